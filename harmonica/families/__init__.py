"""Model families: everything harmonica knows about one family of diffusion transformers, in one module.

A flow-matching family module (`qwen_image.py`, `flux.py`, `flux2.py`, `sd3.py`, `wan.py`, `z_image.py`,
`hunyuan_video15.py`, `ltx2.py`) holds its block adapters (registered in `harmonica.adapters`), its `flow.FlowTask`
subclass, how its pipeline sets the scheduler's timesteps, how its pipeline encodes prompts, the meta inputs of one
forward (MAC counting), its hub models and presets, its VAE class and the peers' patterns for it. `dit.py` and
`pixart.py` hold the same for DiT and PixArt, sampled by their pipelines' schedulers (`Family.samplers`: the
original DiT DDIM, DPM-Solver++, SA-Solver, IDDPM, the DiT pipeline's DDIM) instead of a flow-matching schedule. Every
family's presets are `Preset`s (DiT's and PixArt's name their default sampler, whose steps and guidance are theirs);
every family makes its `task.Task` (`Family.make_task`), which `samplers.sample` samples and the trainer trains on.
Each module ends with `FAMILY = register(Family(...))`. `FAMILIES` maps the diffusers transformer class name to its
`Family`; generic code (`flow`, `solvers`, `prompts`, `macs`, `models`, `generation`, the CLI, bench, profiling) asks
`family_of` or a preset's `family` and never names a family's class.

Adding a family is one module here that ends with `FAMILY = register(Family(...))`, imported at the bottom of this
file, plus its tests (tests/test_families.py checks that no other source file names its classes).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..flow import VAE_FACTOR, make_flow_task
from ..solvers import FlowMatchSchedule

# the VAE of the real DiT and PixArt checkpoints (SD's), AutoencoderKL's defaults otherwise
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2}
# the random 8x KL VAE of the tiny presets (DiT, PixArt, FLUX.1, FLUX.2, SD3): 4 levels of 8 channels
TINY_VAE = {"block_out_channels": (8, 8, 8, 8), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 4, "layers_per_block": 1}
TINY_KL = {**TINY_VAE, "use_quant_conv": False, "use_post_quant_conv": False}  # as FLUX.1's and SD3's VAEs


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


@dataclass(frozen=True)
class Preset:
    """A transformer to sample: its diffusers class and config, the size it generates (pixels; frames for video),
    the text tokens of one prompt (0: class-conditional), its sampler defaults (steps, guidance), the hub repository
    and the VAE config of random weights (None: none; the real ones load theirs)."""

    class_name: str
    config: dict
    height: int
    width: int
    text_tokens: int
    steps: int
    guidance: float  # FLUX: the distilled guidance input; else the CFG scale (Qwen-Image: true_cfg_scale)
    hub_id: str | None = None
    frames: int | None = None
    vae: dict | None = None
    # transformers of `config` its pipeline switches between by step (Wan 2.2 A14B's high- and low-noise experts: 2;
    # `Family.experts`), their pipeline config (boundary_ratio) and the guidance of the second's steps
    experts: int = 1
    pipeline_config: dict | None = None
    guidance_2: float | None = None
    sampler: str | None = None  # DiT's and PixArt's default --sampler (a key of `Family.samplers`); None: flow
    own_pipeline: str | None = None  # its diffusers pipeline class where it is not its family's (PixArt-Sigma's)

    @classmethod
    def of(cls, model: FlowModel, steps: int, guidance: float, **experts) -> "Preset":
        """The preset of a hub model at its native size, with its pipeline's (steps, guidance) defaults; experts:
        `experts`, `pipeline_config`, `guidance_2`."""
        return cls(model.class_name, model.config, model.height, model.width, model.text_tokens, steps, guidance,
                   model.source, model.frames, **experts)

    @classmethod
    def square(cls, class_name: str, config: dict, side: int, samplers: dict, sampler: str, **fields) -> "Preset":
        """A `side` x `side` image preset sampled by `sampler`, at its (steps, guidance) defaults in `samplers`
        (`Family.samplers`); fields: text_tokens (default 0), hub_id, vae, own_pipeline."""
        _, steps, guidance = samplers[sampler]
        return cls(class_name, config, side, side, fields.pop("text_tokens", 0), steps, guidance, sampler=sampler,
                   **fields)

    @property
    def size(self) -> dict:
        return {"height": self.height, "width": self.width, "frames": self.frames}

    @property
    def family(self) -> "Family":
        return family_of(self.class_name)

    @property
    def pipeline(self) -> str:
        """The diffusers pipeline class it is sampled with: its own, else its family's."""
        return self.own_pipeline or self.family.pipeline


