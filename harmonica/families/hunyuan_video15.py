"""The HunyuanVideo 1.5 family: `HunyuanVideo15Transformer3DModel` in `HunyuanVideo15Pipeline`, its VAE
`AutoencoderKLHunyuanVideo15` (16x spatially, 4x in time).

Block adapter: `HunyuanVideo15TransformerBlock` (diffusers transformer_hunyuan_video15.py), the transformer's only
blocks (`transformer_blocks`, 54 of them: double-stream all along, no single-stream blocks). Image stream x (B, N, D)
and text stream c (B, M, D); units, in execution order: the joint attention `attn` (one unit feeding both streams,
each with its adaLN gate; its slot holds both outputs), the image MLP `ff` and the text MLP `ff_context`. Each
stream's adaLN-Zero (`norm1`, `norm1_context`: temb -> shift, scale, gate of both units, (B, D) each) always runs; a
unit's body is its LayerNorm, modulation and attention/MLP, as FLUX.1's. The attention takes the text tokens' mask
(B, M) (the padding of each prompt); the block returns (image, text).

The transformer's forward joins three text streams before the blocks, each sample's valid tokens first: the 729
SigLIP image tokens (zeros for text-to-video, all masked), the ByT5 glyph tokens (256) and the Qwen2.5-VL tokens
(1000), which its token refiner embeds. These steps are data-dependent (`if` on a tensor, boolean indexing): MAC
counting runs them on meta tensors under `MetaMasks`. A CUDA graph cannot capture them: while an engine is enabled
on the transformer (from `setup` to `teardown`) its forward is `capturable_forward`, diffusers' with the `if` made a
`where` and the per-sample boolean indexing a stable sort of the tokens on validity (`joined_text`), bitwise the same.

Task: video latents (B, C, F, h, w) of 4 n + 1 frames at 1/16 of the pixels, with the pipeline's text-to-video
conditioning channels (zeros: C more and a mask channel, the forward's in_channels 2 C + 1), zero image embeddings,
timestep t. The pipeline runs the CFG halves as two forwards (its guider, `v_u + s (v_c - v_u)`); one CFG batch
computes the same. Prompts: the pipeline's `encode_prompt` outputs prompt_embeds (P, 1000, D), prompt_embeds_mask,
prompt_embeds_2 (P, 256, D2) (ByT5, zeros unless the prompt quotes text), prompt_embeds_mask_2 and the negative
four. Not supported, refused: image-to-video transformers (`task_type` "i2v": the task has no image to condition on).
"""

import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import adapters, parallel
from ..adapters import Adapter
from ..flow import FlowTask
from ..solvers import FlowMatchSchedule
from . import Family, FlowModel, Preset, register
from .flux import _modulate, double_stream_units, image_mlp, text_mlp

TRANSFORMER, PIPELINE = "HunyuanVideo15Transformer3DModel", "HunyuanVideo15Pipeline"
VAE_FACTOR, FRAME_FACTOR = 16, 4  # the VAE's spatial and temporal compression
IMAGE_TOKENS, GLYPH_TOKENS = 729, 256  # the pipeline's vision_num_semantic_tokens and tokenizer_2_max_length
NAMES = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")


def joint_attention(block, x, c, image_mod, text_mod, text_mask, freqs_cis):
    """Unit attn: attention over the modulated image x (B, N, D) and text c (B, M, D) tokens together, the text
    tokens masked by text_mask (B, M). image_mod, text_mod: (shift, scale) each (B, D). Returns ((B, N, D),
    (B, M, D))."""
    return block.attn(hidden_states=_modulate(block.norm1.norm, x, *image_mod),
                      encoder_hidden_states=_modulate(block.norm1_context.norm, c, *text_mod),
                      attention_mask=text_mask, image_rotary_emb=freqs_cis)


