"""The schedule search against FORA:2 on a digits model at CUR 0.5, over calibration seeds (docs/training.md).

For each seed s: the search (`harmonica.search.search_schedule`, the `harmonica train` defaults) on the 64
calibration noises `eval_batch(64, seed=100 + s)`, from FORA:2; then both schedules on the 200 held-out noises
`eval_batch(200, seed=0)`: PSNR of the final images against the uncached ones, and on how many held-out noises
the searched schedule's error is lower, with a one-sided sign test. With --equal-macs the search also holds
the MACs to at most FORA:2's (`search_schedule`'s unit_cost, as `harmonica train --target-speedup` does):
at equal CUR a searched schedule may compute more of the costlier units. With --forecast each of the two
schedules also gets its linear forecast (`harmonica.forecast.fit_forecast` on the same 64 calibration noises) and
is measured with it too, paired against itself without it on the held-out noises (and its slot memory), and
"chosen" is the lowest error of the four on 64 selection noises `eval_batch(64, seed=200 + s)` (as `harmonica
train` chooses, `search.deployment`); with --forecast-rounds, from it (with its forecast) "refined" is `harmonica
train --forecast-rounds`'s forecast search (`search.forecast_search`), and "kept" what `harmonica train` then
deploys: refined+forecast where its calibration and selection errors are lower, else chosen; it is paired with
FORA:2+forecast on the held-out noises.

    python -m harmonica.bench.search_check [--model digits-dit|digits-flux] --steps 10 --seeds 0 1 2 [--forecast]
        [--rounds R]
"""

import argparse
import json
import math
import sys
import time

import torch

from harmonica.digits import DIGITS_MODELS, PIXEL_RANGE, eval_batch
from harmonica.files import check_out_file, write_file
from harmonica.schedule import CacheSchedule
from harmonica.search import Rollouts, SearchConfig, budget_for_cur, deployment, search_schedule, spread
from harmonica.training import engine_attached

from .machine import machine_info


def sign_test(wins: int, count: int) -> float:
    """One-sided p of `wins` or more of `count` under a fair coin."""
    return sum(math.comb(count, k) for k in range(wins, count + 1)) / 2 ** count