@dataclass(frozen=True)
class Family:
    """One model family, keyed by its diffusers transformer class.

    scheduler: how its pipeline sets the flow-matching timesteps; None for DiT and PixArt (their `samplers`).
    encode: (pipe, prompts (P strings), negative prompt or None, extra encode_prompt kwargs) -> {name: tensor}, the
        pipeline's `encode_prompt` outputs under the names the task reads (`prompts.encode_prompts`).
    example_inputs: (config, batch, latent h, latent w, text (B, L, D) meta tensor or None where the task's text_dim
        is None (DiT), frames) -> the transformer's forward kwargs on the meta device (`macs.count_macs`); h, w already
        checked against the task's multiple.
    cache_dit: (the transformer's block list, cache-dit ForwardPattern name) for cache-dit's BlockAdapter, where
        cache-dit has no adapter for the transformer alone; None: cache-dit takes the transformer as it is.
    cache_dit_skip: why cache-dit's DBCache cannot run this transformer, or None when it can.
    first_block_cache: why diffusers' First Block Cache cannot run this transformer, or None when it can.
    blocks: the names of the transformer's ModuleLists whose blocks are cached, in execution order; (): every
        ModuleList child named `*blocks` (`adapters.block_lists`).
    arguments: the names of the forward's latents, timestep and text arguments (`forward_arguments`).
    timestep_rises: whether the forward's timestep rises along a generation (Z-Image's 1 - sigma); the engine's
        generation checks read it.
    vae_factor: pixels per latent pixel of its VAE, spatially (8; HunyuanVideo 1.5's 16).
    experts: (pipeline) -> [(transformer, serves)] of a pipeline whose steps switch between transformers (Wan 2.2's
        high- and low-noise experts), in the order they run; serves(t) says whether one runs the step of timestep t
        (`harmonica.enable` gives each an engine on the one schedule of the generation's steps); None: the
        pipeline's `transformer` runs every step.
    meta_mode: () -> a context (a TorchDispatchMode) under which its forward runs on meta tensors (MAC counting),
        for a forward with data-dependent steps; None: the forward runs on meta tensors as it is.
    kind: what `harmonica.options`' rules call the --model (`options.MODEL_KINDS`).
    make_task: (preset, its transformers (`models.load_experts`), the pipeline's scheduler or None, sampler, prompt
        bank or None, steps, guidance) -> the `task.Task` that samples and trains it (`models.preset_task`); the flow
        families': `flow.make_flow_task`.
    DiT's and PixArt's (no flow-matching `scheduler`):
    samplers: {--sampler name: (the sampler name a router records, default steps, default guidance)}, the first the
        default.
    pipeline_scheduler: the diffusers scheduler class of its pipelines, whose config its samplers start from
        (`models.load_scheduler`).
    random_pipeline: (pipeline class, transformer, VAE, scheduler) -> the pipeline of random weights, without text
        encoder.
    read_embeddings: (path, transformer config, option) -> the prompt bank of an embeddings file; None: a flow
        family's (`flow.load_flow_embeddings`, checked by its task).
    """

    name: str  # short name, e.g. "qwen-image"
    transformer: str  # diffusers transformer class name (the key of `FAMILIES`)
    pipeline: str  # diffusers pipeline class whose loop the task is
    vae: str  # diffusers VAE class of its pipelines
    task: type  # its training task class (a `task.Task`): a flow.FlowTask subclass, DiTTask, PixArtTask (`patch(cfg)`,
    # `text_dim` for MACs)
    scheduler: FlowMatchSchedule | None
    encode: Callable | None
    example_inputs: Callable
    models: dict = field(default_factory=dict)  # name -> FlowModel (hub configs at the native size)
    presets: dict = field(default_factory=dict)  # name -> Preset (real and tiny)
    cache_dit: tuple | None = None
    cache_dit_skip: str | None = None
    first_block_cache: str | None = None
    blocks: tuple = ()
    arguments: tuple = ("hidden_states", "timestep", "encoder_hidden_states")
    timestep_rises: bool = False
    frame_factor: int | None = None  # video: its VAE's temporal compression f (latent frames = (frames - 1) / f + 1)
    vae_factor: int = VAE_FACTOR
    half: torch.dtype = torch.bfloat16  # the dtype it samples in on CUDA (the pipelines'), unless --fp32
    meta_mode: Callable | None = None
    # (config, the forward's int arguments) -> (height, width, frames) pixels of the forward, where its hidden_states'
    # shape does not tell them (LTX-2's packed video tokens: its num_frames, height, width); None: the shape tells
    forward_size: Callable | None = None
    experts: Callable | None = None
    kind: str = "flow"
    samplers: dict = field(default_factory=dict)
    make_task: Callable = make_flow_task
    pipeline_scheduler: str | None = None
    random_pipeline: Callable | None = None
    read_embeddings: Callable | None = None
    train_guidance: float | None = None  # the guidance `harmonica train` trains at by default; None: the preset's

    @property
    def text_conditional(self) -> bool:
        """Whether it samples from prompts (it has a prompt encoder)."""
        return self.encode is not None

    def latent_frames(self, frames: int | None) -> int:
        """The latent frames of `frames` video frames; a ValueError unless frames = f n + 1."""
        f = self.frame_factor
        if f is None:
            raise ValueError(f"frames: expected none for {self.transformer} (an image model), got {frames}")
        if frames is None or frames < 1 or (frames - 1) % f:
            raise ValueError(f"frames: expected {f} n + 1 frames for {self.transformer}, got {frames}")
        return (frames - 1) // f + 1

    def video_frames(self, latent_frames: int) -> int:
        """The video frames whose latents have `latent_frames` frames (the inverse of `latent_frames`)."""
        return (latent_frames - 1) * self.frame_factor + 1


