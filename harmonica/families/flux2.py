"""The FLUX.2 family: `Flux2Transformer2DModel` in `Flux2Pipeline`, its VAE `AutoencoderKLFlux2`.

Block adapters (diffusers transformer_flux2.py). Unlike FLUX.1, the transformer computes the adaLN modulations
once per forward (`double_stream_modulation_img` / `_txt`: temb -> (B, 6D) each, `single_stream_modulation`:
temb -> (B, 3D)) and passes them to every block, which only splits them into shifts, scales and gates (B, D);
no linear has a bias, the LayerNorms have no affine and the MLPs are SwiGLU.
- `Flux2TransformerBlock` (`transformer_blocks`): image stream x (B, N, D) and text stream c (B, M, D). Units, in
  execution order: the joint attention `attn` (one unit feeding both streams, each with its gate; its slot holds
  both outputs), the image MLP `ff` and the text MLP `ff_context`.
- `Flux2SingleTransformerBlock` (`single_transformer_blocks`): one stream, the text and image tokens concatenated
  (B, M + N, D) by the transformer before the first single block. One unit `attn_mlp`: its `attn` module
  (a parallel block) projects the tokens to q, k, v and the MLP input in one fused linear, and the attention and
  MLP outputs back in one fused linear.
A unit's body is its LayerNorm, modulation and attention/MLP. Not supported, refused in the block: the reference-
image KV cache of FLUX.2 Klein's KV pipeline (`kv_cache_mode`, with per-token modulations).

Task: packed latents (B, h/2 w/2, 4C) (the pipeline draws its noise as 2 x 2 patches of the VAE's C channels),
Mistral embeddings (B, L, D), 4-axis position ids of the image tokens (0, row, column, 0) and the text tokens
(0, 0, 0, position), timestep sigma (t / 1000) and the distilled guidance value as an input; no unconditional
half. Its mu is the pipeline's own fit in the image tokens and the step count. Decode: the patches unpacked,
denormalised with the VAE's BatchNorm statistics, unpatchified. Prompts: prompt_embeds (P, L, D); no negative prompt.
"""

import torch

from .. import adapters
from ..adapters import Adapter
from ..flow import VAE_FACTOR, FlowTask
from ..solvers import FlowMatchSchedule
from . import TINY_VAE, Family, FlowModel, Preset, register
from .flux import SCHEDULE as FLUX1_SCHEDULE
from .flux import _clip_fp16, _modulate, double_stream_units, image_mlp, refuse_negative, text_mlp

TRANSFORMER, PIPELINE = "Flux2Transformer2DModel", "Flux2Pipeline"


def _attention_kwargs(joint_attention_kwargs) -> dict:
    """The block's attention kwargs; a ValueError for Klein's reference-image KV cache."""
    kwargs = joint_attention_kwargs or {}
    if kwargs.get("kv_cache_mode") is not None:
        raise ValueError(f"kv_cache_mode: expected None (FLUX.2 Klein's reference-image KV cache is not supported by "
                         f"harmonica), got {kwargs['kv_cache_mode']!r}")
    return kwargs


def _modulations(mod, sets: int) -> tuple:
    """(shift, scale, gate) of each of `sets` units, each (B, D), from the transformer's modulation (B, 3 sets D)."""
    if mod.dim() != 2:
        raise ValueError(f"temb_mod: expected one modulation per sample (B, {3 * sets} D), got shape "
                         f"{tuple(mod.shape)} (per-token modulations are not supported by harmonica)")
    chunks = mod.chunk(3 * sets, dim=1)
    return tuple(chunks[3 * i:3 * i + 3] for i in range(sets))


def joint_attention(block, x, c, image_mod, text_mod, image_rotary_emb, kwargs):
    """Unit attn: attention over the modulated image x (B, N, D) and text c (B, M, D) tokens together.
    image_mod, text_mod: (shift, scale) each (B, D). Returns ((B, N, D), (B, M, D))."""
    return block.attn(hidden_states=_modulate(block.norm1, x, *image_mod),
                      encoder_hidden_states=_modulate(block.norm1_context, c, *text_mod),
                      image_rotary_emb=image_rotary_emb, **kwargs)


