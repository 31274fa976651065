"""`harmonica sample`: one image from a DiT/PixArt model (the latents of a flow-matching model) with a router, a
baseline schedule or no cache; `harmonica train`: a router; `harmonica embed`: the prompt embeddings that
training and flow-model sampling read."""

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import parallel
from .api import enable, summary
from .digits import DIGITS_MODELS, PIXEL_RANGE
from .files import RunLock, check_out_file, file_bytes, one_line, write_file
from .flow import cur_for_speedup
from .images import DEFAULT_PROMPT, DIT_CLASS, DIT_PIPELINE_SAMPLER, generate, to_pil
from .models import (
    FLOW_PRESETS,
    PRESETS,
    build_pipeline,
    build_transformer,
    load_text_encoders,
    load_transformer,
    load_vae,
    move_pipeline,
    preset,
)
from .options import check_options, given_options
from .profiling import nvtx  # noqa: F401  (HARMONICA_NVTX=1 switches its ranges on as it is imported)
from .router import Router, RouterInfo, dit_ddim_timesteps, load_router
from .samplers import (
    DIT_SAMPLERS,
    PIXART_SAMPLERS,
    TABLE_SAMPLERS,
    check_steps,
    step_ranges_text,
    use_pixart_sampler,
)
from .schedule import parse_schedule
from .units import cached_units


def _sampler_choices(spec) -> dict:
    return PIXART_SAMPLERS if spec.is_pixart else {**DIT_SAMPLERS, DIT_PIPELINE_SAMPLER: (None, 20)}


VIDEO_SUFFIXES = {".safetensors", ".gif", ".webp"}
FRAME_MS = 62  # 16 frames per second, Wan's


def save_decoded(decoded: torch.Tensor, path: str) -> None:
    """A flow model's decoded output (1, 3, H, W) or video (1, 3, F, H, W), values in [-1, 1], as an image
    file or an animated GIF/WebP (one frame per video frame)."""
    frames = decoded[0].float().cpu()
    frames = frames.unsqueeze(1) if frames.dim() == 3 else frames  # (3, F, H, W)
    pictures = [to_pil((frame.permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1)) for frame in frames.unbind(1)]
    write_images(pictures, path)


def write_images(pictures: list, path) -> None:
    """One PIL image, or an animation of several, written whole to `path` (its suffix gives the format)."""
    from PIL import Image

    image_format = Image.registered_extensions()[Path(path).suffix.lower()]
    animation = {} if len(pictures) == 1 else {"save_all": True, "append_images": pictures[1:],
                                                "duration": FRAME_MS, "loop": 0}
    write_file(path, file_bytes(lambda f: pictures[0].save(f, format=image_format, **animation)))


def image_suffixes() -> set:
    """File name suffixes PIL can write."""
    from PIL import Image

    Image.init()
    return {suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.SAVE}


@dataclasses.dataclass
class SamplePlan:
    """What `harmonica sample` runs, every option checked: the sampler, step count, router or schedule."""

    sampler: str
    steps: int
    cache: object  # a Router or a CacheSchedule


def plan_sample(args, spec) -> SamplePlan:
    """Check every option of `harmonica sample` against each other, the model's config (a meta-device
    transformer, no weights) and the router's files, before any model is built; ValueError naming the
    option to change."""
    check_out_file(args.out, "--out", image_suffixes(), "an image file name (.png, .jpg or another suffix PIL writes)")
    check_tau(args)
    with torch.device("meta"):
        transformer = build_transformer(args.model)
    if args.class_label is not None and not 0 <= args.class_label < transformer.config.num_embeds_ada_norm:
        raise ValueError(f"--class-label: expected a class in [0, {transformer.config.num_embeds_ada_norm - 1}] "
                         f"for {args.model}, got {args.class_label}")
    router = load_router(args.router) if args.router else None
    choices = _sampler_choices(spec)
    trained = _router_sampler(router, spec, args.router) if router else None
    if args.sampler is not None and trained is not None and args.sampler != trained:
        raise ValueError(f"--sampler: the router {args.router} was trained with {trained}, got --sampler "
                         f"{args.sampler}; leave --sampler out")
    sampler = args.sampler or trained or spec.sampler
    if sampler not in choices:
        raise ValueError(f"--sampler: expected one of {sorted(choices)} for {args.model}, got {sampler!r}")
    if args.steps is not None:
        check_steps(sampler, args.steps)
    if router is not None and args.steps is not None and args.steps != router.num_steps:
        raise ValueError(f"--steps: the router {args.router} was trained for {router.num_steps} steps, got --steps "
                         f"{args.steps}; leave --steps out")
    steps = args.steps or (router.num_steps if router else choices[sampler][1])
    if args.scheduler_in_graph and sampler not in TABLE_SAMPLERS:
        raise ValueError(f"--scheduler-in-graph: expected a sampler from {list(TABLE_SAMPLERS)}, got {sampler!r}")
    if router is None:
        units = [name for name, _ in cached_units(transformer)]
        return SamplePlan(sampler, steps, parse_schedule(args.schedule or "no-cache", steps, units))
    check_router_model(router, args, transformer, timesteps=dit_ddim_timesteps(steps) if sampler == "dit-ddim" else [])
    return SamplePlan(sampler, steps, router)


