"""The digits protocol: router objectives compared over seeds, with the static baselines, on the CPU.

    harmonica bench --suite digits [--quick]
    python -m harmonica.bench.digits_protocol [--model digits-dit|digits-flux] [--steps 10] [--quick] [--seeds 6]
        [--workers 2] [--out DIR] [--no-write]
    python -m harmonica.bench.digits_protocol --section bench/results/<file>-digits.json [--write]

The model is a committed digits model (harmonica/digits.py: digits-dit, DiT DDIM; digits-flux, FLUX's
FlowMatchEuler). Objectives, each trained with `--seeds` seeds (0, 1, ...):
- "search": the default of `harmonica train`, the schedule search on the final-image error (harmonica.search;
  CUR held at the target exactly, 64 calibration noises), then its linear forecast (`--forecast`, the default:
  `search.keep_forecast` keeps the searched schedule or FORA's equal-cost start, each with its forecast fitted on
  the calibration noises or without, of the lowest error on `--forecast-selection` other noises (default: as many;
  0: the calibration error) (with `--forecast-rounds`, then searches on from it for that many rounds on the error
  of each schedule with its own forecast, `search.forecast_search`); the router's forecast applies to its
  schedule, so its tau sweep has that one row);
- "harmonica": SDT with IEPO's cumulative lambda (harmonica.training, objective "cumulative"; `harmonica
  train --objective iepo`), `--iterations` iterations;
- "sdt-lambda1": the same SDT with lambda = 1, the paper's "SDT + L_LTC" ablation (objective "l2c");
- "l2c": Learning-to-Cache's own training on the real digits (harmonica.l2c_training), alternating inference
  (digits-dit only: it trains DiT blocks' routers).
Each router is evaluated on `--samples` noises of EVAL_SEED (disjoint from the training generators) at
every tau of `--taus` (equal schedules sampled once): CUR, theoretical (MAC) speedup, PSNR against the
uncached samples, FD against the real digits and against the uncached samples, class accuracy and
agreement with the uncached samples' classes. Reported per router: PSNR interpolated (linear in CUR
between the bracketing points) at CUR 0.45 and 0.50, and the metrics at tau = 0.1; per pair (the first
objective minus each other one, and minus the best static baseline of CUR >= 0.5): the per-seed difference,
mean +- standard error and the two-sided exact sign test; with the forecast, also minus the best static
baseline with its own forecast). Baselines on the same axes: FORA, each also with its linear forecast fitted on
the seed-0 search's calibration noises (`fora:N+forecast`), Δ-DiT (boundary T/2), fewer sampler steps, and the
training-free peers that run here (`--peers`: diffusers' First Block
Cache, TaylorSeer and MagCache hooks, bench/peers.py, on a copy of the model; their CUR and theoretical
speedup from the units that really ran, counted per step). Measured CPU
speedup: median of `--repeats` timed samplings of the eval batch (one thread) against the uncached one
timed again in the same job just before. The uncached reference comes from a freshly loaded model and must equal a
second fresh load (and every worker's own). Jobs run in `--workers` spawned processes, one thread each.
Under torchrun (`torchrun --nproc-per-node N -m harmonica.bench.digits_protocol --workers 0`, gloo) every rank
runs every job, trains its routers as one process would (`training.alone`) and shares out each row's eval noises
with the others, 50 at a time (`parallel.sharded`): the results equal one process's, timings aside (each rank
times its share and the gather); the peers' rows sample the whole batch on every rank (their skips depend on it).
Writes bench/results/<date>-cpu-<commit>-digits.json, the Pareto PNG beside it and (unless --quick or
--no-write) the `bench-digits` section of BENCHMARKS.md.
"""

import argparse
import contextlib
import copy
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import harmonica
from harmonica import CacheSchedule, parallel
from harmonica.digits import (
    DIGITS_MODELS,
    PIXEL_RANGE,
    class_comparison,
    eval_batch,
    feature_stats,
    frechet_distance,
    load_classifier,
    psnr,
    quality,
    real_digits,
)
from harmonica.files import file_bytes, write_file
from harmonica.forecast import fit_forecast
from harmonica.l2c_training import L2CConfig, L2CTrainer
from harmonica.search import Rollouts, SearchConfig, calibration_batch, keep_forecast, search_router
from harmonica.training import (
    RouterTrainer,
    TrainConfig,
    _rank_world,
    alone,
    engine_attached,
    stop_signals,
)
from harmonica.units import cached_units

from .configs import parse_config
from .machine import REPO, machine_info
from .peers import PeerUnavailable, UnitCounter, make_peer
from .quality import ssim
from .table import update_benchmarks

PARENT_POLL_S = 0.5  # how often a worker checks that the protocol's process is alive
EVAL_SEED = 1_000_003  # the eval noises' generator; training generators are seeded from seeds 0 .. seeds-1
OBJECTIVES = ("search", "harmonica", "sdt-lambda1", "l2c")
OBJECTIVE_NAMES = {"search": "schedule search (harmonica train's default)",
                   "harmonica": "HarmoniCa (SDT + IEPO cumulative)", "sdt-lambda1": "SDT, lambda = 1 (ablation)",
                   "l2c": "Learning-to-Cache training (real digits, alternating)"}
STATIC = "best static"  # the comparison with the best static baseline of CUR >= 0.5
FORECAST = "+forecast"  # a baseline row's suffix: the static schedule with its fitted linear forecast
CUR_POINTS = (0.45, 0.50)
TAU = 0.1
GENERATED = "(generated by python -m harmonica.bench.digits_protocol; do not edit by hand)"
SAMPLERS = {"digits-dit": "original DiT DDIM, guidance 1.5",
            "digits-flux": "FLUX's FlowMatchEuler (FLUX.1-dev's scheduler config), no guidance"}


def markers(key: str) -> tuple:
    """The BENCHMARKS.md markers of a protocol section (`ProtocolConfig.key`)."""
    return f"<!-- bench-{key}:begin {GENERATED} -->", f"<!-- bench-{key}:end -->"


