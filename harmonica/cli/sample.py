"""`harmonica sample`: one image (a video) or the final latents of any preset, or a digits model's grid, with a
router, a baseline schedule or no cache (`generation` names the steps)."""

import dataclasses
import time
from pathlib import Path

import torch

from .. import parallel, samplers
from ..api import enable, summary
from ..digits import DIGITS_MODELS
from ..families.dit import CLASS_LABEL
from ..files import check_out_file, file_bytes, write_file
from ..flow import SAMPLER
from ..generation import DEFAULT_PROMPT, default_guidance, first_conditions, generation_task, given_bank, to_pil
from ..models import (
    FLOW_PRESETS,
    PRESETS,
    build_transformer,
    load_experts,
    load_scheduler,
    load_vae,
    move_pipeline,
    preset,
    preset_task,
)
from ..prompts import random_embeddings
from ..router import Router, RouterInfo, load_router
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
    """What `harmonica sample` runs, every option checked: the sampler, step count, guidance, router or schedule,
    the pipeline's scheduler (DiT, PixArt; None for a flow family), the prompt bank (None: class-conditional, or the
    prompt is encoded once the text encoders load) and the conditions of the generation."""

    sampler: str
    steps: int
    guidance: float
    cache: object  # a Router or a CacheSchedule
    scheduler: object
    bank: dict | None
    cond: dict


def default_out(args, spec) -> str:
    """--out's default: an image (a video: an animated GIF) decoded by the preset's VAE, or the final latents where
    there is none to decode with (random weights of a preset without a random VAE)."""
    if args.random_weights and spec.vae is None:
        return "out.safetensors"
    return "out.gif" if spec.frames else "out.png"


def check_out(args, spec) -> None:
    """--out: its suffix (an image, a video's animation, or .safetensors for the final latents) and, with random
    weights, a random VAE to decode with."""
    if spec.frames:
        check_out_file(args.out, "--out", VIDEO_SUFFIXES, "a .safetensors (the final latents), .gif or .webp file name")
    else:
        check_out_file(args.out, "--out", {".safetensors"} | image_suffixes(),
                       "an image file name (.png, .jpg, ...) or a .safetensors file name (the final latents)")
    if args.random_weights and Path(args.out).suffix.lower() != ".safetensors" and spec.vae is None:
        raise ValueError(f"--out: {args.model} has no random VAE to decode with (decoding needs its weights); "
                         f"expected a .safetensors file name (the final latents), got {args.out!r}")


def plan_sample(args, spec, generator: torch.Generator) -> SamplePlan:
    """Check every option of `harmonica sample` against each other, the model's config (a meta-device
    transformer, no weights), the prompt embeddings and the router's files, before any weights load; ValueError
    naming the option to change. The random prompt of random weights is drawn from `generator`."""
    if not (args.random_weights or args.weights or spec.hub_id):
        raise ValueError(f"--random-weights: {args.model} has no published weights; expected --random-weights or "
                         "--weights, got neither")
    check_out(args, spec)
    check_tau(args)
    family = spec.family
    with torch.device("meta"):
        transformer = build_transformer(args.model)
    if args.class_label is not None and not 0 <= args.class_label < transformer.config.num_embeds_ada_norm:
        raise ValueError(f"--class-label: expected a class in [0, {transformer.config.num_embeds_ada_norm - 1}] "
                         f"for {args.model}, got {args.class_label}")
    router = load_router(args.router) if args.router else None
    sampler = plan_sampler(args, spec, router)
    if args.steps is not None:
        check_steps(sampler, args.steps)
    if router is not None and args.steps is not None and args.steps != router.num_steps:
        raise ValueError(f"--steps: the router {args.router} was trained for {router.num_steps} steps, got --steps "
                         f"{args.steps}; leave --steps out")
    steps = args.steps or (router.num_steps if router else family.samplers[sampler][1] if family.samplers else
                           spec.steps)
    guidance = default_guidance(spec, sampler) if args.guidance is None else args.guidance
    if args.prompt is not None and (args.prompt_embeddings or args.random_weights):
        other = "--prompt-embeddings" if args.prompt_embeddings else "--random-weights (no text encoders)"
        raise ValueError(f"--prompt: expected it alone, with the weights' text encoders, got --prompt {args.prompt!r} "
                         f"with {other}")
    bank = given_bank(spec, transformer, path=args.prompt_embeddings, random_weights=args.random_weights,
                      generator=generator)
    scheduler = load_scheduler(args.model, weights=args.weights, random_weights=args.random_weights)
    # a stand-in bank where the prompt is encoded later: the task's steps do not depend on it
    stand_in = random_embeddings(transformer, 1, spec.text_tokens, torch.Generator()) if (
        family.text_conditional and bank is None) else bank
    try:  # a preset of experts (Wan 2.2 A14B): the meta transformer for each, which places the boundary step
        task = preset_task(args.model, [transformer] * spec.experts, scheduler, stand_in, steps, guidance, sampler)
    except ValueError as error:
        raise ValueError(f"--prompt-embeddings: {error}") from None
    if args.scheduler_in_graph and not task.step_in_graph:
        raise ValueError(f"--scheduler-in-graph: expected a sampler whose step can run inside the graphs "
                         f"({', '.join(TABLE_SAMPLERS)}), got {sampler}")
    if router is None:
        units = [name for name, _ in cached_units(transformer)]
        cache = parse_schedule(args.schedule or "no-cache", steps, units)
    else:
        check_router_model(router, args, transformer, sampler=task.sampler, timesteps=task.timesteps)
        cache = router
    check_expert_starts(args, task, cache)
    return SamplePlan(sampler, steps, guidance, cache, scheduler, bank, first_conditions(spec, args.class_label))


