"""`harmonica bench` = `make bench`: the MAC table, the kernel micro-benchmark (CUDA) and the sampling
suite; writes bench/results/<date>-<device>-<commit>.json (or --out; rewritten after each model, so a
run cut short keeps its finished models) and the PNG beside it, prints the tables. Without CUDA the
suite runs the tiny DiT and PixArt (random weights) in well under 2 min. `--plan` prints the rows and
an estimated duration and runs nothing (bench/plan.py).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from harmonica import parallel
from harmonica.files import check_out_dir, check_out_file, one_line, write_file
from harmonica.options import check_options, given_options
from harmonica.router import load_router

from .configs import MODES
from .host_cost import format_host_cost
from .host_cost import measure as measure_host_cost
from .kernel_bench import PROVIDERS, default_cases, format_rows, measure, target_verdict
from .machine import REPO, machine_info
from .macs import format_mac_table, mac_table
from .plan import format_parallel_plan, format_plan, plan, total_seconds
from .suite import FLOW_MODELS, MATRICES, SuiteOptions, run_suite
from .table import format_drift, format_gap_table, format_skipped, format_suite_table, target_verdicts

SUITE_OPTIONS = ("models", "resolutions", "configs", "modes", "steps", "repeat", "warmup", "quick", "full",
                 "max_compiled_graphs", "router", "real_weights", "seed", "device", "context_parallel")
PARTS = {"all": ("kernels", "suite"), "kernels": ("kernels",), "suite": ("suite",)}
CPU_CONFIRM_S = 300  # a CPU run estimated longer than this needs --yes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SuiteOptions.__dataclass_fields__
    cuda, cpu = MATRICES["cuda"], MATRICES["cpu"]
    parser.add_argument("--models", nargs="+", help="presets or families (dit-xl-2, pixart-alpha, pixart-sigma, "
                        f"tiny-dit, ...); default with CUDA: {' '.join(cuda.models)} (--full: every real model); "
                        f"without: {' '.join(cpu.models)}; the flow presets ({' '.join(FLOW_MODELS)}) "
                        "on request only")
    parser.add_argument("--resolutions", nargs="+", type=int, help="pixels, e.g. 256 1024 (default: all)")
    parser.add_argument("--configs", nargs="+",
                        help="no-cache, fewer-steps[:T], fora:N, delta-dit[:b=B,n=N], harmonica[:cur=C], "
                        "l2c[:cur=C], fbcache[:threshold], taylorseer[:interval], magcache[:threshold], "
                        "dbcache[:threshold] "
                        f"(default with CUDA: {' '.join(cuda.configs)}; --full and without CUDA: "
                        f"{' '.join(cpu.configs)})")
    parser.add_argument("--modes", nargs="+", help=f"of {' '.join(MODES)} (default with CUDA: "
                        f"{' '.join(cuda.modes)}; --full and without CUDA: all)")
    parser.add_argument("--steps", nargs="+", type=int,
                        help="denoising steps (default: 20; --full: DDIM 10 20 50 for DiT-XL/2)")
    parser.add_argument("--repeat", type=int, default=defaults["repeat"].default, help="timed generations per row")
    parser.add_argument("--warmup", type=int, default=defaults["warmup"].default,
                        help="untimed generations before them")
    parser.add_argument("--quick", action="store_true", help="one step count per model, at most 2 repeats")
    parser.add_argument("--full", action="store_true", help="with CUDA, the whole matrix (every real model, "
                        "configuration and mode; DiT-XL/2 at DDIM 10, 20 and 50) instead of the default suite")
    parser.add_argument("--max-compiled-graphs", type=int,
                        help="skip compile rows whose schedule needs more compiled graphs (default: no limit)")
    parser.add_argument("--part", choices=tuple(PARTS), default="all",
                        help="kernels: the kernel micro-benchmark only; suite: the sampling suite only")
    parser.add_argument("--kernel-ops", nargs="+", choices=tuple(PROVIDERS), default=list(PROVIDERS),
                        help="the kernel micro-benchmark's ops (default: all)")
    parser.add_argument("--plan", action="store_true",
                        help="print the rows it would run and an estimated duration, run nothing")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="default: cuda when available; --plan --device cuda plans a GPU run anywhere")
    parser.add_argument("--router", help="router directory for harmonica/l2c rows (default: synthetic schedules)")
    parser.add_argument("--real-weights", action="store_true", help="the presets' hub weights (downloads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context-parallel", metavar="ulysses=N|ring=N",
                        help="under torchrun, N = the world size: the flow models with diffusers' context parallelism "
                             "(rank 0 writes; peers and graph modes skipped)")
    parser.add_argument("--out", help="results .json file, or a directory for <date>-<device>-<commit>.json "
                        "(default: bench/results/)")
    parser.add_argument("--yes", action="store_true",
                        help=f"run on a CPU even when the estimate (--plan) exceeds {CPU_CONFIRM_S // 60} min")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--suite", choices=("sampling", "digits"), default="sampling",
                        help="digits: the digits-dit router protocol (bench/digits_protocol.py; ~25 min on 2 cores: "
                        "needs --yes; --quick a smoke run); only --quick, --out, --plan and --yes apply to it (the "
                        "others are refused); BENCHMARKS.md is left alone")


def command_line(args, prog: str) -> str:
    """The command that reproduces `args` (options that differ from the defaults)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    words = [prog]
    for name, value in vars(args).items():
        if name in defaults and name not in ("out", "no_progress", "plan", "yes") and value != defaults[name]:
            flag = "--" + name.replace("_", "-")
            words += [flag] if value is True else [flag, *map(str, value if isinstance(value, list) else [value])]
    return " ".join(words)


