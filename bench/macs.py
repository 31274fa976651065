"""Multiply-accumulates per cached unit of a diffusers transformer: DiT, PixArt and the flow-matching
models of `configs.FLOW_MODELS` (FLUX.1, SD3.5, Wan 2.1, Qwen-Image).

Counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device: no weights, no compute,
seconds at any resolution (4-9 s for each real flow model on 2 CPU cores). MACs = FLOPs / 2. A unit's
MACs are those of the modules a reused unit skips (`harmonica.units`); everything else (patch embedding,
timestep/text embeddings, adaLN, final layer) is the part that always runs.

DiT-XL/2 at 256x256 counts 118.6 GMACs per image per forward, the DiT paper's "118.6 Gflops".

    python -m harmonica.bench.macs [--write [--benchmarks BENCHMARKS.md]]

prints, or with --write rewrites, the MAC section of BENCHMARKS.md (between the `bench-macs` markers).
"""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from harmonica.files import write_file
from harmonica.models import FLOW_PRESETS, PRESETS, REAL_MODELS
from harmonica.units import units_of

from .configs import FLOW_MODELS

VAE_FACTOR = 8  # pixels per latent pixel (the VAEs of every model here, spatially)
WAN_FRAME_FACTOR = 4  # Wan's VAE: latent frames = (frames - 1) / 4 + 1
PATCH = 2  # latent pixels per token side (FLUX and Qwen-Image pack 2 x 2 latents into one token)
DIT_CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
FLOW_CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel", "WanTransformer3DModel",
                "QwenImageTransformer2DModel")


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

    if class_name not in DIT_CLASSES + FLOW_CLASSES:
        raise ValueError(f"model: expected a transformer of {', '.join(DIT_CLASSES + FLOW_CLASSES)}, got {class_name}")
    return getattr(diffusers, class_name)


def _meta_transformer(class_name: str, config: dict):
    with torch.device("meta"):
        return _diffusers_class(class_name).from_config(config)


def _latent_side(pixels: int, multiple: int, name: str, size: str) -> int:
    if pixels % multiple:
        raise ValueError(f"{name}: expected multiples of {multiple} (VAE factor x patch size), got {size}")
    return pixels // VAE_FACTOR


