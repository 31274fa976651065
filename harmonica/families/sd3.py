"""The SD3/SD3.5 family: `SD3Transformer2DModel` in `StableDiffusion3Pipeline`, its VAE `AutoencoderKL`.

Block adapter: `JointTransformerBlock` (diffusers models/attention.py), the MMDiT block. Image stream
x (B, N, D) and text stream c (B, M, D). Units, in execution order:
- `attn`: the joint attention over both streams' modulated tokens; it feeds x (gate_msa) and c
  (c_gate_msa) and its slot holds both outputs. The last block (`context_pre_only`) updates no text:
  its `attn` feeds x only and it has no `ff_context`;
- `attn2` (SD3.5's dual attention, `use_dual_attention`): image-only self-attention over the block
  input's LayerNorm with its own modulation and gate;
- `ff`: the image MLP; `ff_context`: the text MLP.
The adaLN linears (temb -> shifts, scales, gates) always run; a unit's body is its norm, modulation and
attention/MLP. Per-sample ops only: CFG's cond and uncond halves share a batch (and each slot) unmixed.

Task: latents (B, C, h, w), joint embeddings and pooled, timestep t. Prompts: prompt_embeds, pooled_prompt_embeds
and the negative pair (1, ...).
"""

import torch

from .. import adapters
from ..adapters import Adapter
from ..flow import FlowTask
from ..solvers import FlowMatchSchedule
from . import TINY_KL, Family, FlowModel, Preset, register

TRANSFORMER, PIPELINE = "SD3Transformer2DModel", "StableDiffusion3Pipeline"


def _modulate(norm, x, shift, scale):
    """norm(x) * (1 + scale) + shift, with shift and scale (B, D) over the tokens of x (B, N, D)."""
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def joint_attention(block, x, c, image_mod, text_mod, kwargs):
    """Unit attn: attention over the modulated image x (B, N, D) and text c (B, M, D) tokens together.
    image_mod, text_mod: (shift, scale) each (B, D). Returns ((B, N, D), (B, M, D)), or the image's
    (B, N, D) alone in the last block (`context_pre_only`)."""
    image, text = block.attn(hidden_states=_modulate(block.norm1.norm, x, *image_mod),
                             encoder_hidden_states=_modulate(block.norm1_context.norm, c, *text_mod), **kwargs)
    return image if block.context_pre_only else (image, text)


def dual_attention(block, x, shift, scale, kwargs):
    """Unit attn2: self-attention over the LayerNorm of the block input x (B, N, D) modulated by shift,
    scale (B, D). Returns (B, N, D)."""
    return block.attn2(hidden_states=_modulate(block.norm1.norm, x, shift, scale), **kwargs)


def image_mlp(block, x, shift, scale):
    """Unit ff: the MLP of the modulated LayerNorm of x (B, N, D); shift, scale (B, D). Returns (B, N, D)."""
    return block.ff(_modulate(block.norm2, x, shift, scale))


def text_mlp(block, c, shift, scale):
    """Unit ff_context: the text MLP of c (B, M, D); shift, scale (B, D). Returns (B, M, D)."""
    return block.ff_context(_modulate(block.norm2_context, c, shift, scale))


class JointBlockAdapter(Adapter):
    block_class = "JointTransformerBlock"
    kinds = ("attn", "attn2", "ff", "ff_context")
    bodies = {"attn": joint_attention, "attn2": dual_attention, "ff": image_mlp, "ff_context": text_mlp}

    @classmethod
    def check(cls, name: str, block) -> None:
        if block._chunk_size is not None:
            raise ValueError(f"{name}: expected an SD3 block without feed-forward chunking, got chunk size "
                             f"{block._chunk_size} (enable_forward_chunking)")

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb,
                joint_attention_kwargs=None):
        """diffusers' `JointTransformerBlock.forward` unit by unit. Returns (text, image) as diffusers does:
        text None after the last block."""
        kwargs = joint_attention_kwargs or {}
        x, c = hidden_states, encoder_hidden_states
        image_mod = block.norm1.linear(block.norm1.silu(temb)).chunk(9 if block.use_dual_attention else 6, dim=1)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = image_mod[:6]
        norm1_context = block.norm1_context
        text_mod = norm1_context.linear(norm1_context.silu(temb).to(c.dtype) if block.context_pre_only
                                        else norm1_context.silu(temb))
        if block.context_pre_only:
            c_scale, c_shift = text_mod.chunk(2, dim=1)
            gates, streams = gate, x
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = text_mod.chunk(6, dim=1)
            gates, streams = (gate, c_gate), (x, c)
        bodies = engine.bodies[self.block_class]
        updated = engine.run_unit(index["attn"], lambda: bodies["attn"](block, x, c, (shift, scale), (c_shift, c_scale),
                                                                        kwargs), gates, streams)
        x, c = (updated, c) if block.context_pre_only else updated
        if block.use_dual_attention:
            shift2, scale2, gate2 = image_mod[6:]
            x = engine.run_unit(index["attn2"], lambda: bodies["attn2"](block, hidden_states, shift2, scale2, kwargs),
                                gate2, x)
        x = engine.run_unit(index["ff"], lambda: bodies["ff"](block, x, shift_mlp, scale_mlp), gate_mlp, x)
        if block.context_pre_only:
            return None, x
        c = engine.run_unit(index["ff_context"], lambda: bodies["ff_context"](block, c, c_shift_mlp, c_scale_mlp),
                            c_gate_mlp, c)
        return c, x


