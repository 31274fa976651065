"""`harmonica train`: a router (default: a schedule search; --objective iepo: SDT + IEPO), with the closing
comparison against the static schedules of equal cost."""

import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import parallel
from ..api import enable
from ..digits import DIGITS_MODELS, PIXEL_RANGE
from ..files import RunLock
from ..flow import cur_for_speedup
from ..generation import given_bank, read_bank
from ..models import (
    FLOW_PRESETS,
    PRESETS,
    build_transformer,
    load_experts,
    load_scheduler,
    preset,
    preset_task,
)
from ..search import SearchConfig
from ..task import Task

RANDOM_PROMPTS = 16  # the prompt bank of a random-weights text-conditional model's training
DIGITS_REPORT_SAMPLES = 500  # noises of the quality report that ends a digits model's training


def digits_report(model, schedule, num_steps: int, count: int = DIGITS_REPORT_SAMPLES, *,
                  batch: int = parallel.EVAL_CHUNK, guidance=None, stopped=lambda: False,
                  forecast=None) -> str | None:
    """Quality of a digits model (`digits.DIGITS_MODELS`) with `schedule` (and `forecast`, a `Forecast` of it)
    against its uncached samples of the same seeds, sampled `batch` at a time (guidance: the model's by default);
    None when `stopped()` turns true before a batch. Under torchrun the batches are shared out over the ranks
    (`parallel.sharded`; every rank calls this and gets the one-process report)."""
    from ..api import disable
    from ..digits import eval_batch, psnr, quality

    guidance = model.guidance if guidance is None else guidance
    noise, labels = eval_batch(count)
    bar = tqdm(total=2 * len(range(0, count, batch)), desc="quality report", leave=False, disable=parallel.rank() > 0)

    def sample_all():
        return parallel.sharded(lambda a, b: model.sample(noise[a:b], labels[a:b], num_steps, guidance), count, batch,
                                stopped=stopped, advance=bar.update)

    with bar:
        reference = sample_all()
        if reference is None:
            return None
        enable(model.transformer, schedule, forecast=forecast)
        try:
            cached = sample_all()
        finally:
            disable(model.transformer)
    if cached is None:
        return None
    ref_q, q = quality(reference, labels), quality(cached, labels)
    return (f"quality on {count} samples: uncached FD {ref_q['fd']:.3f}, accuracy {ref_q['accuracy']:.1%}; "
            f"with the router FD {q['fd']:.3f}, accuracy {q['accuracy']:.1%}, "
            f"PSNR vs uncached {psnr(cached, reference):.1f} dB")


