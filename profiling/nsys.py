"""Nsight Systems session of one generation: its command lines, and a per-step and per-unit table of
GPU time, kernel count and idle gaps parsed from `nsys stats --format csv`.

The reports, one CSV each (`<base>_<report>.csv`):
- `nvtx_kern_sum`: per NVTX range and kernel name, kernel instances and summed GPU time. A kernel
  counts for every range open on its thread when it was launched (its step, block and unit), so a
  range's rows add up to its GPU time and kernel count.
- `cuda_gpu_kern_sum`: per kernel name, instances and GPU time (the top kernels).
- `nvtx_gpu_proj_trace`: each range instance projected onto the GPU, from the start of its first
  GPU operation to the end of its last (its GPU window).
- `cuda_gpu_trace`: every kernel and memory operation with its start and duration.
The two summaries cannot give idle time: a range's idle time is its GPU window minus the time some
GPU operation runs in it (the gaps between its kernels: launch latency, host work, syncs), which
needs the windows (`nvtx_gpu_proj_trace`) and the kernel intervals (`cuda_gpu_trace`) together.
Column names are those of nsys 2023.4-2025.x (the fixtures in tests/fixtures/nsys/).
"""

import bisect
import re
from dataclasses import dataclass
from pathlib import Path

from .tables import markdown, number, read_csv

REPORTS = ("nvtx_kern_sum", "cuda_gpu_kern_sum", "nvtx_gpu_proj_trace", "cuda_gpu_trace")
STEP = re.compile(r"step (\d+)")
UNIT = re.compile(r"(.+) (compute|reuse)")


def profile_command(report: Path, workload: list) -> list:
    """`nsys profile` of the workload argv: captures from cudaProfilerStart to cudaProfilerStop (the timed
    generation after warm-up); `--cuda-graph-trace node` traces the kernels of replayed CUDA graphs one by
    one (else a replay is one event). Writes `<report>.nsys-rep`."""
    return ["nsys", "profile", "-c", "cudaProfilerApi", "-t", "cuda,nvtx,osrt", "--cuda-graph-trace", "node",
            "-o", str(report), "--force-overwrite", "true", *workload]


def stats_command(report: Path) -> list:
    """`nsys stats` of `<report>.nsys-rep`: the REPORTS as `<report>_<name>.csv` (`--force-export`: never the
    SQLite export of an earlier report of the same name)."""
    return ["nsys", "stats", "--report", ",".join(REPORTS), "--format", "csv", "--output", str(report),
            "--force-export", "true", f"{report}.nsys-rep"]


def report_path(report: Path, name: str) -> Path:
    return report.parent / f"{report.name}_{name}.csv"


def range_name(raw: str) -> str:
    """A range's name without its NVTX domain (recent nsys writes 'domain:name', ':name' in the default
    domain). Our labels hold no colon."""
    return raw.rpartition(":")[2]


@dataclass
class RangeStats:
    """One NVTX range name over all its instances; times in ns."""

    name: str
    instances: int = 0  # instances that ran GPU work
    kernels: int = 0
    gpu_ns: float = 0.0  # summed kernel time
    window_ns: float = 0.0  # summed GPU windows (first operation's start to last operation's end)
    idle_ns: float = 0.0  # summed window time with no GPU operation running
    max_gap_ns: float = 0.0  # the longest such gap


def kernel_sums(text: str) -> dict:
    """nvtx_kern_sum CSV -> {range: (kernel instances, summed kernel ns)}."""
    sums = {}
    for row in read_csv(text, "NVTX Range", "nvtx_kern_sum"):
        kernels, total = sums.get(range_name(row["NVTX Range"]), (0, 0.0))
        sums[range_name(row["NVTX Range"])] = (kernels + int(number(row["Kern Inst"])),
                                               total + number(row["Total Time (ns)"]))
    return sums


def gpu_windows(text: str) -> dict:
    """nvtx_gpu_proj_trace CSV -> {range: [(start, end) ns of each instance]}, in order of first start."""
    windows = {}
    for row in read_csv(text, "Name", "nvtx_gpu_proj_trace"):
        start, duration = number(row["Projected Start (ns)"]), number(row["Projected Duration (ns)"])
        if start is not None and duration is not None:
            windows.setdefault(range_name(row["Name"]), []).append((start, start + duration))
    return windows


