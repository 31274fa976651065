"""`harmonica bench` = `make bench`: the MAC table, the kernel micro-benchmark (CUDA) and the sampling
suite; writes bench/results/<date>-<device>-<commit>.json (or --out) and the PNG beside it, prints
the tables. Without CUDA the suite runs the tiny DiT and PixArt (random weights) in well under 2 min.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from .configs import DEFAULT_CONFIGS, MODES
from .kernel_bench import default_cases, format_rows, measure, target_verdict
from .machine import REPO, machine_info
from .macs import format_mac_table, mac_table
from .suite import SuiteOptions, run_suite
from .table import format_gap_table, format_skipped, format_suite_table, target_verdicts

SUITE_OPTIONS = ("models", "resolutions", "configs", "modes", "steps", "repeat", "warmup", "quick", "router",
                 "real_weights", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SuiteOptions.__dataclass_fields__
    parser.add_argument("--models", nargs="+", help="presets or families (dit-xl-2, pixart-alpha, pixart-sigma, "
                        "tiny-dit, ...); default: the real models with CUDA, tiny-dit and tiny-pixart without")
    parser.add_argument("--resolutions", nargs="+", type=int, help="pixels, e.g. 256 1024 (default: all)")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="no-cache, fewer-steps[:T], fora:N, delta-dit[:b=B,n=N], harmonica[:cur=C], "
                        "l2c[:cur=C], fbcache[:threshold], taylorseer[:interval], dbcache[:threshold] "
                        f"(default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--modes", nargs="+", default=list(MODES), help=f"of {' '.join(MODES)} (default: all)")
    parser.add_argument("--steps", nargs="+", type=int,
                        help="denoising steps (default: DDIM 10 20 50 for DiT-XL/2, 20 for the others)")
    parser.add_argument("--repeat", type=int, default=defaults["repeat"].default, help="timed generations per row")
    parser.add_argument("--warmup", type=int, default=defaults["warmup"].default,
                        help="untimed generations before them")
    parser.add_argument("--quick", action="store_true", help="one step count per model, at most 2 repeats")
    parser.add_argument("--router", help="router directory for harmonica/l2c rows (default: synthetic schedules)")
    parser.add_argument("--real-weights", action="store_true", help="the presets' hub weights (downloads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results JSON path (default: bench/results/<date>-<device>-<commit>.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def command_line(args, prog: str) -> str:
    """The command that reproduces `args` (options that differ from the defaults)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    words = [prog]
    for name, value in vars(args).items():
        if name in defaults and name not in ("out", "no_progress") and value != defaults[name]:
            flag = "--" + name.replace("_", "-")
            words += [flag] if value is True else [flag, *map(str, value if isinstance(value, list) else [value])]
    return " ".join(words)


def run(args, prog: str = "python -m harmonica.bench") -> int:
    options = SuiteOptions(**{name: tuple(v) if isinstance(v, list) else v
                              for name, v in vars(args).items() if name in SUITE_OPTIONS and v is not None})
    before = machine_info()
    results = {"command": command_line(args, prog), "args": {k: getattr(args, k) for k in SUITE_OPTIONS},
               "machine_before": before, "macs": mac_table(), "kernels": []}
    print("MACs per image per transformer forward (FlopCounterMode on the meta device)\n")
    print(format_mac_table(results["macs"]))
    if torch.cuda.is_available():
        results["kernels"] = measure(default_cases())
        print(f"\nKernel micro-benchmark on {before['gpu']} (triton.testing.do_bench medians)\n")
        print(format_rows(results["kernels"]))
        print("\n" + target_verdict(results["kernels"]))
    else:
        print("\nNo CUDA device: the kernel micro-benchmark needs one and was not run.")
    print(f"\nSampling suite on {options.device}: {', '.join(options.model_names)}\n")
    results["suite"] = run_suite(options, progress=not args.no_progress)
    results["machine_after"] = machine_info()
    rows = results["suite"]
    print(format_suite_table(rows) + "\n\nGap attribution, ms per generation:\n\n" + format_gap_table(rows))
    print("\nSkipped rows:\n\n" + format_skipped(rows))
    print("\nTargets: " + "\n".join(target_verdicts(rows, options.device)))
    device = before.get("gpu", "cpu").replace(" ", "-")
    path = Path(args.out) if args.out else REPO / "bench" / "results" / f"{before['date'][:10]}-{device}-" \
        f"{before['commit']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nraw results: {path}")
    try:
        from .plot import plot_speedups

        print(f"plot: {plot_speedups(rows, path.with_suffix('.png'))}")
    except ImportError:
        print("plot: not drawn, matplotlib is not installed (pip install -e '.[bench]')")
    except ValueError as error:
        print(f"plot: not drawn ({error})")
    print(f"BENCHMARKS.md section: python -m harmonica.bench.table {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmonica.bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as error:
        print(f"harmonica bench: error: {error}", file=sys.stderr)
        return 2
