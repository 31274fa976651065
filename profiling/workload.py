"""The profiled workload: one cached generation of a preset, timed after warm-up, between
cudaProfilerStart and cudaProfilerStop (what `nsys profile -c cudaProfilerApi` and
`ncu --profile-from-start off` capture), inside an NVTX range `generation` when NVTX is on.

    HARMONICA_NVTX=1 python -m harmonica.profiling.workload --model dit-xl-2-256 --config fora:2 --steps 20

`harmonica profile nsys|ncu` runs it in a subprocess with the same options. On the CPU it runs the
same way without the profiler calls (the tests use the tiny presets). A generation is `harmonica sample`'s
(`harmonica.generation`): the preset's task through `samplers.sample` on its transformer (fp16 for DiT and PixArt,
bf16 for the flow families on CUDA) with its sampler's defaults, the class or the first prompt of
`--prompt-embeddings` (default: a random one for random weights, else the default prompt through the text encoders,
not timed), and the VAE decode where the preset has a VAE to decode with (real weights, or a random VAE).
"""

import argparse
import sys
import time
from types import SimpleNamespace

import torch

from harmonica.api import enable, summary
from harmonica.bench.configs import MODE_OPTIONS
from harmonica.flow import SAMPLER
from harmonica.generation import default_guidance, first_conditions, generation_task, given_bank
from harmonica.models import FLOW_PRESETS, PRESETS, load_experts, load_scheduler, load_vae, move_pipeline, preset
from harmonica.router import Router
from harmonica.samplers import check_steps, initial_noise, sample
from harmonica.schedule import parse_schedule
from harmonica.units import cached_units

from . import nvtx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=sorted(PRESETS) + sorted(FLOW_PRESETS))
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="hub id or local path of the pipeline (default: the preset's hub id)")
    weights.add_argument("--random-weights", action="store_true", help="no download: random weights from configs")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--config", default="no-cache", help="cache schedule: 'fora:N', 'delta-dit:b=B,n=N' or "
                                                            "'no-cache' (as `harmonica sample --schedule`)")
    cache.add_argument("--router", help="directory of a router saved by Router.save_pretrained")
    parser.add_argument("--mode", choices=MODE_OPTIONS, default="fused",
                        help="eager (torch references), fused (Triton ops), graphs (one CUDA graph per schedule "
                             "row), graphs-step (the sampler step inside the graphs) or compile (graphs and "
                             "torch.compile), as in the bench")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset sampler's)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed generations first (Triton autotuning, graph capture, compilation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-embeddings", help="PixArt and flow models: safetensors file of prompt embeddings "
                        "(harmonica embed writes one; its first prompt is used; default: a random prompt with random "
                        "weights, else the default prompt through the text encoders)")


def workload_argv(args) -> list:
    """The command line that runs this workload with the options parsed into `args`."""
    argv = [sys.executable, "-m", "harmonica.profiling.workload", "--model", args.model]
    if args.weights:
        argv += ["--weights", args.weights]
    if args.random_weights:
        argv.append("--random-weights")
    argv += ["--router", args.router] if args.router else ["--config", args.config]
    argv += ["--mode", args.mode, "--warmup", str(args.warmup), "--seed", str(args.seed)]
    argv += ["--prompt-embeddings", args.prompt_embeddings] if args.prompt_embeddings else []
    return argv + (["--steps", str(args.steps)] if args.steps else [])


def _generation(args, spec, device) -> tuple:
    """(what the ranges hook: the transformer and the VAE or None, steps, one generation) of a preset, caching
    enabled."""
    steps = args.steps or spec.steps
    sampler = spec.sampler or SAMPLER
    transformers = load_experts(args.model, weights=args.weights, random_weights=args.random_weights,
                                seed=args.seed)
    transformer = transformers[0]
    dtype = spec.family.half if device == "cuda" else torch.float32
    for expert in transformers:
        move_pipeline(expert, device, dtype)
    bank = given_bank(spec, transformer, path=args.prompt_embeddings, random_weights=args.random_weights,
                      generator=torch.Generator().manual_seed(args.seed))
    scheduler = load_scheduler(args.model, weights=args.weights, random_weights=args.random_weights)
    task = generation_task(args.model, transformers, scheduler, bank, steps, default_guidance(spec, sampler), sampler,
                           weights=args.weights, device=device, dtype=dtype)
    enable(transformers, _cache(args, steps, transformer), **MODE_OPTIONS[args.mode])
    vae = None
    if not args.random_weights or spec.vae is not None:
        vae = load_vae(args.model, weights=args.weights, random_weights=args.random_weights, seed=args.seed)
        move_pipeline(vae, device, torch.float32)
    cond = first_conditions(spec)

    def generation():
        generator = torch.Generator().manual_seed(args.seed)
        latents = sample(task, cond, initial_noise(task, 1, generator), generator=generator)
        return latents if vae is None else task.decode(vae, latents)

    return SimpleNamespace(transformer=transformer, transformer_2=transformers[1] if len(transformers) > 1 else None,
                           vae=vae), steps, generation


def check_workload_steps(model: str, steps: int | None) -> None:
    """--steps against the preset's sampler (DiT's and PixArt's have their ranges; the flow sampler takes any)."""
    if steps is not None:
        check_steps(preset(model).sampler or SAMPLER, steps)


def _cache(args, steps: int, transformer):
    """The `--router`, else the `--config` schedule over the transformer's units."""
    if args.router:
        return Router.from_pretrained(args.router)
    return parse_schedule(args.config, steps, [name for name, _ in cached_units(transformer)])


def run(args) -> float:
    """Build, warm up and time one generation; returns its seconds (decode included where there is a VAE)."""
    spec = preset(args.model)
    if args.prompt_embeddings and not spec.family.text_conditional:
        raise ValueError(f"--prompt-embeddings: expected only with a text-conditional model, got {args.model}")
    check_workload_steps(args.model, args.steps)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts, steps, generation = _generation(args, spec, device)
    profiled = device == "cuda"
    with nvtx.PipelineRanges(parts), torch.inference_mode():
        for _ in range(args.warmup):
            generation()
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        start = time.perf_counter()
        if nvtx.ENABLED:
            nvtx.call_in_range(nvtx.GENERATION, generation)
        else:
            generation()
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        elapsed = time.perf_counter() - start
    print(f"model {args.model}, mode {args.mode}, {steps} steps, {device}")
    print(summary(parts.transformer))
    print(f"timed generation: {elapsed * 1e3:.1f} ms after {args.warmup} warm-up "
          f"({'latents only: no VAE' if parts.vae is None else 'decode included'})")
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmonica.profiling.workload", description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