def check_expert_starts(args, task, cache) -> None:
    """A later expert's first step (Wan 2.2 A14B's low-noise one, from the boundary step on) must compute every
    unit: its slots hold nothing yet. ValueError naming --schedule or --router."""
    table = cache.schedule(args.tau).table if isinstance(cache, Router) else cache.table
    for _, first in task.experts()[1:]:
        if not table[first].all():
            option = f"--router {args.router}" if isinstance(cache, Router) else f"--schedule {args.schedule}"
            raise ValueError(f"{option.split()[0]}: expected every unit computed at step {first}, where {args.model}'s "
                             f"next transformer begins (its slots are empty), got {int((~table[first]).sum())} of "
                             f"{table.shape[1]} reused by {option} at {task.num_steps} steps")


def plan_sampler(args, spec, router: Router | None) -> str:
    """--sampler, else the router's, else the preset's: one of the family's samplers (a flow family: its
    flow-matching Euler)."""
    choices = spec.family.samplers or {SAMPLER: None}
    trained = _router_sampler(router, spec, args.router) if router and spec.family.samplers else None
    if args.sampler is not None and trained is not None and args.sampler != trained:
        raise ValueError(f"--sampler: the router {args.router} was trained with {trained}, got --sampler "
                         f"{args.sampler}; leave --sampler out")
    sampler = args.sampler or trained or spec.sampler or SAMPLER
    if sampler not in choices:
        raise ValueError(f"--sampler: expected one of {sorted(choices)} for {args.model}, got {sampler!r}")
    return sampler


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
    """`harmonica sample`: preset -> transformers -> task -> enable -> `samplers.sample` -> decode, for every family
    (a preset of experts that take turns by step, Wan 2.2 A14B: both, one engine each);
    the final latents go to --out, or the image (a video's frames as an animation) its VAE decodes. Under torchrun
    with --context-parallel (parallel.py), rank 0 writes and prints."""
    if args.model in DIGITS_MODELS:
        return sample_digits(args)
    spec = preset(args.model)
    context_parallel = parallel.check_option(args.context_parallel, {args.model: spec.class_name})
    if context_parallel and spec.experts > 1:
        raise ValueError(f"--context-parallel: expected a model of one transformer, got {args.model}, whose "
                         f"pipeline switches between {spec.experts} by step")
    args.out = args.out or default_out(args, spec)
    generator = torch.Generator().manual_seed(args.seed)
    plan = plan_sample(args, spec, generator)
    transformers = load_experts(args.model, weights=args.weights, random_weights=args.random_weights,
                                seed=args.seed)
    transformer = transformers[0]
    device = (parallel.init_context_parallel(transformer, *context_parallel) if context_parallel else
              "cuda" if torch.cuda.is_available() else "cpu")
    dtype = spec.family.half if device.startswith("cuda") and not args.fp32 else torch.float32
    for expert in transformers:
        move_pipeline(expert, device, dtype)
    task = generation_task(args.model, transformers, plan.scheduler, plan.bank, plan.steps, plan.guidance,
                           plan.sampler, prompt=args.prompt, weights=args.weights, device=device, dtype=dtype)
    engine = enable(transformers, plan.cache, tau=args.tau, cuda_graphs=args.cuda_graphs,
                    scheduler_in_graph=args.scheduler_in_graph, compile=args.compile)
    start = time.perf_counter()
    with torch.inference_mode():
        latents = samplers.sample(task, plan.cond, samplers.initial_noise(task, 1, generator), generator=generator,
                                  progress=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    bad = int((~torch.isfinite(latents)).sum())
    if bad:
        raise RuntimeError(f"latents: expected finite values, got {bad} of {latents.numel()} NaN/inf (the sampling "
                           "diverged; nothing was written)")
    if parallel.rank():  # every rank holds the gathered latents; rank 0 writes and reports
        return 0
    write_output(args, task, latents, device)
    weights = "random weights" if args.random_weights else (args.weights or spec.hub_id)
    print(f"model {args.model} ({weights}), sampler {plan.sampler}, {plan.steps} steps, guidance {plan.guidance}, "
          f"seed {args.seed}, {device} {dtype}")
    size = f"{spec.height}x{spec.width}" + (f"x{spec.frames}" if spec.frames else "")
    print(summary(transformer, counted=(task.macs(), size)))
    if context_parallel:
        print(parallel.summary_line(args.model, transformer, engine.policy.schedule, 2 if task.guided else 1,
                                    dtype.itemsize, engine.cache_bytes()))
    print(f"measured {elapsed:.2f} s (the denoising loop); latents {tuple(latents.shape)}, "
          f"{'latents' if args.out.endswith('.safetensors') else 'decoded'} written to {args.out}")
    return 0


def write_output(args, task, latents: torch.Tensor, device) -> None:
    """The final latents (unpacked, as the pipeline hands them to its VAE) to a .safetensors --out, else the image
    or video the preset's VAE decodes (in fp32, as the pipelines keep Wan's; cheap next to the loop)."""
    from safetensors.torch import save

    if Path(args.out).suffix.lower() == ".safetensors":
        write_file(args.out, save({"latents": task.unpack(latents).float().cpu().contiguous()}))
        return
    vae = load_vae(args.model, weights=args.weights, random_weights=args.random_weights, seed=args.seed)
    move_pipeline(vae, device, torch.float32)
    with torch.inference_mode():
        save_decoded(task.decode(vae, latents), args.out)


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
    s.add_argument("--prompt", help=f"PixArt and flow models: the prompt, through the pipeline's text encoders "
                   f"(default {DEFAULT_PROMPT!r}; with --random-weights: a random prompt)")
    s.add_argument("--prompt-embeddings", help="PixArt and flow models: safetensors file of the pipeline's "
                   "encode_prompt outputs instead (harmonica embed writes one; the first prompt is sampled)")
    s.add_argument("--guidance", type=float,
                   help="classifier-free guidance, 0 or 1 for none (default: 1.5 dit-ddim, 4.0 pipeline, 4.5 PixArt, "
                   "the pipeline's for flow models)")
    s.add_argument("--fp32", action="store_true", help="fp32 on CUDA (default fp16 for DiT and PixArt, bf16 for flow "
                   "models; CPU always fp32)")
    s.add_argument("--cuda-graphs", action="store_true", help="one CUDA graph per distinct schedule row")
    s.add_argument("--scheduler-in-graph", action="store_true",
                   help="with --cuda-graphs: the sampler step inside each graph (dit-ddim, dpm-solver++)")
    s.add_argument("--compile", action="store_true", help="torch.compile each unit kind once (all blocks share it)")
    s.add_argument("--context-parallel", metavar="ulysses=N|ring=N", help="under torchrun, N = the world size: "
                   "diffusers' context parallelism (FLUX, Wan, Qwen-Image)")
    s.add_argument("--out", help="in an existing directory: an image file (.png, .jpg, ...; default out.png) or a "
                   "video's animation (.gif, .webp; default out.gif) decoded by the model's VAE, or a .safetensors "
                   "file of the final latents (the default for random weights without a random VAE)")
