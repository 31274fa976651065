"""The Wan 2.x family: `WanTransformer3DModel` in `WanPipeline`, its VAE `AutoencoderKLWan`.

Block adapter: `WanTransformerBlock` (diffusers transformer_wan.py), in the transformer's `blocks`. One residual
stream h (B, L, D) of video tokens; units, in execution order: self-attention `attn1` (gate msa),
cross-attention `attn2` to the text (and I2V image) tokens (no gate) and feed-forward `ffn` (gate c_gate_msa). The
modulation `scale_shift_table + temb` is fp32, so the gated units' residual is added in fp32 and cast back,
`(h.float() + out * gate).type_as(h)`: the fused ops do the same when given the fp32 gate over a low-precision h
(kernels/gated_residual.py). Per-token modulation (Wan 2.2 TI2V's timestep (B, L), temb (B, L, 6, D)) is not
supported: the fused ops take one gate per batch row.

Wan 2.2 A14B: two transformers of one config, the high-noise expert `transformer` runs the steps of timesteps
t >= boundary_ratio x num_train_timesteps, the low-noise expert `transformer_2` the rest (with guidance_scale_2);
`experts` tells `harmonica.enable`, which gives each its engine on the one schedule of the generation's steps.

Task: video latents (B, C, F, h, w) of 4 n + 1 frames, T5 embeddings, timestep t. The pipeline runs the two CFG
halves as two forwards; one CFG batch computes the same. Prompts: prompt_embeds and negative_prompt_embeds (1, L, D).
"""

import torch

from .. import adapters
from ..adapters import Adapter
from ..flow import FlowTask, denormalized
from ..solvers import FlowMatchSchedule
from . import Family, FlowModel, Preset, register

TRANSFORMER, PIPELINE = "WanTransformer3DModel", "WanPipeline"


def _modulated(norm, h, shift, scale):
    """norm(h) in fp32, modulated by shift and scale (B, 1, D, fp32), in h's dtype; h (B, L, D)."""
    return (norm(h.float()) * (1 + scale) + shift).type_as(h)


def self_attention(block, h, shift, scale, rotary_emb):
    """Unit attn1: self-attention over the modulated norm1 of h (B, L, D) with the rotary embedding.
    Returns (B, L, D)."""
    return block.attn1(_modulated(block.norm1, h, shift, scale), None, None, rotary_emb)


def cross_attention(block, h, encoder_hidden_states):
    """Unit attn2: norm2 of h (B, L, D) attending to encoder_hidden_states (B, M, D). Returns (B, L, D)."""
    return block.attn2(block.norm2(h.float()).type_as(h), encoder_hidden_states, None, None)


def feed_forward(block, h, shift, scale):
    """Unit ffn: the MLP of the modulated norm3 of h (B, L, D). Returns (B, L, D)."""
    return block.ffn(_modulated(block.norm3, h, shift, scale))


class WanBlockAdapter(Adapter):
    block_class = "WanTransformerBlock"
    kinds = ("attn1", "attn2", "ffn")
    bodies = {"attn1": self_attention, "attn2": cross_attention, "ffn": feed_forward}

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb, rotary_emb):
        """diffusers' `WanTransformerBlock.forward` unit by unit. temb: (B, 6, D)."""
        if temb.ndim != 3:
            raise ValueError(f"temb: expected shape (B, 6, D) (one timestep per sample), got {tuple(temb.shape)} "
                             "(Wan 2.2 TI2V's per-token timesteps are not supported by harmonica)")
        shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        bodies = engine.bodies[self.block_class]
        h = hidden_states
        h = engine.run_unit(index["attn1"], lambda: bodies["attn1"](block, h, shift, scale, rotary_emb), gate, h)
        h = engine.run_unit(index["attn2"], lambda: bodies["attn2"](block, h, encoder_hidden_states), None, h)
        return engine.run_unit(index["ffn"], lambda: bodies["ffn"](block, h, c_shift, c_scale), c_gate, h)


adapters.register(WanBlockAdapter)


class WanTask(FlowTask):
    """Wan 2.1, or with `transformer_2` and `boundary_ratio` Wan 2.2 A14B's two experts as `WanPipeline` runs them:
    `transformer` at the steps of timesteps t >= boundary_ratio x num_train_timesteps, `transformer_2` (guidance
    `guidance_2`, default `guidance`) at the rest."""

    text_dim = "text_dim"

    def __init__(self, transformer, embeddings, num_steps, guidance, *, transformer_2=None, boundary_ratio=None,
                 guidance_2=None, **size):
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError(f"transformer_2, boundary_ratio: expected both or neither, got "
                             f"{type(transformer_2).__name__} and {boundary_ratio}")
        super().__init__(transformer, embeddings, num_steps, guidance, **size)
        self.transformer_2, self.boundary_ratio = transformer_2, boundary_ratio
        self.guidance_2 = guidance if guidance_2 is None else guidance_2
        boundary = (boundary_ratio or 0) * self.scheduler.config.num_train_timesteps
        # the low-noise expert's first step (num_steps: none)
        self.boundary = num_steps if transformer_2 is None else sum(t >= boundary for t in
                                                                    self.scheduler.timesteps.tolist())

    def with_steps(self, num_steps: int) -> "WanTask":
        return type(self)(self.transformer, self.embeddings, num_steps, self.guidance, transformer_2=self.transformer_2,
                          boundary_ratio=self.boundary_ratio, guidance_2=self.guidance_2, height=self.height,
                          width=self.width, frames=self.frames)

    def experts(self) -> list:
        experts = [(self.transformer, 0), (self.transformer_2, self.boundary)]
        return [(transformer, first) for (transformer, first), last in zip(experts, (self.boundary, self.num_steps))
                if first < last]

    def guidance_at(self, i: int) -> dict:
        if i < self.boundary or not self.solver_guidance:
            return self.solver_guidance
        return {**self.solver_guidance, "guidance_scale": self.cfg_scale(self.guidance_2)}

    def _latent_shape(self, cfg):
        channels, h, w = super()._latent_shape(cfg)
        return (channels, FAMILY.latent_frames(self.frames), h, w)

    @property
    def image_seq_len(self):
        return None  # the pipeline sets the timesteps without mu

    def _inputs(self, prompts, device):
        return {"encoder_hidden_states": prompts["prompt_embeds"]}

    def _vae_latents(self, vae, latents):
        return denormalized(vae, latents)


