"""Shared test tools: devices, dtypes, random inputs and the three-way comparison of style.md."""

import torch

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
