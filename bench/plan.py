"""`harmonica bench --plan`: the rows a bench command would run (`suite.plan_group`, the rows the suite
runs) and an estimate of its duration, without running anything.

The estimate is arithmetic on MACs (`harmonica/macs.py`; the VAE decode counted the same way) and on the assumed
constants of a `CostModel`; no constant comes from a measurement:
- a generation: 2 FLOPs per MAC x (2 images per forward (classifier-free guidance) x the transformer MACs
  of the row's schedule over its steps + the VAE decode's MACs) at `flops`, plus `unit_host_s` per computed
  unit outside CUDA graphs (launch overhead);
- a row: `row_s` + (warm-up + repeats) generations + `graph_s` per CUDA graph + `compile_s` per compiled
  graph; a peer row counts as no-cache (its CUR is known only once it ran);
- a model: `build_s`; a command: `start_s` (imports, the MAC table) and, with CUDA, `timing_s` per timing of
  the kernel micro-benchmark.

For the flow models whose diffusers class has a cp plan (FLUX, Wan, Qwen-Image), `format_parallel_plan` adds
what each rank would do under context parallelism on 2, 4 and 8 GPUs (Ulysses and ring): the transformer MACs
per rank (the tokens split evenly) and the bytes it sends (`harmonica.parallel`: a reused unit sends none).
"""

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from harmonica import parallel
from harmonica.macs import VAE_FACTOR, count_macs
from harmonica.models import preset
from harmonica.schedule import CacheSchedule

from .kernel_bench import PROVIDERS, default_cases
from .suite import FLOW_MODELS, PlannedRow, SuiteOptions, plan_group, resolution

CFG_BATCH = 2  # images per transformer forward: DiT (guidance 1.5) and PixArt (4.5) run guidance as a batch of 2
H100_PEAK_FLOPS = 989e12  # H100 SXM, fp16/bf16 dense tensor-core peak (NVIDIA datasheet)


@dataclass(frozen=True)
class CostModel:
    """Assumed costs (seconds, FLOP/s) of the estimate; `name` says what they stand for."""

    name: str
    flops: float
    unit_host_s: float
    row_s: float
    graph_s: float
    compile_s: float
    build_s: float
    start_s: float
    timing_s: float


COSTS = {
    "cuda": CostModel("H100 SXM: 0.4 x the fp16 dense peak of 989 TFLOP/s; assumed: 0.1 ms host time per "
                      "computed unit outside graphs, 1 s per row, 0.5 s per CUDA graph, 20 s per compiled graph, "
                      "20 s per model build, 20 s start, 0.3 s per kernel timing",
                      0.4 * H100_PEAK_FLOPS, 1e-4, 1.0, 0.5, 20.0, 20.0, 20.0, 0.3),
    "cpu": CostModel("CPU: simple assumed constants, not measured: 20 GFLOP/s, 0.5 ms host time per computed "
                     "unit, 0.05 s per row, 2 s per model build, 10 s start",
                     20e9, 5e-4, 0.05, 0.0, 0.0, 2.0, 10.0, 0.0),
}


_count_macs = functools.cache(count_macs)  # counting a real preset takes seconds


@dataclass(frozen=True)
class PlanLine:
    model: str
    resolution: int
    steps: int
    row: PlannedRow
    seconds: float


