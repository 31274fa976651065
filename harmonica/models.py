"""Model presets: the real DiT/PixArt checkpoints, the flow-matching models (their hub configs in `FLOW_MODELS`)
and tiny random models for tests and CPU runs.

A preset gives the transformer config (overrides of diffusers' defaults, which are the XL/2
sizes), its native resolution, the hub id of its pipeline, the pipeline class and the default
sampler. `build_pipeline` loads the weights or, with `random_weights`, builds every part from its
config (no network): random weights make the same computation, so timing and caching behave alike.
"""

import logging
from dataclasses import dataclass, field

import torch

TINY_DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "sample_size": 8, "out_channels": 8}
TINY_PIXART = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "sample_size": 8,
               "cross_attention_dim": 16, "caption_channels": 32}
TINY_VAE = {"block_out_channels": (8, 8, 8, 8), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 4, "layers_per_block": 1}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2}


@dataclass(frozen=True)
class ModelPreset:
    class_name: str  # DiTTransformer2DModel or PixArtTransformer2DModel
    config: dict
    resolution: int  # pixels per side
    caption_tokens: int = 0  # PixArt text length
    hub_id: str | None = None
    pipeline: str = "DiTPipeline"
    sampler: str = "dit-ddim"
    vae: dict = field(default_factory=lambda: SD_VAE)

    @property
    def is_pixart(self) -> bool:
        return self.class_name == "PixArtTransformer2DModel"

    is_flow = False


def _dit(sample_size, hub_id):
    return ModelPreset("DiTTransformer2DModel", {"sample_size": sample_size, "out_channels": 8}, sample_size * 8,
                       hub_id=hub_id)


def _pixart(sample_size, hub_id, pipeline="PixArtAlphaPipeline", tokens=120, **config):
    return ModelPreset("PixArtTransformer2DModel", {"sample_size": sample_size, "caption_channels": 4096, **config},
                       sample_size * 8, tokens, hub_id, pipeline, "dpm-solver++")


PRESETS = {
    "dit-xl-2-256": _dit(32, "facebook/DiT-XL-2-256"),
    "dit-xl-2-512": _dit(64, "facebook/DiT-XL-2-512"),
    "pixart-alpha-256": _pixart(32, "PixArt-alpha/PixArt-XL-2-256x256"),
    "pixart-alpha-512": _pixart(64, "PixArt-alpha/PixArt-XL-2-512x512"),
    "pixart-alpha-1024": _pixart(128, "PixArt-alpha/PixArt-XL-2-1024-MS"),
    "pixart-sigma-2048": _pixart(256, "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", "PixArtSigmaPipeline", 300,
                                 use_additional_conditions=False),
    "tiny-dit": ModelPreset("DiTTransformer2DModel", TINY_DIT, 64, vae=TINY_VAE),
    "tiny-pixart": ModelPreset("PixArtTransformer2DModel", TINY_PIXART, 64, 8, pipeline="PixArtAlphaPipeline",
                               sampler="dpm-solver++", vae=TINY_VAE),
}
REAL_MODELS = tuple(name for name in PRESETS if not name.startswith("tiny"))


@dataclass(frozen=True)
class FlowPreset:
    """A flow-matching transformer (harmonica/flow.py): its diffusers class and config, the size it
    generates (pixels; frames for video), the text tokens of one prompt, its scheduler config (a key of
    `solvers.FLOW_MATCH_SCHEDULERS`), the hub repository and the sampler defaults of its pipeline."""

    class_name: str
    config: dict
    height: int
    width: int
    text_tokens: int
    scheduler: str
    steps: int
    guidance: float  # FLUX: the distilled guidance input; else the CFG scale (Qwen-Image: true_cfg_scale)
    hub_id: str | None = None
    frames: int | None = None
    vae: dict | None = None  # config of a random VAE (the tiny presets; the real ones load theirs)

    is_flow, is_pixart = True, False

    @property
    def size(self) -> dict:
        return {"height": self.height, "width": self.width, "frames": self.frames, "scheduler": self.scheduler}

    @property
    def pipeline(self) -> str:
        """The diffusers pipeline class of the family."""
        from .flow import FAMILIES

        return FAMILIES[self.class_name].pipeline


@dataclass(frozen=True)
class FlowModel:
    """A flow-matching transformer at its native size: the diffusers class, its hub config, the pixels
    (height, width, frames for video), the text tokens of one prompt and where the config comes from."""

    class_name: str
    config: dict
    height: int
    width: int
    text_tokens: int
    source: str
    frames: int | None = None