FAMILIES = {}  # diffusers transformer class name -> Family
DIFFUSERS_ARGUMENTS = Family.arguments  # the usual names, DiT's and PixArt's too


def register(family: Family) -> Family:
    """Add `family` to `FAMILIES` (one family per transformer class)."""
    if family.transformer in FAMILIES:
        raise ValueError(f"family: expected one per transformer class, got a second for {family.transformer}")
    FAMILIES[family.transformer] = family
    return family


def family_of(transformer) -> Family:
    """The `Family` of a diffusers transformer (instance or class) or its class name; a ValueError naming the
    supported classes otherwise."""
    if isinstance(transformer, str):
        name = transformer
    else:
        name = (transformer if isinstance(transformer, type) else type(transformer)).__name__
    if name not in FAMILIES:
        raise ValueError(f"transformer: expected one of {sorted(FAMILIES)}, got {name}")
    return FAMILIES[name]


def forward_arguments(transformer) -> tuple:
    """((latents, timestep, text) argument names, whether the timestep rises along a generation) of a diffusers
    transformer's forward: its family's, else the usual (hidden_states, timestep, encoder_hidden_states), falling."""
    family = FAMILIES.get(type(transformer).__name__)
    return (DIFFUSERS_ARGUMENTS, False) if family is None else (family.arguments, family.timestep_rises)


# each module registers its family; this order (DiT, PixArt, FLUX.1, SD3, Wan, Qwen-Image, FLUX.2, Z-Image,
# HunyuanVideo 1.5, LTX-2) is `FAMILIES`' and the presets'
from . import dit, pixart, flux, sd3, wan, qwen_image, flux2, z_image, hunyuan_video15, ltx2  # noqa: E402,F401,I001
