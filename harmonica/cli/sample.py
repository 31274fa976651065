"""`harmonica sample`: one image from a DiT/PixArt model, a video or the latents of a flow-matching model, or a digits
model's grid, with a router, a baseline schedule or no cache."""

import dataclasses
import time
from pathlib import Path

import torch

from .. import parallel
from ..api import enable, summary
from ..digits import DIGITS_MODELS
from ..families import FLOW_LOOP, PIPELINE_LOOP
from ..families.dit import CLASS_LABEL
from ..families.pixart import DEFAULT_PROMPT
from ..files import check_out_file, file_bytes, write_file
from ..images import generate, to_pil
from ..models import (
    FLOW_PRESETS,
    PRESETS,
    build_pipeline,
    build_transformer,
    load_transformer,
    load_vae,
    move_pipeline,
    preset,
)
from ..router import Router, RouterInfo, dit_ddim_timesteps, load_router
from ..samplers import TABLE_SAMPLERS, check_steps, step_ranges_text
from ..schedule import parse_schedule
from ..units import cached_units

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
    choices = spec.family.samplers
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
    names = {recorded: name for name, (recorded, _, _) in spec.family.samplers.items()}
    if router.info.sampler not in names:
        raise ValueError(f"--router: {directory} was trained with the sampler {router.info.sampler}, expected one "
                         f"of {sorted(names)} for --model {spec.pipeline}")
    return names[router.info.sampler]


def sample(args) -> int:
    if args.model in DIGITS_MODELS:
        return sample_digits(args)
    spec = preset(args.model)
    context_parallel = parallel.check_option(args.context_parallel, {args.model: spec.class_name})
    return {FLOW_LOOP: sample_flow, PIPELINE_LOOP: sample_pipeline}[spec.family.loop](args, spec, context_parallel)


def sample_pipeline(args, spec, context_parallel) -> int:
    """`harmonica sample` for a DiT/PixArt preset: one image of its task through `samplers.sample`, its prompt
    through the pipeline's text encoder, decoded by its VAE (context parallelism: refused by
    `parallel.check_option`)."""
    args.out = args.out or "out.png"
    plan = plan_sample(args, spec)
    pipe = build_pipeline(args.model, weights=args.weights, random_weights=args.random_weights, seed=args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" and not args.fp32 else torch.float32
    move_pipeline(pipe, device, dtype)
    execution = {"cuda_graphs": args.cuda_graphs, "scheduler_in_graph": args.scheduler_in_graph,
                 "compile": args.compile}
    enable(pipe.transformer, plan.cache, tau=args.tau, **execution)
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
    from ..digits import class_comparison

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
    from ..flow import SAMPLER, flow_task, load_flow_embeddings
    from ..prompts import random_embeddings

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
        bank = random_embeddings(transformer, 1, spec.text_tokens, generator)
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

    from ..api import Summary
    from ..flow import SAMPLER, flow_sample, flow_task

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
    schedule = engine.policy.schedule
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


def add_parser(commands) -> None:
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
    s.add_argument("--class-label", type=int, help=f"ImageNet class (DiT; default {CLASS_LABEL})")
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