def run(args, prog: str = "python -m harmonica.bench") -> int:
    """Either suite, planned first: --plan prints the plan and runs nothing; a CPU run estimated over
    CPU_CONFIRM_S needs --yes. The options were checked (harmonica.options) before."""
    out = _out_target(args.out)
    if args.suite == "digits":
        return _run_digits(args, prog, out)
    options = SuiteOptions(**{name: tuple(v) if isinstance(v, list) else v
                              for name, v in vars(args).items() if name in SUITE_OPTIONS and v is not None})
    parts = PARTS[args.part]
    router = load_router(options.router) if options.router else None
    lines = plan(options, router) if "suite" in parts else []
    kernels, suite = "kernels" in parts, "suite" in parts
    if args.plan:
        print(f"Plan of `{command_line(args, prog)}` on {options.device}\n")
        print(format_plan(lines, options, kernels=kernels, suite=suite))
        cp = format_parallel_plan(lines, options)
        if cp:
            print(f"\n{cp}")
        return 0
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested, but torch sees no CUDA device (only --plan runs without one)")
    estimate = total_seconds(lines, options, kernels, suite)
    if options.device == "cpu":
        check_confirmed(estimate, args.yes, "rows")
    if parallel.rank():  # the other ranks run the suite's collectives with rank 0, which reports and writes
        run_suite(options, progress=False)
        return 0
    before = machine_info()
    results = {"command": command_line(args, prog), "args": {k: getattr(args, k) for k in SUITE_OPTIONS},
               "machine_before": before, "macs": mac_table(), "kernels": [], "suite": []}
    device = before.get("gpu", "cpu").replace(" ", "-")
    if args.out is None or out.is_dir():  # the results file inside, with its usual name
        out.mkdir(exist_ok=True)  # bench/results, the default
        out = out / f"{before['date'][:10]}-{device}-{before['commit']}.json"
    path = out

    def save(rows):
        results["suite"] = rows
        write_file(path, json.dumps(results, indent=1) + "\n")

    print("MACs per image per transformer forward (FlopCounterMode on the meta device)\n")
    print(format_mac_table(results["macs"]))
    if "kernels" in parts:
        results["host_cost"] = _host_cost()
    if "kernels" not in parts:
        print("\nKernel micro-benchmark: not run (--part suite).")
    elif torch.cuda.is_available():
        results["kernels"] = measure([c for c in default_cases() if c.op in args.kernel_ops])
        print(f"\nKernel micro-benchmark on {before['gpu']} (triton.testing.do_bench medians)\n")
        print(format_rows(results["kernels"]))
        print("\n" + target_verdict(results["kernels"]))
    else:
        print("\nNo CUDA device: the kernel micro-benchmark needs one and was not run.")
    if "suite" not in parts:
        results["machine_after"] = machine_info()
        save([])
        print(f"\nraw results: {path}\nBENCHMARKS.md sections: python -m harmonica.bench.table --write {path}")
        return 0
    save([])  # the kernel rows are kept if the suite is cut short
    print(f"\nSampling suite on {options.device}: {', '.join(options.model_names)}\n")
    rows = run_suite(options, progress=not args.no_progress, done=save)
    results["machine_after"] = machine_info()
    save(rows)
    print(format_suite_table(rows) + "\n\nGap attribution, ms per generation:\n\n" + format_gap_table(rows))
    print("\nBaseline drift (the no-cache eager row timed again after the others):\n\n" + format_drift(rows))
    print("\nSkipped rows:\n\n" + format_skipped(rows))
    print("\nTargets: " + "\n".join(target_verdicts(rows, options.device)))
    print(f"\nraw results: {path}")
    try:
        from .plot import plot_speedups

        print(f"plot: {plot_speedups(rows, path.with_suffix('.png'))}")
    except ImportError:
        print("plot: not drawn, matplotlib is not installed (pip install -e '.[bench]')")
    except ValueError as error:
        print(f"plot: not drawn ({error})")
    print(f"BENCHMARKS.md sections: python -m harmonica.bench.table --write {path}")
    return 0


