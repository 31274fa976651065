"""Ahead-of-time compile check: every kernel variant the public ops launch, through Triton's real
compiler for a GPU architecture, on a machine without a GPU.

The Triton interpreter (the CPU test path) runs kernels as Python, so it accepts kernels the compiler
rejects and says nothing about the generated code. Here a stand-in driver reports the target
(`GPUTarget("cuda", arch, 32)`), and every launch compiles (`warmup=True`) instead of running: the
launchers `gated_residual_fwd/bwd`, `gated_residual_forecast_fwd`, `cache_copy_fwd` and `solver_step_fwd`
are called with CPU tensors of real shapes, dtypes and strides, so the specialisations (16-byte alignment,
divisibility) are those a GPU run would see. The PTX of each variant is summarised for the memory-bound kernels' needs:
128-bit (v4) global accesses and no 64-bit integer division.

Needs triton with its NVIDIA backend (its wheel carries ptxas) and a process where TRITON_INTERPRET
is unset (the kernels are built as JIT functions at import):

    python -m harmonica.kernels.aot --arch 80 90 [--json report.json] [--ptx-dir DIR]
"""

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harmonica.files import write_file

ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# DiT-XL/2 at 256² with CFG: 256 tokens of hidden 1152; PixArt at 1024²: 4096 tokens
UNIT_SHAPE = (2, 256, 1152)
LATENT_SHAPE = (2, 4, 32, 32)
_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(\.v[248])?\.[bfsu](8|16|32|64)\b")
_DIVISION_64 = re.compile(r"\b(div|rem)(?:\.[a-z]+)*\.[su]64\b")


@dataclass(frozen=True)
class Variant:
    """One launch of a public launcher. streams: how many full-size tensors it reads and writes (each
    must move in 128-bit accesses); broadcasts: other global accesses it may make (gate, r,
    coefficients, metadata), each at most one instruction per thread."""

    name: str
    launch: Callable[[], None]
    streams: int
    broadcasts: int
    aligned: bool = True  # contiguous, 16-byte aligned inputs: v4 accesses are required


def ptx_summary(ptx: str) -> dict:
    """Counts of global load/store instructions by vector width and of 64-bit divisions/remainders."""
    summary = {"v4": 0, "v2": 0, "scalar": 0, "div64": len(_DIVISION_64.findall(ptx))}
    for _, vector, _ in _ACCESS.findall(ptx):
        summary[vector[1:] if vector else "scalar"] += 1
    return summary


# ---- the variants ----

def _module(name: str):
    """A kernel module (the package attributes of the same names are the public functions)."""
    return importlib.import_module(f"{__package__}.{name}")


def _gated_residual_variants():
    op = _module("gated_residual")

    variants = []
    forms = [(op.BLEND, "blend"), (op.COMPUTE, "compute"), (op.REUSE, "reuse")]
    for dtype_name, dtype in DTYPES.items():
        h = torch.empty(UNIT_SHAPE, dtype=dtype)
        r = torch.empty((), dtype=torch.float32)
        # the gate: none, in h's dtype, or fp32 over a low-precision stream (Wan)
        gates = {"nogate": None, "gate": dtype, **({"fp32gate": torch.float32} if dtype != torch.float32 else {})}
        gates = {label: None if g is None else torch.empty(UNIT_SHAPE[0], UNIT_SHAPE[2], dtype=g)
                 for label, g in gates.items()}
        for mode, form in forms:
            for gate_name, gate in gates.items():
                for write in ((False,) if mode == op.REUSE else (False, True)):
                    def launch(mode=mode, gate=gate, write=write, h=h, r=r):
                        op.gated_residual_fwd(h, None if mode == op.REUSE else torch.empty_like(h),
                                              torch.empty_like(h), r if mode == op.BLEND else None, gate,
                                              torch.empty_like(h), mode=mode, tau=0.1 if write else None,
                                              write_cache=write)
                    loads = 1 + (mode != op.REUSE) + (mode != op.COMPUTE)  # h, fresh, cache
                    name = f"gated_residual_fwd-{form}-{gate_name}-{'write' if write else 'nowrite'}-{dtype_name}"
                    variants.append(Variant(name, launch, streams=loads + 1 + write,
                                            broadcasts=(gate is not None) + (mode == op.BLEND)))
        for gate_name, gate in gates.items():
            def launch(gate=gate, h=h):
                op.gated_residual_forecast_fwd(h, torch.empty_like(h), torch.empty_like(h), 0.9, 0.1, gate,
                                               torch.empty_like(h))
            # h, newest, older; out; broadcasts: the gate
            variants.append(Variant(f"gated_residual_forecast-{gate_name}-{dtype_name}", launch, streams=4,
                                    broadcasts=gate is not None))
        for gate_name, gate in gates.items():
            has_gate = gate is not None
            for need_fresh, need_r, need_gate in ((1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1),
                                                  (0, 1, 1), (1, 1, 1)):
                if need_gate and not has_gate:
                    continue

                def launch(gate=gate, flags=(need_fresh, need_r, need_gate), h=h, r=r):
                    op.gated_residual_bwd(h, torch.empty_like(h), torch.empty_like(h), r, gate,
                                          need_fresh=bool(flags[0]), need_r=bool(flags[1]),
                                          need_gate=bool(flags[2]))
                reads = need_r or need_gate
                name = (f"gated_residual_bwd-{gate_name}-"
                        f"{'fresh' * need_fresh}{'r' * need_r}{'g' * need_gate}-{dtype_name}")
                # dout, (fresh, cache), dfresh; broadcasts: r, gate, the dr / dg partial sums
                variants.append(Variant(name, launch, streams=1 + 2 * reads + need_fresh,
                                        broadcasts=1 + has_gate + need_r + need_gate))
    return variants


