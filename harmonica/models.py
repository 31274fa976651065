"""Model presets, gathered from the families (harmonica/families): the DiT/PixArt checkpoints (`PRESETS`), the
flow-matching models (every family's hub configs and presets, `FLOW_MODELS` and `FLOW_PRESETS`) and tiny random
models for tests and CPU runs.

A preset (`families.Preset`) gives the transformer config, its native size, the hub id of its pipeline, the
pipeline class and the sampler defaults. `build_pipeline` loads the weights or, with `random_weights`, builds every
part from its config (no network): random weights make the same computation, so timing and caching behave alike.
"""

import contextlib
import logging

import torch

from .families import FAMILIES, Preset, family_of


def _presets(flow_matching: bool) -> dict:
    """{name: preset} of the flow-matching families (a `Family.scheduler`) or of the others, the real ones first."""
    return {name: spec for real in (True, False) for family in FAMILIES.values()
            if (family.scheduler is not None) == flow_matching
            for name, spec in family.presets.items() if (name.startswith("tiny")) != real}


PRESETS = _presets(False)  # DiT's and PixArt's (harmonica/families/dit.py, pixart.py): their pipelines' samplers
REAL_MODELS = tuple(name for name in PRESETS if not name.startswith("tiny"))
# every flow-matching family's presets (harmonica/families), the real ones first
FLOW_PRESETS = _presets(True)
FLOW_MODELS = {name: model for family in FAMILIES.values() for name, model in family.models.items()}


def preset(name: str) -> Preset:
    if name not in PRESETS and name not in FLOW_PRESETS:
        raise ValueError(f"model: expected one of {sorted({*PRESETS, *FLOW_PRESETS})}, got {name!r}")
    return PRESETS.get(name) or FLOW_PRESETS[name]


def build_transformer(name: str, *, seed: int = 0, device=None):
    """The preset's transformer with random weights (seeded), built on `device` (None: the current default
    device, so a caller's `with torch.device("meta")` holds). On a GPU a real-size model initialises in seconds
    instead of minutes of CPU work; its weights differ from the CPU-built ones."""
    import diffusers

    spec = preset(name)
    torch.manual_seed(seed)
    with contextlib.nullcontext() if device is None else torch.device(device):
        return getattr(diffusers, spec.class_name)(**spec.config).eval()


def load_experts(name: str, *, weights: str | None = None, random_weights: bool = False, seed: int = 0,
                 device=None) -> list:
    """A preset's transformers that take turns by step, in order (`Preset.experts`; one for most): from the
    `transformer`, `transformer_2`, ... folders of `weights` (hub id or path; default the preset's hub id), or with
    `random_weights` from its config, the i-th seeded `seed + i`, built on `device`."""
    import diffusers

    spec = preset(name)
    count = spec.experts
    if random_weights:
        return [build_transformer(name, seed=seed + i, device=device) for i in range(count)]
    model_class = getattr(diffusers, spec.class_name)
    folders = ["transformer", *(f"transformer_{i + 1}" for i in range(1, count))]
    return [_from_hub(name, weights or spec.hub_id, lambda source, folder=folder: model_class.from_pretrained(
        source, subfolder=folder)).eval() for folder in folders]


def load_vae(name: str, *, weights: str | None = None, random_weights: bool = False, seed: int = 0):
    """A preset's VAE: the `vae` folder of `weights` (hub id or path; default the preset's hub id), or
    with `random_weights` a random one from the preset's config (tiny presets only)."""
    import diffusers

    spec = preset(name)
    vae_class = getattr(diffusers, family_of(spec.class_name).vae)
    if random_weights:
        if spec.vae is None:
            raise ValueError(f"--random-weights: {name} has no random VAE (decoding needs its weights); write the "
                             f"latents instead (--out x.safetensors)")
        torch.manual_seed(seed)
        return vae_class(**spec.vae).eval()
    return _from_hub(name, weights or spec.hub_id, lambda source: vae_class.from_pretrained(
        source, subfolder="vae")).eval()


def load_scheduler(name: str, *, weights: str | None = None, random_weights: bool = False):
    """The scheduler of a DiT/PixArt preset's pipeline (`Family.pipeline_scheduler`), whose config its samplers start
    from: the `scheduler` folder of `weights` (hub id or path; default the preset's hub id), or with `random_weights`
    the class's defaults; None for a flow family (its task holds its scheduler, `Family.scheduler`)."""
    import diffusers

    spec = preset(name)
    if spec.family.pipeline_scheduler is None:
        return None
    scheduler_class = getattr(diffusers, spec.family.pipeline_scheduler)
    if random_weights:
        return scheduler_class()
    return _from_hub(name, weights or spec.hub_id, lambda source: scheduler_class.from_pretrained(
        source, subfolder="scheduler"))


def preset_task(name: str, transformers: list, scheduler, bank: dict | None, steps: int, guidance: float,
                sampler: str | None = None):
    """The `task.Task` of preset `name` on its transformers (`load_experts`), its pipeline's `scheduler`
    (`load_scheduler`; None for a flow family), a prompt bank (None: class-conditional), `sampler` (default the
    preset's), steps and guidance (`Family.make_task`)."""
    from .flow import SAMPLER

    spec = preset(name)
    return spec.family.make_task(spec, transformers, scheduler, sampler or spec.sampler or SAMPLER, bank, steps,
                                 guidance)


def load_text_encoders(name: str, *, weights: str | None = None, dtype: torch.dtype = torch.float32):
    """A PixArt or flow preset's pipeline with its tokenizers and text encoders only (no transformer, none of its
    experts, no VAE), from `weights` (hub id or path; default the preset's hub id)."""
    import diffusers

    spec = preset(name)
    if not spec.family.text_conditional:
        raise ValueError(f"model: expected a text-conditional model (PixArt or a flow model), got {name} (class-"
                         f"conditional: no text encoder)")
    pipeline_class = getattr(diffusers, spec.pipeline)
    experts = {f"transformer_{i}": None for i in range(2, spec.experts + 1)}  # Wan 2.2 A14B's transformer_2
    return _from_hub(name, weights or spec.hub_id, lambda source: pipeline_class.from_pretrained(
        source, transformer=None, vae=None, dtype=dtype, **experts), hint="")


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
    pass prompt embeddings (`prompts.random_embeddings`)."""
    import diffusers

    spec = preset(name)
    pipeline_class = getattr(diffusers, spec.pipeline)
    if not random_weights:
        return _from_hub(name, weights or spec.hub_id, pipeline_class.from_pretrained)
    transformer = build_transformer(name, seed=seed)
    vae = load_vae(name, random_weights=True, seed=seed)
    return spec.family.random_pipeline(pipeline_class, transformer, vae, load_scheduler(name, random_weights=True))


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