def check_confirmed(estimate: float, yes: bool, what: str) -> None:
    """ValueError naming --yes when a CPU run estimated at `estimate` seconds exceeds CPU_CONFIRM_S without it."""
    if estimate > CPU_CONFIRM_S and not yes:
        raise ValueError(f"--yes: this run is estimated at {estimate / 60:.0f} min on the CPU (over "
                         f"{CPU_CONFIRM_S // 60} min; --plan lists its {what}); expected --yes to run it, got none")


def _run_digits(args, prog: str, out: Path) -> int:
    """--suite digits: the digits-dit protocol (bench/digits_protocol.py; --quick: its smoke run)."""
    from . import digits_protocol as protocol

    under_torchrun = {"workers": 0} if protocol.torchrun_world() > 1 else {}  # the ranks share out the noises
    config = protocol.ProtocolConfig(**(protocol.QUICK if args.quick else {}), **under_torchrun)
    estimate = protocol.estimate_seconds(config)
    if args.plan:
        print(f"Plan of `{command_line(args, prog)}` on cpu\n\n{protocol.format_plan(config, estimate)}")
        return 0
    check_confirmed(estimate, args.yes, "jobs")
    return protocol.bench_main(config, command_line(args, prog), out)


def _out_target(out: str | None) -> Path:
    """--out checked before any work: an existing writable directory (default bench/results) or a .json file
    in one."""
    if out is None:
        return REPO / "bench" / "results"
    if Path(out).is_dir():
        return check_out_dir(Path(out), "--out")
    return check_out_file(out, "--out", {".json"}, "a .json file name or an existing directory")


def _host_cost() -> list:
    """Host microseconds per fused call (bench/host_cost.py), printed; [] with the reason when it cannot run."""
    try:
        rows = measure_host_cost()
    except (RuntimeError, ImportError) as error:
        print(f"\nHost cost per fused call: not measured ({error})")
        return []
    print("\nHost cost per fused call, launch stubbed (bench/host_cost.py)\n")
    print(format_host_cost(rows))
    return rows


def main(argv=None) -> int:
    def parser():
        made = argparse.ArgumentParser(prog="python -m harmonica.bench", description=__doc__)
        add_arguments(made)
        return made

    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        check_options("bench", args, given_options(parser(), argv))
        return run(args)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"harmonica bench: error: {one_line(error)}", file=sys.stderr)
        return 2