def _cache_copy_variants():
    op = _module("cache_copy")

    variants = []
    B, N, D = UNIT_SHAPE
    for src_name, src_dtype in DTYPES.items():
        for dst_name, dst_dtype in DTYPES.items():
            for layout in ("flat", "rows"):
                def launch(src_dtype=src_dtype, dst_dtype=dst_dtype, layout=layout):
                    srcs = [torch.empty(B, N + i, D, dtype=src_dtype) for i in range(3)]
                    if layout == "rows":  # slices of wider buffers: the rows path
                        srcs = [torch.empty(B, N, D + 64 * (i + 1), dtype=src_dtype)[..., :D] for i in range(3)]
                    plan = op.CacheCopyPlan(srcs, [torch.empty(s.shape, dtype=dst_dtype) for s in srcs])
                    assert plan.groups[0].rows == (layout == "rows")
                    op.cache_copy_fwd(plan)
                # metadata: offsets, counts (and columns and strides on the rows path)
                variants.append(Variant(f"cache_copy-{layout}-{src_name}-to-{dst_name}", launch, streams=2,
                                        broadcasts=3 if layout == "flat" else 6))
    return variants


def _solver_step_variants():
    op = _module("solver_step")

    variants = []
    guidances = {"noguide": {}, "dit": dict(guidance_scale=1.5, guided_channels=3, cond_first=True),
                 "pixart": dict(guidance_scale=4.5, cond_first=False)}
    for dtype_name, dtype in DTYPES.items():
        x = torch.empty(LATENT_SHAPE, dtype=dtype)
        for guide_name, guidance in guidances.items():
            rows = 2 * LATENT_SHAPE[0] if guidance else LATENT_SHAPE[0]
            channels = 8 if guide_name == "dit" else 4  # DiT's output carries the learned variance
            out = torch.empty(rows, channels, *LATENT_SHAPE[2:], dtype=dtype)
            for has_prev in (False, True):
                for write_x0 in (False, True):
                    def launch(x=x, out=out, guidance=guidance, has_prev=has_prev, write_x0=write_x0):
                        f32 = torch.empty(LATENT_SHAPE, dtype=torch.float32)
                        coefficients = torch.empty(op.COEFFICIENTS, dtype=torch.float32)
                        op.solver_step_fwd(x, out, coefficients, x0_prev=f32 if has_prev else None,
                                           x0_out=torch.empty_like(f32) if write_x0 else None, **guidance)
                    name = f"solver_step-{guide_name}-{'prev' if has_prev else 'noprev'}-" \
                           f"{'x0' if write_x0 else 'nox0'}-{dtype_name}"
                    streams = 2 + bool(guidance) + has_prev + 1 + write_x0  # x, cond, uncond, prev; x_next, x0
                    variants.append(Variant(name, launch, streams=streams, broadcasts=4 + has_prev))

    def strided():  # (H, W) planes that are not contiguous: the general offsets
        x = torch.empty(LATENT_SHAPE, dtype=torch.float16).transpose(2, 3)
        op.solver_step_fwd(x, torch.empty_like(x), torch.empty(op.COEFFICIENTS, dtype=torch.float32))
    variants.append(Variant("solver_step-strided-fp16", strided, streams=3, broadcasts=4, aligned=False))
    return variants


def variants() -> list:
    """Every kernel variant the public ops launch (names unique)."""
    return _gated_residual_variants() + _cache_copy_variants() + _solver_step_variants()


# ---- compiling without a GPU ----

