"""Kernel micro-benchmark: the fused cache-path ops against the eager diffusers sequence.

Ops (inputs (B, N, D), gate (B, 1, D)):
- compute: eager `cache.copy_(out)`, `gate * out`, `+ h`   vs `gated_residual_compute(..., cache=)`
- reuse:   eager `gate * cache`, `+ h`                      vs `gated_residual_reuse`
- blend:   eager soft gating with the r > tau slot write    vs `gated_residual(..., tau=)`
- forecast: eager `a * newest + b * older`, `gate *`, `+ h` vs `gated_residual_forecast`
- cache_copy: 56 slots, a loop of `copy_` and `torch._foreach_copy_` vs one `CacheCopyPlan`
- solver_step (shape (B, C, N): latents of N = H*W positions, a CFG output of 2B rows and 2C channels,
  guidance on all channels and a DPM-Solver++ second-order step, as PixArt's):
  eager `solver_step_ref` (16 tensor ops in fp16) vs `solver_step`, both in place
Each op also times a device-to-device copy moving the same bytes as the fused op, in the same run:
`copy_fraction` = copy time / op time is the share of copy bandwidth the op reaches. A bandwidth-bound
op cannot beat eager by more than `byte_ratio` = bytes eager moves (its aten ops' reads and writes,
counted on the meta device) / bytes the fused op moves.

Times are `triton.testing.do_bench` quantiles (median, p20, p80, ms; L2 flushed between runs).
"""

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from harmonica.kernels.cache_copy import CacheCopyPlan, cache_copy_ref
from harmonica.kernels.gated_residual import (
    gated_residual,
    gated_residual_compute,
    gated_residual_compute_ref,
    gated_residual_forecast,
    gated_residual_forecast_ref,
    gated_residual_ref,
    gated_residual_reuse,
    gated_residual_reuse_ref,
)
from harmonica.kernels.solver_step import solver_step, solver_step_ref

TAU = 0.1
FORECAST = (1.6, -0.6)  # a, b of the forecast form: a linear extrapolation leaning on the newest output
CACHE_SLOTS = 56  # DiT-XL/2: 28 blocks x (attn1, ff)
# fused compute form: >= 90% of copy bandwidth and >= 90% of the eager / fused byte ratio as speedup
TARGET = {"op": "compute", "shape": (2, 4096, 1152), "dtype": "bf16", "copy_fraction": 0.9, "byte_ratio_share": 0.9}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
PROVIDERS = {
    "compute": ("eager", "fused"),
    "reuse": ("eager", "fused"),
    "blend": ("eager", "fused"),
    "forecast": ("eager", "fused"),
    "cache_copy": ("eager", "foreach", "fused"),
    "solver_step": ("eager", "fused"),
}
SOLVER_SHAPES = [(1, 4, 32 * 32), (1, 4, 128 * 128), (1, 4, 256 * 256)]  # latents of 256², 1024², 2048²


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple  # (B, N, D)
    dtype: torch.dtype

    @property
    def id(self) -> str:
        B, N, D = self.shape
        return f"{self.op}-B{B}-N{N}-D{D}-{DTYPE_NAMES[self.dtype]}"


def default_cases() -> list:
    shapes = [(2, 256, 1152), (2, 1024, 1152), (2, 4096, 1152), (2, 16384, 1152)]
    dtypes = (torch.bfloat16, torch.float16)
    cases = [Case(op, shape, dtype) for op in PROVIDERS if op != "solver_step" for dtype in dtypes
             for shape in shapes if not (op == "cache_copy" and shape[1] > 4096)]
    return cases + [Case("solver_step", shape, dtype) for dtype in dtypes for shape in SOLVER_SHAPES]


def _tensors(case: Case, device, count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(case.shape, generator=gen).to(device, case.dtype) for _ in range(count)]