def joined_text(text, text_mask, glyphs, glyph_mask, image, image_mask):
    """The forward's text stream without host syncs: each sample's valid image (B, I, D), ByT5 (B, G, D) and
    Qwen2.5-VL (B, L, D) tokens first, in this order, then the invalid ones in the same order (ByT5's and Qwen's
    zeroed), by a stable sort on validity. Masks (B, I), (B, G), (B, L) bool. Returns ((B, I + G + L, D), its mask)."""
    tokens = torch.cat([image, glyphs.where(glyph_mask[..., None], 0), text.where(text_mask[..., None], 0)], dim=1)
    mask = torch.cat([image_mask, glyph_mask, text_mask], dim=1)
    order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)
    return tokens.gather(1, order[..., None].expand_as(tokens)), mask.gather(1, order)


def capturable_forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, timestep_r=None,
                       encoder_hidden_states_2=None, encoder_attention_mask_2=None, image_embeds=None,
                       attention_kwargs=None, return_dict=True):
    """diffusers' forward (inference), its text-stream join without host syncs: the `if` on all-zero image
    embeddings (text-to-video: image tokens times 0, all masked) a `where`, the boolean indexing `joined_text`.
    hidden_states (B, 2C + 1, F, h, w) -> sample (B, C, F, h, w)."""
    batch, _, frames, height, width = hidden_states.shape
    p_t, p = self.config.patch_size_t, self.config.patch_size
    rotary, temb = self.rope(hidden_states), self.time_embed(timestep, timestep_r=timestep_r)
    x = self.x_embedder(hidden_states)
    text = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    text = text + self.cond_type_embed(torch.zeros_like(text[:, :, 0], dtype=torch.long))
    glyphs = self.context_embedder_2(encoder_hidden_states_2)
    glyphs = glyphs + self.cond_type_embed(torch.ones_like(glyphs[:, :, 0], dtype=torch.long))
    image = self.image_embedder(image_embeds)
    t2v = torch.all(image_embeds == 0)
    image = torch.where(t2v, image * 0.0, image)
    image = image + self.cond_type_embed(2 * torch.ones_like(image[:, :, 0], dtype=torch.long))
    c, mask = joined_text(text, encoder_attention_mask.bool(), glyphs, encoder_attention_mask_2.bool(), image,
                          (~t2v).expand(batch, image.shape[1]))
    for block in self.transformer_blocks:
        x, c = block(x, c, temb, mask, rotary)
    x = self.proj_out(self.norm_out(x, temb))
    x = x.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    x = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    if not return_dict:
        return (x,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput  # importing harmonica loads no diffusers
    return Transformer2DModelOutput(sample=x)


class HunyuanVideo15BlockAdapter(Adapter):
    block_class = "HunyuanVideo15TransformerBlock"
    kinds = ("attn", "ff", "ff_context")
    bodies = {"attn": joint_attention, "ff": image_mlp, "ff_context": text_mlp}

    def setup(self, engine, blocks: list) -> None:
        """The transformer's forward becomes `capturable_forward`, under diffusers' LoRA scaling as its own is."""
        from diffusers.utils import apply_lora_scale  # here, not at import: importing harmonica loads no diffusers
        forward = apply_lora_scale("attention_kwargs")(capturable_forward)
        with parallel.lifted_hooks(engine.transformer):  # diffusers' hooks stay outermost
            self.own_forward = vars(engine.transformer).get("forward")  # the instance's own; None: the class's
            engine.transformer.forward = types.MethodType(forward, engine.transformer)

    def teardown(self, engine, blocks: list) -> None:
        with parallel.lifted_hooks(engine.transformer):
            if self.own_forward is None:
                del engine.transformer.forward  # back to diffusers'
            else:
                engine.transformer.forward = self.own_forward
        self.own_forward = None

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb,
                attention_mask=None, freqs_cis=None):
        """diffusers' `HunyuanVideo15TransformerBlock.forward` unit by unit. Returns (image, text) as diffusers does."""
        image = block.norm1.linear(block.norm1.silu(temb)).chunk(6, dim=1)
        text = block.norm1_context.linear(block.norm1_context.silu(temb)).chunk(6, dim=1)
        return double_stream_units(engine, engine.bodies[self.block_class], block, index, hidden_states,
                                   encoder_hidden_states, (image[:3], image[3:]), (text[:3], text[3:]),
                                   attention_mask, freqs_cis)


