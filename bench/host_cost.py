"""Host cost of the fused ops: microseconds of Python per public call, launch excluded.

In eager mode every cached unit is one fused call, 56 (DiT-XL/2) or 84 (PixArt) per step, so the host
path (checks, launch shape, argument binding) is paid that often. It is measured without a GPU: under
`harmonica.kernels.aot.stubbed_launches` the public ops take their kernel path on CPU tensors, the
first call compiles for sm_90 and every later call goes through the whole host path to a launch that
does nothing. Shapes are DiT-XL/2's at 256² with CFG; the time does not depend on them.

    python -m harmonica.bench.host_cost
"""

import time

import torch

from harmonica.kernels import CacheCopyPlan, aot, gated_residual_compute, gated_residual_reuse, solver_step

TARGET_US = 15.0  # per call
UNIT_SHAPE = (2, 256, 1152)


def _calls(dtype=torch.float16) -> dict:
    """Name -> a public call as the engine and the samplers make it."""
    h, out, slot = (torch.randn(UNIT_SHAPE, dtype=dtype) for _ in range(3))
    gate = torch.randn(UNIT_SHAPE[0], 1, UNIT_SHAPE[2], dtype=dtype)
    x = torch.randn(1, 4, 32, 32, dtype=dtype)
    eps = torch.randn(2, 8, 32, 32, dtype=dtype)
    coefficients = torch.randn(5)
    x0 = torch.randn(1, 4, 32, 32)
    slots = [torch.empty(UNIT_SHAPE, dtype=dtype) for _ in range(56)]
    plan = CacheCopyPlan([out] * 56, slots)
    return {
        "gated_residual_compute (gate, slot write)": lambda: gated_residual_compute(h, out, gate, cache=slot, out=h),
        "gated_residual_compute (no gate)": lambda: gated_residual_compute(h, out, out=h),
        "gated_residual_reuse (gate)": lambda: gated_residual_reuse(h, slot, gate, out=h),
        "solver_step (DiT guidance, multistep)": lambda: solver_step(
            x, eps, coefficients, guidance_scale=1.5, guided_channels=3, x0_prev=x0, x_out=x, x0_out=x0),
        "CacheCopyPlan (56 slots)": plan,
    }


def measure(calls: int = 2000, rounds: int = 5) -> list:
    """Rows {"call", "host_us" (the least over rounds of the mean per call: the work is fixed, so other load on
    the machine only adds to it), "target_us", "direct_launches" (launches of the compiled kernel during the
    timed calls: one per call when the kernel path and its direct launch were taken)}."""
    aot.check_environment()
    rows = []
    with aot.stubbed_launches(90) as (_, launches), torch.no_grad():  # as the engine and samplers call them
        for name, call in _calls().items():
            call()  # compiles
            call()
            launches.clear()
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(calls):
                    call()
                times.append((time.perf_counter() - start) / calls * 1e6)
            rows.append({"call": name, "host_us": min(times), "target_us": TARGET_US,
                         "direct_launches": sum(isinstance(launch, tuple) for launch in launches)})
    return rows


def format_host_cost(rows) -> str:
    """Markdown table of `measure`'s rows."""
    lines = ["| call | host us per call | target |", "|---|---:|---|"]
    lines += [f"| {r['call']} | {r['host_us']:.1f} | <= {r['target_us']:.0f} us: "
              f"{'met' if r['host_us'] <= r['target_us'] else 'NOT met'} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    print(format_host_cost(measure()))


if __name__ == "__main__":
    main()
