"""`harmonica sample`: one image from a DiT/PixArt model with a router, a baseline schedule or no cache."""

import argparse
import sys
import time

import torch

from .api import enable, step_runner, summary
from .models import PRESETS, build_pipeline, preset, random_prompt_embeds
from .router import Router
from .samplers import (
    DIT_SAMPLERS,
    PIXART_PROMPT_KEYS,
    PIXART_SAMPLERS,
    TABLE_SAMPLERS,
    default_steps,
    dit_ddim_sample,
    pixart_sample,
    use_pixart_sampler,
)
from .schedule import CacheSchedule
from .units import cached_units

DIT_PIPELINE_SAMPLER = "pipeline"  # DiTPipeline with its own scheduler


def parse_schedule(spec: str, num_steps: int, unit_names: list) -> CacheSchedule:
    """'no-cache', 'fora:N' or 'delta-dit:b=B,n=N[,blocks=C]' for `num_steps` steps."""
    kind, _, params = spec.partition(":")
    try:
        if kind == "no-cache" and not params:
            return CacheSchedule.no_cache(num_steps, len(unit_names))
        if kind == "fora":
            return CacheSchedule.fora(num_steps, len(unit_names), int(params))
        if kind == "delta-dit":
            values = dict(item.split("=") for item in params.split(","))
            blocks = int(values["blocks"]) if "blocks" in values else None
            return CacheSchedule.delta_dit(unit_names, num_steps, int(values["b"]), int(values["n"]), blocks)
    except (ValueError, KeyError) as error:
        raise ValueError(f"--schedule: could not read {spec!r} ({error})") from error
    raise ValueError(f"--schedule: expected 'no-cache', 'fora:N' or 'delta-dit:b=B,n=N', got {spec!r}")


def _sampler_choices(spec) -> dict:
    return PIXART_SAMPLERS if spec.is_pixart else {**DIT_SAMPLERS, DIT_PIPELINE_SAMPLER: (None, 20)}


def generate(pipe, args, spec, sampler: str, steps: int, generator: torch.Generator):
    """One PIL image of the preset's native resolution. With the sampler step inside the CUDA graphs
    (`enable(..., scheduler_in_graph=True)`), PixArt runs `pixart_sample` instead of the pipeline."""
    device = pipe.transformer.device
    if spec.is_pixart:
        prompt = {"prompt": args.prompt}
        if args.random_weights:  # no text encoder: embeddings of a random prompt
            embeds = random_prompt_embeds(args.model, 1, generator).to(device, pipe.transformer.dtype)
            mask = torch.ones(embeds.shape[:2], device=device)
            prompt = {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt": None,
                      "negative_prompt_embeds": torch.zeros_like(embeds), "negative_prompt_attention_mask": mask}
        if step_runner(pipe.transformer) is not None:
            if "prompt" in prompt:
                prompt = dict(zip(PIXART_PROMPT_KEYS, pipe.encode_prompt(args.prompt, device=device)))
            prompt = {key: prompt[key] for key in PIXART_PROMPT_KEYS}
            latents = pixart_sample(pipe, **prompt, num_steps=steps, guidance_scale=args.guidance or 4.5,
                                    generator=generator, height=spec.resolution, width=spec.resolution, progress=True)
            return _decode(pipe, latents)
        return pipe(**prompt, num_inference_steps=steps, guidance_scale=args.guidance or 4.5, generator=generator,
                    height=spec.resolution, width=spec.resolution, use_resolution_binning=not args.random_weights
                    ).images[0]
    labels = torch.tensor([args.class_label], device=device)
    if sampler == DIT_PIPELINE_SAMPLER:
        return pipe(class_labels=[args.class_label], num_inference_steps=steps, guidance_scale=args.guidance or 4.0,
                    generator=generator).images[0]
    latents = dit_ddim_sample(pipe.transformer, labels, num_steps=steps, guidance_scale=args.guidance or 1.5,
                              generator=generator, progress=True)
    return _decode(pipe, latents)


def _decode(pipe, latents: torch.Tensor):
    """The PIL image of latents (1, C, h, w)."""
    from diffusers.image_processor import VaeImageProcessor

    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return VaeImageProcessor().postprocess(images, output_type="pil")[0]