# transformer/config.json of each hub repository, transcribed (keys equal to diffusers' defaults left out)
FLOW_MODELS = {
    # FluxPipeline pads the T5 prompt to max_sequence_length 512
    "flux.1-dev-1024": FlowModel("FluxTransformer2DModel", {
        "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
        "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
        "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56)}, 1024, 1024, 512,
        "black-forest-labs/FLUX.1-dev"),
    # StableDiffusion3Pipeline: 77 CLIP tokens and the T5 prompt padded to max_sequence_length 256
    "sd3.5-large-1024": FlowModel("SD3Transformer2DModel", {
        "attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16, "joint_attention_dim": 4096,
        "num_attention_heads": 38, "num_layers": 38, "out_channels": 16, "patch_size": 2,
        "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128},
        1024, 1024, 77 + 256, "stabilityai/stable-diffusion-3.5-large"),
    # WanPipeline pads the UMT5 prompt to max_sequence_length 512; 480p is 480 x 832
    "wan2.1-t2v-1.3b-480p": FlowModel("WanTransformer3DModel", {
        "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
        "ffn_dim": 8960, "freq_dim": 256, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30,
        "out_channels": 16, "patch_size": (1, 2, 2), "qk_norm": "rms_norm_across_heads", "text_dim": 4096},
        480, 832, 512, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", frames=81),
    # QwenImagePipeline does not pad: 512 is its max_sequence_length, the most a prompt takes
    "qwen-image-1328": FlowModel("QwenImageTransformer2DModel", {
        "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "guidance_embeds": False, "in_channels": 64,
        "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16,
        "patch_size": 2}, 1328, 1328, 512, "Qwen/Qwen-Image"),
}


def _flow(name, scheduler, steps, guidance):
    m = FLOW_MODELS[name]
    return FlowPreset(m.class_name, m.config, m.height, m.width, m.text_tokens, scheduler, steps, guidance,
                      m.source, m.frames)


TINY_FLUX = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
             "axes_dims_rope": (2, 2, 4)}
TINY_SD3 = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
            "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
            "pooled_projection_dim": 16, "pos_embed_max_size": 16}
TINY_WAN = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
            "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2, "rope_max_seq_len": 32}
TINY_QWEN = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (8, 4, 4)}
# random VAEs of the tiny presets: 8x like the real ones, with the real ones' latent scaling or normalisation
TINY_KL = {**TINY_VAE, "use_quant_conv": False, "use_post_quant_conv": False}
TINY_FLUX_VAE = {**TINY_KL, "latent_channels": 4, "scaling_factor": 0.3611, "shift_factor": 0.1159}
TINY_SD3_VAE = {**TINY_KL, "latent_channels": 4, "scaling_factor": 1.5305, "shift_factor": 0.0609}
TINY_WAN_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                "latents_mean": [-0.76, -0.71, -0.91, 0.11], "latents_std": [2.82, 1.45, 2.33, 2.66]}
VAE_CLASSES = {"FluxTransformer2DModel": "AutoencoderKL", "SD3Transformer2DModel": "AutoencoderKL",
               "WanTransformer3DModel": "AutoencoderKLWan", "QwenImageTransformer2DModel": "AutoencoderKLQwenImage"}
# (steps, guidance) of each pipeline's __call__ defaults
FLOW_PRESETS = {
    "flux.1-dev": _flow("flux.1-dev-1024", "flux.1-dev", 28, 3.5),
    "sd3.5-large": _flow("sd3.5-large-1024", "sd3.5-large", 28, 7.0),
    "wan2.1-1.3b": _flow("wan2.1-t2v-1.3b-480p", "wan2.1", 50, 5.0),
    "qwen-image": _flow("qwen-image-1328", "qwen-image", 50, 4.0),
    "tiny-flux": FlowPreset("FluxTransformer2DModel", TINY_FLUX, 64, 64, 8, "flux.1-dev", 28, 3.5, vae=TINY_FLUX_VAE),
    "tiny-sd3": FlowPreset("SD3Transformer2DModel", TINY_SD3, 64, 64, 8, "sd3.5-large", 28, 7.0, vae=TINY_SD3_VAE),
    "tiny-sd35": FlowPreset("SD3Transformer2DModel", {**TINY_SD3, "dual_attention_layers": (0,), "qk_norm": "rms_norm"},
                            64, 64, 8, "sd3.5-large", 28, 7.0, vae=TINY_SD3_VAE),
    "tiny-wan": FlowPreset("WanTransformer3DModel", TINY_WAN, 32, 32, 8, "wan2.1", 50, 5.0, frames=5, vae=TINY_WAN_VAE),
    "tiny-qwen-image": FlowPreset("QwenImageTransformer2DModel", TINY_QWEN, 64, 64, 8, "qwen-image", 50, 4.0,
                                  vae=TINY_WAN_VAE),
}


def preset(name: str) -> ModelPreset | FlowPreset:
    if name not in PRESETS and name not in FLOW_PRESETS:
        raise ValueError(f"model: expected one of {sorted({*PRESETS, *FLOW_PRESETS})}, got {name!r}")
    return PRESETS.get(name) or FLOW_PRESETS[name]