def check_router_model(router: Router, args, transformer, **fields) -> None:
    """ValueError naming --router when the router was trained for another model (its class, units and, with
    random weights, config; hub configs may differ from the preset's) or for other `fields` (RouterInfo's)."""
    model = RouterInfo.for_model(transformer, **fields)
    diffs = router.info.differences(dataclasses.replace(model, config_hash=model.config_hash if args.random_weights
                                                        else ""))
    if diffs:
        raise ValueError(f"--router: {args.router} was trained for something else than --model {args.model} "
                         f"({'; '.join(diffs)})")


def check_tau(args) -> None:
    """--tau needs --router (its range: harmonica.options)."""
    if args.tau is not None and not args.router:
        raise ValueError(f"--tau: expected only with --router (it thresholds the router's gates), got --tau "
                         f"{args.tau} with {'--schedule ' + args.schedule if args.schedule else 'no router'}")


def _router_sampler(router: Router, spec, directory: str) -> str | None:
    """The `--sampler` name of what the router was trained with (None when it does not say)."""
    if not router.info.sampler:
        return None
    names = ({scheduler: name for name, (scheduler, _) in PIXART_SAMPLERS.items()} if spec.is_pixart
             else {"dit-ddim": "dit-ddim", "DDIMScheduler": DIT_PIPELINE_SAMPLER})
    if router.info.sampler not in names:
        raise ValueError(f"--router: {directory} was trained with the sampler {router.info.sampler}, expected one "
                         f"of {sorted(names)} for --model {spec.pipeline}")
    return names[router.info.sampler]


