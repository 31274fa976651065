"""CPU mini-benchmark of cache schedules on digits-dit, a DiT that really learned something.

    python -m harmonica.bench.digits_bench [--steps 10] [--target-cur 0.5] [--iterations 900]

Trains two routers with `--target-cur` (HarmoniCa: SDT + IEPO; and SDT with the L2C objective,
lambda = 1), then samples the same seeds with every configuration: no cache, the two routers,
FORA, and fewer steps at about the same theoretical speedup. Reports per row: Fréchet distance in
the digit classifier's feature space and class accuracy (against real digits), PSNR against the
uncached samples of the same seeds, CUR, theoretical MAC speedup and measured CPU speedup (median
of `--repeats` timed runs of the whole sampling loop, baseline timed in the same run). Writes
bench/results/<date>-cpu-<commit>-digits.json.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

import harmonica
from harmonica import CacheSchedule
from harmonica.digits import eval_batch, load_classifier, load_digits_dit, psnr, quality, sample
from harmonica.training import DiTTask, RouterTrainer, TrainConfig

from .machine import REPO, machine_info
from .macs import VAE_FACTOR, count_macs


def train_router(model, objective: str, args) -> harmonica.Router:
    config = TrainConfig(num_steps=args.steps, iterations=args.iterations, batch=32, lr=args.lr, beta=1e-6,
                         refresh=100, lambda_batch=16, objective=objective, target_cur=args.target_cur,
                         seed=args.seed, checkpoint_every=args.iterations)
    with tempfile.TemporaryDirectory() as out:
        trainer = RouterTrainer(DiTTask(model, args.steps, 1.5), config, out)
        return trainer.run(progress=False)


def timed_samples(model, schedule, noise, labels, num_steps, repeats):
    """(samples, median seconds) of sampling with `schedule` (None: no cache)."""
    if schedule is not None:
        harmonica.enable(model, schedule)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = sample(model, noise, labels, num_steps)
        times.append(time.perf_counter() - start)
    if schedule is not None:
        harmonica.disable(model)
    return result, statistics.median(times)


def run(args) -> dict:
    torch.manual_seed(args.seed)
    model = load_digits_dit()
    classifier = load_classifier()
    noise, labels = eval_batch(args.samples, seed=args.seed)
    macs = count_macs(model, model.config.sample_size * VAE_FACTOR)
    units = len(macs.names)
    routers = {name: train_router(model, objective, args)
               for name, objective in (("harmonica", "cumulative"), ("sdt-l2c-objective", "l2c"))}
    configs = [("no-cache", args.steps, None)]
    configs += [(name, args.steps, router.schedule()) for name, router in routers.items()]
    configs += [(f"fora:{n}", args.steps, CacheSchedule.fora(args.steps, units, n)) for n in (2, 3)]
    configs += [(f"fewer-steps:{t}", t, None) for t in args.fewer_steps]
    rows, reference, base_time = [], None, None
    for name, steps, schedule in configs:
        samples, seconds = timed_samples(model, schedule, noise, labels, steps, args.repeats)
        if reference is None:
            reference, base_time = samples, seconds
        full = CacheSchedule.no_cache(steps, units)
        theoretical = args.steps / steps * (schedule or full).theoretical_speedup(macs)
        rows.append({"config": name, "steps": steps, "cur": (schedule or full).cur,
                     "theoretical_speedup": theoretical, "measured_speedup": base_time / seconds,
                     "seconds": seconds, "psnr_vs_uncached": psnr(samples, reference),
                     **quality(samples, labels, classifier)})
    return {"machine": machine_info(), "args": vars(args), "rows": rows}


def format_table(rows) -> str:
    header = ("| config | steps | CUR | theoretical speedup | measured CPU speedup | FD ↓ | class accuracy ↑ "
              "| PSNR vs uncached (dB) ↑ |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['config']} | {r['steps']} | {r['cur']:.1%} | {r['theoretical_speedup']:.2f}x | "
                     f"{r['measured_speedup']:.2f}x | {r['fd']:.3f} | {r['accuracy']:.1%} | "
                     f"{r['psnr_vs_uncached']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--target-cur", type=float, default=0.5)
    parser.add_argument("--iterations", type=int, default=900)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--fewer-steps", type=int, nargs="*", default=[5, 6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    results = run(args)
    print(format_table(results["rows"]))
    if not args.no_save:
        machine = results["machine"]
        path = REPO / "bench" / "results" / f"{machine['date'][:10]}-cpu-{machine['commit']}-digits.json"
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nraw results: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