def build_transformer(name: str, *, seed: int = 0):
    """The preset's transformer with random weights (seeded)."""
    import diffusers

    spec = preset(name)
    torch.manual_seed(seed)
    return getattr(diffusers, spec.class_name)(**spec.config).eval()


def load_transformer(name: str, *, weights: str | None = None, random_weights: bool = False, seed: int = 0):
    """A flow preset's transformer alone (no text encoders, no VAE): from the `transformer` folder of
    `weights` (hub id or path; default the preset's hub id), or with `random_weights` from its config."""
    import diffusers

    spec = preset(name)
    if random_weights:
        return build_transformer(name, seed=seed)
    model_class = getattr(diffusers, spec.class_name)
    return _from_hub(name, weights or spec.hub_id, lambda source: model_class.from_pretrained(
        source, subfolder="transformer")).eval()


def load_vae(name: str, *, weights: str | None = None, random_weights: bool = False, seed: int = 0):
    """A flow preset's VAE: the `vae` folder of `weights` (hub id or path; default the preset's hub id), or
    with `random_weights` a random one from the preset's config (tiny presets only)."""
    import diffusers

    spec = preset(name)
    vae_class = getattr(diffusers, VAE_CLASSES[spec.class_name])
    if random_weights:
        if spec.vae is None:
            raise ValueError(f"--random-weights: {name} has no random VAE (decoding needs its weights); write the "
                             f"latents instead (--out x.safetensors)")
        torch.manual_seed(seed)
        return vae_class(**spec.vae).eval()
    return _from_hub(name, weights or spec.hub_id, lambda source: vae_class.from_pretrained(
        source, subfolder="vae")).eval()


def load_text_encoders(name: str, *, weights: str | None = None, dtype: torch.dtype = torch.float32):
    """A PixArt or flow preset's pipeline with its tokenizers and text encoders only (no transformer, no VAE),
    from `weights` (hub id or path; default the preset's hub id)."""
    import diffusers

    spec = preset(name)
    if not (spec.is_pixart or spec.is_flow):
        raise ValueError(f"model: expected a text-conditional model (PixArt or a flow model), got {name} (class-"
                         f"conditional: no text encoder)")
    pipeline_class = getattr(diffusers, spec.pipeline)
    return _from_hub(name, weights or spec.hub_id, lambda source: pipeline_class.from_pretrained(
        source, transformer=None, vae=None, dtype=dtype), hint="")


RANDOM_HINT = "\nWithout weights, run with --random-weights."


def _from_hub(name: str, source: str | None, load, hint: str = RANDOM_HINT):
    """`load(source)`, its failure a RuntimeError ending with `hint` (default: suggest random weights)."""
    if source is None:
        raise ValueError(f"weights: {name} has no published weights; use --random-weights")
    try:
        return load(source)
    except (OSError, ValueError) as error:
        raise RuntimeError(f"could not load the weights of {name} from {source!r} (no network or no local copy?): "
                           f"{error}{hint}") from error


def build_pipeline(name: str, *, weights: str | None = None, random_weights: bool = False, seed: int = 0):
    """The preset's diffusers pipeline: from `weights` (hub id or path; default the preset's hub id)
    or, with `random_weights`, from configs alone. A random PixArt pipeline has no text encoder:
    pass prompt embeddings (see `random_prompt_embeds`)."""
    import diffusers

    spec = preset(name)
    pipeline_class = getattr(diffusers, spec.pipeline)
    if not random_weights:
        return _from_hub(name, weights or spec.hub_id, pipeline_class.from_pretrained)
    transformer = build_transformer(name, seed=seed)
    vae = diffusers.AutoencoderKL(**spec.vae).eval()
    if spec.is_pixart:
        return pipeline_class(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                              scheduler=diffusers.DPMSolverMultistepScheduler())
    return pipeline_class(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())


def move_pipeline(pipe, device, dtype: torch.dtype) -> None:
    """`pipe.to(device, dtype)` (a pipeline or one model), without the warning diffusers prints for every model
    cast to a dtype ("should be kept in float32: []") when the model keeps no module in float32."""
    parts = pipe.components.values() if hasattr(pipe, "components") else [pipe]
    keeps_fp32 = any(getattr(part, "_keep_in_fp32_modules", None) for part in parts)
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    if not keeps_fp32:
        logger.setLevel(logging.ERROR)
    try:
        pipe.to(device, dtype)
    finally:
        logger.setLevel(level)


def random_prompt_embeds(name: str, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, caption tokens, caption channels) N(0, 1) prompt embeddings for a random PixArt."""
    spec = preset(name)
    channels = spec.config.get("caption_channels", 4096)
    return torch.randn(batch, spec.caption_tokens, channels, generator=generator)