def sample(args) -> int:
    if args.model in DIGITS_MODELS:
        return sample_digits(args)
    spec = preset(args.model)
    context_parallel = parallel.check_option(args.context_parallel, {args.model: spec.class_name})
    if spec.is_flow:
        return sample_flow(args, spec, context_parallel)
    args.out = args.out or "out.png"
    plan = plan_sample(args, spec)
    pipe = build_pipeline(args.model, weights=args.weights, random_weights=args.random_weights, seed=args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" and not args.fp32 else torch.float32
    move_pipeline(pipe, device, dtype)
    if spec.is_pixart:
        use_pixart_sampler(pipe, plan.sampler)  # before enable, which hooks the scheduler
    execution = {"cuda_graphs": args.cuda_graphs, "scheduler_in_graph": args.scheduler_in_graph,
                 "compile": args.compile}
    enable(pipe, plan.cache, tau=args.tau, **execution)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    with torch.inference_mode():
        image = generate(pipe, args, spec, plan.sampler, plan.steps, generator)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    write_images([image], args.out)
    weights = "random weights" if args.random_weights else (args.weights or spec.hub_id)
    print(f"model {args.model} ({weights}), sampler {plan.sampler}, {plan.steps} steps, seed {args.seed}, "
          f"{device} {dtype}")
    print(summary(pipe))
    print(f"measured {elapsed:.2f} s (whole generation, decode included); image written to {args.out}")
    return 0


def sample_digits(args) -> int:
    """`harmonica sample` for a committed digits model: one noise per class (--seed), sampled uncached and with the
    cache, written as a PNG grid (`digits.comparison_grid`: the uncached digit above the cached one, the PSNR of
    each pair; the caption gives the cache, CUR, theoretical speedup and PSNR over the ten)."""
    from .digits import class_comparison

    args.out = args.out or "out.png"
    check_out_file(args.out, "--out", {".png"}, "a .png file name (the grid of uncached and cached digits)")
    check_tau(args)
    router = load_router(args.router) if args.router else None
    if router is not None and args.steps is not None and args.steps != router.num_steps:
        raise ValueError(f"--steps: the router {args.router} was trained for {router.num_steps} steps, got --steps "
                         f"{args.steps}; leave --steps out")
    model = DIGITS_MODELS[args.model]()
    steps = args.steps or (router.num_steps if router else model.steps)
    guidance = model.guidance if args.guidance is None else args.guidance
    task = model.task(steps, guidance)
    units = [name for name, _ in cached_units(model.transformer)]
    if router is None:
        cache = parse_schedule(args.schedule or "no-cache", steps, units)
    else:
        diffs = router.info.differences(RouterInfo.for_model(model.transformer, sampler=task.sampler,
                                                             timesteps=list(task.timesteps)))
        if diffs:
            raise ValueError(f"--router: {args.router} was trained for something else than --model {args.model} "
                             f"({'; '.join(diffs)})")
        cache = router
    model.transformer.to("cuda" if torch.cuda.is_available() else "cpu")
    image, caption = class_comparison(model, cache, steps, guidance, args.seed, tau=args.tau,
                                      cuda_graphs=args.cuda_graphs, compile=args.compile)
    write_images([image], args.out)
    print(caption)
    print(f"grid of the ten classes written to {args.out}")
    return 0


def plan_flow_sample(args, spec, generator: torch.Generator) -> tuple:
    """`plan_sample` for a flow-matching model: (prompt bank, steps, guidance, cache) with every option checked
    against the model's config (a meta-device transformer), the prompt embeddings and the router, before any
    weights load. The random prompt of random weights is drawn from `generator`."""
    from .flow import SAMPLER, flow_task, load_flow_embeddings, random_flow_embeddings

    if spec.frames:  # video: its frames as an animation
        check_out_file(args.out, "--out", VIDEO_SUFFIXES, "a .safetensors (the final latents), .gif or .webp file name")
    else:
        check_out_file(args.out, "--out", {".safetensors"} | image_suffixes(),
                       "a .safetensors file name (the final latents) or an image file name (.png, .jpg, ...)")
    if args.random_weights and Path(args.out).suffix.lower() != ".safetensors" and spec.vae is None:
        raise ValueError(f"--out: {args.model} has no random VAE to decode with (decoding needs its weights); "
                         f"expected a .safetensors file name (the final latents), got {args.out!r}")
    check_tau(args)
    if args.sampler not in (None, SAMPLER):
        raise ValueError(f"--sampler: expected {SAMPLER} (the pipeline's) for --model {args.model}, got "
                         f"{args.sampler!r}")
    if args.scheduler_in_graph:
        raise ValueError(f"--scheduler-in-graph: expected off for --model {args.model} (its sampler step runs after "
                         f"the graph), got on")
    if args.steps is not None:
        check_steps(SAMPLER, args.steps)
    router = load_router(args.router) if args.router else None
    if router is not None and args.steps is not None and args.steps != router.num_steps:
        raise ValueError(f"--steps: the router {args.router} was trained for {router.num_steps} steps, got --steps "
                         f"{args.steps}; leave --steps out")
    steps = args.steps or (router.num_steps if router else spec.steps)
    guidance = spec.guidance if args.guidance is None else args.guidance
    with torch.device("meta"):
        transformer = build_transformer(args.model)
    if args.prompt_embeddings:
        bank = load_flow_embeddings(args.prompt_embeddings)
    else:
        if not args.random_weights:
            raise ValueError(f"--prompt-embeddings: expected a file of the pipeline's prompt embeddings for the "
                             f"weights of {args.model} (random ones only suit --random-weights), got none")
        bank = random_flow_embeddings(transformer, 1, spec.text_tokens, generator)
    try:
        task = flow_task(transformer, bank, steps, guidance, **spec.size)
    except ValueError as error:
        raise ValueError(f"--prompt-embeddings: {error}") from None
    if router is None:
        units = [name for name, _ in cached_units(transformer)]
        return bank, steps, guidance, parse_schedule(args.schedule or "no-cache", steps, units)
    check_router_model(router, args, transformer, sampler=SAMPLER, timesteps=task.timesteps)
    return bank, steps, guidance, router


def sample_flow(args, spec, context_parallel=None) -> int:
    """`harmonica sample` for a flow-matching model: the transformer alone, driven by `flow.flow_sample` on the
    first prompt of the bank; the final latents (unpacked, as the pipeline hands them to its VAE) go to --out.
    context_parallel: (kind, degree) under torchrun (parallel.py); rank 0 writes and prints."""
    from safetensors.torch import save

    from .api import Summary
    from .flow import SAMPLER, flow_sample, flow_task

    args.out = args.out or "out.safetensors"
    generator = torch.Generator().manual_seed(args.seed)
    bank, steps, guidance, cache = plan_flow_sample(args, spec, generator)
    transformer = load_transformer(args.model, weights=args.weights, random_weights=args.random_weights,
                                   seed=args.seed)
    device = (parallel.init_context_parallel(transformer, *context_parallel) if context_parallel else
              "cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and not args.fp32 else torch.float32
    move_pipeline(transformer, device, dtype)
    task = flow_task(transformer, bank, steps, guidance, **spec.size)
    engine = enable(transformer, cache, tau=args.tau, cuda_graphs=args.cuda_graphs, compile=args.compile)
    start = time.perf_counter()
    with torch.inference_mode():
        latents = flow_sample(task, torch.zeros(1, dtype=torch.long), generator=generator, progress=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    bad = int((~torch.isfinite(latents)).sum())
    if bad:
        raise RuntimeError(f"latents: expected finite values, got {bad} of {latents.numel()} NaN/inf (the sampling "
                           "diverged; nothing was written)")
    if parallel.rank():  # every rank holds the gathered latents; rank 0 writes and reports
        return 0
    if Path(args.out).suffix.lower() == ".safetensors":
        write_file(args.out, save({"latents": task.unpack(latents).float().cpu().contiguous()}))
    else:
        vae = load_vae(args.model, weights=args.weights, random_weights=args.random_weights, seed=args.seed)
        move_pipeline(vae, device, torch.float32)  # the pipelines keep Wan's VAE in fp32; cheap next to the loop
        with torch.inference_mode():
            save_decoded(task.decode(vae, latents), args.out)
    schedule = engine.schedule
    weights = "random weights" if args.random_weights else (args.weights or spec.hub_id)
    print(f"model {args.model} ({weights}), sampler {SAMPLER}, {steps} steps, guidance {guidance}, seed {args.seed}, "
          f"{device} {dtype}")
    size = f"{spec.height}x{spec.width}" + (f"x{spec.frames}" if spec.frames else "")
    print(Summary(schedule.name, SAMPLER, steps, schedule.num_units, schedule.cur,
                  schedule.theoretical_speedup(task.macs()), size, engine.cache_bytes()))
    if context_parallel:
        print(parallel.summary_line(args.model, transformer, schedule, 2 if task.guided else 1, dtype.itemsize,
                                    engine.cache_bytes()))
    print(f"measured {elapsed:.2f} s (whole generation, decode not included); latents {tuple(latents.shape)}, "
          f"{'latents' if args.out.endswith('.safetensors') else 'decoded'} written to {args.out}")
    return 0


RANDOM_PROMPTS = 16  # the prompt bank of a random-weights flow model's training
DIGITS_REPORT_SAMPLES = 500  # noises of the quality report that ends a digits model's training


def digits_report(model, schedule, num_steps: int, count: int = DIGITS_REPORT_SAMPLES, *,
                  batch: int = parallel.EVAL_CHUNK, guidance=None, stopped=lambda: False,
                  forecast=None) -> str | None:
    """Quality of a digits model (`digits.DIGITS_MODELS`) with `schedule` (and `forecast`, a `Forecast` of it)
    against its uncached samples of the same seeds, sampled `batch` at a time (guidance: the model's by default);
    None when `stopped()` turns true before a batch. Under torchrun the batches are shared out over the ranks
    (`parallel.sharded`; every rank calls this and gets the one-process report)."""
    from .api import disable
    from .digits import eval_batch, psnr, quality

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

    from .digits import DIGITS_MODELS
    from .training import (
        DiTTask,
        PixArtTask,
        RouterTrainer,
        TrainConfig,
        _any_rank,
        check_resumable,
        check_run_dir,
        stop_signals,
        task_macs,
    )

    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # before any model is loaded
    if args.resume:
        check_resumable(args.out)
    digits = DIGITS_MODELS.get(args.model)
    spec = preset("tiny-dit" if digits is not None else args.model)  # (digits: past every check below)
    if spec.is_pixart and not args.embeds:
        raise ValueError(f"--embeds: {args.model} trains on precomputed prompt embeddings; expected a file "
                         f"(harmonica embed writes one), got none")
    if spec.is_flow and not (args.embeds or args.random_weights):
        raise ValueError(f"--embeds: the weights of {args.model} train on precomputed prompt embeddings; expected a "
                         f"file of the pipeline's encode_prompt outputs (random ones only suit --random-weights), got "
                         f"none")
    default_guidance = digits.guidance if digits else spec.guidance if spec.is_flow else TrainConfig.guidance
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
        transformer = digits.transformer.to(device)
    elif spec.is_flow:
        transformer = load_transformer(args.model, weights=args.weights, random_weights=args.random_weights).to(device)
    else:
        pipe = build_pipeline(args.model, weights=args.weights, random_weights=args.random_weights)
        transformer = pipe.transformer.to(device)
    if digits is not None:
        task = digits.task(config.num_steps, config.guidance)
    elif spec.is_flow:
        from .flow import flow_task, random_flow_embeddings

        bank = (embeddings if embeddings is not None else
                random_flow_embeddings(transformer, RANDOM_PROMPTS, spec.text_tokens,
                                       torch.Generator().manual_seed(config.seed)))
        task = flow_task(transformer, bank, config.num_steps, config.guidance, **spec.size)
    elif spec.is_pixart:
        scheduler = use_pixart_sampler(pipe, args.sampler or spec.sampler)
        task = PixArtTask(transformer, scheduler, embeddings, config.num_steps, config.guidance)
    else:
        task = DiTTask(transformer, config.num_steps, config.guidance)
    macs = task_macs(task)
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
    if not args.no_forecast and not partial:
        router = _fit_forecast(args, task, router, config, clip, rank)
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
                from .search import SearchConfig

                table = closing_table(task, schedule.table, macs, args.eval_batch, config.seed, clip,
                                      router.forecast, args.batch or SearchConfig.batch)
                if rank == 0:
                    print(table)
    if dist.is_initialized():
        dist.destroy_process_group()
    # stopped by a signal (on another rank, when not on this one)
    if stop.stop_signal is not None or partial:
        return 128 + int(stop.stop_signal or signal.SIGTERM)
    return 0


def check_train_embeddings(args, spec, config) -> dict:
    """The --embeds file, checked against the model's config (a meta-device transformer: no weights): its
    tensors (`prompts.read_embeddings`), keys and widths. ValueError naming --embeds and the file."""
    from .flow import flow_task, load_flow_embeddings
    from .training import load_prompt_embeddings

    with torch.device("meta"):
        transformer = build_transformer(args.model)
    if spec.is_pixart:
        return load_prompt_embeddings(args.embeds, transformer.config.caption_channels)
    bank = load_flow_embeddings(args.embeds, "--embeds")
    try:
        flow_task(transformer, bank, config.num_steps, config.guidance, **spec.size)
    except ValueError as error:
        raise ValueError(f"--embeds: {args.embeds}: {error}") from None
    return bank


SEARCH = "search"  # the default objective (harmonica.search)
IEPO_NAMES = {"iepo": "cumulative"}  # the paper's objective, as the official code computes lambda


class _StopFlag:
    """A SIGINT/SIGTERM handler that records the signal (`stop_signal`), as RouterTrainer.request_stop."""

    def __init__(self):
        self.stop_signal = None

    def request_stop(self, signum, frame) -> None:
        self.stop_signal = signum


def _search(args, task, config, macs, clip) -> tuple:
    """--objective search: (router, rank, stop flag); the router saved under --out."""
    from .search import SearchConfig, search_router
    from .training import _any_rank, _rank_world, check_run_dir, stop_signals

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


def _fit_forecast(args, task, router, config, clip, rank: int):
    """The linear forecast (the default; --no-forecast: none): `search.keep_forecast` on the calibration batch
    (--batch noises of --seed), the router it returns saved (rank 0) and returned."""
    from .search import SearchConfig, keep_forecast
    from .training import ROUTER_DIR

    batch = args.batch or SearchConfig.batch
    started = time.perf_counter()
    router, choice = keep_forecast(task, router, batch, config.seed, clip)
    if rank == 0:
        router.save_pretrained(Path(args.out) / ROUTER_DIR)
        print(f"forecast: fitted on {batch} calibration noises in {time.perf_counter() - started:.0f} s; "
              f"calibration MSE (pure reuse -> forecast): " +
              ", ".join(f"{name} {before:.4g} -> {after:.4g}" for name, (before, after) in choice.errors.items()) +
              "; two cache slots per unit")
        if choice.label != "learned+forecast":
            kept = "with its forecast" if choice.with_forecast else "without a forecast (pure reuse)"
            print(f"forecast: the lowest calibration error is {choice.label}'s: the router keeps {choice.name} {kept}")
    return router


def closing_table(task, table, macs, count: int, seed: int, clip, forecast=None, calibration: int = 0) -> str:
    """The learned `table` (with its `forecast`, if any) against the static schedules of about its cost, on
    `count` held-out noises. With a forecast each static rival gets its own too, fitted on the `calibration`
    noises of `seed` that rank 0 trained on (every rank fits the same: the table is that of one process), and a
    row with it."""
    from .forecast import fit_forecast
    from .search import Rollouts, calibration_batch, compare, static_rivals, table_text
    from .training import engine_attached

    noise, cond = calibration_batch(task, count, seed, rank=HELD_OUT_RANK)
    with engine_attached(task.transformer) as engine:
        forecasts = {}
        if forecast is not None:
            forecasts["learned"] = forecast
            fit_noise, fit_cond = calibration_batch(task, calibration, seed)
            rollouts = Rollouts(task, engine, fit_noise, fit_cond, table.shape[0], clip=clip)
            for rival in static_rivals(table.shape[0], [n for n, _ in engine.units], table):
                forecasts[rival.name] = fit_forecast(rollouts, rival.table)
        rows = compare(task, engine, table, macs, noise, cond, clip=clip, forecasts=forecasts)
    return table_text(rows, count)


HELD_OUT_RANK = 1_000_003  # the held-out batch's generator: no training rank draws from it


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def embed(args) -> int:
    """`harmonica embed`: the pipeline's text encoders (no transformer, no VAE) encode the prompts of a text
    file (one per line) and the negative prompt into a safetensors file (see harmonica/prompts.py)."""
    from .prompts import save_prompt_embeddings

    out = check_out_file(args.out, "--out", {".safetensors"}, "a .safetensors file name (the prompt embeddings)")
    try:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"--prompts: expected a text file of prompts, one per line, got {args.prompts} "
                         f"({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts: expected a UTF-8 text file, got {args.prompts} (byte "
                         f"0x{error.object[error.start]:02x} at offset {error.start} is not UTF-8)") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: expected at least one non-empty line in {args.prompts}, got none")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    pipe = load_text_encoders(args.model, weights=args.weights, dtype=dtype).to(device)
    tensors = save_prompt_embeddings(pipe, prompts, out, args.negative_prompt, args.max_sequence_length)
    shapes = ", ".join(f"{name} {tuple(value.shape)}" for name, value in tensors.items())
    print(f"{len(prompts)} prompts of {args.prompts} encoded by {type(pipe).__name__} "
          f"({args.weights or preset(args.model).hub_id}): {shapes}\nsaved {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .training import LOSSES, OBJECTIVES, OPTIMIZERS, TrainConfig

    parser = argparse.ArgumentParser(prog="harmonica", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
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
    s = commands.add_parser("sample", help="generate one image")
    s.add_argument("--model", required=True, choices=sorted(PRESETS) + sorted(FLOW_PRESETS) + sorted(DIGITS_MODELS))
    source = s.add_mutually_exclusive_group()
    source.add_argument("--weights", help="hub id or local path of the pipeline (default: the preset's hub id)")
    source.add_argument("--random-weights", action="store_true", help="no download: random weights from configs")
    cache = s.add_mutually_exclusive_group()
    cache.add_argument("--router", help="directory of a router saved by Router.save_pretrained")
    cache.add_argument("--schedule", help="'fora:N', 'delta-dit[:b=B,n=N[,blocks=C]]' or 'no-cache'")
    cache.add_argument("--no-cache", action="store_true", help="every unit computes at every step (the default)")
    s.add_argument("--tau", type=float, help="router threshold in (0, 1) (default: the router's training tau)")
    s.add_argument("--sampler", help="dit-ddim or pipeline (DiT); dpm-solver++, sa-solver or iddpm (PixArt) "
                   "(default: the router's, else the model's)")
    s.add_argument("--steps", type=int, help=f"denoising steps, {step_ranges_text()} (default: the router's, else the "
                   "sampler's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class-label", type=int, help=f"ImageNet class (DiT; default {DIT_CLASS})")
    s.add_argument("--prompt", help=f"PixArt prompt (default {DEFAULT_PROMPT!r})")
    s.add_argument("--prompt-embeddings", help="flow models: safetensors file of the pipeline's encode_prompt outputs "
                   "(harmonica embed writes one; the first prompt is sampled; default with --random-weights: a random "
                   "prompt)")
    s.add_argument("--guidance", type=float,
                   help="classifier-free guidance, 0 or 1 for none (default: 1.5 dit-ddim, 4.0 pipeline, 4.5 PixArt)")
    s.add_argument("--fp32", action="store_true", help="fp32 on CUDA (default fp16; CPU always fp32)")
    s.add_argument("--cuda-graphs", action="store_true", help="one CUDA graph per distinct schedule row")
    s.add_argument("--scheduler-in-graph", action="store_true",
                   help="with --cuda-graphs: the sampler step inside each graph (dit-ddim, dpm-solver++)")
    s.add_argument("--compile", action="store_true", help="torch.compile each unit kind once (all blocks share it)")
    s.add_argument("--context-parallel", metavar="ulysses=N|ring=N", help="under torchrun, N = the world size: "
                   "diffusers' context parallelism (FLUX, Wan, Qwen-Image)")
    s.add_argument("--out", help="image file (.png, .jpg, ...; default out.png) in an existing directory; flow models: "
                   ".safetensors file of the final latents (default out.safetensors), or an image file decoded by "
                   "the model's VAE (Wan: .gif or .webp)")
    e = commands.add_parser("embed", help="prompt embeddings from the pipeline's text encoders, for train --embeds "
                            "and sample --prompt-embeddings")
    e.add_argument("--model", required=True, choices=sorted(name for name in PRESETS if preset(name).is_pixart)
                   + sorted(FLOW_PRESETS))
    e.add_argument("--weights", help="hub id or local path of the pipeline (default: the preset's hub id)")
    e.add_argument("--prompts", required=True, help="text file, one prompt per line")
    e.add_argument("--negative-prompt", help='the unconditional prompt (default ""; FLUX.1, FLUX.2: none)')
    e.add_argument("--max-sequence-length", type=int, help="text tokens (default: the pipeline's)")
    e.add_argument("--device", help="default cuda when available")
    e.add_argument("--dtype", choices=sorted(DTYPES), help="text encoders' dtype (default bf16 on CUDA, else fp32)")
    e.add_argument("--out", required=True, help=".safetensors file")
    from .bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(commands.add_parser("bench", help="the benchmark suite: theoretical vs measured speedup, "
                                            "quality, peers (what make bench runs)"))
    from .profiling.session import add_parser as add_profile_parser

    add_profile_parser(commands)
    return parser


def bench(args) -> int:
    from .bench.command import run

    return run(args, prog="harmonica bench")


def profile(args) -> int:
    from .profiling.session import run

    return run(args)


def main(argv=None) -> int:
    """Exit status 0; 2 with one line on stderr for any error (a refused option or file, a failed write, a
    diverged computation); 128 + N when signal N stopped a training (see train)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        check_options(args.command, args, given_options(build_parser(), argv))
        return {"sample": sample, "train": train, "embed": embed, "bench": bench,
                "profile": profile}[args.command](args)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"harmonica: error: {one_line(error)}", file=sys.stderr)
        return 2