adapters.register(JointBlockAdapter)


class SD3Task(FlowTask):
    prompt_keys = ("prompt_embeds", "pooled_prompt_embeds")
    negative_keys = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")

    def _inputs(self, prompts, device):
        return {"encoder_hidden_states": prompts["prompt_embeds"],
                "pooled_projections": prompts["pooled_prompt_embeds"]}


def encode(pipe, prompts, negative, extra):
    """The pipeline's `encode_prompt` of the prompts and the negative prompt (default ""), with CFG."""
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=True, negative_prompt="" if negative is None else negative,
        **extra)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative_embeds[:1],
            "negative_pooled_prompt_embeds": negative_pooled[:1]}


def example_inputs(cfg, batch, h, w, text, frames):
    """One forward's meta inputs: latents (B, C, h, w), text (B, L, D) and pooled (B, P)."""
    return {"hidden_states": torch.empty(batch, cfg.in_channels, h, w, device="meta"), "encoder_hidden_states": text,
            "timestep": torch.zeros(batch, device="meta"),
            "pooled_projections": torch.empty(batch, cfg.pooled_projection_dim, device="meta")}


# stabilityai/stable-diffusion-3.5-large's scheduler_config.json, transcribed; the pipeline computes mu only under
# dynamic shifting
SCHEDULE = FlowMatchSchedule("sd3.5-large", {"num_train_timesteps": 1000, "shift": 3.0}, mu="dynamic", max_shift=1.16)
# transformer/config.json of the hub repository, transcribed (keys equal to diffusers' defaults left out);
# the pipeline: 77 CLIP tokens and the T5 prompt padded to max_sequence_length 256
MODELS = {"sd3.5-large-1024": FlowModel(TRANSFORMER, {
    "attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 38, "num_layers": 38, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128},
    1024, 1024, 77 + 256, "stabilityai/stable-diffusion-3.5-large")}
TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
        "pooled_projection_dim": 16, "pos_embed_max_size": 16}
# a random VAE 8x like the real one, with its latent scaling and shift
TINY_SD3_VAE = {**TINY_KL, "latent_channels": 4, "scaling_factor": 1.5305, "shift_factor": 0.0609}
# (steps, guidance): the pipeline's __call__ defaults; tiny-sd35: SD3.5's dual attention and qk norm
PRESETS = {"sd3.5-large": Preset.of(MODELS["sd3.5-large-1024"], 28, 7.0),
           "tiny-sd3": Preset(TRANSFORMER, TINY, 64, 64, 8, 28, 7.0, vae=TINY_SD3_VAE),
           "tiny-sd35": Preset(TRANSFORMER, {**TINY, "dual_attention_layers": (0,), "qk_norm": "rms_norm"},
                                   64, 64, 8, 28, 7.0, vae=TINY_SD3_VAE)}

FAMILY = register(Family(
    "sd3", TRANSFORMER, PIPELINE, "AutoencoderKL", SD3Task, SCHEDULE, encode, example_inputs, MODELS, PRESETS,
    # cache-dit 1.5.3 takes this transformer only through its "StableDiffusion3" pipeline adapter
    cache_dit=("transformer_blocks", "Pattern_1"),
    # diffusers 0.42: a TypeError in its hook
    first_block_cache="not a CacheMixin; its last block returns no text stream, which the hook subtracts"))