adapters.register(HunyuanVideo15BlockAdapter)


class MetaMasks(TorchDispatchMode):
    """The forward's data-dependent steps on meta tensors, for MAC counting: a meta tensor's truth value is True (the
    image embeddings are all zero: text-to-video), a meta boolean mask selects every token and its negation none.
    Every token is computed whatever the masks say, so the MACs are the forward's."""

    def __init__(self):
        super().__init__()
        self.negated = {}  # id -> a mask made by negating a mask (held: one forward's), which selects no token

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if not (isinstance(first, torch.Tensor) and first.is_meta):
            return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return True
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            (mask,) = args[1]
            return first.new_empty((0 if id(mask) in self.negated else mask.shape[0], *first.shape[1:]))
        out = func(*args, **kwargs)
        if func is torch.ops.aten.bitwise_not.default and first.dtype == torch.bool:
            self.negated[id(out)] = out
        return out


class HunyuanVideo15Task(FlowTask):
    text_dim = "text_embed_dim"
    text_dims = {"prompt_embeds_2": "text_embed_2_dim"}
    prompt_keys = NAMES
    negative_keys = tuple(f"negative_{name}" for name in NAMES)

    def __init__(self, transformer, *args, **kwargs):
        cfg = transformer.config
        if cfg.task_type != "t2v":
            raise ValueError(f"task_type: expected 't2v' for {TRANSFORMER} (image-to-video conditioning is not "
                             f"supported by harmonica), got {cfg.task_type!r}")
        if cfg.in_channels != 2 * cfg.out_channels + 1:
            raise ValueError(f"in_channels: expected 2 out_channels + 1 = {2 * cfg.out_channels + 1} for {TRANSFORMER} "
                             f"(latents, condition latents and mask), got {cfg.in_channels}")
        super().__init__(transformer, *args, **kwargs)

    def _latent_shape(self, cfg):
        _, h, w = super()._latent_shape(cfg)
        return (cfg.out_channels, FAMILY.latent_frames(self.frames), h, w)

    @property
    def image_seq_len(self):
        return None  # the pipeline passes its sigmas without mu

    def _timestep_input(self, t):
        return t.to(self.transformer.dtype)

    def prepare(self, cond, device):
        """`FlowTask.prepare`'s inputs and "condition": text-to-video's zero condition latents (C) and mask (1),
        (R, C + 1, F, h, w)."""
        inputs = super().prepare(cond, device)
        channels, *rest = self.latent_shape
        rows = inputs["kwargs"]["encoder_hidden_states"].shape[0]
        return {**inputs, "condition": torch.zeros(rows, channels + 1, *rest, device=device,
                                                   dtype=self.transformer.dtype)}

    def _inputs(self, prompts, device):
        rows, cfg = prompts["prompt_embeds"].shape[0], self.transformer.config
        image = torch.zeros(rows, IMAGE_TOKENS, cfg.image_embed_dim, device=device, dtype=self.transformer.dtype)
        return {"encoder_hidden_states": prompts["prompt_embeds"],
                "encoder_attention_mask": prompts["prompt_embeds_mask"],
                "encoder_hidden_states_2": prompts["prompt_embeds_2"],
                "encoder_attention_mask_2": prompts["prompt_embeds_mask_2"], "image_embeds": image}

    def _step_inputs(self, model_in, t, inputs):
        """The pipeline's latent_model_input (R, 2C + 1, F, h, w): the latents, then the condition."""
        return {"hidden_states": torch.cat([model_in, inputs["condition"]], dim=1), "timestep": t}

    def _vae_latents(self, vae, latents):
        return latents / vae.config.scaling_factor


def encode(pipe, prompts, negative, extra):
    """The pipeline's `encode_prompt` of the prompts and of the negative prompt (default ""): Qwen2.5-VL hidden states
    (P, 1000, D) and ByT5 glyph embeddings (P, 256, D2), each with its mask."""
    if extra:
        raise ValueError(f"max_sequence_length: expected none for {PIPELINE} (its encode_prompt pads to 1000 and 256 "
                         f"tokens), got {extra['max_sequence_length']}")
    tensors = dict(zip(NAMES, pipe.encode_prompt(prompts), strict=True))
    negatives = pipe.encode_prompt(["" if negative is None else negative])
    return {**tensors, **{f"negative_{name}": value for name, value in zip(NAMES, negatives, strict=True)}}