class Flux2BlockAdapter(Adapter):
    block_class = "Flux2TransformerBlock"
    kinds = ("attn", "ff", "ff_context")
    bodies = {"attn": joint_attention, "ff": image_mlp, "ff_context": text_mlp}

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb_mod_img,
                temb_mod_txt, image_rotary_emb=None, joint_attention_kwargs=None):
        """diffusers' `Flux2TransformerBlock.forward` unit by unit. Returns (text, image) as diffusers does."""
        kwargs = _attention_kwargs(joint_attention_kwargs)  # first: a refused KV-cache mode is the error to report
        x, c = double_stream_units(engine, engine.bodies[self.block_class], block, index, hidden_states,
                                   encoder_hidden_states, _modulations(temb_mod_img, 2), _modulations(temb_mod_txt, 2),
                                   image_rotary_emb, kwargs)
        return _clip_fp16(c), x


def parallel_attention_mlp(block, h, shift, scale, image_rotary_emb, kwargs):
    """Unit attn_mlp: the parallel attention and MLP (one fused input and one fused output projection) of the
    modulated LayerNorm of h (B, L, D); shift, scale (B, D). Returns (B, L, D)."""
    return block.attn(hidden_states=_modulate(block.norm, h, shift, scale), image_rotary_emb=image_rotary_emb,
                      **kwargs)


class Flux2SingleBlockAdapter(Adapter):
    block_class = "Flux2SingleTransformerBlock"
    kinds = ("attn_mlp",)
    bodies = {"attn_mlp": parallel_attention_mlp}

    @classmethod
    def units(cls, block, *, cross_attention: bool = True) -> list:
        return [("attn_mlp", ("attn",))]

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb_mod,
                image_rotary_emb=None, joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):
        """diffusers' `Flux2SingleTransformerBlock.forward` as one unit. hidden_states: the concatenated stream
        (B, M + N, D), or the image's (B, N, D) with encoder_hidden_states (B, M, D). Returns the stream, or
        (text, image) with split_hidden_states, as diffusers does."""
        kwargs = _attention_kwargs(joint_attention_kwargs)
        h = hidden_states
        if encoder_hidden_states is not None:
            text_seq_len = encoder_hidden_states.shape[1]
            h = torch.cat([encoder_hidden_states, h], dim=1)
        ((shift, scale, gate),) = _modulations(temb_mod, 1)
        body = engine.bodies[self.block_class]["attn_mlp"]
        h = _clip_fp16(engine.run_unit(index["attn_mlp"], lambda: body(block, h, shift, scale, image_rotary_emb,
                                                                        kwargs), gate, h))
        return (h[:, :text_seq_len], h[:, text_seq_len:]) if split_hidden_states else h


adapters.register(Flux2BlockAdapter)
adapters.register(Flux2SingleBlockAdapter)


def _pipeline():
    import diffusers

    return getattr(diffusers, PIPELINE)