def check(num_steps: int, seed: int, calibration: int = 64, held_out: int = 200, *, model: str = "digits-dit",
          equal_macs: bool = False, forecast: bool = False, rounds: int | None = None,
          forecast_rounds: int = SearchConfig.forecast_rounds) -> dict:
    digits = DIGITS_MODELS[model]()
    task = digits.task(num_steps, digits.guidance)
    macs = task.macs()
    defaults = SearchConfig()
    with engine_attached(digits.transformer) as engine:
        units = len(engine.units)
        noise, labels = eval_batch(calibration, seed=100 + seed)
        started = time.perf_counter()
        rollouts = Rollouts(task, engine, digits.latents(noise), digits.conditions(labels), num_steps, clip=PIXEL_RANGE)
        start = spread(num_steps, units, budget_for_cur(0.5, num_steps, units))
        result = search_schedule(rollouts.loss, start, rounds=rounds or defaults.rounds, candidates=defaults.candidates,
                                 on_accept=rollouts.set_base, unit_cost=macs.unit_macs if equal_macs else None)
        seconds = time.perf_counter() - started
        tables = {"fora:2": start, "searched": result.table}
        choice = refined = kept = None
        forecasts = {}
        if forecast:
            noise, labels = eval_batch(calibration, seed=200 + seed)
            judge = Rollouts(task, engine, digits.latents(noise), digits.conditions(labels), num_steps,
                             clip=PIXEL_RANGE)
            choice, refined, (kept, *_) = deployment(
                rollouts, tables, judge=judge, rounds=forecast_rounds, candidates=defaults.candidates,
                unit_cost=macs.unit_macs if equal_macs else None)
            forecasts = dict(choice.forecasts)
            if refined is not None:
                refined, forecasts["refined"] = refined
                tables["refined"] = refined.table
        seconds_forecast = time.perf_counter() - started - seconds
        noise, labels = eval_batch(held_out, seed=0)
        test = Rollouts(task, engine, digits.latents(noise), digits.conditions(labels), num_steps, clip=PIXEL_RANGE)
        errors, cache_bytes = {}, {}
        for name, table in tables.items():
            for label, fitted in ((name, None), *(((f"{name}+forecast", forecasts[name]),) if forecast else ())):
                x = test.sample(table, forecast=fitted)
                errors[label] = ((test._clipped(x) - test.reference) ** 2).flatten(1).mean(1)
                cache_bytes[label] = engine.cache_bytes()
    psnr = {name: 10 * math.log10(4 / e.mean().item()) for name, e in errors.items()}
    wins = int((errors["searched"] < errors["fora:2"]).sum())
    paired = {name: int((errors[f"{name}+forecast"] < errors[name]).sum()) for name in tables if forecast}
    speedup = {name: CacheSchedule(table.clone(), name).theoretical_speedup(macs) for name, table in tables.items()}
    return {"model": model, "steps": num_steps, "seed": seed, "seconds": seconds, "schedules": result.rollouts,
            "calibration": (result.start_loss, result.loss), "psnr": psnr, "wins": wins, "count": held_out,
            "p": sign_test(wins, held_out), "speedup": speedup, "forecast_wins": paired,
            "forecast_p": {name: sign_test(w, held_out) for name, w in paired.items()}, "cache_bytes": cache_bytes,
            "chosen": None if choice is None else choice.label, "kept": kept, "forecast_seconds": seconds_forecast,
            "refined_calibration": None if refined is None else (refined.start_loss, refined.loss),
            "kept_wins": None if kept is None else int((errors[kept] < errors["fora:2+forecast"]).sum()),
            "calibration_forecast": None if choice is None else choice.errors,
            "selection_forecast": None if choice is None else choice.judged}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DIGITS_MODELS), default="digits-dit")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--equal-macs", action="store_true", help="also hold the MACs to at most FORA:2's")
    parser.add_argument("--forecast", action="store_true", help="also each schedule with its fitted linear forecast")
    parser.add_argument("--rounds", type=int, help=f"search rounds at most (default {SearchConfig.rounds}, train's)")
    parser.add_argument("--forecast-rounds", type=int, default=SearchConfig.forecast_rounds,
                        help=f"with --forecast: rounds of the forecast search from the kept schedule (default "
                        f"{SearchConfig.forecast_rounds}, train's)")
    parser.add_argument("--out", help="also write the results, with the machine and the command, to this JSON file")
    args = parser.parse_args(argv)
    if args.out is not None:
        try:
            check_out_file(args.out, "--out", (".json",), "a .json file in an existing writable directory")
        except ValueError as error:
            parser.error(str(error))
    torch.set_num_threads(1)
    results = {"command": "python -m harmonica.bench.search_check " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine_info(), "seeds": []}
    for seed in args.seeds:
        r = check(args.steps, seed, model=args.model, equal_macs=args.equal_macs, forecast=args.forecast,
                  rounds=args.rounds, forecast_rounds=args.forecast_rounds)
        results["seeds"].append(r)
        if args.out is not None:  # after each seed: a run cut short keeps what it finished
            write_file(args.out, json.dumps(results, indent=1, default=float))
        print(f"{r['model']} T={r['steps']} seed {r['seed']}: FORA:2 {r['psnr']['fora:2']:.2f} dB "
              f"({r['speedup']['fora:2']:.3f}x), "
              f"searched {r['psnr']['searched']:.2f} dB ({r['speedup']['searched']:.3f}x), "
              f"{r['psnr']['searched'] - r['psnr']['fora:2']:+.2f} dB; better on {r['wins']}/{r['count']} held-out "
              f"noises (sign test p = {r['p']:.1e}); calibration MSE {r['calibration'][0]:.4g} -> "
              f"{r['calibration'][1]:.4g}, {r['schedules']} schedules in {r['seconds']:.0f} s", flush=True)
        if r["chosen"] is not None:
            chosen, kept = r["chosen"], r["kept"]
            print(f"  chosen on the selection noises: {chosen}, {r['psnr'][chosen]:.2f} dB, "
                  f"{r['psnr'][chosen] - r['psnr']['fora:2']:+.2f} dB over FORA:2", flush=True)
            print(f"  kept after the forecast search (harmonica train's default): {kept}, {r['psnr'][kept]:.2f} dB, "
                  f"{r['psnr'][kept] - r['psnr']['fora:2+forecast']:+.2f} dB over FORA:2+forecast, better on "
                  f"{r['kept_wins']}/{r['count']} held-out noises "
                  f"(sign test p = {sign_test(r['kept_wins'], r['count']):.1e}); "
                  f"forecast fits and search {r['forecast_seconds']:.0f} s", flush=True)
        for name, wins in r["forecast_wins"].items():
            with_forecast = f"{name}+forecast"
            print(f"  {with_forecast}: {r['psnr'][with_forecast]:.2f} dB vs {r['psnr'][name]:.2f} dB, "
                  f"{r['psnr'][with_forecast] - r['psnr'][name]:+.2f} dB; better on {wins}/{r['count']} held-out "
                  f"noises (sign test p = {r['forecast_p'][name]:.1e}); slots "
                  f"{r['cache_bytes'][with_forecast] / 2**20:.1f} MiB vs {r['cache_bytes'][name] / 2**20:.1f} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