def example_inputs(cfg, batch, h, w, text, frames):
    """One forward's meta inputs: video latents (B, 2C + 1, F, h, w) of `frames` frames, text (B, L, D) with its
    mask, the ByT5 tokens and zero image embeddings (run under `MetaMasks`)."""
    meta = dict(device="meta")
    latents = torch.empty(batch, cfg.in_channels, FAMILY.latent_frames(frames), h, w, **meta)
    return {"hidden_states": latents, "timestep": torch.zeros(batch, **meta), "encoder_hidden_states": text,
            "encoder_attention_mask": torch.ones(batch, text.shape[1], **meta),
            "encoder_hidden_states_2": torch.empty(batch, GLYPH_TOKENS, cfg.text_embed_2_dim, **meta),
            "encoder_attention_mask_2": torch.ones(batch, GLYPH_TOKENS, **meta),
            "image_embeds": torch.zeros(batch, IMAGE_TOKENS, cfg.image_embed_dim, **meta)}


# diffusers' (0.42) scripts/convert_hunyuan_video1_5_to_diffusers.py, "480p_t2v": the scheduler is
# FlowMatchEulerDiscreteScheduler(shift=5.0), the guider ClassifierFreeGuidance(guidance_scale=6.0); the pipeline
# passes sigmas numpy's linspace(1, 0, T + 1)[:-1], no mu
SCHEDULE = FlowMatchSchedule("hunyuanvideo-1.5-480p-t2v", {"num_train_timesteps": 1000, "shift": 5.0},
                             custom_sigmas=True, to_zero=True)
# the same script's TRANSFORMER_CONFIGS["480p_t2v"], transcribed (keys equal to the class's defaults left out:
# out_channels 32, 16 heads of 128, 54 layers, 2 refiner layers, mlp_ratio 4, patch 1, text widths 3584 and 1472,
# image 1152, rope (16, 56, 56), target_size 640); the pipeline's default size for target_size 640 at 16:9 is
# 480 x 848 (its `calculate_default_height_width`), 121 frames; its Qwen2.5-VL prompt is 1000 tokens
MODELS = {"hunyuan-video15-480p-t2v": FlowModel(TRANSFORMER, {"task_type": "t2v"}, 480, 848, 1000,
                                                "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v", frames=121)}
TINY = {"in_channels": 9, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
        "num_refiner_layers": 1, "mlp_ratio": 2.0, "text_embed_dim": 16, "text_embed_2_dim": 12,
        "image_embed_dim": 8, "rope_axes_dim": (2, 2, 4), "target_size": 32, "task_type": "t2v"}
# a random VAE 16x like the real one (4 latent channels), with its latent scaling
TINY_VAE = {"latent_channels": 4, "block_out_channels": (8, 8, 8, 8, 8), "layers_per_block": 1}
# (steps, guidance): the pipeline's __call__ defaults (50 steps, 121 frames) and the 480p t2v guider's scale
PRESETS = {"hunyuan-video15-480p": Preset.of(MODELS["hunyuan-video15-480p-t2v"], 50, 6.0),
           "tiny-hunyuan-video15": Preset(TRANSFORMER, TINY, 32, 48, 8, 50, 6.0, frames=5, vae=TINY_VAE)}

FAMILY = register(Family(
    "hunyuan-video1.5", TRANSFORMER, PIPELINE, "AutoencoderKLHunyuanVideo15", HunyuanVideo15Task, SCHEDULE, encode,
    example_inputs, MODELS, PRESETS,
    # diffusers 0.42.1: its hooks' TransformerBlockRegistry has no entry for this block class
    first_block_cache="its block class is not in diffusers' TransformerBlockRegistry (the hook cannot read it)",
    frame_factor=FRAME_FACTOR, vae_factor=VAE_FACTOR, meta_mode=MetaMasks))
