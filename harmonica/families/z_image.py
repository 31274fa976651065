"""The Z-Image family: `ZImageTransformer2DModel` in `ZImagePipeline`, its VAE `AutoencoderKL` (FLUX.1's).

Z-Image is a single-stream DiT (S3-DiT, diffusers transformer_z_image.py): all its blocks are
`ZImageTransformerBlock`s, in three lists that run in this order:
- `noise_refiner` (2 blocks): the image tokens alone, adaLN-modulated by the timestep;
- `context_refiner` (2 blocks): the caption tokens alone, no modulation (no timestep: the same output at every step);
- `layers` (30 blocks): each sample's image then caption tokens in one residual stream h (B, L, D), padded to the
  batch's longest sample with an attention mask (B, L).
The cached units are the `layers`' (`Family.blocks`); the refiners always run, with diffusers' own forward. They
embed the inputs before the streams are joined, each over one modality's tokens (4 of 34 blocks, on 4096 image or
at most 512 caption tokens at 1024x1024 instead of both), and the peers cache the same `layers` (cache-dit's ZImage
adapter, diffusers' First Block Cache), so unit counts and CURs compare.

Units of a `layers` block, in execution order, both gated by tanh(gate) (B, 1, D) onto h:
- `attention`: the attention (RoPE table freqs_cis, the batch's padding mask) over RMSNorm(h) x (1 + scale), then
  its post-norm `attention_norm2`; the unit's output is the post-normed one;
- `feed_forward`: the SwiGLU MLP over RMSNorm(h) x (1 + scale), then its post-norm `ffn_norm2`.
The modulation `adaLN_modulation(adaln_input)` (scale and gate of each unit, no shift) always runs. Refused with one
line: a `layers` block without modulation, and Z-Image-Omni's per-token modulation (`noise_mask`: noisy and clean
tokens with gates of their own, (B, L, D)), which the fused residual ops do not take.

Task: latents (B, C, h, w) as the pipeline's; the forward takes per-sample lists, x [(C, 1, h, w)] (a frame axis of
1), t = (1000 - timestep) / 1000 and cap_feats [(L_i, D)] (each prompt's tokens, no padding; the forward pads each
to a multiple of 32), and returns per-sample (C, 1, h, w): the negated velocity. The pipeline's CFG (guidance_scale
g > 0) runs [cond, uncond] as one batch and steps with -(o_c + g (o_c - o_u)) of the outputs o, which is
v_u + (1 + g) (v_c - v_u) of the velocities v = -o: `cfg_scale` 1 + g (Z-Image-Turbo: g = 0, no CFG). Its
`cfg_normalization` and `cfg_truncation` (off by default) are not reproduced by the task. Prompts: the pipeline's
`encode_prompt` returns one (L_i, D) tensor per prompt (its chat-templated tokens, no padding); `encode` writes them
as prompt_embeds (P, L, D) with prompt_embeds_mask (P, L) (each prompt's tokens first) and the negative pair.
"""

import torch

from .. import adapters
from ..adapters import Adapter
from ..flow import FlowTask
from ..solvers import FlowMatchSchedule
from . import Family, FlowModel, Preset, register
from .flux import TINY_FLUX_VAE
from .qwen_image import pad_prompts

TRANSFORMER, PIPELINE = "ZImageTransformer2DModel", "ZImagePipeline"
PATCH = 2  # the forward's default patch_size, which the pipeline keeps (latent pixels per token side)


def attention(block, h, scale, attn_mask, freqs_cis):
    """Unit attention: the post-normed attention over RMSNorm(h) x scale; h (B, L, D), scale (B, 1, D), freqs_cis
    (B, L, head_dim / 2) complex, attn_mask (B, L) bool or None (no padding). Returns (B, L, D)."""
    out = block.attention(block.attention_norm1(h) * scale, attention_mask=attn_mask, freqs_cis=freqs_cis)
    return block.attention_norm2(out)