class _StandInDriver:
    """What the JIT and the launchers ask of a driver before a launch, answered for a GPU that is not there.
    The device index is the architecture, so each architecture keeps its own compiled kernels; it can be
    set, as the launchers' device guard does."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = arch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def set_current_device(self, device: int) -> None:
        self.device = device

    def get_current_stream(self, device=None):
        return 0


@dataclass
class Launch:
    """One launch seen by `stubbed_launches`: through the JIT (`direct` False) or of a compiled kernel."""

    kernel: str
    direct: bool
    args: list  # every kernel parameter's value, in the kernel's order


@contextlib.contextmanager
def stubbed_launches(arch: int):
    """Within: a launch through Triton's JIT compiles for `arch` instead of running, a launch of an
    already compiled kernel does nothing, and CPU tensors take the kernel path of the public ops (so
    their whole host path runs). Yields (compiled kernels, launches)."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from . import _triton
    from ._launch import Launcher

    compiled, launches, kernels = [], [], set()
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        kernels.add(self)
        launches.append(Launch(self.__name__, False, [*args, *(kwargs[n] for n in self.arg_names[len(args):])]))
        if kernel not in compiled:
            compiled.append(kernel)
            name = self.__name__

            def direct(*launch_args):  # grid x, y, z, stream, function, metadata, launch metadata, 2 hooks
                launches.append((name, launch_args))  # a raw tuple, as cheap as can be: host_cost times this path

            kernel.module, kernel.function, kernel._run = "stub", None, direct  # as if loaded on a device
        return kernel

    previous = driver._active  # reset_active() would look for a GPU driver, and there is none
    driver.set_active(_StandInDriver(arch))
    JITFunction.run = compile_instead
    _triton.KERNELS_ON_CPU = True
    try:
        yield compiled, launches
        launches[:] = [launch if isinstance(launch, Launch) else Launch(launch[0], True, list(launch[1][9:]))
                       for launch in launches]
    finally:  # nothing compiled for the stand-in outlives it
        _triton.KERNELS_ON_CPU = False
        JITFunction.run = run
        driver.set_active(previous)
        for launcher in Launcher.instances:
            launcher.forget(arch)
        for kernel in kernels:
            kernel.device_caches.pop(arch, None)


def stand_in_leftovers() -> list:
    """Kernels compiled under `stubbed_launches` still held by a launcher or a JIT cache (none expected)."""
    from ._launch import Launcher

    return [(launcher.kernel.__name__, key[0]) for launcher in Launcher.instances for key in launcher.compiled
            if key[0] in ARCHS] + [(launcher.kernel.__name__, arch) for launcher in Launcher.instances
                                   for arch in ARCHS if arch in getattr(launcher.kernel, "device_caches", {})]


def _same_launch(jit: Launch, direct: Launch) -> bool:
    """A direct launch passes what the JIT launch bound: tensors of the same dtype and shape, equal numbers."""
    def describe(value):
        return (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else value
    return jit.kernel == direct.kernel and list(map(describe, jit.args)) == list(map(describe, direct.args))


def check_environment() -> None:
    """Raise a RuntimeError saying what is missing for an ahead-of-time compile."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels were built for the interpreter; run without it")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"triton with its NVIDIA backend is needed: {error}") from error


def compile_variants(archs=ARCHS, names=None, ptx_dir: Path | None = None) -> dict:
    """{variant name: {arch: {"ok": bool, "error": str | None, PTX summary}}} for every variant."""
    check_environment()
    report = {}
    for variant in variants():
        if names is not None and variant.name not in names:
            continue
        entry = report[variant.name] = {"streams": variant.streams, "broadcasts": variant.broadcasts,
                                        "aligned": variant.aligned}
        for arch in archs:
            with stubbed_launches(arch) as (compiled, launches):
                try:
                    variant.launch()  # compiles
                    variant.launch()  # launches the compiled kernel directly (kernels/_launch.py)
                except Exception as error:  # noqa: BLE001 - every failure is reported, by variant
                    entry[str(arch)] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
                    continue
            ptx = "\n".join(kernel.asm["ptx"] for kernel in compiled)
            half = len(launches) // 2
            ok = len(compiled) > 0 and all("cubin" in k.asm for k in compiled)
            entry[str(arch)] = {"ok": ok, "error": None if ok else "no kernel compiled to a binary",
                                "kernels": len(compiled), **ptx_summary(ptx),
                                "direct_launch": all(not j.direct and d.direct and _same_launch(j, d)
                                                     for j, d in zip(launches[:half], launches[half:]))}
            if ptx_dir is not None:
                ptx_dir.mkdir(parents=True, exist_ok=True)
                write_file(ptx_dir / f"{variant.name}-sm{arch}.ptx", ptx)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmonica.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80, 90)")
    parser.add_argument("--only", nargs="+", help="variant names (default: all)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--ptx-dir", type=Path, help="write each variant's PTX here")
    args = parser.parse_args(argv)
    try:
        report = compile_variants(args.arch, args.only, args.ptx_dir)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = [(name, arch) for name, entry in report.items() for arch in args.arch if not entry[str(arch)]["ok"]]
    for name, entry in report.items():
        cells = [f"sm_{a}: " + (f"v4 {e['v4']} v2 {e['v2']} scalar {e['scalar']} div64 {e['div64']}" if e["ok"]
                                else "FAILED " + e["error"].splitlines()[0][:120])
                 for a, e in ((a, entry[str(a)]) for a in args.arch)]
        print(f"{name:55s} " + " | ".join(cells))
    print(f"{len(report)} variants x {len(args.arch)} architectures, {len(failed)} failed")
    if args.json:
        write_file(args.json, json.dumps({"variants": report, "stand_in_leftovers": stand_in_leftovers()}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