def default_taus(count: int = 12) -> tuple:
    """`count` values log-spaced over [1e-3, 0.99], and TAU."""
    values = torch.logspace(math.log10(1e-3), math.log10(0.99), count, dtype=torch.float64).tolist()
    return tuple(sorted({round(v, 6) for v in values} | {TAU}))


@dataclass
class ProtocolConfig:
    model: str = "digits-dit"  # a key of harmonica.digits.DIGITS_MODELS
    objectives: tuple = OBJECTIVES  # the first is compared with each other one and the best static baseline
    seeds: int = 6
    workers: int = 2
    steps: int = 10
    iterations: int = 600
    batch: int = 16
    lr: float = 0.1
    refresh: int = 100  # IEPO lambda refreshes (harmonica)
    lambda_batch: int = 8
    beta: float = 1e-6  # SDT's initial beta (target_cur adjusts it)
    l2c_beta: float = 1e-3  # L2C's initial beta
    target_cur: float = 0.5
    l2c_target_cur: float = 0.45  # L2C's alternating inference caps its CUR at ~0.5
    search_batch: int = 64  # the search's calibration noises
    search_rounds: int = 8
    search_candidates: int = 24
    search_macs: bool = True  # recorded: the search holds the MACs too (harmonica.search since 2026-12-03)
    forecast: bool = True  # the search's router with its linear forecast, FORA rows with theirs
    forecast_rounds: int = SearchConfig.forecast_rounds  # then the search on the forecast's error (train's default)
    forecast_selection: int | None = None  # noises the kept schedule is chosen on (None: search_batch, as train's;
    # 0: the calibration noises, as before 2026-12-05)
    samples: int = 500
    repeats: int = 3
    taus: tuple = field(default_factory=default_taus)
    fora: tuple = (2, 3)
    delta_dit: tuple | None = None  # (boundary, interval, cached blocks); None: T/2, 2 and 3, 4, 5 of the 6 blocks
    fewer_steps: tuple | None = None  # None: 50, 60, 70 and 80% of the steps
    peers: tuple = ("fbcache:0.1", "fbcache:0.2", "taylorseer:2", "magcache")  # bench/peers.py names
    quick: bool = False

    def __post_init__(self):
        if self.model not in DIGITS_MODELS:
            raise ValueError(f"model: expected one of {sorted(DIGITS_MODELS)}, got {self.model!r}")
        self.objectives = tuple(self.objectives)
        if not self.objectives or len(set(self.objectives)) < len(self.objectives) or \
                not set(self.objectives) <= set(OBJECTIVES):
            raise ValueError(f"objectives: expected distinct names from {OBJECTIVES}, got {self.objectives}")
        if "l2c" in self.objectives and self.model != "digits-dit":
            raise ValueError(f"objectives: expected no l2c with {self.model} (Learning-to-Cache's training routes "
                             f"DiT blocks), got {self.objectives}")
        if self.seeds < 1 or self.workers < 0 or self.samples < 2 or self.repeats < 1 or self.steps < 2:
            raise ValueError(f"seeds, workers, samples, repeats, steps: expected >= 1, >= 0, >= 2, >= 1, >= 2; got "
                             f"{self.seeds}, {self.workers}, {self.samples}, {self.repeats}, {self.steps}")
        self.forecast_selection = self.search_batch if self.forecast_selection is None else self.forecast_selection
        if self.forecast_selection < 0:
            raise ValueError(f"forecast_selection: expected >= 0 noises, got {self.forecast_selection}")
        if TAU not in self.taus:
            raise ValueError(f"taus: expected them to include {TAU}, got {self.taus}")
        if self.delta_dit is None:
            self.delta_dit = tuple((self.steps // 2, 2, blocks) for blocks in (3, 4, 5))
        for name in self.peers:
            if not parse_config(name).is_peer:
                raise ValueError(f"peers: expected peer names (fbcache, taylorseer, magcache, dbcache), got {name!r}")
        if self.fewer_steps is None:
            self.fewer_steps = tuple(sorted({max(1, round(share * self.steps)) for share in (0.5, 0.6, 0.7, 0.8)}))

    @property
    def key(self) -> str:
        """The BENCHMARKS.md section's name: bench-digits for digits-dit at 10 steps, else bench-<model>-t<steps>."""
        return "digits" if (self.model, self.steps) == ("digits-dit", 10) else f"{self.model}-t{self.steps}"


QUICK = {"seeds": 2, "iterations": 12, "batch": 4, "refresh": 6, "lambda_batch": 2, "samples": 50, "repeats": 1,
         "taus": default_taus(8), "search_batch": 8, "search_rounds": 1, "search_candidates": 4, "quick": True}


def _print(text: str) -> None:
    print(text, flush=True)


# ---- statistics ----

def interpolate(points: list, cur: float) -> float | None:
    """The PSNR at `cur` on a curve of (cur, psnr) points, linear in CUR between the two bracketing points
    (an exact hit: that point's); None where `cur` is outside the curve or a bracketing PSNR is infinite."""
    points = sorted(points)
    for (c0, p0), (c1, p1) in zip(points, points[1:] + [points[-1]]):
        if c0 == cur:
            return p0 if math.isfinite(p0) else None
        if c0 < cur < c1:
            if not (math.isfinite(p0) and math.isfinite(p1)):
                return None
            return p0 + (p1 - p0) * (cur - c0) / (c1 - c0)
    return None


def sign_test(positive: int, negative: int) -> float:
    """Two-sided exact binomial sign test p-value of `positive` vs `negative` signs (ties left out)."""
    n = positive + negative
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(positive, negative) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mean_se(values: list) -> tuple:
    """(mean, standard error) of the values; the error is None below two values."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def paired(first: dict, second: dict) -> dict:
    """Per-seed difference first - second ({seed: value}) over the seeds where both are defined and finite (an
    infinite PSNR, an all-compute schedule, has no finite difference)."""
    seeds = sorted(s for s in first if s in second and all(v is not None and math.isfinite(v)
                                                           for v in (first[s], second[s])))
    diffs = [first[s] - second[s] for s in seeds]
    mean, se = mean_se(diffs)
    positive, negative = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"seeds": seeds, "differences": diffs, "mean": mean, "se": se, "positive": positive,
            "negative": negative, "sign_test_p": sign_test(positive, negative)}


# ---- one process's evaluation ----

def check_pristine(model) -> None:
    """Raise when anything of a cache engine is left on the model (a patched forward, hooks)."""
    if hasattr(model, "_harmonica") or any("forward" in vars(m) for m in model.modules()) \
            or model._forward_hooks or model._forward_pre_hooks:
        raise RuntimeError("digits protocol: a cache engine outlived its use on the model")


def eval_samples(digits, noise, labels, steps: int, guidance: float) -> torch.Tensor:
    """The digits model's samples of the eval batch, `parallel.EVAL_CHUNK` noises at a time; under torchrun the
    chunks are shared out over the ranks and every rank gets all the samples (`parallel.sharded`). On this CPU the
    chunks equal the whole batch sampled at once bit for bit."""
    return parallel.sharded(lambda a, b: digits.sample(noise[a:b], labels[a:b], steps, guidance), len(noise))


def fingerprint(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


class Evaluator:
    """A fresh digits model, the eval batch, its uncached samples (the reference) and their timing."""

    def __init__(self, config: ProtocolConfig):
        self.config = config
        self.digits, self.classifier = DIGITS_MODELS[config.model](), load_classifier()
        self.model, self.guidance = self.digits.transformer, self.digits.guidance
        self.noise, self.labels = eval_batch(config.samples, seed=EVAL_SEED)
        self.macs = self.digits.task(config.steps, self.guidance).macs()
        self.unit_names = list(self.macs.names)
        self.reference, self.base_seconds = self.timed(None, config.steps)
        with torch.no_grad():
            features = self.classifier.features(self.reference.clamp(-1, 1))
            self.reference_prediction = self.classifier.head(features).argmax(1)
        self.reference_stats = feature_stats(features)

    def timed(self, schedule, steps: int, repeats: int | None = None, forecast=None) -> tuple:
        """(samples, median seconds of `repeats` samplings of the eval batch) with `schedule` (None: uncached) and
        its `forecast` (a `forecast.Forecast`, or None: pure reuse)."""
        times = []
        if schedule is not None:
            harmonica.enable(self.model, schedule, forecast=forecast)
        try:
            for _ in range(repeats or self.config.repeats):
                start = time.perf_counter()
                samples = eval_samples(self.digits, self.noise, self.labels, steps, self.guidance)
                times.append(time.perf_counter() - start)
        finally:
            if schedule is not None:
                harmonica.disable(self.model)
        check_pristine(self.model)
        return samples, statistics.median(times)

    def row(self, schedule, steps: int, repeats: int | None = None, forecast=None) -> dict:
        """The metrics of sampling with `schedule` over `steps` (None: uncached), with its `forecast` if any."""
        samples, seconds = self.timed(schedule, steps, repeats, forecast)
        return self.metrics(samples, seconds, schedule or CacheSchedule.no_cache(steps, len(self.unit_names)), steps)

    def peer_row(self, name: str) -> dict:
        """The metrics of a peer (bench/peers.py) on a copy of the model; its schedule: the units that ran."""
        peer = make_peer(parse_config(name), self.model, self.config.steps)
        on_copy = copy.copy(self.digits)
        on_copy.transformer = peer.transformer
        times = []
        try:
            def generate():
                with peer.generation(self.config.steps):
                    return on_copy.sample(self.noise, self.labels, self.config.steps, self.guidance)

            peer.calibrate(generate)
            for _ in range(self.config.repeats):
                with UnitCounter(peer.transformer) as counter:
                    start = time.perf_counter()
                    samples = generate()
                    times.append(time.perf_counter() - start)
        finally:
            peer.close()
        check_pristine(self.model)
        ran = CacheSchedule(counter.table(), name)
        return self.metrics(samples, statistics.median(times), ran, self.config.steps)

    def metrics(self, samples, seconds: float, schedule, steps: int) -> dict:
        """The row of `samples` of the eval batch, sampled in `seconds` over `steps` with `schedule`."""
        x = samples.float().clamp(-1, 1)
        with torch.no_grad():
            features = self.classifier.features(x)
            prediction = self.classifier.head(features).argmax(1)
        real = quality(samples, self.labels, self.classifier)
        return {"steps": steps, "cur": schedule.cur,
                "theoretical_speedup": self.config.steps / steps * schedule.theoretical_speedup(self.macs),
                "seconds": seconds, "measured_speedup": self.base_seconds / seconds,
                "psnr": psnr(samples, self.reference), "ssim": ssim(samples, self.reference),
                "fd": real["fd"], "accuracy": real["accuracy"],
                "fd_vs_uncached": frechet_distance(*feature_stats(features), *self.reference_stats),
                "agreement": (prediction == self.reference_prediction).float().mean().item()}

    def fitted_forecast(self, schedule):
        """`schedule`'s linear forecast fitted on the calibration noises of the seed-0 search."""
        task = self.digits.task(self.config.steps, self.guidance)
        noise, cond = calibration_batch(task, self.config.search_batch, 0)
        with engine_attached(self.model) as engine:
            rollouts = Rollouts(task, engine, noise, cond, self.config.steps, clip=PIXEL_RANGE)
            forecast = fit_forecast(rollouts, schedule.table)
        check_pristine(self.model)
        return forecast

    def retime_base(self) -> float:
        """Time the uncached sampling again (median of `repeats`): each job's speedups divide by a baseline
        timed next to them, not at the worker's start, which other load may have slowed."""
        self.base_seconds = self.timed(None, self.config.steps)[1]
        return self.base_seconds

    def sweep(self, router) -> list:
        """One row per distinct schedule of `router` over the taus (its `taus`), CUR ascending; the row of
        TAU is timed `repeats` times, the others once."""
        seen = {}
        for tau in self.config.taus:
            schedule = router.schedule(tau)
            key = schedule.table.numpy().tobytes()
            seen.setdefault(key, (schedule, []))[1].append(tau)
        rows = []
        for schedule, taus in seen.values():
            forecast = router.forecast if router.forecast is not None and torch.equal(
                router.forecast.table, schedule.table) else None
            row = self.row(schedule, self.config.steps, None if TAU in taus else 1, forecast)
            rows.append({"taus": taus, **row})
        return sorted(rows, key=lambda r: r["cur"])


# ---- jobs (run in the worker processes) ----

_EVALUATOR = None


@contextlib.contextmanager
def one_thread():
    """Every sample of the protocol is computed on one thread, in the workers and in this process: the
    uncached samples are compared bitwise across processes, and another thread count may sum in
    another order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_worker(config: dict) -> None:
    global _EVALUATOR
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(1)
    _EVALUATOR = Evaluator(ProtocolConfig(**config))


def _exit_with_parent(parent: int) -> None:
    """A worker's watch: it ends within a second of the protocol's process, however that one ended (SIGKILL
    included), instead of computing on with no one to read its results."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _exit_on_signal(signum, frame) -> None:
    """SIGINT/SIGTERM in the protocol's process: leave through the worker pool's exit, which terminates them."""
    raise SystemExit(128 + signum)


def train(evaluator: Evaluator, objective: str, seed: int):
    """A router of `objective` trained with `seed` on the evaluator's model (left pristine)."""
    cfg, model = evaluator.config, evaluator.model
    task = evaluator.digits.task(cfg.steps, evaluator.guidance)
    if objective == "search":
        config = SearchConfig(num_steps=cfg.steps, target_cur=cfg.target_cur, batch=cfg.search_batch, seed=seed,
                              rounds=cfg.search_rounds, candidates=cfg.search_candidates, tau=TAU, clip=PIXEL_RANGE)
        with tempfile.TemporaryDirectory() as out:
            router, _ = search_router(task, config, out, evaluator.macs)
        if cfg.forecast:
            router, *_ = keep_forecast(task, router, cfg.search_batch, seed, config.clip, macs=evaluator.macs,
                                       rounds=cfg.forecast_rounds, candidates=cfg.search_candidates,
                                       selection=cfg.forecast_selection)
    elif objective == "l2c":
        config = L2CConfig(num_steps=cfg.steps, iterations=cfg.iterations, batch=cfg.batch, lr=cfg.lr,
                           beta=cfg.l2c_beta, tau=TAU, seed=seed, target_cur=cfg.l2c_target_cur)
        router = L2CTrainer(model, *real_digits(), config).run()
    else:
        config = TrainConfig(num_steps=cfg.steps, iterations=cfg.iterations, batch=cfg.batch, lr=cfg.lr,
                             beta=cfg.beta, tau=TAU, refresh=cfg.refresh, lambda_batch=cfg.lambda_batch,
                             objective="cumulative" if objective == "harmonica" else "l2c", guidance=evaluator.guidance,
                             target_cur=cfg.target_cur, seed=seed, checkpoint_every=cfg.iterations,
                             log_every=cfg.iterations)
        with tempfile.TemporaryDirectory() as out:
            router = RouterTrainer(task, config, out).run(progress=False)
    check_pristine(model)
    return router


def run_job(job: tuple) -> dict:
    """("router", objective, seed) or ("baseline", name, steps, spec): its result, with the worker's
    reference fingerprint and uncached seconds."""
    evaluator = _EVALUATOR
    start = time.perf_counter()
    result = {"reference": fingerprint(evaluator.reference)}
    if job[0] == "router":
        _, objective, seed = job
        with alone():  # under torchrun: the one-process router on every rank, no collective
            router = train(evaluator, objective, seed)
        trained = time.perf_counter()
        result.update(kind="router", objective=objective, seed=seed, train_seconds=trained - start,
                      logits=router.logits.detach().tolist(), rule=router.info.rule,
                      forecast=router.forecast is not None,
                      base_seconds=evaluator.retime_base(), curve=evaluator.sweep(router))
        result["eval_seconds"] = time.perf_counter() - trained
    elif job[0] == "peer":
        try:
            result.update(kind="baseline", config=job[1], peer=True, base_seconds=evaluator.retime_base(),
                          **evaluator.peer_row(job[1]))
        except PeerUnavailable as error:
            result.update(kind="skipped", config=job[1], reason=str(error))
    elif job[0] == "forecast":
        _, name, steps, schedule = job
        result.update(kind="baseline", config=name, forecast=True, base_seconds=evaluator.retime_base(),
                      **evaluator.row(schedule, steps, forecast=evaluator.fitted_forecast(schedule)))
    else:
        _, name, steps, schedule = job
        result.update(kind="baseline", config=name, base_seconds=evaluator.retime_base(),
                      **evaluator.row(schedule, steps))
    return result


def jobs(config: ProtocolConfig, unit_names: list) -> list:
    routers = [("router", objective, seed) for objective in config.objectives for seed in range(config.seeds)]
    T, K = config.steps, len(unit_names)
    baselines = [("baseline", "no-cache", T, None)]
    baselines += [("baseline", f"fora:{n}", T, CacheSchedule.fora(T, K, n)) for n in config.fora]
    if config.forecast:
        baselines += [("forecast", f"fora:{n}{FORECAST}", T, CacheSchedule.fora(T, K, n)) for n in config.fora]
    for b, n, blocks in config.delta_dit:
        schedule = CacheSchedule.delta_dit(unit_names, T, b, n, blocks)
        baselines.append(("baseline", f"{schedule.name},blocks={blocks}", T, schedule))
    baselines += [("baseline", f"fewer-steps:{s}", s, None) for s in config.fewer_steps]
    return routers + baselines + [("peer", name) for name in config.peers]  # the longest first


def run_jobs(config: ProtocolConfig, todo: list, progress=_print) -> list:
    """Every job's result, in `config.workers` spawned processes (0: in this one)."""
    start = time.perf_counter()

    def report(i, result):
        what = (f"{result['objective']} seed {result['seed']}" if result["kind"] == "router" else
                result["config"] + (f" skipped: {result['reason']}" if result["kind"] == "skipped" else ""))
        progress(f"[{time.perf_counter() - start:6.0f} s] {i + 1}/{len(todo)} {what}")

    results = []
    if config.workers == 0:
        with one_thread():
            _init_worker(asdict(config))
            for i, job in enumerate(todo):
                results.append(run_job(job))
                report(i, results[-1])
        return results
    context = multiprocessing.get_context("spawn")
    with stop_signals(_exit_on_signal), context.Pool(config.workers, initializer=_init_worker,
                                                     initargs=(asdict(config),)) as pool:
        for i, result in enumerate(pool.imap_unordered(run_job, todo, chunksize=1)):
            results.append(result)
            report(i, result)
        pool.close()
        pool.join()
    return results


# ---- the protocol ----

def fresh_reference(config: ProtocolConfig) -> torch.Tensor:
    """The uncached samples of the eval batch from a freshly loaded model."""
    digits = DIGITS_MODELS[config.model]()
    noise, labels = eval_batch(config.samples, seed=EVAL_SEED)
    samples = eval_samples(digits, noise, labels, config.steps, digits.guidance)
    check_pristine(digits.transformer)
    return samples


def router_metrics(result: dict) -> dict:
    """PSNR at CUR 0.45 / 0.50 and the row of TAU of one router's sweep."""
    curve = result["curve"]
    at_tau = next(r for r in curve if TAU in r["taus"])
    points = [(r["cur"], r["psnr"]) for r in curve]
    return {**{f"psnr_at_cur_{c:.2f}": interpolate(points, c) for c in CUR_POINTS},
            **{f"{key}_at_tau": at_tau[key] for key in ("cur", "psnr", "ssim", "fd", "fd_vs_uncached", "accuracy",
                                                         "agreement", "theoretical_speedup", "measured_speedup")},
            "train_seconds": result["train_seconds"]}


COMPARED = ("psnr_at_cur_0.45", "psnr_at_cur_0.50", "psnr_at_tau")


def best_static(baselines: list, cur: float = 0.5, forecast: bool = False) -> dict | None:
    """The static baseline row (not a peer; with its fitted forecast or, by default, without) of the highest PSNR
    among those whose CUR is at least `cur` (as cheap or cheaper)."""
    rows = [r for r in baselines if r["cur"] >= cur - 1e-9 and r["psnr"] is not None and math.isfinite(r["psnr"])
            and not r.get("peer") and r.get("forecast", False) == forecast]
    return max(rows, key=lambda r: r["psnr"], default=None)


def summarize(routers: list, objectives: tuple, baselines: list) -> tuple:
    """({objective: {metric: {mean, se, n}}}, [paired rows: the first objective minus each other one, then
    its PSNR at CUR 0.50 minus the best static baseline's of CUR >= 0.5, seed by seed])."""
    by_objective = {o: {r["seed"]: r["metrics"] for r in routers if r["objective"] == o} for o in objectives}
    summary = {}
    for objective, seeds in by_objective.items():
        metrics = {}
        for key in next(iter(seeds.values()), {}):
            values = [m[key] for m in seeds.values() if m[key] is not None and math.isfinite(m[key])]
            mean, se = mean_se(values)
            metrics[key] = {"mean": mean, "se": se, "n": len(values)}
        summary[objective] = metrics
    comparisons = []
    lead = objectives[0]
    for other in objectives[1:]:
        for key in COMPARED:
            first = {s: m[key] for s, m in by_objective[lead].items()}
            second = {s: m[key] for s, m in by_objective[other].items()}
            comparisons.append({"metric": key, "first": lead, "second": other, **paired(first, second)})
    for rival in (best_static(baselines), best_static(baselines, forecast=True)):
        if rival is not None:
            first = {s: m["psnr_at_cur_0.50"] for s, m in by_objective[lead].items()}
            comparisons.append({"metric": "psnr_at_cur_0.50", "first": lead, "second": f"{STATIC} ({rival['config']})",
                                **paired(first, {s: rival["psnr"] for s in first})})
    return summary, comparisons


def outcome(comparisons: list) -> list:
    """One sentence per comparison, whichever way it went."""
    lines = []
    for c in comparisons:
        first = c.get("first", "harmonica")
        head = f"{c['metric']}: {first} minus {c['second']}"
        if c["mean"] is None:
            lines.append(f"{head}: no seed where both are defined")
            continue
        se = "n/a" if c["se"] is None else f"{c['se']:.2f}"
        verdict = ("no difference shown at p < 0.05" if c["sign_test_p"] >= 0.05 else
                   f"{first} higher" if c["mean"] > 0 else f"{first} lower")
        lines.append(f"{head}: {c['mean']:+.2f} +- {se} dB over {len(c['seeds'])} seeds ({c['positive']} higher, "
                     f"{c['negative']} lower; sign test p = {c['sign_test_p']:.3g}): {verdict}")
    return lines


def run(config: ProtocolConfig, command: str, progress=_print) -> dict:
    start, machine = time.perf_counter(), machine_info()  # the commit that runs, not the one checked out at the end
    with one_thread():
        reference = fresh_reference(config)
        second = fresh_reference(config)
    if not torch.equal(reference, second):
        raise RuntimeError(f"digits protocol: two fresh loads of {config.model} gave different uncached samples")
    unit_names = [name for name, _ in cached_units(DIGITS_MODELS[config.model]().transformer)]
    todo = jobs(config, unit_names)
    results = run_jobs(config, todo, progress)
    fingerprints = {r["reference"] for r in results}
    if fingerprints != {fingerprint(reference)}:
        raise RuntimeError(f"digits protocol: the workers' uncached samples differ from the fresh reference "
                           f"({sorted(fingerprints)} vs {fingerprint(reference)})")
    routers = sorted((r for r in results if r["kind"] == "router"), key=lambda r: (r["objective"], r["seed"]))
    for r in routers:
        r["metrics"] = router_metrics(r)
    order = {job[1]: i for i, job in enumerate(todo) if job[0] != "router"}
    baselines = sorted((r for r in results if r["kind"] == "baseline"), key=lambda r: order[r["config"]])
    summary, comparisons = summarize(routers, config.objectives, baselines)
    return {"command": command, "machine": machine, "protocol": asdict(config), "eval_seed": EVAL_SEED,
            "reference": {"fingerprint": fingerprint(reference), "equal_to_second_fresh_load": True,
                          "equal_in_every_worker": True},
            "base_timing": "per-job", "ranks": _rank_world()[1], "routers": routers, "baselines": baselines,
            "skipped": [{"config": r["config"], "reason": r["reason"]} for r in results if r["kind"] == "skipped"],
            "summary": summary,
            "paired": comparisons, "outcome": outcome(comparisons), "wall_seconds": time.perf_counter() - start}


# ---- report ----

def _fmt(value, spec: str = ".2f", none: str = "n/a") -> str:
    if value is None:
        return none
    return "inf" if value == float("inf") else format(value, spec)


def _table(header: list, lines: list) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


SUMMARY_COLUMNS = (("psnr_at_cur_0.45", "PSNR @ CUR 0.45", ".2f"), ("psnr_at_cur_0.50", "PSNR @ CUR 0.50", ".2f"),
                   ("psnr_at_tau", "PSNR @ tau 0.1", ".2f"), ("ssim_at_tau", "SSIM", ".4f"),
                   ("cur_at_tau", "CUR @ tau 0.1", ".3f"),
                   ("fd_at_tau", "FD real", ".2f"), ("fd_vs_uncached_at_tau", "FD vs uncached", ".2f"),
                   ("accuracy_at_tau", "accuracy", ".3f"), ("agreement_at_tau", "agreement", ".3f"),
                   ("theoretical_speedup_at_tau", "theoretical", ".2f"),
                   ("measured_speedup_at_tau", "measured CPU", ".2f"), ("train_seconds", "train s", ".0f"))


def format_summary(summary: dict) -> str:
    """Objectives x metrics, mean +- standard error (n seeds where defined)."""
    def cell(m, spec):
        if m["mean"] is None:
            return "n/a"
        return f"{_fmt(m['mean'], spec)} ± {_fmt(m['se'], spec)}" + (f" (n={m['n']})" if m["n"] else "")

    columns = [c for c in SUMMARY_COLUMNS if any(c[0] in summary[o] for o in summary)]  # older files: no SSIM
    lines = [[o] + [cell(summary[o][key], spec) for key, _, spec in columns] for o in summary if summary[o]]
    return _table(["objective"] + [name for _, name, _ in columns], lines)


def format_paired(comparisons: list) -> str:
    lines = [[f"{c.get('first', 'harmonica')} − {c['second']}", c["metric"], _fmt(c["mean"], "+.2f"), _fmt(c["se"]),
              f"{c['positive']}/{c['negative']}", _fmt(c["sign_test_p"], ".3g"),
              " ".join(_fmt(d, "+.2f") for d in c["differences"])] for c in comparisons]
    return _table(["pair", "metric", "mean dB", "SE", "+/−", "sign test p", "per seed"], lines)


def format_baselines(rows: list) -> str:
    lines = [[r["config"], str(r["steps"]), f"{r['cur']:.3f}", f"{r['theoretical_speedup']:.2f}x",
              f"{r['measured_speedup']:.2f}x", _fmt(r["psnr"]), _fmt(r.get("ssim"), ".4f"), _fmt(r["fd"]),
              _fmt(r["fd_vs_uncached"]), f"{r['accuracy']:.3f}", f"{r['agreement']:.3f}"] for r in rows]
    return _table(["config", "steps", "CUR", "theoretical", "measured CPU", "PSNR dB", "SSIM", "FD real",
                   "FD vs uncached", "accuracy", "agreement"], lines)


BASE_TIMING = {"per-job": "again in the same job just before",  # since 2026-11-30 (commit after 1fd7322)
               None: "once at each worker's start"}


def digits_section(results: dict, json_path: str) -> str:
    """The BENCHMARKS.md section of one protocol results file, markers included."""
    p, machine = results["protocol"], results["machine"]
    model, objectives = p.get("model", "digits-dit"), p.get("objectives", OBJECTIVES[1:])
    begin, end = markers("digits" if (model, p["steps"]) == ("digits-dit", 10) else f"{model}-t{p['steps']}")
    png = str(Path(json_path).with_suffix(".png"))
    versions = ", ".join(f"{k} {machine[k]}" for k in ("torch", "diffusers") if k in machine)
    trained = []
    if "search" in objectives:
        held = "exactly and at most FORA's MACs" if p.get("search_macs") else "exactly (not the MACs)"
        trained.append(f"the search holds CUR {p['target_cur']} {held} ({p['search_batch']} calibration noises, at "
                       f"most {p['search_rounds']} rounds of {p['search_candidates']} swaps)"
                       + (", then keeps the searched schedule or the equal-cost FORA schedule, each with its linear "
                          "forecast fitted on the same noises or without, of the lowest error on "
                          + (f"{p['forecast_selection']} other noises" if p.get("forecast_selection") else
                             "the calibration noises") + " (harmonica train's default)"
                          + (f", then {p['forecast_rounds']} round(s) of the search on each schedule's error with its "
                             "own forecast (forecast_search)" if p.get("forecast_rounds") else "")
                          + "; fora:N+forecast: FORA with its forecast fitted on the seed-0 search's calibration noises"
                          if p.get("forecast") else ""))
    if {"harmonica", "sdt-lambda1"} & set(objectives):
        trained.append(f"SDT objectives: {p['iterations']} iterations (batch {p['batch']}, lr {p['lr']}), target CUR "
                       f"{p['target_cur']} (IEPO lambda refreshed every {p['refresh']} iterations on "
                       f"{p['lambda_batch']} noises)")
    if "l2c" in objectives:
        trained.append(f"L2C targets CUR {p['l2c_target_cur']} (its alternating inference caps it at 0.5) with real "
                       f"digits, 10% label dropout")
    return "\n".join([
        begin,
        f"## Routers on a model that learned something: {model}, T = {p['steps']} (CPU)",
        "",
        f"- Command: `{results['command']}`; {machine.get('cpu', 'cpu')}; date {machine['date'][:10]}; commit "
        f"{machine['commit']}; {versions}; wall {results['wall_seconds'] / 60:.1f} min"
        + (" (**--quick**: a smoke run, not the protocol)" if p["quick"] else ""),
        f"- Raw: `{json_path}`; Pareto plot: `{png}`; per objective, its seed-0 router's digits beside the uncached "
        f"ones: `{png[:-4]}-grid-<objective>.png`",
        f"- {model} (harmonica/digits.py), {SAMPLERS[model]}, T = {p['steps']}. {p['seeds']} training seeds per "
        f"objective; {'; '.join(trained)}. Evaluation: {p['samples']} noises of seed "
        f"{results['eval_seed']} "
        f"(disjoint from training), {len(p['taus'])} taus per router; PSNR interpolated linearly in CUR; "
        "the uncached reference from a fresh load, equal to a second fresh load and to every worker's.",
        "- SSIM: against the uncached samples, one 8 x 8 Gaussian window per digit (bench/quality.py). "
        "FD real: Fréchet distance to the real digits in the classifier's features; FD vs uncached: to the "
        "uncached samples; accuracy: classified as the requested digit; agreement: same class as the uncached "
        f"sample. Measured CPU: median of {p['repeats']} samplings of the eval batch, one thread, against the "
        f"uncached sampling timed {BASE_TIMING.get(results.get('base_timing'), BASE_TIMING[None])} "
        f"({p['workers']} worker processes share the machine).",
        "",
        "Per objective, mean ± standard error over the seeds where the value is defined and finite (n; an "
        "all-compute schedule has an infinite PSNR), metrics at tau = 0.1 unless named:",
        "",
        format_summary(results["summary"]),
        "",
        "Paired per-seed differences (two-sided exact sign test):",
        "",
        format_paired(results["paired"]),
        "",
        "Baselines (same eval batch, same reference; peers: CUR and theoretical speedup from the units that ran):",
        "",
        format_baselines(results["baselines"]),
        *[f"- {r['config']}: not run ({r['reason']})" for r in results.get("skipped", [])],
        "",
        "Outcome:",
        "",
        *[f"- {line}" for line in results["outcome"]],
        end,
    ])


def plot_pareto(results: dict, path) -> Path:
    """Quality (PSNR vs uncached) against theoretical and against measured CPU speedup: every router's tau
    sweep (small points; their measured speedup from one timing each), its tau = 0.1 row (large, the median
    of `repeats`) and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(OBJECTIVES, ("tab:purple", "tab:red", "tab:blue", "tab:green")))
    objectives = results["protocol"].get("objectives", OBJECTIVES[1:])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, key, label in ((axes[0], "theoretical_speedup", "theoretical (MAC) speedup"),
                           (axes[1], "measured_speedup", "measured CPU speedup (one thread)")):
        for objective in objectives:
            routers = [r for r in results["routers"] if r["objective"] == objective]
            for i, r in enumerate(routers):
                finite = [row for row in r["curve"] if math.isfinite(row["psnr"])]
                ax.plot([row[key] for row in finite], [row["psnr"] for row in finite],
                        ".-" if key == "theoretical_speedup" else ".", lw=0.5, ms=3, alpha=0.35,
                        color=colors[objective])  # measured: single timings, no curve through them
                at_tau = next(row for row in r["curve"] if TAU in row["taus"])
                ax.scatter(at_tau[key], at_tau["psnr"], s=30, color=colors[objective],
                           label=OBJECTIVE_NAMES[objective] if i == 0 else None, zorder=3)
        for row in results["baselines"]:
            if math.isfinite(row["psnr"]):
                ax.scatter(row[key], row["psnr"], marker="x", color="black", zorder=3)
                ax.annotate(row["config"], (row[key], row["psnr"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlabel=label, ylabel="PSNR vs uncached (dB)", title=f"quality vs {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    write_file(path, file_bytes(lambda f: fig.savefig(f, format="png", dpi=110)))
    plt.close(fig)
    return path


def write_grids(results: dict, path: Path) -> list:
    """Beside the JSON `path`, one `class_comparison` PNG per objective: its seed-0 router's schedule at TAU on
    one noise per class (eval_batch(10, 0)), the uncached digits above the cached ones."""
    p = results["protocol"]
    digits = DIGITS_MODELS[p.get("model", "digits-dit")]()
    written = []
    for r in (r for r in results["routers"] if r["seed"] == 0):
        gates = torch.sigmoid(torch.tensor(r["logits"]))
        schedule = CacheSchedule(CacheSchedule.from_gates(gates, TAU, r["rule"]).table, f"{r['objective']} seed 0")
        image, _ = class_comparison(digits, schedule, p["steps"], digits.guidance)
        written.append(write_file(path.with_name(f"{path.stem}-grid-{r['objective']}.png"),
                                  file_bytes(lambda f, picture=image: picture.save(f, format="PNG"))))
    return written


def write_outputs(results: dict, out: Path, write_benchmarks: bool, progress=_print) -> Path:
    """The JSON (out: a .json file or a directory), the Pareto PNG and the grids beside it and optionally
    BENCHMARKS.md."""
    machine = results["machine"]
    path = out if out.suffix == ".json" else out / f"{machine['date'][:10]}-cpu-{machine['commit']}-digits.json"
    write_file(path, json.dumps(results, indent=1) + "\n")
    progress(f"raw results: {path}")
    try:
        progress(f"plot: {plot_pareto(results, path.with_suffix('.png'))}")
    except ImportError:
        progress("plot: not drawn, matplotlib is not installed (pip install -e '.[bench]')")
    progress("grids: " + ", ".join(str(grid) for grid in write_grids(results, path)))
    shown = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    section = digits_section(results, shown)
    progress("\n" + section)
    if write_benchmarks:
        benchmarks = REPO / "BENCHMARKS.md"
        write_file(benchmarks, update_benchmarks(benchmarks.read_text(), section))
        progress(f"{benchmarks}: bench-digits section regenerated")
    return path


# the ProtocolConfig fields that are command-line options (--search-rounds for search_rounds)
INT_OPTIONS = ("steps", "seeds", "workers", "iterations", "batch", "refresh", "lambda_batch", "search_batch",
               "search_rounds", "search_candidates", "forecast_rounds", "forecast_selection", "samples", "repeats")
FLOAT_OPTIONS = ("lr", "beta", "l2c_beta", "target_cur", "l2c_target_cur")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ProtocolConfig()
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument("--model", choices=sorted(DIGITS_MODELS), help=f"default {defaults.model}")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES,
                        help=f"default {' '.join(defaults.objectives)} (digits-flux: without l2c); the first is "
                        "compared with the others")
    for name in INT_OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {getattr(defaults, name)}")
    for name in FLOAT_OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), type=float, help=f"default {getattr(defaults, name)}")
    parser.add_argument("--taus", type=int, help="how many log-spaced taus in [1e-3, 0.99] (0.1 added); default 12")


def config_from_args(args) -> ProtocolConfig:
    overrides = {name: getattr(args, name) for name in ("model", *INT_OPTIONS, *FLOAT_OPTIONS)
                 if getattr(args, name, None) is not None}
    if getattr(args, "objectives", None):
        overrides["objectives"] = tuple(args.objectives)
    elif overrides.get("model", ProtocolConfig.model) != "digits-dit":
        overrides["objectives"] = tuple(o for o in OBJECTIVES if o != "l2c")
    if getattr(args, "taus", None) is not None:
        overrides["taus"] = default_taus(args.taus)
    return ProtocolConfig(**{**(QUICK if args.quick else {}), **overrides})  # T-relative baselines from the steps


def torchrun_world() -> int:
    """The world size torchrun set (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_and_write(config: ProtocolConfig, command: str, out: str | None, no_write: bool = False) -> int:
    """Run the protocol, write its outputs (BENCHMARKS.md unless quick or `no_write`), print the outcome.
    Under torchrun (gloo): every rank runs every job in its own process (`workers` 0), the eval noises of each
    row shared out over the ranks; rank 0 writes and prints."""
    import torch.distributed as dist

    world = torchrun_world()
    if world > 1 and config.workers:
        raise ValueError(f"--workers: expected 0 under torchrun (the ranks share out every row's noises instead), "
                         f"got {config.workers}")
    if world > 1:
        dist.init_process_group("gloo")
    try:
        results = run(config, command, _print if parallel.rank() == 0 else lambda text: None)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if parallel.rank():
        return 0
    path = write_outputs(results, Path(out) if out else REPO / "bench" / "results",
                         write_benchmarks=not (config.quick or no_write))
    if no_write and not config.quick:
        print(f"BENCHMARKS.md section: python -m harmonica.bench.digits_protocol --section {path} --write")
    print("\n".join(results["outcome"]))
    return 0


def bench_main(config: ProtocolConfig, command: str, out: Path) -> int:
    """`harmonica bench --suite digits [--quick] [--out]` once planned and confirmed: the protocol, its JSON and
    plot under `out` (a directory or a .json file); BENCHMARKS.md is left alone (its section: --section)."""
    return run_and_write(config, command, out, no_write=True)


# seconds per sample and step of digits-dit on one thread, per training sample and iteration (lambda refreshes
# included) and to start the workers, from the protocol run bench/results/2026-11-30-cpu-ed0543b-digits.json
# (2-core CPU: 500-sample uncached sampling 8 s at T = 10; 600 iterations of batch 16 about 60 s)
SAMPLE_STEP_S, TRAIN_SAMPLE_S, START_S = 1.6e-3, 6.25e-3, 10.0


def estimate_seconds(config: ProtocolConfig) -> float:
    """The protocol's wall time on a 2-core CPU, roughly (`harmonica bench --plan`, the --yes guard)."""
    base = config.samples * config.steps * SAMPLE_STEP_S  # one uncached sampling of the eval batch
    router = (config.iterations * config.batch * TRAIN_SAMPLE_S * config.steps / 10
              + base * (2 * config.repeats + len(config.taus) / 3))  # train, re-time, sweep
    baselines = 1 + len(config.fora) + len(config.delta_dit) + len(config.fewer_steps) + len(config.peers)
    work = len(config.objectives) * config.seeds * router + baselines * 2 * config.repeats * base
    return START_S + 2 * base + work / max(config.workers, 1)


def format_plan(config: ProtocolConfig, estimate: float) -> str:
    baselines = 1 + len(config.fora) + len(config.delta_dit) + len(config.fewer_steps) + len(config.peers)
    objectives = config.objectives
    return (f"{config.model} protocol{' (--quick: a smoke run)' if config.quick else ''}: {len(objectives)} objectives "
            f"({', '.join(objectives)}) x {config.seeds} seeds = {len(objectives) * config.seeds} router trainings "
            f"({config.iterations} iterations, batch {config.batch}, T = {config.steps}) and {baselines} baselines, "
            f"each evaluated on {config.samples} samples ({len(config.taus)} taus per router), in {config.workers} "
            f"worker processes\nestimated {estimate / 60:.1f} min on a 2-core CPU (from the 2026-11-30 run)")


def main(argv=None, prog: str = "python -m harmonica.bench.digits_protocol") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--out", help="results .json file or directory (default bench/results/)")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--section", help="print (--write: rewrite in BENCHMARKS.md) the section of this JSON")
    parser.add_argument("--write", action="store_true", help="with --section: rewrite BENCHMARKS.md and the grids")
    args = parser.parse_args(argv)
    if args.section:
        results = json.loads(Path(args.section).read_text())
        section = digits_section(results, args.section)
        if args.write:
            benchmarks = REPO / "BENCHMARKS.md"
            write_file(benchmarks, update_benchmarks(benchmarks.read_text(), section))
            write_grids(results, Path(args.section))
        print(section)
        return 0
    config = config_from_args(args)
    command = " ".join([prog] + (argv if argv is not None else sys.argv[1:]))
    return run_and_write(config, command, args.out, args.no_write)


if __name__ == "__main__":
    raise SystemExit(main())