def _example_inputs(model, batch: int, height: int, width: int, text_tokens: int, frames: int | None) -> dict:
    """Meta tensors of one forward of `model` on `batch` images (videos) of height x width pixels."""
    cfg, name = model.config, type(model).__name__
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[-1]
    multiple = VAE_FACTOR * (PATCH if name in ("FluxTransformer2DModel", "QwenImageTransformer2DModel") else patch)
    h, w = (_latent_side(p, multiple, "height, width", f"{height}x{width}") for p in (height, width))
    meta = dict(device="meta")
    text_dims = {"FluxTransformer2DModel": "joint_attention_dim", "SD3Transformer2DModel": "joint_attention_dim",
                 "WanTransformer3DModel": "text_dim", "QwenImageTransformer2DModel": "joint_attention_dim",
                 "PixArtTransformer2DModel": "caption_channels"}
    text = torch.empty(batch, text_tokens, cfg[text_dims[name]], **meta) if name in text_dims else None
    if name in ("FluxTransformer2DModel", "QwenImageTransformer2DModel"):  # packed latents (B, h/2 w/2, C)
        inputs = dict(hidden_states=torch.empty(batch, (h // PATCH) * (w // PATCH), cfg.in_channels, **meta),
                      encoder_hidden_states=text, timestep=torch.zeros(batch, **meta))
        if name == "QwenImageTransformer2DModel":
            return {**inputs, "img_shapes": [(1, h // PATCH, w // PATCH)] * batch}
        ids = dict(img_ids=torch.zeros(inputs["hidden_states"].shape[1], 3, **meta),
                   txt_ids=torch.zeros(text_tokens, 3, **meta), pooled_projections=torch.empty(
                       batch, cfg.pooled_projection_dim, **meta))
        return {**inputs, **ids, "guidance": torch.zeros(batch, **meta) if cfg.guidance_embeds else None}
    if name == "WanTransformer3DModel":
        if frames is None or (frames - 1) % WAN_FRAME_FACTOR:
            raise ValueError(f"frames: expected 4 n + 1 frames for a video model, got {frames}")
        latents = torch.empty(batch, cfg.in_channels, (frames - 1) // WAN_FRAME_FACTOR + 1, h, w, **meta)
        return dict(hidden_states=latents, encoder_hidden_states=text, timestep=torch.zeros(batch, **meta))
    inputs = dict(hidden_states=torch.empty(batch, cfg.in_channels, h, w, **meta))
    if name == "SD3Transformer2DModel":
        return {**inputs, "encoder_hidden_states": text, "timestep": torch.zeros(batch, **meta),
                "pooled_projections": torch.empty(batch, cfg.pooled_projection_dim, **meta)}
    inputs["timestep"] = torch.zeros(batch, dtype=torch.long, **meta)
    if name == "DiTTransformer2DModel":
        inputs["class_labels"] = torch.zeros(batch, dtype=torch.long, **meta)
        return inputs
    inputs["encoder_hidden_states"] = text
    inputs["added_cond_kwargs"] = (
        {"resolution": torch.empty(batch, 2, **meta), "aspect_ratio": torch.empty(batch, 1, **meta)}
        if model.use_additional_conditions else {"resolution": None, "aspect_ratio": None})
    return inputs


def _spec(model):
    """(class name, config, height, width, text tokens, frames) of a preset name or a model instance."""
    if isinstance(model, str):
        if model in FLOW_MODELS or model in FLOW_PRESETS:
            spec = FLOW_MODELS.get(model) or FLOW_PRESETS[model]
            return spec.class_name, spec.config, spec.height, spec.width, spec.text_tokens, spec.frames
        if model not in PRESETS:
            raise ValueError(f"model: expected one of {sorted({*PRESETS, *FLOW_MODELS})}, got {model!r}")
        spec = PRESETS[model]
        return spec.class_name, spec.config, spec.resolution, spec.resolution, spec.caption_tokens, None
    sample_size = model.config.get("sample_size")
    resolution = sample_size * VAE_FACTOR if isinstance(sample_size, int) else None
    return type(model).__name__, dict(model.config), resolution, resolution, 120, None


def count_macs(model, height: int | None = None, width: int | None = None, *, batch: int = 1,
               caption_tokens: int | None = None, frames: int | None = None,
               cross_attention: bool = True) -> MacCount:
    """MACs per image (video) per forward, per unit and for the always-run rest.

    model: a preset name (PRESETS or configs.FLOW_MODELS) or a diffusers transformer (only its config is used).
    height, width: pixels (default: the preset's size, or the config's sample_size x 8).
    caption_tokens: text tokens (default: the preset's, else 120); frames: a video model's (default the preset's).
    cross_attention: whether PixArt's `attn2` is a unit of its own (else it counts as always-run).
    """
    class_name, config, default_height, default_width, tokens, default_frames = _spec(model)
    height = height or default_height
    width = width or (height if height != default_height else default_width)
    if height is None:
        raise ValueError(f"height: expected pixels for a {class_name} (its config has no sample_size), got None")
    meta_model = _meta_transformer(class_name, config)
    inputs = _example_inputs(meta_model, batch, height, width, tokens if caption_tokens is None else caption_tokens,
                             frames or default_frames)
    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        meta_model(**inputs)
    flops = counter.get_flop_counts()
    per_module = {name: sum(ops.values()) / 2 / batch for name, ops in flops.items()}
    units = units_of(meta_model, cross_attention=cross_attention)
    names = tuple(unit.name for unit in units)
    unit_macs = tuple(sum(per_module.get(f"{class_name}.{module}", 0.0) for module in unit.modules) for unit in units)
    return MacCount(names=names, unit_macs=unit_macs, always_macs=per_module["Global"] - sum(unit_macs))


def count_macs_for_input(model, hidden_shape: tuple, text_tokens: int | None = None, *,
                         cross_attention: bool = True) -> tuple:
    """(MacCount, where) at the size of a forward whose hidden_states had `hidden_shape`: (B, C, h, w)
    latents, (B, C, f, h, w) video latents or (B, L, C) packed tokens (FLUX, Qwen-Image: 2 x 2 latents per
    token; only L matters, so they are counted as one row of L tokens). where: "HxW px", "HxWxF px" or
    "L tokens", for messages. text_tokens: encoder_hidden_states' tokens (None: the preset's default)."""
    if len(hidden_shape) == 3:
        tokens = hidden_shape[1]
        side = VAE_FACTOR * PATCH
        return count_macs(model, side, side * tokens, caption_tokens=text_tokens,
                          cross_attention=cross_attention), f"{tokens} image tokens"
    height, width = (size * VAE_FACTOR for size in hidden_shape[-2:])
    frames = (hidden_shape[2] - 1) * WAN_FRAME_FACTOR + 1 if len(hidden_shape) == 5 else None
    where = f"{height}x{width}" + (f"x{frames}" if frames else "")
    return count_macs(model, height, width, caption_tokens=text_tokens, frames=frames,
                      cross_attention=cross_attention), where


def mac_table(presets=REAL_MODELS) -> list:
    """One row per DiT/PixArt preset at its native resolution: GMACs per image per forward and the unit shares."""
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


def flow_mac_table(models=tuple(FLOW_MODELS)) -> list:
    """One row per flow model at its native size: GMACs per image (video) per forward, image and text tokens,
    and the share of each unit kind."""
    rows = []
    for name in models:
        spec = FLOW_MODELS[name]
        count = count_macs(name)
        frames = (spec.frames - 1) // WAN_FRAME_FACTOR + 1 if spec.frames else 1
        rows.append({
            "model": name,
            "size": f"{spec.height}x{spec.width}" + (f"x{spec.frames}" if spec.frames else ""),
            "image_tokens": frames * math.prod(side // (VAE_FACTOR * PATCH) for side in (spec.height, spec.width)),
            "text_tokens": spec.text_tokens,
            "units": len(count.names),
            "gmacs": count.total / 1e9,
            "kind_shares": {kind: macs / count.total for kind, macs in count.by_kind().items()},
            "always_gmacs": count.always_macs / 1e9,
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


def format_flow_mac_table(rows) -> str:
    """Markdown table of `flow_mac_table` rows."""
    header = ("| model | size | image tokens | text tokens | units | TMACs/fwd | unit kinds (share of the forward) "
              "| always-run GMACs |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        kinds = ", ".join(f"{kind} {share:.1%}" for kind, share in r["kind_shares"].items())
        lines.append(f"| {r['model']} | {r['size']} | {r['image_tokens']} | {r['text_tokens']} | {r['units']} | "
                     f"{r['gmacs'] / 1e3:.2f} | {kinds} | {r['always_gmacs']:.1f} |")
    return "\n".join(lines)


MACS_BEGIN = "<!-- bench-macs:begin (generated by python -m harmonica.bench.macs; do not edit by hand) -->"
MACS_END = "<!-- bench-macs:end -->"


def macs_section(dit_rows, flow_rows, machine: dict) -> str:
    """The BENCHMARKS.md MAC section, markers included; machine: `machine.machine_info()`."""
    versions = ", ".join(f"{p} {machine[p]}" for p in ("torch", "diffusers"))
    return "\n".join([
        MACS_BEGIN,
        "## MAC accounting (no timing)",
        "",
        "Multiply-accumulates per image (video) per transformer forward, per cached unit kind, counted by",
        "`torch.utils.flop_counter.FlopCounterMode` on the meta device (`bench/macs.py`). Deterministic: any machine",
        "gives the same table. Reference: the DiT paper gives 118.6 and 524.6 GFLOPs (MACs) for DiT-XL/2 at",
        "256² and 512².",
        "",
        f"- Command: `python -m harmonica.bench.macs --write`; date {machine['date'][:10]}; "
        f"commit {machine['commit']}; {versions}",
        "",
        format_mac_table(dit_rows),
        "",
        "PixArt counts 120 caption tokens (α) and 300 (Σ); cross-attention is its own unit.",
        "",
        "Flow-matching models at their native sizes, configs transcribed from their hub repositories",
        "(`bench/configs.py` FLOW_MODELS), one prompt, no CFG batch:",
        "",
        format_flow_mac_table(flow_rows),
        "",
        "- Units, as the block adapters (`harmonica/adapters`) define them: FLUX.1's double block has the joint",
        "  attention `attn` (one unit for both streams), the image MLP `ff` and the text MLP `ff_context`, its single",
        "  block one unit `attn_mlp` (attention, MLP and `proj_out`); SD3.5's `attn` (joint), `attn2` (where dual),",
        "  `ff`, `ff_context` (the last block has none); Wan's `attn1`, cross-attention `attn2`, `ffn`; Qwen-Image's",
        "  `attn` (joint), `img_mlp`, `txt_mlp`.",
        "- Always-run: embeddings, adaLN linears, norms, the final layer.",
        "- Text tokens: FLUX.1 (T5) and Wan (UMT5) pad the prompt to 512; SD3.5 has 77 CLIP + 256 T5 tokens;",
        "  Qwen-Image at its cap of 512 (its pipeline does not pad: shorter prompts cost less). Wan: 81 frames are",
        "  21 latent frames.",
        MACS_END,
    ])


def main(argv=None) -> int:
    from .machine import machine_info
    from .table import update_benchmarks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the section in --benchmarks (default: print)")
    parser.add_argument("--benchmarks", default="BENCHMARKS.md", help="the markdown file --write rewrites")
    args = parser.parse_args(argv)
    section = macs_section(mac_table(), flow_mac_table(), machine_info())
    if not args.write:
        print(section)
        return 0
    path = Path(args.benchmarks)
    write_file(path, update_benchmarks(path.read_text(), section))
    print(f"{path}: MAC section regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
