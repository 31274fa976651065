"""Nsight Compute session on our fused kernels: its command lines, and per kernel the achieved DRAM
bandwidth against the device's peak, the achieved occupancy and the top warp stall reason, read from
`ncu --import <report> --csv --page raw` (one row per profiled launch, a units row under the header).

The peak is ncu's own, as its roofline section computes it: `dram__bytes.sum.peak_sustained` (bytes
per DRAM cycle) times `dram__cycles_elapsed.avg.per_second` (the DRAM clock of that launch); no table
of devices. Averages over launches are weighted by each launch's duration, so the bandwidth is total
bytes over total time.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .tables import markdown, number, read_csv

KERNELS = "gated_residual|cache_copy"  # the Triton kernels _gated_residual_fwd_kernel, _cache_copy_fwd_kernel
# enough launches for one computing and one reusing step of DiT-XL/2 (2 x 56 units)
LAUNCH_COUNT = 112
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
NOT_STALLS = ("selected",)  # the cycles a warp issues
DURATION = "gpu__time_duration.sum"
DRAM_RATE, DRAM_PEAK, DRAM_CLOCK = ("dram__bytes.sum.per_second", "dram__bytes.sum.peak_sustained",
                                    "dram__cycles_elapsed.avg.per_second")
OCCUPANCY = "sm__warps_active.avg.pct_of_peak_sustained_active"  # achieved occupancy
# collected on top of --set full (whose WarpStateStats section holds the stall ratios), so the bandwidth,
# peak and occupancy never depend on what a version's sections hold
METRICS = (DURATION, DRAM_RATE, DRAM_PEAK, DRAM_CLOCK, OCCUPANCY)
SI_PREFIXES = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "K": 1e3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
SI_BASES = ("byte", "second", "s", "cycle", "hz", "Hz", "B")


def profile_command(report: Path, workload: list, *, kernels: str = KERNELS, nvtx_include: str | None = None,
                    launch_count: int = LAUNCH_COUNT) -> list:
    """`ncu` on the kernels whose name matches the regex `kernels`, only between cudaProfilerStart and Stop
    (the timed generation), at the GPU's own clocks (`--clock-control none`: as the generation runs),
    optionally only inside the NVTX ranges `nvtx_include` (e.g. 'regex:.* reuse/'). Writes `<report>.ncu-rep`."""
    command = ["ncu", "--set", "full", "--metrics", ",".join(METRICS), "--clock-control", "none",
               "--profile-from-start", "off", "--kernel-name", f"regex:{kernels}", "--launch-count", str(launch_count)]
    if nvtx_include:
        command += ["--nvtx", "--nvtx-include", nvtx_include]
    return command + ["--export", str(report), "--force-overwrite", *workload]


def import_command(report: Path) -> list:
    """The raw page of `<report>.ncu-rep` as CSV on stdout, values in base units."""
    return ["ncu", "--import", f"{report}.ncu-rep", "--csv", "--page", "raw", "--print-units", "base"]


def unit_scale(unit: str) -> float:
    """Factor to SI base units: 'Gbyte/second' -> 1e9, 'usecond' -> 1e-6, 'cycle/nsecond' -> 1e9, '%' -> 1."""
    scale = 1.0
    for i, part in enumerate(unit.split("/")):
        factor = SI_PREFIXES.get(part[:1], 1.0) if part[1:] in SI_BASES else 1.0
        scale = scale * factor if i == 0 else scale / factor
    return scale


@dataclass
class KernelStats:
    """One kernel name over its profiled launches (duration-weighted means)."""

    kernel: str
    launches: int
    duration_us: float
    dram_gbps: float
    peak_gbps: float
    occupancy_pct: float
    top_stall: str  # reason, as in the metric name
    top_stall_cycles: float  # cycles per issued instruction

    @property
    def dram_pct_of_peak(self) -> float:
        return 100 * self.dram_gbps / self.peak_gbps


def _weighted(runs: list, metric) -> float:
    """Duration-weighted mean of `metric` (a name, or a tuple of names whose values multiply) over the runs
    that have it."""
    names = metric if isinstance(metric, tuple) else (metric,)
    pairs = [(run[names[0]] * (run[names[1]] if len(names) > 1 else 1), run[DURATION]) for run in runs
             if all(run[n] is not None for n in (*names, DURATION))]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def parse_raw(text: str) -> list:
    """ncu raw-page CSV -> [KernelStats], one per kernel name, in order of first launch."""
    rows = read_csv(text, "ID", "ncu --page raw")
    if not rows or rows[0]["ID"]:
        raise ValueError("ncu --page raw: expected a units row under the header, got none")
    units, launches = rows[0], rows[1:]
    missing = [m for m in (DURATION, DRAM_RATE, DRAM_PEAK, DRAM_CLOCK, OCCUPANCY) if m not in units]
    if missing:
        raise ValueError(f"ncu --page raw: expected the metrics {missing} in the header (profile_command collects "
                         f"them), got a header without them")
    stalls = {m: STALL.fullmatch(m)[1] for m in units if STALL.fullmatch(m)}
    stalls = {m: reason for m, reason in stalls.items() if reason not in NOT_STALLS}
    metrics = (DURATION, DRAM_RATE, DRAM_PEAK, DRAM_CLOCK, OCCUPANCY, *stalls)
    by_kernel = {}
    for row in launches:
        run = {m: None if number(row[m]) is None else number(row[m]) * unit_scale(units[m]) for m in metrics}
        by_kernel.setdefault(row["Kernel Name"], []).append(run)
    stats = []
    for kernel, runs in by_kernel.items():
        stall_cycles = {reason: _weighted(runs, metric) for metric, reason in stalls.items()}
        stall_cycles = {reason: cycles for reason, cycles in stall_cycles.items() if not math.isnan(cycles)}
        top = max(stall_cycles, key=stall_cycles.get) if stall_cycles else "n/a"
        durations = [run[DURATION] for run in runs if run[DURATION] is not None]
        stats.append(KernelStats(
            kernel, len(runs), sum(durations) / len(durations) * 1e6, _weighted(runs, DRAM_RATE) / 1e9,
            _weighted(runs, (DRAM_PEAK, DRAM_CLOCK)) / 1e9, _weighted(runs, OCCUPANCY), top,
            stall_cycles.get(top, float("nan"))))
    return stats


def format_summary(stats: list) -> str:
    return "## Fused kernels (ncu, duration-weighted over the profiled launches)\n\n" + markdown(
        ["kernel", "launches", "duration (us)", "DRAM (GB/s)", "peak (GB/s)", "of peak (%)", "occupancy (%)",
         "top stall (cycles/issue)"],
        [[s.kernel, s.launches, s.duration_us, s.dram_gbps, s.peak_gbps, s.dram_pct_of_peak, s.occupancy_pct,
          f"{s.top_stall} ({s.top_stall_cycles:.1f})"] for s in stats]) + "\n"
