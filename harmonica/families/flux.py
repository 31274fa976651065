"""The FLUX.1 family: `FluxTransformer2DModel` in `FluxPipeline`, its VAE `AutoencoderKL`.

Block adapters (diffusers transformer_flux.py): `FluxTransformerBlock` (`transformer_blocks`): image stream x
(B, N, D) and text stream c (B, M, D). Units, in execution order: the joint attention `attn` (one unit feeding
both streams, each with its adaLN gate; its slot holds both outputs), the image MLP `ff` and the text MLP
`ff_context`. `FluxSingleTransformerBlock` (`single_transformer_blocks`): one stream, the text and image tokens
concatenated (B, M + N, D); one unit `attn_mlp`, the parallel attention and MLP through `proj_out`. The adaLN
linears (temb -> shift, scale, gate) always run; a unit's body is its norm, modulation and attention/MLP.

Task: packed latents (B, h/2 w/2, 4C), T5 embeddings (B, L, D), pooled CLIP (B, P), img_ids / txt_ids, timestep
sigma (t / 1000) and the distilled guidance value as an input; no unconditional half. Prompts: prompt_embeds
(P, L, D), pooled_prompt_embeds (P, D'); no negative prompt.
"""

import torch

from .. import adapters
from ..adapters import Adapter
from ..flow import VAE_FACTOR, FlowTask
from ..solvers import FlowMatchSchedule
from . import TINY_KL, Family, FlowModel, Preset, register

TRANSFORMER, PIPELINE = "FluxTransformer2DModel", "FluxPipeline"


def _modulate(norm, x, shift, scale):
    """norm(x) * (1 + scale) + shift, with shift and scale (B, D) over the tokens of x (B, N, D)."""
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def joint_attention(block, x, c, image_mod, text_mod, image_rotary_emb, kwargs):
    """Unit attn: attention over the modulated image x (B, N, D) and text c (B, M, D) tokens together.
    image_mod, text_mod: (shift, scale) each (B, D). Returns ((B, N, D), (B, M, D))."""
    outputs = block.attn(hidden_states=_modulate(block.norm1.norm, x, *image_mod),
                         encoder_hidden_states=_modulate(block.norm1_context.norm, c, *text_mod),
                         image_rotary_emb=image_rotary_emb, **kwargs)
    if len(outputs) != 2:
        raise ValueError(f"joint_attention_kwargs: expected no IP-Adapter inputs, got {len(outputs)} attention outputs")
    return outputs


def image_mlp(block, x, shift, scale):
    """Unit ff: the MLP of the modulated LayerNorm of x (B, N, D); shift, scale (B, D). Returns (B, N, D)."""
    return block.ff(_modulate(block.norm2, x, shift, scale))


def text_mlp(block, c, shift, scale):
    """Unit ff_context: the text MLP of c (B, M, D); shift, scale (B, D). Returns (B, M, D)."""
    return block.ff_context(_modulate(block.norm2_context, c, shift, scale))


def _clip_fp16(x):
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def double_stream_units(engine, bodies, block, index, x, c, image_mods, text_mods, *attention_args):
    """The three units of a double-stream block (FLUX.1's, FLUX.2's, HunyuanVideo 1.5's): the joint attention over
    image x (B, N, D) and text c (B, M, D), then each stream's MLP. image_mods, text_mods: ((shift, scale, gate) of
    the attention, (shift, scale, gate) of the MLP), each (B, D); attention_args: the attention body's last
    arguments (FLUX: rotary embedding and attention kwargs). Returns (x, c) updated."""
    (shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp) = image_mods
    (c_shift, c_scale, c_gate), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = text_mods
    x, c = engine.run_unit(index["attn"], lambda: bodies["attn"](block, x, c, (shift, scale), (c_shift, c_scale),
                                                                 *attention_args), (gate, c_gate), (x, c))
    x = engine.run_unit(index["ff"], lambda: bodies["ff"](block, x, shift_mlp, scale_mlp), gate_mlp, x)
    c = engine.run_unit(index["ff_context"], lambda: bodies["ff_context"](block, c, c_shift_mlp, c_scale_mlp),
                        c_gate_mlp, c)
    return x, c


class FluxBlockAdapter(Adapter):
    block_class = "FluxTransformerBlock"
    kinds = ("attn", "ff", "ff_context")
    bodies = {"attn": joint_attention, "ff": image_mlp, "ff_context": text_mlp}

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb,
                image_rotary_emb=None, joint_attention_kwargs=None):
        """diffusers' `FluxTransformerBlock.forward` unit by unit. Returns (text, image) as diffusers does."""
        image = block.norm1.linear(block.norm1.silu(temb)).chunk(6, dim=1)
        text = block.norm1_context.linear(block.norm1_context.silu(temb)).chunk(6, dim=1)
        x, c = double_stream_units(engine, engine.bodies[self.block_class], block, index, hidden_states,
                                   encoder_hidden_states, (image[:3], image[3:]), (text[:3], text[3:]),
                                   image_rotary_emb, joint_attention_kwargs or {})
        return _clip_fp16(c), x


def parallel_attention_mlp(block, h, shift, scale, image_rotary_emb, kwargs):
    """Unit attn_mlp: proj_out of the attention and the MLP of the modulated LayerNorm of h (B, L, D)
    side by side; shift, scale (B, D). Returns (B, L, D)."""
    normed = _modulate(block.norm.norm, h, shift, scale)
    mlp = block.act_mlp(block.proj_mlp(normed))
    attention = block.attn(hidden_states=normed, image_rotary_emb=image_rotary_emb, **kwargs)
    return block.proj_out(torch.cat([attention, mlp], dim=2))