def train(args) -> int:
    """Exit status 0, or 128 + the signal number when a SIGINT/SIGTERM stopped the run (partial router). The run
    directory is held (`files.RunLock`, by rank 0 under torchrun) from before its files are looked at until the
    command ends: a second run on it fails at once."""
    import contextlib

    held = RunLock(args.out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with held:
        return _train(args)


def _train(args) -> int:
    import signal

    import torch.distributed as dist

    from ..digits import DIGITS_MODELS
    from ..training import (
        RouterTrainer,
        TrainConfig,
        _any_rank,
        check_resumable,
        check_run_dir,
        stop_signals,
    )

    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # before any model is loaded
    if args.resume:
        check_resumable(args.out)
    digits = DIGITS_MODELS.get(args.model)
    spec = preset("tiny-dit" if digits is not None else args.model)  # (digits: past every check below)
    family = spec.family
    experts = spec.experts
    if experts > 1 and args.objective != SEARCH:
        raise ValueError(f"--objective: expected {SEARCH} for a two-expert model ({args.model}: its pipeline switches "
                         f"between {experts} transformers by step; SDT and IEPO train one transformer's router), got "
                         f"{args.objective}")
    if family.text_conditional and not args.embeds and not args.random_weights:
        raise ValueError(f"--embeds: the weights of {args.model} train on precomputed prompt embeddings; expected a "
                         "file of the pipeline's encode_prompt outputs (harmonica embed writes one; random ones only "
                         "suit --random-weights), got none")
    default_guidance = digits.guidance if digits else family.train_guidance or spec.guidance
    guidance = default_guidance if args.guidance is None else args.guidance
    config = TrainConfig(num_steps=args.steps, iterations=args.iterations,
                         batch=args.batch or TrainConfig.batch, lr=args.lr,
                         beta=args.beta, tau=args.tau, refresh=args.refresh, guidance=guidance,
                         objective=IEPO_NAMES.get(args.objective, args.objective) if args.objective != SEARCH else
                         TrainConfig.objective, lambda_batch=args.lambda_batch, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
                         target_cur=args.target_cur, optimizer=args.optimizer, loss=args.loss,
                         init=args.init or TrainConfig.init)
    embeddings = check_train_embeddings(args, spec, config) if args.embeds else None  # before any weights load
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    if digits is not None:
        digits = digits()
        digits.transformer.to(device)
        task = digits.task(config.num_steps, config.guidance)
    else:
        task = train_task(args, spec, config, embeddings, device)
    macs = task.macs()
    if args.target_speedup is not None:  # the checkpoint records the CUR target it became
        config.target_cur = cur_for_speedup(macs, args.target_speedup, config.num_steps)
        print(f"target speedup {args.target_speedup}x: target CUR {config.target_cur:.1%} (at the average unit's MACs)")
    clip = PIXEL_RANGE if digits is not None else None
    if args.objective == SEARCH:
        router, rank, stop = _search(args, task, config, macs, clip)
        partial = not router.info.complete
        done = "searched"
    else:
        trainer = RouterTrainer(task, config, args.out)
        router = trainer.run(resume=args.resume, overwrite=args.overwrite)
        rank, stop = trainer.rank, trainer
        partial = trainer.iteration < config.iterations
        done = f"after {trainer.iteration} iterations"
    schedule = router.schedule()  # at its tau (--target-cur: the one that meets it); the same on every rank
    forecasting = not args.no_forecast and not partial and experts == 1
    if not args.no_forecast and not partial and experts > 1:
        if rank == 0:
            print(f"forecast: none: a forecast is refused for a model of {experts} experts (a reused unit would "
                  f"forecast from the other expert's steps); the router reuses")
    elif forecasting:
        router = _fit_forecast(args, task, router, config, clip, rank, macs)
        schedule = router.schedule()
    if rank == 0:
        print(f"router {done}: {args.out}/router (sampler {task.sampler}, {config.num_steps} steps, tau "
              f"{router.info.tau:.4g}), CUR {schedule.cur:.1%}, theoretical speedup "
              f"{schedule.theoretical_speedup(macs):.2f}x")
        if partial and args.objective == SEARCH:
            print("interrupted: the router is partial (the best schedule found so far); run the search again")
        elif partial:
            print(f"interrupted: the router is partial ({trainer.iteration} of {config.iterations} iterations); "
                  f"the same command with --resume continues it")
    if not partial:  # the closing evaluation, shared out over the ranks; rank 0 prints
        with stop_signals(stop.request_stop):
            if digits is not None:
                report = digits_report(digits, schedule, config.num_steps, DIGITS_REPORT_SAMPLES,
                                       guidance=config.guidance, stopped=lambda: stop.stop_signal is not None,
                                       forecast=router.forecast)
                if rank == 0:
                    print(report or "interrupted: the quality report was skipped (the router is complete)")
            if args.eval_batch and not _any_rank([stop.stop_signal is not None], device)[0]:
                table = closing_table(task, schedule.table, macs, args.eval_batch, config.seed, clip,
                                      router.forecast, (args.batch or SearchConfig.batch) if forecasting else 0)
                if rank == 0:
                    print(table)
    if dist.is_initialized():
        dist.destroy_process_group()
    # stopped by a signal (on another rank, when not on this one)
    if stop.stop_signal is not None or partial:
        return 128 + int(stop.stop_signal or signal.SIGTERM)
    return 0


def check_train_embeddings(args, spec, config) -> dict:
    """The --embeds file, checked against the model's config (a meta-device transformer: no weights) and its task:
    its tensors (`prompts.read_embeddings`), keys and widths. ValueError naming --embeds and the file."""
    with torch.device("meta"):
        transformer = build_transformer(args.model)
    bank = read_bank(spec, args.embeds, transformer.config, "--embeds")
    try:
        preset_task(args.model, [transformer], load_scheduler(args.model, random_weights=True), bank,
                    config.num_steps, config.guidance, args.sampler)
    except ValueError as error:
        raise ValueError(f"--embeds: {args.embeds}: {error}") from None
    return bank


def train_task(args, spec, config, embeddings, device) -> Task:
    """The task of a preset's transformers on `device` (`models.preset_task`; random weights without --embeds: a
    bank of random prompts): DiT's and PixArt's --sampler (default the preset's) from their pipeline's scheduler; a
    preset of two experts (Wan 2.2 A14B): the task of both."""
    transformers = [transformer.to(device) for transformer in
                    load_experts(args.model, weights=args.weights, random_weights=args.random_weights)]
    bank = embeddings if embeddings is not None else given_bank(
        spec, transformers[0], random_weights=args.random_weights, generator=torch.Generator().manual_seed(config.seed),
        count=RANDOM_PROMPTS)
    scheduler = load_scheduler(args.model, weights=args.weights, random_weights=args.random_weights)
    return preset_task(args.model, transformers, scheduler, bank, config.num_steps, config.guidance, args.sampler)


SEARCH = "search"  # the default objective (harmonica.search)
IEPO_NAMES = {"iepo": "cumulative"}  # the paper's objective, as the official code computes lambda


class _StopFlag:
    """A SIGINT/SIGTERM handler that records the signal (`stop_signal`), as RouterTrainer.request_stop."""

    def __init__(self):
        self.stop_signal = None

    def request_stop(self, signum, frame) -> None:
        self.stop_signal = signum


def _search(args, task: Task, config, macs, clip) -> tuple:
    """--objective search: (router, rank, stop flag); the router saved under --out."""
    from ..search import search_router
    from ..training import _any_rank, _rank_world, check_run_dir, stop_signals

    found = check_run_dir(args.out, resume=False, overwrite=args.overwrite)
    rank, _ = _rank_world()
    if found and rank == 0:
        import shutil

        for name in found:
            path = Path(args.out) / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    target = SearchConfig.target_cur if config.target_cur is None else config.target_cur
    search = SearchConfig(num_steps=config.num_steps, target_cur=target, target_speedup=args.target_speedup,
                          batch=args.batch or SearchConfig.batch, seed=config.seed, rounds=args.rounds,
                          candidates=args.candidates, tau=config.tau, clip=clip)
    stop = _StopFlag()
    started = time.perf_counter()
    with stop_signals(stop.request_stop):
        device = next(task.transformer.parameters()).device
        router, result = search_router(task, search, args.out, macs, log=print if rank == 0 else None,
                                       stopped=lambda: _any_rank([stop.stop_signal is not None], device)[0])
    if rank == 0:
        print(f"search: calibration error {result.start_loss:.4g} (equal-cost start) -> {result.loss:.4g}, "
              f"{result.rollouts} schedules measured in {time.perf_counter() - started:.0f} s")
    return router, rank, stop


def _fit_forecast(args, task: Task, router, config, clip, rank: int, macs):
    """The linear forecast (the default; --no-forecast: none): `search.keep_forecast`, fitted on the calibration
    batch (--batch noises of --seed) and chosen on as many other noises (after the search objective,
    --forecast-rounds of `search.forecast_search`), the router it returns saved (rank 0) and returned."""
    from ..search import keep_forecast
    from ..training import ROUTER_DIR

    batch = args.batch or SearchConfig.batch
    rounds = args.forecast_rounds if args.objective == SEARCH else 0
    started = time.perf_counter()
    router, choice, refined, kept = keep_forecast(task, router, batch, config.seed, clip, macs=macs, rounds=rounds,
                                                  candidates=args.candidates, log=print if rank == 0 else None)
    if rank == 0:
        router.save_pretrained(Path(args.out) / ROUTER_DIR)
        print(f"forecast: fitted on {batch} calibration noises in {time.perf_counter() - started:.0f} s; MSE (pure "
              f"reuse -> forecast) on them: " + _pairs(choice.errors) + f"; on {batch} other noises: " +
              _pairs(choice.judged) + "; two cache slots per unit")
        if choice.label != "learned+forecast":
            how = "with its forecast" if choice.with_forecast else "without a forecast (pure reuse)"
            print(f"forecast: the lowest error on the other noises is {choice.label}'s: the router keeps "
                  f"{choice.name} {how}")
        if rounds and refined is None:
            print(f"forecast search: none: {choice.label} was kept without a forecast")
        if refined is not None:
            print(f"forecast search from {choice.label}: calibration error {refined.start_loss:.4g} -> "
                  f"{refined.loss:.4g}, {refined.rollouts} schedules measured; the router keeps "
                  f"{'the searched schedule' if kept == 'refined+forecast' else choice.label} with its forecast")
    return router


def _pairs(errors: dict) -> str:
    return ", ".join(f"{name} {before:.4g} -> {after:.4g}" for name, (before, after) in errors.items())


def closing_table(task: Task, table, macs, count: int, seed: int, clip, forecast=None, calibration: int = 0) -> str:
    """The learned `table` (with its `forecast`, if any) against the static schedules of about its cost, on
    `count` held-out noises. With `calibration` (the forecast on, whether or not the router kept one) each static
    rival gets its own forecast too, fitted on the `calibration` noises of `seed` that rank 0 trained on (every
    rank fits the same: the table is that of one process), and a row with it."""
    from ..forecast import fit_forecast
    from ..search import Rollouts, calibration_batch, compare, static_rivals, table_text, task_engine

    noise, cond = calibration_batch(task, count, seed, rank=HELD_OUT_RANK)
    with task_engine(task) as engine:
        forecasts = {} if forecast is None else {"learned": forecast}
        if calibration:
            fit_noise, fit_cond = calibration_batch(task, calibration, seed)
            rollouts = Rollouts(task, engine, fit_noise, fit_cond, table.shape[0], clip=clip)
            for rival in static_rivals(table.shape[0], [n for n, _ in engine.units], table):
                forecasts[rival.name] = fit_forecast(rollouts, rival.table)
        rows = compare(task, engine, table, macs, noise, cond, clip=clip, forecasts=forecasts)
    return table_text(rows, count)


HELD_OUT_RANK = 1_000_003  # the held-out batch's generator: no training rank draws from it


def add_parser(commands) -> None:
    from ..training import LOSSES, OBJECTIVES, OPTIMIZERS, TrainConfig

    t = commands.add_parser("train", help="train a router (default: a schedule search; --objective iepo: SDT + "
                            "IEPO); torchrun for several GPUs")
    defaults = TrainConfig()
    t.add_argument("--model", required=True, choices=sorted(PRESETS) + sorted(FLOW_PRESETS) + sorted(DIGITS_MODELS))
    weights = t.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="hub id or local path of the pipeline (default: the preset's hub id)")
    weights.add_argument("--random-weights", action="store_true", help="no download: random weights")
    t.add_argument("--out", required=True, help="directory for checkpoints, train_log.jsonl and router/")
    existing = t.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    existing.add_argument("--overwrite", action="store_true",
                          help="start afresh in an --out that holds a run (its checkpoints, router and log removed)")
    t.add_argument("--steps", type=int, default=defaults.num_steps, help="denoising steps T")
    t.add_argument("--iterations", type=int, default=defaults.iterations)
    t.add_argument("--batch", type=int, help=f"noises per rank (CFG doubles it; default {defaults.batch}, search: "
                   "64 calibration noises)")
    t.add_argument("--lr", type=float, default=defaults.lr)
    t.add_argument("--beta", type=float, default=defaults.beta, help="weight of the router L1 term")
    t.add_argument("--tau", type=float, default=defaults.tau)
    t.add_argument("--refresh", type=int, default=defaults.refresh, help="iterations between lambda refreshes")
    t.add_argument("--guidance", type=float, help=f"default {defaults.guidance} (DiT's; PixArt uses 4.5), or the flow "
                   "pipeline's (FLUX 3.5 distilled, SD3 7, Wan 5, Qwen-Image true CFG 4)")
    t.add_argument("--embeds", help="PixArt and flow models: safetensors file of prompt embeddings (harmonica embed "
                   "writes one)")
    t.add_argument("--sampler", help="PixArt: dpm-solver++ (default), sa-solver or iddpm")
    t.add_argument("--objective", choices=(SEARCH, *IEPO_NAMES, *OBJECTIVES), default=SEARCH,
                   help="search (default): a static schedule of the target CUR searched for the final-image error on "
                   "calibration noises; iepo: the paper's SDT + IEPO (= cumulative, its official lambda); "
                   "leave-one-out: IEPO's paper formula; l2c: lambda = 1")
    t.add_argument("--rounds", type=int, default=8, help="search: at most this many rounds of sensitivities and swaps")
    t.add_argument("--candidates", type=int, default=24, help="search: swaps measured per round")
    t.add_argument("--forecast-rounds", type=int, default=SearchConfig.forecast_rounds,
                   help="search: rounds of a second search, on each schedule's error with its own fitted forecast, "
                   "from the schedule kept with its forecast (default 0: none; one round lowered the calibration "
                   "error but not the held-out one on digits-dit, docs/training.md)")
    t.add_argument("--eval-batch", type=int, default=64,
                   help="held-out noises of the closing comparison with the static schedules (0: none)")
    t.add_argument("--lambda-batch", type=int, default=defaults.lambda_batch)
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="iterations")
    t.add_argument("--checkpoint-minutes", type=float, default=defaults.checkpoint_minutes,
                   help="also checkpoint when this many minutes passed since the last checkpoint")
    target = t.add_mutually_exclusive_group()
    target.add_argument("--target-cur", type=float, help="iepo: steer beta towards this CUR, and set the router's tau "
                        "where it is met")
    target.add_argument("--target-speedup", type=float,
                        help="--target-cur of this theoretical MAC speedup, at the average unit's MACs")
    t.add_argument("--init", help="iepo: the router's start, random (default, the official N(0, 1)), compute (every "
                   "gate open) or fora:N")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                   help="per-step: one AdamW parameter per step's row, as the official code (shared: one (T, K))")
    t.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                   help="combined: MSE of the guidance-combined output, as the official code (separate: CFG halves)")
    t.add_argument("--no-forecast", action="store_true",
                   help="pure reuse: no linear forecast (by default, after the schedule, each reused unit's output is "
                   "forecast from its last two computed outputs with coefficients fitted on the calibration batch, "
                   "for the schedule and the equal-cost static start, keeping the better; two cache slots per unit)")