def encode(pipe, prompts, negative, extra):
    """The pipeline's `encode_prompt` of the prompts and the negative prompt (default ""), with CFG."""
    embeds, negative_embeds = pipe.encode_prompt(prompts, negative_prompt="" if negative is None else negative,
                                                 do_classifier_free_guidance=True, **extra)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds[:1]}


def example_inputs(cfg, batch, h, w, text, frames):
    """One forward's meta inputs: video latents (B, C, F, h, w) of `frames` frames, text (B, L, D)."""
    latents = torch.empty(batch, cfg.in_channels, FAMILY.latent_frames(frames), h, w, device="meta")
    return {"hidden_states": latents, "encoder_hidden_states": text, "timestep": torch.zeros(batch, device="meta")}


def experts(pipe) -> list:
    """[(transformer, serves)] as `WanPipeline.__call__` picks them: with a boundary_ratio and a transformer_2 (Wan
    2.2 A14B), `transformer` serves t >= boundary_ratio x num_train_timesteps and `transformer_2` the rest; else
    `transformer` every step."""
    ratio, second = getattr(pipe.config, "boundary_ratio", None), getattr(pipe, "transformer_2", None)
    if ratio is None or second is None:
        return [(pipe.transformer, None)]
    boundary = ratio * pipe.scheduler.config.num_train_timesteps
    return [(pipe.transformer, lambda t: t >= boundary), (second, lambda t: t < boundary)]


# Wan2.1-T2V-1.3B-Diffusers ships a UniPCMultistepScheduler; its flow-matching Euler form is the
# FlowMatchEulerDiscreteScheduler with shift = flow_shift (3.0 at 480p, 5.0 at 720p, the pipeline's docs); the
# pipeline sets the timesteps by count, without mu
SCHEDULE = FlowMatchSchedule("wan2.1", {"num_train_timesteps": 1000, "shift": 5.0})
# transformer/config.json of the hub repository, transcribed (keys equal to diffusers' defaults left out);
# the pipeline pads the UMT5 prompt to max_sequence_length 512; 480p is 480 x 832
MODELS = {"wan2.1-t2v-1.3b-480p": FlowModel(TRANSFORMER, {
    "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
    "ffn_dim": 8960, "freq_dim": 256, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30,
    "out_channels": 16, "patch_size": (1, 2, 2), "qk_norm": "rms_norm_across_heads", "text_dim": 4096},
    480, 832, 512, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", frames=81),
    # each expert's transformer/config.json (both alike: Wan 2.1 14B's shape, 40 layers of 40 heads x 128; checked
    # against the hub's transformer_2/config.json on 2026-12-04); the MACs of a step are one expert's
    "wan2.2-t2v-a14b-720p": FlowModel(TRANSFORMER, {
        "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
        "ffn_dim": 13824, "freq_dim": 256, "in_channels": 16, "num_attention_heads": 40, "num_layers": 40,
        "out_channels": 16, "patch_size": (1, 2, 2), "qk_norm": "rms_norm_across_heads", "text_dim": 4096},
        720, 1280, 512, "Wan-AI/Wan2.2-T2V-A14B-Diffusers", frames=81)}
TINY = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
        "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2, "rope_max_seq_len": 32}
# a random VAE 8x like the real one, with a per-channel latent normalisation
TINY_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
            "latents_mean": [-0.76, -0.71, -0.91, 0.11], "latents_std": [2.82, 1.45, 2.33, 2.66]}
# Wan 2.2 A14B text-to-video: model_index.json's boundary_ratio, its model card's 40 steps, guidance 4.0 (high-noise
# expert) and guidance_scale_2 3.0 (low-noise), as diffusers' modular Wan 2.2 blocks default them
A14B = {"experts": 2, "pipeline_config": {"boundary_ratio": 0.875}, "guidance_2": 3.0}
# (steps, guidance): the pipeline's __call__ defaults
PRESETS = {"wan2.1-1.3b": Preset.of(MODELS["wan2.1-t2v-1.3b-480p"], 50, 5.0),
           "wan2.2-t2v-a14b": Preset.of(MODELS["wan2.2-t2v-a14b-720p"], 40, 4.0, **A14B),
           "tiny-wan": Preset(TRANSFORMER, TINY, 32, 32, 8, 50, 5.0, frames=5, vae=TINY_VAE),
           "tiny-wan2.2": Preset(TRANSFORMER, TINY, 32, 32, 8, 40, 4.0, frames=5, vae=TINY_VAE, **A14B)}

FAMILY = register(Family("wan", TRANSFORMER, PIPELINE, "AutoencoderKLWan", WanTask, SCHEDULE, encode,
                         example_inputs, MODELS, PRESETS, frame_factor=4, experts=experts))