class FluxSingleBlockAdapter(Adapter):
    block_class = "FluxSingleTransformerBlock"
    kinds = ("attn_mlp",)
    bodies = {"attn_mlp": parallel_attention_mlp}

    @classmethod
    def units(cls, block, *, cross_attention: bool = True) -> list:
        return [("attn_mlp", ("attn", "proj_mlp", "proj_out"))]

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb,
                image_rotary_emb=None, joint_attention_kwargs=None):
        """diffusers' `FluxSingleTransformerBlock.forward` as one unit. Returns (text, image)."""
        kwargs = joint_attention_kwargs or {}
        text_tokens = encoder_hidden_states.shape[1]
        h = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        shift, scale, gate = block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)
        body = engine.bodies[self.block_class]["attn_mlp"]
        h = _clip_fp16(engine.run_unit(index["attn_mlp"], lambda: body(block, h, shift, scale, image_rotary_emb,
                                                                        kwargs), gate, h))
        return h[:, :text_tokens], h[:, text_tokens:]


adapters.register(FluxBlockAdapter)
adapters.register(FluxSingleBlockAdapter)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's packing of latents (B, C, h, w) into tokens of 2 x 2 patches (B, h/2 w/2, 4C)."""
    import diffusers

    batch, channels, h, w = latents.shape
    return getattr(diffusers, PIPELINE)._pack_latents(latents, batch, channels, h, w)


def unpack(latents: torch.Tensor, height: int, width: int, vae_factor: int = VAE_FACTOR) -> torch.Tensor:
    """The pipeline's unpacking of tokens (B, h/2 w/2, 4C) into latents (B, C, h, w), h = height / vae_factor."""
    import diffusers

    return getattr(diffusers, PIPELINE)._unpack_latents(latents, height, width, vae_factor)


class FluxTask(FlowTask):
    packed, cfg = True, False
    prompt_keys, negative_keys = ("prompt_embeds", "pooled_prompt_embeds"), ()

    def _timestep_input(self, t):
        return t.to(self.transformer.dtype) / 1000

    def _inputs(self, prompts, device):
        import diffusers

        dtype, embeds = self.transformer.dtype, prompts["prompt_embeds"]
        rows = embeds.shape[0]
        ids = getattr(diffusers, PIPELINE)._prepare_latent_image_ids(
            rows, self.height // VAE_FACTOR // 2, self.width // VAE_FACTOR // 2, device, dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance, device=device, dtype=torch.float32).expand(rows)
        return {"guidance": guidance, "encoder_hidden_states": embeds,
                "pooled_projections": prompts["pooled_prompt_embeds"], "img_ids": ids,
                "txt_ids": torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)}

    def unpack(self, latents):
        return unpack(latents, self.height, self.width)


def refuse_negative(pipe, negative) -> None:
    """A ValueError for a negative prompt: the pipeline's guidance is distilled into the model (FLUX.1, FLUX.2)."""
    if negative is not None:
        raise ValueError(f"negative_prompt: expected none for {type(pipe).__name__} (its guidance is distilled into "
                         f"the model: no unconditional pass), got {negative!r}")


def encode(pipe, prompts, negative, extra):
    """The pipeline's `encode_prompt`: T5 embeddings and pooled CLIP; a negative prompt is an error."""
    refuse_negative(pipe, negative)
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, **extra)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def example_inputs(cfg, batch, h, w, text, frames):
    """One forward's meta inputs: packed latents (B, h/2 w/2, C) of latent h x w, text (B, L, D), pooled, ids and
    the guidance input where the config embeds one."""
    tokens = (h // 2) * (w // 2)
    return {"hidden_states": torch.empty(batch, tokens, cfg.in_channels, device="meta"),
            "encoder_hidden_states": text, "timestep": torch.zeros(batch, device="meta"),
            "img_ids": torch.zeros(tokens, 3, device="meta"), "txt_ids": torch.zeros(text.shape[1], 3, device="meta"),
            "pooled_projections": torch.empty(batch, cfg.pooled_projection_dim, device="meta"),
            "guidance": torch.zeros(batch, device="meta") if cfg.guidance_embeds else None}


# black-forest-labs/FLUX.1-dev's scheduler_config.json, transcribed; the pipeline passes custom sigmas and always mu
SCHEDULE = FlowMatchSchedule("flux.1-dev", {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}, custom_sigmas=True, mu="always",
    max_shift=1.15)
# transformer/config.json of the hub repository, transcribed (keys equal to diffusers' defaults left out);
# the pipeline pads the T5 prompt to max_sequence_length 512
MODELS = {"flux.1-dev-1024": FlowModel(TRANSFORMER, {
    "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
    "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56)}, 1024, 1024, 512, "black-forest-labs/FLUX.1-dev")}
TINY = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
        "axes_dims_rope": (2, 2, 4)}
# a random VAE 8x like the real one, with its latent scaling and shift
TINY_FLUX_VAE = {**TINY_KL, "latent_channels": 4, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# (steps, guidance): the pipeline's __call__ defaults (the distilled guidance input 3.5)
PRESETS = {"flux.1-dev": Preset.of(MODELS["flux.1-dev-1024"], 28, 3.5),
           "tiny-flux": Preset(TRANSFORMER, TINY, 64, 64, 8, 28, 3.5, vae=TINY_FLUX_VAE)}

FAMILY = register(Family("flux.1", TRANSFORMER, PIPELINE, "AutoencoderKL", FluxTask, SCHEDULE, encode,
                         example_inputs, MODELS, PRESETS))