def feed_forward(block, h, scale):
    """Unit feed_forward: the post-normed SwiGLU MLP of RMSNorm(h) x scale; h (B, L, D), scale (B, 1, D).
    Returns (B, L, D)."""
    return block.ffn_norm2(block.feed_forward(block.ffn_norm1(h) * scale))


class ZImageBlockAdapter(Adapter):
    block_class = "ZImageTransformerBlock"
    kinds = ("attention", "feed_forward")
    bodies = {"attention": attention, "feed_forward": feed_forward}

    @classmethod
    def units(cls, block, *, cross_attention: bool = True) -> list:
        return [("attention", ("attention", "attention_norm1", "attention_norm2")),
                ("feed_forward", ("feed_forward", "ffn_norm1", "ffn_norm2"))]

    @classmethod
    def check(cls, name: str, block) -> None:
        if not block.modulation:
            raise ValueError(f"{name}: expected a Z-Image block with adaLN modulation (a main layer), got "
                             f"modulation=False (a context refiner's)")

    def forward(self, engine, block, index, position, x, attn_mask, freqs_cis, adaln_input=None, noise_mask=None,
                adaln_noisy=None, adaln_clean=None):
        """diffusers' `ZImageTransformerBlock.forward` (modulated) unit by unit. Returns h (B, L, D)."""
        if noise_mask is not None:
            raise ValueError("noise_mask: expected None (Z-Image-Omni's per-token modulation of noisy and clean "
                             "tokens is not supported by harmonica), got a tensor")
        scale, gate, scale_mlp, gate_mlp = block.adaLN_modulation(adaln_input).unsqueeze(1).chunk(4, dim=2)
        scale, gate, scale_mlp, gate_mlp = 1.0 + scale, gate.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()
        bodies = engine.bodies[self.block_class]
        h = engine.run_unit(index["attention"], lambda: bodies["attention"](block, x, scale, attn_mask, freqs_cis),
                            gate, x)
        return engine.run_unit(index["feed_forward"], lambda: bodies["feed_forward"](block, h, scale_mlp), gate_mlp, h)


adapters.register(ZImageBlockAdapter)


def prompt_lengths(mask: torch.Tensor, key: str) -> torch.Tensor:
    """Each prompt's tokens (P,) on the host, from its mask (P, L); a ValueError unless every prompt has at least one
    token and its tokens come first (as `encode` writes them)."""
    mask = mask.cpu().bool()
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1]) < lengths[:, None]) or not lengths.all():
        raise ValueError(f"{key}: expected each prompt's tokens first (at least one), then padding, got the mask "
                         f"{mask.int().tolist()}")
    return lengths


class ZImageTask(FlowTask):
    text_dim = "cap_feat_dim"
    prompt_keys = ("prompt_embeds", "prompt_embeds_mask")
    negative_keys = ("negative_prompt_embeds", "negative_prompt_embeds_mask")

    def __init__(self, transformer, embeddings, *args, **kwargs):
        super().__init__(transformer, pad_prompts(embeddings), *args, **kwargs)
        # each prompt's tokens, on the host: the forward takes them without padding, sliced with no device read
        self.lengths = {key: prompt_lengths(self.embeddings[key], key) for key in self.embeddings
                        if key.endswith("mask")}

    @staticmethod
    def cfg_scale(guidance: float) -> float:
        return 1 + guidance  # the pipeline's o_c + g (o_c - o_u)

    @classmethod
    def patch(cls, cfg) -> int:
        return PATCH

    def _prompts(self, cond, device) -> dict:
        """The batch's prompts (`FlowTask._prompts`) with "lengths": each row's tokens, a host list (2B under CFG)."""
        prompts = super()._prompts(cond, device)
        index = cond["prompt_index"].cpu()
        lengths = self.lengths["prompt_embeds_mask"][index]
        if self.guided:
            lengths = torch.cat([self.lengths["negative_prompt_embeds_mask"].expand(len(index)), lengths])
        prompts["lengths"] = lengths.tolist()
        return prompts

    def _timestep_input(self, t):
        return (1000 - t) / 1000

    def _inputs(self, prompts, device):
        embeds = prompts["prompt_embeds"]
        return {"cap_feats": [e[:n] for e, n in zip(embeds, prompts["lengths"], strict=True)]}

    def _step_inputs(self, model_in, t, inputs):
        return {"x": list(model_in.unsqueeze(2).unbind(0)), "t": t}  # latents per sample (C, 1, h, w)

    def velocity(self, out):
        """The velocity (B, C, h, w): the outputs, per sample [(C, 1, h, w)] or stacked (B, C, 1, h, w), negated as
        the pipeline steps them."""
        return -(torch.stack(out) if isinstance(out, list) else out).squeeze(2)