class Flux2Task(FlowTask):
    packed, cfg = True, False
    prompt_keys, negative_keys = ("prompt_embeds",), ()

    def _image_ids(self, batch: int) -> torch.Tensor:
        """(batch, h/2 w/2, 4) CPU position ids (0, row, column, 0) of the image tokens, the pipeline's (made from
        the patch latents' shape alone: an empty meta tensor stands for them)."""
        side = (self.height // VAE_FACTOR // 2, self.width // VAE_FACTOR // 2)
        return _pipeline()._prepare_latent_ids(torch.empty(batch, 0, *side, device="meta"))

    def _timestep_input(self, t):
        return t.to(self.transformer.dtype) / 1000

    def _inputs(self, prompts, device):
        embeds = prompts["prompt_embeds"]
        guidance = torch.full([1], self.guidance, device=device, dtype=torch.float32).expand(embeds.shape[0])
        return {"guidance": guidance, "encoder_hidden_states": embeds, "img_ids": self._image_ids(1)[0].to(device),
                "txt_ids": _pipeline()._prepare_text_ids(embeds[:1])[0].to(device)}

    def unpack(self, latents):
        """Tokens (B, h/2 w/2, 4C) -> the VAE's latents (B, C, h, w): the pipeline's unpacking, then unpatchified."""
        ids = self._image_ids(latents.shape[0]).to(latents.device)
        return _pipeline()._unpatchify_latents(_pipeline()._unpack_latents_with_ids(latents, ids))

    def _vae_latents(self, vae, latents):
        """The pipeline's denormalisation with the VAE's BatchNorm statistics, which are per channel of the 2 x 2
        patches: latents (B, C, h, w) patchified, denormalised and unpatchified again."""
        pipeline = _pipeline()
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                               latents.dtype)
        return pipeline._unpatchify_latents(pipeline._patchify_latents(latents) * std + mean)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The pipeline's mu (pipeline_flux2.py's `compute_empirical_mu`): Black Forest Labs' fit in the image tokens
    and, up to 4300 tokens, the step count."""
    from diffusers.pipelines.flux2 import pipeline_flux2

    return pipeline_flux2.compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)


def encode(pipe, prompts, negative, extra):
    """The pipeline's `encode_prompt`: the Mistral text encoder's hidden states of three layers side by side per
    token (P, L, 3 x its width; the task rebuilds the text ids); a negative prompt is an error."""
    refuse_negative(pipe, negative)
    embeds, _ = pipe.encode_prompt(prompts, **extra)
    return {"prompt_embeds": embeds}


def example_inputs(cfg, batch, h, w, text, frames):
    """One forward's meta inputs: packed latents (B, h/2 w/2, C) of latent h x w, text (B, L, D), the position ids
    of both (one column per rotary axis) and the guidance input."""
    tokens, axes = (h // 2) * (w // 2), len(cfg.axes_dims_rope)
    return {"hidden_states": torch.empty(batch, tokens, cfg.in_channels, device="meta"),
            "encoder_hidden_states": text, "timestep": torch.zeros(batch, device="meta"),
            "img_ids": torch.zeros(tokens, axes, device="meta"),
            "txt_ids": torch.zeros(text.shape[1], axes, device="meta"), "guidance": torch.zeros(batch, device="meta")}


# diffusers' scripts/convert_flux2_to_diffusers.py builds the pipeline with black-forest-labs/FLUX.1-dev's scheduler
# (FLUX.1's spec); the pipeline passes custom sigmas and always its own mu
SCHEDULE = FlowMatchSchedule("flux.2-dev", FLUX1_SCHEDULE.config, custom_sigmas=True, mu="always", mu_of=empirical_mu)
# black-forest-labs/FLUX.2-dev's transformer config: the "flux2-dev" config of diffusers' (0.42)
# scripts/convert_flux2_to_diffusers.py, transcribed (it equals the class's defaults; guidance_embeds default True);
# the pipeline pads the Mistral prompt to max_sequence_length 512; default size 128 x 8 = 1024 pixels
MODELS = {"flux.2-dev-1024": FlowModel(TRANSFORMER, {
    "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128,
    "num_attention_heads": 48, "joint_attention_dim": 15360, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True},
    1024, 1024, 512, "black-forest-labs/FLUX.2-dev")}
# joint_attention_dim: 3 x a tiny text encoder's width (the pipeline stacks three of its layers)
TINY = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
        "num_attention_heads": 2, "joint_attention_dim": 24, "timestep_guidance_channels": 16,
        "axes_dims_rope": (2, 2, 2, 2)}
# a random VAE 8x like the real one (quant convs, BatchNorm over the 2 x 2 patches of its 4 latent channels)
TINY_FLUX2_VAE = {**TINY_VAE, "latent_channels": 4}
# (steps, guidance): the pipeline's __call__ defaults (the distilled guidance input 4)
PRESETS = {"flux.2-dev": Preset.of(MODELS["flux.2-dev-1024"], 50, 4.0),
           "tiny-flux2": Preset(TRANSFORMER, TINY, 64, 64, 8, 50, 4.0, vae=TINY_FLUX2_VAE)}

FAMILY = register(Family(
    "flux.2", TRANSFORMER, PIPELINE, "AutoencoderKLFlux2", Flux2Task, SCHEDULE, encode, example_inputs, MODELS,
    PRESETS,
    # diffusers 0.42: a TypeError in its hook. cache-dit takes the transformer as it is (its "Flux" adapter, read in
    # its source; not run here, cache-dit not being installed)
    first_block_cache="its head block returns two streams and its tail block one, which the hook subtracts"))