def build(case: Case, provider: str, device="cuda"):
    """(fn, bytes the fused op moves). fn runs the provider and returns the tensors it wrote."""
    B, N, D = case.shape
    size = B * N * D * torch.tensor([], dtype=case.dtype).element_size()
    if case.op == "cache_copy":
        srcs = _tensors(case, device, CACHE_SLOTS)
        dsts = [torch.empty_like(s) for s in srcs]
        plan = CacheCopyPlan(srcs, dsts)
        fns = {"eager": lambda: cache_copy_ref(srcs, dsts), "foreach": lambda: torch._foreach_copy_(dsts, srcs),
               "fused": plan}
        return (lambda: fns[provider]() or dsts), 2 * CACHE_SLOTS * size
    if case.op == "solver_step":
        return _build_solver_step(case, provider, device)
    h, fresh, cache = _tensors(case, device, 3)
    gate = torch.randn(B, 1, D, generator=torch.Generator().manual_seed(1)).to(device, case.dtype)
    r = torch.tensor(0.7, device=device)
    a, b = FORECAST
    out = torch.empty_like(h)
    # eager allocates its result, as diffusers' `hidden_states = attn_output + hidden_states` does
    fns = {
        "compute": {"eager": lambda: gated_residual_compute_ref(h, fresh, gate, cache),
                    "fused": lambda: gated_residual_compute(h, fresh, gate, cache=cache, out=out)},
        "reuse": {"eager": lambda: gated_residual_reuse_ref(h, cache, gate),
                  "fused": lambda: gated_residual_reuse(h, cache, gate, out=out)},
        "blend": {"eager": lambda: gated_residual_ref(h, fresh, cache, r, gate, TAU),
                  "fused": lambda: gated_residual(h, fresh, cache, r, gate, tau=TAU, out=out)},
        "forecast": {"eager": lambda: gated_residual_forecast_ref(h, cache, fresh, a, b, gate),
                     "fused": lambda: gated_residual_forecast(h, cache, fresh, a, b, gate, out=out)},
    }[case.op][provider]
    # tensor-sized reads and writes of the fused op: compute h, fresh -> out, cache; reuse h, cache -> out;
    # blend h, fresh, cache -> out, cache; forecast h, newest (cache), older (fresh) -> out
    moved = {"compute": 4, "reuse": 3, "blend": 5, "forecast": 4}[case.op] * size
    return (lambda: [fns(), cache]), moved


def _build_solver_step(case: Case, provider: str, device):
    B, C, N = case.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, N, 1, generator=gen).to(device, case.dtype)
    out = torch.randn(2 * B, 2 * C, N, 1, generator=gen).to(device, case.dtype)
    x0_prev = torch.randn(B, C, N, 1, generator=gen).to(device)
    coefficients = torch.tensor([1.02, -0.2, 0.8, 0.25, -0.05], device=device)
    step = {"eager": solver_step_ref, "fused": solver_step}[provider]
    x_out, x0_out = torch.empty_like(x), torch.empty_like(x0_prev)

    def run():
        step(x, out, coefficients, guidance_scale=4.5, cond_first=False, x0_prev=x0_prev, x_out=x_out, x0_out=x0_out)
        return [x_out, x0_out]

    # reads x, both halves of eps, x0_prev (fp32); writes x_next, x0 (fp32)
    return run, B * C * N * (4 * x.element_size() + 2 * 4)


def do_bench_ms(fn) -> tuple:
    """(median, p20, p80) in ms of `fn` on the GPU, L2 flushed before each run."""
    import triton.testing

    return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))