def padded(tensors: list, key: str) -> dict:
    """{key: (P, L, D) zero-padded, key + "_mask": (P, L) long} of P tensors (L_i, D), L the longest."""
    embeds = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
    lengths = torch.tensor([len(t) for t in tensors], device=embeds.device)
    mask = (torch.arange(embeds.shape[1], device=embeds.device) < lengths[:, None]).long()
    return {key: embeds, f"{key}_mask": mask}


def encode(pipe, prompts, negative, extra):
    """The pipeline's `encode_prompt` of the prompts and of the negative prompt (default ""): one (L_i, D) tensor per
    prompt (its Qwen3 text encoder's second-to-last hidden states of the chat-templated prompt), padded with masks."""
    embeds = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, **extra)[0]
    negative_embeds = pipe.encode_prompt(["" if negative is None else negative], do_classifier_free_guidance=False,
                                         **extra)[0]
    return {**padded(embeds, "prompt_embeds"), **padded(negative_embeds, "negative_prompt_embeds")}


def example_inputs(cfg, batch, h, w, text, frames):
    """One forward's meta inputs: per-sample latents (C, 1, h, w) of latent h x w, text (B, L, D) as L tokens each."""
    return {"x": [torch.empty(cfg.in_channels, 1, h, w, device="meta")] * batch,
            "t": torch.zeros(batch, device="meta"), "cap_feats": list(text.unbind(0))}


# Tongyi-MAI/Z-Image-Turbo's scheduler_config.json (shift 3, no dynamic shifting), transcribed; the pipeline passes
# custom sigmas from torch.linspace and always mu (unused without dynamic shifting)
SCHEDULE = FlowMatchSchedule("z-image-turbo", {"num_train_timesteps": 1000, "shift": 3.0,
                                               "use_dynamic_shifting": False},
                             custom_sigmas=True, mu="always", torch_linspace=True)
# diffusers 0.42.1's ZImageTransformer2DModel defaults, which are Z-Image-Turbo's 6B transformer (its hub
# config.json, not read here: no network), the sizes written out; 1024x1024 is the pipeline's default size and 512
# its max_sequence_length, the most a prompt takes
MODELS = {"z-image-turbo-1024": FlowModel(TRANSFORMER, {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560, "axes_dims": (32, 48, 48)},
    1024, 1024, 512, "Tongyi-MAI/Z-Image-Turbo")}
TINY = {"in_channels": 4, "dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2,
        "cap_feat_dim": 16, "axes_dims": (4, 6, 6), "axes_lens": (256, 32, 32)}
# (steps, guidance): Z-Image-Turbo's model card (9 steps, guidance 0: its CFG is distilled); tiny-z-image: the
# pipeline's __call__ defaults (50, 5: CFG runs); the VAE is FLUX.1's
PRESETS = {"z-image-turbo": Preset.of(MODELS["z-image-turbo-1024"], 9, 0.0),
           "tiny-z-image": Preset(TRANSFORMER, TINY, 64, 64, 8, 50, 5.0, vae=TINY_FLUX_VAE)}

FAMILY = register(Family(
    "z-image", TRANSFORMER, PIPELINE, "AutoencoderKL", ZImageTask, SCHEDULE, encode, example_inputs, MODELS, PRESETS,
    # diffusers 0.42: its hook reads the block's `hidden_states` argument, which this block names `x`
    first_block_cache="its block's forward takes `x`, not the `hidden_states` the hook reads",
    blocks=("layers",), arguments=("x", "t", "cap_feats"), timestep_rises=True))