def sample(args) -> int:
    spec = preset(args.model)
    sampler = args.sampler or spec.sampler
    choices = _sampler_choices(spec)
    if sampler not in choices:
        raise ValueError(f"--sampler: expected one of {sorted(choices)} for {args.model}, got {sampler!r}")
    steps = args.steps or (default_steps(sampler) if sampler != DIT_PIPELINE_SAMPLER else 20)
    pipe = build_pipeline(args.model, weights=args.weights, random_weights=args.random_weights, seed=args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" and not args.fp32 else torch.float32
    pipe.to(device, dtype)
    if spec.is_pixart:
        use_pixart_sampler(pipe, sampler)  # before enable, which hooks the scheduler
    unit_names = [name for name, _ in cached_units(pipe.transformer)]
    if args.scheduler_in_graph and sampler not in TABLE_SAMPLERS:
        raise ValueError(f"--scheduler-in-graph: expected a sampler from {list(TABLE_SAMPLERS)}, got {sampler!r}")
    execution = {"cuda_graphs": args.cuda_graphs, "scheduler_in_graph": args.scheduler_in_graph,
                 "compile": args.compile}
    if args.router:
        enable(pipe, Router.from_pretrained(args.router), tau=args.tau, **execution)
    else:
        enable(pipe, parse_schedule(args.schedule or "no-cache", steps, unit_names), **execution)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    with torch.inference_mode():
        image = generate(pipe, args, spec, sampler, steps, generator)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    image.save(args.out)
    weights = "random weights" if args.random_weights else (args.weights or spec.hub_id)
    print(f"model {args.model} ({weights}), sampler {sampler}, {steps} steps, seed {args.seed}, {device} {dtype}")
    print(summary(pipe))
    print(f"measured {elapsed:.2f} s (whole generation, decode included); image written to {args.out}")
    return 0


DIGITS = "digits-dit"  # the committed digits model (harmonica.digits), trainable, not a pipeline


def digits_report(model, schedule, num_steps: int, count: int = 500) -> str:
    """Quality of the digits model with `schedule` against its uncached samples of the same seeds."""
    from .api import disable
    from .digits import eval_batch, psnr, quality, sample

    noise, labels = eval_batch(count)
    reference = sample(model, noise, labels, num_steps)
    enable(model, schedule)
    cached = sample(model, noise, labels, num_steps)
    disable(model)
    ref_q, q = quality(reference, labels), quality(cached, labels)
    return (f"quality on {count} samples: uncached FD {ref_q['fd']:.3f}, accuracy {ref_q['accuracy']:.1%}; "
            f"with the router FD {q['fd']:.3f}, accuracy {q['accuracy']:.1%}, "
            f"PSNR vs uncached {psnr(cached, reference):.1f} dB")


def train(args) -> int:
    import os

    import torch.distributed as dist

    from .training import DiTTask, PixArtTask, RouterTrainer, TrainConfig, load_prompt_embeddings

    spec = preset("tiny-dit" if args.model == DIGITS else args.model)
    if spec.is_pixart and not args.embeds:
        raise ValueError(f"--embeds: {args.model} trains on precomputed prompt embeddings; expected a file "
                         f"(harmonica.training.save_prompt_embeddings writes one), got none")
    config = TrainConfig(num_steps=args.steps, iterations=args.iterations, batch=args.batch, lr=args.lr,
                         beta=args.beta, tau=args.tau, refresh=args.refresh, guidance=args.guidance,
                         objective=args.objective, lambda_batch=args.lambda_batch, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, target_cur=args.target_cur)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    if args.model == DIGITS:
        from .digits import load_digits_dit

        transformer = load_digits_dit().to(device)
    else:
        pipe = build_pipeline(args.model, weights=args.weights, random_weights=args.random_weights)
        transformer = pipe.transformer.to(device)
    if spec.is_pixart:
        scheduler = use_pixart_sampler(pipe, args.sampler or spec.sampler)
        task = PixArtTask(transformer, scheduler, load_prompt_embeddings(args.embeds), config.num_steps,
                          config.guidance)
    else:
        task = DiTTask(transformer, config.num_steps, config.guidance)
    trainer = RouterTrainer(task, config, args.out)
    router = trainer.run(resume=args.resume)
    if trainer.rank == 0:
        schedule = router.schedule(config.tau)
        print(f"router after {trainer.iteration} iterations: {args.out}/router (sampler {trainer.task.sampler}, "
              f"{config.num_steps} steps, tau {config.tau}), CUR {schedule.cur:.1%}, theoretical speedup "
              f"{schedule.theoretical_speedup(trainer.macs):.2f}x")
        if args.model == DIGITS:
            print(digits_report(transformer, schedule, config.num_steps))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .training import OBJECTIVES, TrainConfig

    parser = argparse.ArgumentParser(prog="harmonica", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train a router (SDT + IEPO); torchrun for several GPUs")
    defaults = TrainConfig()
    t.add_argument("--model", required=True, choices=sorted(PRESETS) + [DIGITS])
    weights = t.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="hub id or local path of the pipeline (default: the preset's hub id)")
    weights.add_argument("--random-weights", action="store_true", help="no download: random weights")
    t.add_argument("--out", required=True, help="directory for checkpoints, train_log.jsonl and router/")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--steps", type=int, default=defaults.num_steps, help="denoising steps T")
    t.add_argument("--iterations", type=int, default=defaults.iterations)
    t.add_argument("--batch", type=int, default=defaults.batch, help="noises per rank (CFG doubles it)")
    t.add_argument("--lr", type=float, default=defaults.lr)
    t.add_argument("--beta", type=float, default=defaults.beta, help="weight of the router L1 term")
    t.add_argument("--tau", type=float, default=defaults.tau)
    t.add_argument("--refresh", type=int, default=defaults.refresh, help="iterations between lambda refreshes")
    t.add_argument("--guidance", type=float, default=defaults.guidance, help="1.5 is DiT's; PixArt uses 4.5")
    t.add_argument("--embeds", help="PixArt: safetensors file of prompt embeddings (see save_prompt_embeddings)")
    t.add_argument("--sampler", help="PixArt: dpm-solver++ (default), sa-solver or iddpm")
    t.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective)
    t.add_argument("--lambda-batch", type=int, default=defaults.lambda_batch)
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    t.add_argument("--target-cur", type=float, help="adjust beta during training towards this CUR at tau")
    s = commands.add_parser("sample", help="generate one image")
    s.add_argument("--model", required=True, choices=sorted(PRESETS))
    source = s.add_mutually_exclusive_group()
    source.add_argument("--weights", help="hub id or local path of the pipeline (default: the preset's hub id)")
    source.add_argument("--random-weights", action="store_true", help="no download: random weights from configs")
    cache = s.add_mutually_exclusive_group()
    cache.add_argument("--router", help="directory of a router saved by Router.save_pretrained")
    cache.add_argument("--schedule", help="'fora:N', 'delta-dit:b=B,n=N' or 'no-cache'")
    cache.add_argument("--no-cache", action="store_true", help="every unit computes at every step (the default)")
    s.add_argument("--tau", type=float, help="router threshold (default: the router's training tau)")
    s.add_argument("--sampler", help="dit-ddim or pipeline (DiT); dpm-solver++, sa-solver or iddpm (PixArt)")
    s.add_argument("--steps", type=int, help="denoising steps (default: the sampler's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class-label", type=int, default=207, help="ImageNet class (DiT)")
    s.add_argument("--prompt", default="A small cactus with a happy face in the Sahara desert.", help="PixArt prompt")
    s.add_argument("--guidance", type=float, help="classifier-free guidance (default: 1.5 DiT-DDIM, 4.5 PixArt)")
    s.add_argument("--fp32", action="store_true", help="fp32 on CUDA (default fp16; CPU always fp32)")
    s.add_argument("--cuda-graphs", action="store_true", help="one CUDA graph per distinct schedule row")
    s.add_argument("--scheduler-in-graph", action="store_true",
                   help="with --cuda-graphs: the sampler step inside each graph (dit-ddim, dpm-solver++)")
    s.add_argument("--compile", action="store_true", help="torch.compile each unit kind once (all blocks share it)")
    s.add_argument("--out", default="out.png")
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
    args = build_parser().parse_args(argv)
    try:
        return {"sample": sample, "train": train, "bench": bench, "profile": profile}[args.command](args)
    except (ValueError, RuntimeError) as error:
        print(f"harmonica: error: {error}", file=sys.stderr)
        return 2
