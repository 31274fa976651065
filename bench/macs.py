"""Multiply-accumulates per cached unit of a diffusers DiT or PixArt transformer.

Counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device: no weights, no compute,
instant at any resolution. MACs = FLOPs / 2. Everything outside the units (patch embedding,
timestep/class/caption embeddings, adaLN, final layer) is the part that always runs.

DiT-XL/2 at 256x256 counts 118.6 GMACs per image per forward, the DiT paper's "118.6 Gflops".
"""

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from harmonica.models import PRESETS, REAL_MODELS
from harmonica.units import cached_units

VAE_FACTOR = 8  # pixels per latent pixel (SD VAE, used by DiT and PixArt)


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

    if class_name not in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        raise ValueError(f"model: expected a DiTTransformer2DModel or PixArtTransformer2DModel, got {class_name}")
    return getattr(diffusers, class_name)


def _meta_transformer(class_name: str, config: dict):
    with torch.device("meta"):
        return _diffusers_class(class_name).from_config(config)


def _example_inputs(model, batch: int, height: int, width: int, caption_tokens: int) -> dict:
    cfg = model.config
    patch = VAE_FACTOR * cfg.patch_size
    if height % patch or width % patch:
        raise ValueError(f"height, width: expected multiples of {patch} (VAE factor x patch size), "
                         f"got {height}x{width}")
    meta = dict(device="meta")
    inputs = dict(
        hidden_states=torch.empty(batch, cfg.in_channels, height // VAE_FACTOR, width // VAE_FACTOR, **meta),
        timestep=torch.zeros(batch, dtype=torch.long, **meta),
    )
    if type(model).__name__ == "DiTTransformer2DModel":
        inputs["class_labels"] = torch.zeros(batch, dtype=torch.long, **meta)
    else:
        inputs["encoder_hidden_states"] = torch.empty(batch, caption_tokens, cfg.caption_channels, **meta)
        inputs["added_cond_kwargs"] = (
            {"resolution": torch.empty(batch, 2, **meta), "aspect_ratio": torch.empty(batch, 1, **meta)}
            if model.use_additional_conditions else {"resolution": None, "aspect_ratio": None})
    return inputs


def count_macs(model, height: int | None = None, width: int | None = None, *, batch: int = 1,
               caption_tokens: int | None = None, cross_attention: bool = True) -> MacCount:
    """MACs per image per forward, per unit and for the always-run rest.

    model: a preset name (see PRESETS) or a diffusers DiT/PixArt transformer (only its config is used).
    height, width: pixels (default: the preset's resolution, or the config's sample_size x 8).
    caption_tokens: text length of PixArt's cross-attention (default: the preset's, else 120).
    cross_attention: whether PixArt's `attn2` is a unit of its own (else it counts as always-run).
    """
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"model: expected one of {sorted(PRESETS)}, got {model!r}")
        spec = PRESETS[model]
        class_name, config, resolution, tokens = spec.class_name, spec.config, spec.resolution, spec.caption_tokens
    else:
        class_name, config = type(model).__name__, dict(model.config)
        resolution, tokens = model.config.sample_size * VAE_FACTOR, 120
    height = height or resolution
    width = width or height
    meta_model = _meta_transformer(class_name, config)
    inputs = _example_inputs(meta_model, batch, height, width, tokens if caption_tokens is None else caption_tokens)
    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        meta_model(**inputs)
    flops = counter.get_flop_counts()
    per_module = {name: sum(ops.values()) / 2 / batch for name, ops in flops.items()}
    names = tuple(name for name, _ in cached_units(meta_model, cross_attention=cross_attention))
    unit_macs = tuple(per_module.get(f"{class_name}.{name}", 0.0) for name in names)
    return MacCount(names=names, unit_macs=unit_macs, always_macs=per_module["Global"] - sum(unit_macs))


def mac_table(presets=REAL_MODELS) -> list:
    """One row per preset at its native resolution: GMACs per image per forward and the unit shares."""
    rows = []
    for name in presets:
        count = count_macs(name)
        kinds = count.by_kind()
        spec = PRESETS[name]
        patch = VAE_FACTOR * 2  # every preset has patch size 2
        rows.append({
            "model": name,
            "resolution": spec.resolution,
            "tokens": (spec.resolution // patch) ** 2,
            "units": len(count.names),
            "gmacs": count.total / 1e9,
            **{f"{kind}_share": kinds.get(kind, 0.0) / count.total for kind in ("attn1", "attn2", "ff")},
            "always_share": count.always_macs / count.total,
            "ff_per_attn1": kinds["ff"] / kinds["attn1"],
        })
    return rows


def format_mac_table(rows) -> str:
    """Markdown table of `mac_table` rows."""
    header = "| model | res | tokens | units | GMACs/img/fwd | attn1 | attn2 | ff | always-run | ff/attn1 |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['tokens']} | {r['units']} | {r['gmacs']:.1f} | "
            f"{r['attn1_share']:.1%} | {r['attn2_share']:.1%} | {r['ff_share']:.1%} | {r['always_share']:.1%} | "
            f"{r['ff_per_attn1']:.2f} |")
    return "\n".join(lines)