def busy_intervals(text: str) -> list:
    """cuda_gpu_trace CSV -> the disjoint, sorted (start, end) ns intervals in which some operation runs."""
    spans = sorted((number(r["Start (ns)"]), number(r["Start (ns)"]) + number(r["Duration (ns)"]))
                   for r in read_csv(text, "Start (ns)", "cuda_gpu_trace"))
    merged = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def idle_in(window: tuple, busy: list, starts: list) -> tuple:
    """(idle ns, longest gap ns) of `window` given the merged busy intervals and their starts."""
    begin, end = window
    cursor, idle, longest = begin, 0.0, 0.0
    i = max(bisect.bisect_right(starts, begin) - 1, 0)
    while i < len(busy) and busy[i][0] < end:
        start, stop = busy[i]
        if start > cursor:
            idle, longest = idle + start - cursor, max(longest, start - cursor)
        cursor = max(cursor, min(stop, end))
        i += 1
    if cursor < end:
        idle, longest = idle + end - cursor, max(longest, end - cursor)
    return idle, longest


def summarize(nvtx_kern_sum: str, nvtx_gpu_proj_trace: str, cuda_gpu_trace: str) -> list:
    """[RangeStats] of every range that ran GPU work, in order of first GPU start."""
    sums = kernel_sums(nvtx_kern_sum)
    windows = gpu_windows(nvtx_gpu_proj_trace)
    busy = busy_intervals(cuda_gpu_trace)
    starts = [start for start, _ in busy]
    stats = []
    for name in list(windows) + [n for n in sums if n not in windows]:
        row = RangeStats(name, len(windows.get(name, [])), *sums.get(name, (0, 0.0)))
        for window in windows.get(name, []):
            idle, gap = idle_in(window, busy, starts)
            row.window_ns += window[1] - window[0]
            row.idle_ns += idle
            row.max_gap_ns = max(row.max_gap_ns, gap)
        stats.append(row)
    return stats


def top_kernels(text: str, count: int = 10) -> list:
    """cuda_gpu_kern_sum CSV -> [(name, instances, total ns, % of kernel time)] of the `count` longest."""
    rows = read_csv(text, "Time (%)", "cuda_gpu_kern_sum")
    kernels = [(r["Name"], int(number(r["Instances"])), number(r["Total Time (ns)"]), number(r["Time (%)"]))
               for r in rows]
    return sorted(kernels, key=lambda k: -k[2])[:count]


def _us(ns: float, instances: int = 1) -> float:
    return ns / 1e3 / max(instances, 1)


def format_summary(stats: list, kernels: list) -> str:
    """Markdown: per step, per unit (per instance, compute and reuse apart), other ranges, top kernels."""
    steps = sorted((s for s in stats if STEP.fullmatch(s.name)), key=lambda s: int(STEP.fullmatch(s.name)[1]))
    units = [s for s in stats if UNIT.fullmatch(s.name)]
    others = [s for s in stats if s not in steps and s not in units]
    sections = [
        "## Per step\n\n" + markdown(
            ["step", "GPU time (us)", "kernels", "GPU window (us)", "idle (us)", "longest gap (us)"],
            [[s.name, _us(s.gpu_ns), s.kernels, _us(s.window_ns), _us(s.idle_ns), _us(s.max_gap_ns)] for s in steps]),
        "## Per unit (per instance)\n\n" + markdown(
            ["unit", "path", "instances", "GPU time (us)", "kernels", "idle (us)"],
            [[*UNIT.fullmatch(s.name).groups(), s.instances, _us(s.gpu_ns, s.instances),
              f"{s.kernels / max(s.instances, 1):.1f}", _us(s.idle_ns, s.instances)] for s in units]),
        "## Other ranges (totals)\n\n" + markdown(
            ["range", "instances", "GPU time (us)", "kernels", "GPU window (us)", "idle (us)"],
            [[s.name, s.instances, _us(s.gpu_ns), s.kernels, _us(s.window_ns), _us(s.idle_ns)] for s in others]),
        "## Top kernels\n\n" + markdown(
            ["kernel", "instances", "GPU time (us)", "share (%)"],
            [[name[:80], n, _us(total), share] for name, n, total, share in kernels]),
    ]
    if not units and steps:
        sections.insert(2, "No unit ranges: under CUDA graphs the replayed steps have step ranges only.")
    return "\n\n".join(sections) + "\n"
