"""Multiply-accumulates per cached unit of a diffusers transformer of a family (harmonica/families): the DiT and
PixArt presets (`models.PRESETS`) and the flow-matching models (`models.FLOW_MODELS` and `models.FLOW_PRESETS`).

Counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device: no weights, no compute,
seconds at any resolution (4-9 s for each real flow model on 2 CPU cores), each count kept for the process (a
`MacCount` is frozen; training, the bench plan and the tables ask for the same ones). MACs = FLOPs / 2. A unit's
MACs are those of the modules a reused unit skips (`harmonica.units`); everything else (patch embedding,
timestep/text embeddings, adaLN, final layer) is the part that always runs.

DiT-XL/2 at 256x256 counts 118.6 GMACs per image per forward, the DiT paper's "118.6 Gflops".
`summary`, the flow tasks and training count with it; `harmonica.bench.macs` makes the tables of BENCHMARKS.md.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .families import FAMILIES, family_of
from .flow import VAE_FACTOR  # a family's own: `Family.vae_factor`
from .models import FLOW_MODELS, FLOW_PRESETS, PRESETS
from .units import units_of

PATCH = 2  # latent pixels per token side of packed latents (2 x 2 latents in one token)
_COUNTS = {}  # (class name, frozen config, batch, height, width, text tokens, frames, cross_attention) -> MacCount


@dataclass(frozen=True)
class MacCount:
    """MACs per image for one forward of a transformer at one resolution.

    names: qualified unit names in execution order (`transformer_blocks.3.ff`), K of them.
    unit_macs: MACs of each unit, aligned with `names`.
    always_macs: MACs outside the units, spent at every step whatever the schedule.
    """

    names: tuple
    unit_macs: tuple
    always_macs: float

    @property
    def total(self) -> float:
        return sum(self.unit_macs) + self.always_macs

    def by_kind(self) -> dict:
        """{'attn1': MACs, 'attn2': ..., 'ff': ...} summed over blocks."""
        sums = {}
        for name, macs in zip(self.names, self.unit_macs):
            kind = name.rsplit(".", 1)[1]
            sums[kind] = sums.get(kind, 0.0) + macs
        return sums


def _diffusers_class(class_name: str):
    import diffusers

    classes = tuple(FAMILIES)
    if class_name not in classes:
        raise ValueError(f"model: expected a transformer of {', '.join(classes)}, got {class_name}")
    return getattr(diffusers, class_name)


def _meta_transformer(class_name: str, config: dict):
    with torch.device("meta"):
        return _diffusers_class(class_name).from_config(config)


def _latent_side(pixels: int, factor: int, multiple: int, name: str, size: str) -> int:
    if pixels % multiple:
        raise ValueError(f"{name}: expected multiples of {multiple} (VAE factor x patch size), got {size}")
    return pixels // factor


def _example_inputs(model, batch: int, height: int, width: int, text_tokens: int, frames: int | None) -> dict:
    """Meta tensors of one forward of `model` on `batch` images (videos) of height x width pixels."""
    cfg, family = model.config, family_of(model)
    factor = family.vae_factor
    multiple = factor * family.task.patch(cfg)
    h, w = (_latent_side(p, factor, multiple, "height, width", f"{height}x{width}") for p in (height, width))
    text_dim = family.task.text_dim  # None: a class-conditional family
    text = None if text_dim is None else torch.empty(batch, text_tokens, cfg[text_dim], device="meta")
    return family.example_inputs(cfg, batch, h, w, text, frames)


def _spec(model):
    """(class name, config, height, width, text tokens, frames) of a preset name or a model instance."""
    if isinstance(model, str):
        spec = FLOW_MODELS.get(model) or FLOW_PRESETS.get(model) or PRESETS.get(model)
        if spec is None:
            raise ValueError(f"model: expected one of {sorted({*PRESETS, *FLOW_MODELS})}, got {model!r}")
        return spec.class_name, spec.config, spec.height, spec.width, spec.text_tokens, spec.frames
    sample_size = model.config.get("sample_size")
    resolution = sample_size * VAE_FACTOR if isinstance(sample_size, int) else None
    return type(model).__name__, dict(model.config), resolution, resolution, 120, None


def count_macs(model, height: int | None = None, width: int | None = None, *, batch: int = 1,
               text_tokens: int | None = None, frames: int | None = None,
               cross_attention: bool = True) -> MacCount:
    """MACs per image (video) per forward, per unit and for the always-run rest.

    model: a preset name (PRESETS, FLOW_PRESETS or FLOW_MODELS) or a diffusers transformer (only its config is used).
    height, width: pixels (default: the preset's size, or the config's sample_size x 8).
    text_tokens: text tokens (default: the preset's, else 120); frames: a video model's (default the preset's).
    cross_attention: whether PixArt's `attn2` is a unit of its own (else it counts as always-run).
    """
    class_name, config, default_height, default_width, tokens, default_frames = _spec(model)
    height = height or default_height
    width = width or (height if height != default_height else default_width)
    if height is None:
        raise ValueError(f"height: expected pixels for a {class_name} (its config has no sample_size), got None")
    tokens = tokens if text_tokens is None else text_tokens
    frames = frames or default_frames
    key = (class_name, _frozen(config), batch, height, width, tokens, frames, cross_attention)
    if key not in _COUNTS:
        _COUNTS[key] = _count(_meta_transformer(class_name, config), batch, height, width, tokens, frames,
                              cross_attention)
    return _COUNTS[key]


def _frozen(value):
    """A hashable copy of a config value: dicts as sorted (key, value) tuples, lists as tuples."""
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    return value


def _count(meta_model, batch, height, width, tokens, frames, cross_attention) -> MacCount:
    """`count_macs` of the meta transformer: one forward under the flop counter."""
    class_name = type(meta_model).__name__
    inputs = _example_inputs(meta_model, batch, height, width, tokens, frames)
    counter = FlopCounterMode(display=False, depth=None)
    family = FAMILIES.get(class_name)
    meta_mode = family.meta_mode() if family is not None and family.meta_mode is not None else nullcontext()
    with counter, meta_mode, torch.no_grad():
        meta_model(**inputs)
    flops = counter.get_flop_counts()
    per_module = {name: sum(ops.values()) / 2 / batch for name, ops in flops.items()}
    units = units_of(meta_model, cross_attention=cross_attention)
    names = tuple(unit.name for unit in units)
    unit_macs = tuple(sum(per_module.get(f"{class_name}.{module}", 0.0) for module in unit.modules) for unit in units)
    return MacCount(names=names, unit_macs=unit_macs, always_macs=per_module["Global"] - sum(unit_macs))


def count_macs_for_input(model, hidden_shape: tuple, text_tokens: int | None = None, *,
                         cross_attention: bool = True, sizes: dict | None = None) -> tuple:
    """(MacCount, where) at the size of a forward whose hidden_states had `hidden_shape`: (B, C, h, w) latents,
    (B, C, f, h, w) video latents or (B, L, C) packed tokens (2 x 2 latents per token; only L matters, so they are
    counted as one row of L tokens). where: "HxW px", "HxWxF px" or "L tokens", for messages. text_tokens:
    encoder_hidden_states' tokens (None: the preset's default). sizes: the forward's int arguments, for a family
    whose `forward_size` reads its size from them (LTX-2)."""
    family = FAMILIES.get(type(model).__name__)
    if family is not None and family.forward_size is not None:
        height, width, frames = family.forward_size(model.config, sizes or {})
        return count_macs(model, height, width, text_tokens=text_tokens, frames=frames,
                          cross_attention=cross_attention), f"{height}x{width}x{frames}"
    if len(hidden_shape) == 3:
        tokens = hidden_shape[1]
        side = VAE_FACTOR * PATCH
        return count_macs(model, side, side * tokens, text_tokens=text_tokens,
                          cross_attention=cross_attention), f"{tokens} image tokens"
    family = FAMILIES.get(_spec(model)[0])
    height, width = (size * (VAE_FACTOR if family is None else family.vae_factor) for size in hidden_shape[-2:])
    video = len(hidden_shape) == 5 and family_of(model).frame_factor is not None  # (Z-Image's images are 5-D)
    frames = family_of(model).video_frames(hidden_shape[2]) if video else None
    where = f"{height}x{width}" + (f"x{frames}" if frames else "")
    return count_macs(model, height, width, text_tokens=text_tokens, frames=frames,
                      cross_attention=cross_attention), where