@functools.cache
def decode_macs(name: str) -> float:
    """MACs of the preset's VAE decoding one image at its resolution (FlopCounterMode on the meta device);
    0 for a flow preset (the suite runs its transformer alone, `FlowWorkload`)."""
    import diffusers

    if name in FLOW_MODELS:
        return 0.0
    spec = preset(name)
    with torch.device("meta"):
        vae = getattr(diffusers, spec.family.vae)(**spec.vae)
        latents = torch.empty(1, vae.config.latent_channels, spec.height // VAE_FACTOR, spec.width // VAE_FACTOR)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vae.decode(latents)
    return counter.get_total_flops() / 2


def row_seconds(row: PlannedRow, macs, decode: float, options: SuiteOptions, cost: CostModel) -> float:
    """Estimated seconds of one planned row (0 when it is skipped)."""
    if row.reason:
        return 0.0
    schedule = row.table or CacheSchedule.no_cache(row.row_steps, len(macs.names))
    transformer_macs = row.row_steps * macs.total / schedule.theoretical_speedup(macs)
    host = 0.0 if row.graphs else schedule.table.sum().item() * cost.unit_host_s
    generation = 2 * (CFG_BATCH * transformer_macs + decode) / cost.flops + host
    graphs = row.graphs or 0
    compiled = graphs if row.mode == "compile" else 0
    return (cost.row_s + (options.warmup + options.repeat) * generation + graphs * cost.graph_s
            + compiled * cost.compile_s)


def kernel_seconds(cost: CostModel) -> float:
    """Estimated seconds of the kernel micro-benchmark: every provider and the copy of every default case."""
    return sum(len(PROVIDERS[case.op]) + 1 for case in default_cases()) * cost.timing_s


def plan(options: SuiteOptions, router=None) -> list:
    """A `PlanLine` per row the suite would make, in the order it would make them."""
    cost = COSTS[options.device]
    lines = []
    for name in options.model_names:
        macs, decode = _count_macs(name), decode_macs(name)
        for steps in options.steps_for(name):
            lines += [PlanLine(name, resolution(name), steps, row, row_seconds(row, macs, decode, options, cost))
                      for row in plan_group(name, steps, options, router, macs=macs)]
    return lines


def total_seconds(lines: list, options: SuiteOptions, kernels: bool, suite: bool = True) -> float:
    """The command's estimate: start, and the kernel micro-benchmark (CUDA) and/or the suite."""
    cost = COSTS[options.device]
    seconds = cost.start_s + (kernel_seconds(cost) if kernels and options.device == "cuda" else 0.0)
    if suite:
        seconds += len(options.model_names) * cost.build_s + sum(line.seconds for line in lines)
        seconds += sum(line.seconds for line in lines if _is_baseline(line))  # re-timed after its group (drift)
    return seconds


def _is_baseline(line: PlanLine) -> bool:
    return (line.row.config.name, line.row.mode) == ("no-cache", "eager")


def format_plan(lines: list, options: SuiteOptions, kernels: bool, suite: bool = True) -> str:
    """The rows as a markdown table, the cost model and the total."""
    cost = COSTS[options.device]
    header = "| model | res | steps | config | mode | row steps | graphs | est. s | skipped because |"
    table = [header, "|" + "---|" * (header.count("|") - 1)]
    table += [f"| {line.model} | {line.resolution} | {line.steps} | {line.row.config.name} | {line.row.mode} | "
              f"{line.row.row_steps} | {line.row.graphs or '-'} | {line.seconds:.1f} | {line.row.reason or ''} |"
              for line in lines]
    runs = sum(1 for line in lines if not line.row.reason)
    parts = [*(table if suite else []), "", f"Cost model ({options.device}): {cost.name}."]
    if suite:
        parts.append(f"Suite: {len(lines)} rows ({runs} run, {len(lines) - runs} skipped), "
                     f"{len(options.model_names)} model builds, {options.warmup} warm-up + {options.repeat} timed "
                     "generations per row; each baseline (no-cache eager) timed again after its group.")
    if kernels and options.device == "cuda":
        parts.append(f"Kernel micro-benchmark: {kernel_seconds(cost):.0f} s.")
    seconds = total_seconds(lines, options, kernels, suite)
    parts.append(f"Estimated duration: {seconds:.0f} s ({seconds / 60:.1f} min). Nothing was run.")
    return "\n".join(parts)


DEGREES = (2, 4, 8)  # GPUs of the context-parallel rows


@functools.cache
def _trace(name: str, batch: int):
    return parallel.trace_attention(name, batch=batch)


def _flow_batch(name: str) -> int | None:
    """Images per forward of a flow preset whose class has a cp plan (2 with a CFG half), else None."""
    import diffusers

    spec = preset(name)
    if getattr(diffusers, spec.class_name)._cp_plan is None:  # (DiT's and PixArt's classes have none)
        return None
    return 2 if spec.family.task.cfg and spec.guidance > 1 else 1


def format_parallel_plan(lines: list, options: SuiteOptions) -> str:
    """Per planned flow row with a cp plan (once per model, steps and config): for 2, 4 and 8 ranks under
    Ulysses and ring, the transformer's GMACs and the GB each rank sends per generation (bf16 activations on
    CUDA, fp32 on a CPU), and the bytes against the no-cache generation's. Empty without such rows."""
    element_size = 2 if options.device == "cuda" else 4
    header = "| model | steps | config | GPUs | cp | GMACs per rank | GB sent per rank | of no-cache |"
    table, seen = [header, "|" + "---|" * (header.count("|") - 1)], set()
    for line in lines:
        key = (line.model, line.row.row_steps, line.row.config.name)
        batch = _flow_batch(line.model)
        if line.row.reason or batch is None or key in seen:
            continue
        seen.add(key)
        macs = _count_macs(line.model)
        steps = line.row.row_steps
        schedule = line.row.table or CacheSchedule.no_cache(steps, len(macs.names))
        generation_macs = batch * steps * macs.total / schedule.theoretical_speedup(macs)
        for kind in parallel.KINDS:
            for degree in DEGREES:
                sent = _trace(line.model, batch).communication(kind, degree, element_size)
                ratio = sent.trajectory(schedule) / sent.trajectory(CacheSchedule.no_cache(steps, len(macs.names)))
                table.append(f"| {line.model} | {steps} | {line.row.config.name} | {degree} | {kind} | "
                             f"{generation_macs / degree / 1e9:.4g} | {sent.trajectory(schedule) / 1e9:.4g} | "
                             f"{ratio:.0%} |")
    if len(table) == 2:
        return ""
    return "\n".join(["Context parallelism (diffusers' enable_parallelism; per rank, per generation; not measured):",
                      "", *table])
