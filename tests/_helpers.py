"""Shared test tools: devices, dtypes, random inputs and the three-way comparison of style.md."""

import torch

from harmonica.models import build_transformer
from harmonica.units import cached_units

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# beyond twice torch's own low-precision error (the interpreter truncates where the GPU rounds)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def dtype_id(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def randn(shape, dtype, *, gen: torch.Generator, strided: bool = False) -> torch.Tensor:
    """Fresh N(0, 1) values; `strided` gives a view whose every stride is non-trivial."""
    if not strided:
        return torch.randn(shape, generator=gen).to(DEVICE, dtype)
    # reversed storage order with a gap in the last dimension
    base = torch.randn(*reversed(shape[:-1]), 2 * shape[-1], generator=gen).to(DEVICE, dtype)
    view = base.permute(*reversed(range(len(shape) - 1)), len(shape) - 1)[..., ::2]
    assert view.shape == tuple(shape)
    return view


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def assert_matches_reference(actual, lowp, ref32, name: str) -> None:
    """`actual` may differ from the fp32 reference by at most twice what torch in the same low
    precision (`lowp`) differs, plus a small per-dtype atol. Reports count and place of mismatches."""
    assert actual.shape == ref32.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref32.shape)}"
    err = (actual.float() - ref32.float()).abs()
    scale = max(1.0, ref32.abs().max().item())
    bound = 2 * (lowp.float() - ref32.float()).abs().max().item() + ATOL[actual.dtype] * scale
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} elements beyond {bound:.3g} "
                             f"(max error {err.nan_to_num(float('inf')).max().item():.3g}); first at {where}")


def rounding_bound(reference: torch.Tensor, terms: int) -> float:
    """How far two evaluations of `reference` may differ when they differ only in rounding (other BLAS kernels,
    reduction orders or fused operations): eps x terms x max |reference|, terms counting the roundings along
    the way (the longest reduction, times the steps or units that carry its error on)."""
    return torch.finfo(reference.dtype).eps * terms * reference.abs().max().item()


def make_model(name):
    """A tiny DiT/PixArt transformer whose every parameter is random (diffusers zero-initialises some)."""
    model = build_transformer(name)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return model


def step_inputs(model, step, batch=2):
    """The forward arguments of denoising step `step` for a tiny model (8x8 latents)."""
    gen = torch.Generator().manual_seed(100 + step)
    inputs = dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=gen),
                  timestep=torch.full((batch,), 900 - 200 * step))
    if type(model).__name__.startswith("DiT"):
        inputs["class_labels"] = torch.tensor([3, 1000])[:batch]
    else:
        inputs["encoder_hidden_states"] = torch.randn(batch, 5, 32, generator=gen)
        inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return inputs


def cuda_inputs(model, step, batch=2):
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in step_inputs(model, step, batch).items()}


def units_of(model):
    return len(cached_units(model))


def patch_cli(monkeypatch, name: str, value) -> None:
    """Set `name` to `value` in every command module of harmonica.cli that imported it (each holds its own)."""
    from harmonica.cli import embed, sample, train

    modules = [module for module in (sample, train, embed) if hasattr(module, name)]
    assert modules, f"no harmonica.cli module has {name}"
    for module in modules:
        monkeypatch.setattr(module, name, value)