def copy_baseline(moved_bytes: int, device="cuda"):
    """A device-to-device copy that reads and writes `moved_bytes` in total."""
    src = torch.empty(moved_bytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


class _ByteCount(TorchDispatchMode):
    """Bytes the aten ops run under it read and write. Views move none; `copy_` and `out=` arguments are
    written, not read."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return result
        named = {**dict(zip((a.name for a in schema.arguments), args)), **kwargs}
        write_only = {a.name for a in schema.arguments
                      if a.is_out or (func.overloadpacket is torch.ops.aten.copy_ and a.is_write)}
        tensors = tree_leaves([v for k, v in named.items() if k not in write_only]) + tree_leaves(result)
        self.bytes += sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
                          for t in tensors if isinstance(t, torch.Tensor))
        return result


def eager_bytes(case: Case) -> int:
    """Bytes the eager provider of `case` reads and writes, counted op by op on the meta device."""
    fn, _ = build(case, "eager", "meta")
    with _ByteCount() as counter:
        fn()
    return counter.bytes


def measure(cases, time_fn=do_bench_ms, device="cuda") -> list:
    """Long-format rows: one per (case, provider), plus the copy baseline of each case."""
    rows = []
    for case in cases:
        timings = {}
        ratio = eager_bytes(case) / build(case, "fused", "meta")[1]
        for provider in PROVIDERS[case.op]:
            fn, moved = build(case, provider, device)
            timings[provider] = time_fn(fn)
        timings["copy"] = time_fn(copy_baseline(moved, device))
        for provider, (median, p20, p80) in timings.items():
            rows.append({
                "kernel": case.op, "provider": provider, "shape": list(case.shape), "dtype": DTYPE_NAMES[case.dtype],
                "metric": "ms", "median": median, "p20": p20, "p80": p80,
                "bytes": moved, "gbps": moved / median / 1e6, "byte_ratio": ratio,
                "copy_fraction": timings["copy"][0] / median,
                "speedup_vs_eager": timings["eager"][0] / median,
            })
    return rows


def format_rows(rows) -> str:
    """Markdown table: one line per case, fused against eager and against the copy of the same bytes."""
    by_case = {}
    for row in rows:
        by_case.setdefault((row["kernel"], tuple(row["shape"]), row["dtype"]), {})[row["provider"]] = row
    header = ("| op | B, N, D | dtype | eager ms | fused ms | fused vs eager | eager / fused bytes | fused GB/s "
              "| copy GB/s | fused / copy bandwidth | others |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for (op, shape, dtype), p in by_case.items():
        others = ", ".join(f"{name} {r['median']:.4f} ms" for name, r in p.items()
                           if name not in ("eager", "fused", "copy"))
        lines.append(
            f"| {op} | {', '.join(map(str, shape))} | {dtype} | {p['eager']['median']:.4f} | "
            f"{p['fused']['median']:.4f} | {p['fused']['speedup_vs_eager']:.2f}x | {p['fused']['byte_ratio']:.2f} | "
            f"{p['fused']['gbps']:.0f} | "
            f"{p['copy']['gbps']:.0f} | {p['fused']['copy_fraction']:.0%} | {others or '-'} |")
    return "\n".join(lines)


def target_verdict(rows) -> str:
    """The target: the fused compute form at B=2, N=4096, D=1152, bf16 reaches >= 90% of the same-run copy
    bandwidth and >= 0.9x the eager / fused byte ratio as speedup over eager."""
    for row in rows:
        if (row["kernel"], tuple(row["shape"]), row["dtype"], row["provider"]) == (
                TARGET["op"], TARGET["shape"], TARGET["dtype"], "fused"):
            least = TARGET["byte_ratio_share"] * row["byte_ratio"]
            ok = row["copy_fraction"] >= TARGET["copy_fraction"] and row["speedup_vs_eager"] >= least
            return (f"target (fused compute, B2 N4096 D1152 bf16): {row['copy_fraction']:.0%} of copy bandwidth "
                    f"(want >= {TARGET['copy_fraction']:.0%}), {row['speedup_vs_eager']:.2f}x vs eager (want >= "
                    f"{least:.2f}x = {TARGET['byte_ratio_share']:g} x the byte ratio {row['byte_ratio']:.2f}): "
                    f"{'met' if ok else 'NOT met'}")
    return "target case not measured"
