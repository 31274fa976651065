"""The profiled workload: one cached generation of a preset, timed after warm-up, between
cudaProfilerStart and cudaProfilerStop (what `nsys profile -c cudaProfilerApi` and
`ncu --profile-from-start off` capture), inside an NVTX range `generation` when NVTX is on.

    HARMONICA_NVTX=1 python -m harmonica.profiling.workload --model dit-xl-2-256 --config fora:2 --steps 20

`harmonica profile nsys|ncu` runs it in a subprocess with the same options. On the CPU it runs the
same way without the profiler calls (the tests use the tiny presets). A flow-matching preset (FLUX.1,
SD3/SD3.5, Wan, Qwen-Image) runs `flow.flow_sample` on its transformer alone (bf16 on CUDA), with the first
prompt of `--prompt-embeddings` or a random one: no text encoder, no VAE.
"""

import argparse
import sys
import time

import torch

from harmonica.api import enable, summary
from harmonica.bench.configs import MODE_OPTIONS
from harmonica.families import FLOW_LOOP, PIPELINE_LOOP
from harmonica.images import generate
from harmonica.models import FLOW_PRESETS, PRESETS, build_pipeline, load_transformer, move_pipeline, preset
from harmonica.router import Router
from harmonica.samplers import check_steps
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
    parser.add_argument("--prompt-embeddings", help="flow models: safetensors file of prompt embeddings (harmonica "
                        "embed writes one; its first prompt is used; default: a random prompt)")
    parser.set_defaults(prompt="a photo of a cat", guidance=None, class_label=207)  # what images.generate reads


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


def _pipeline_generation(args, spec, device):
    """(pipeline, steps, one generation) of a DiT/PixArt preset, caching enabled."""
    steps = args.steps or spec.steps
    pipe = build_pipeline(args.model, weights=args.weights, random_weights=args.random_weights, seed=args.seed)
    move_pipeline(pipe, device, torch.float16 if device == "cuda" else torch.float32)
    enable(pipe.transformer, _cache(args, steps, pipe.transformer), **MODE_OPTIONS[args.mode])
    return pipe, steps, lambda: generate(pipe, args, spec, spec.sampler, steps,
                                         torch.Generator().manual_seed(args.seed), progress=False)


def _flow_generation(args, spec, device):
    """(transformer, steps, one generation) of a flow-matching preset, caching enabled."""
    from harmonica.flow import flow_sample, flow_task, load_flow_embeddings
    from harmonica.prompts import random_embeddings

    steps = args.steps or spec.steps
    transformer = load_transformer(args.model, weights=args.weights, random_weights=args.random_weights,
                                   seed=args.seed)
    move_pipeline(transformer, device, torch.bfloat16 if device == "cuda" else torch.float32)
    bank = (load_flow_embeddings(args.prompt_embeddings) if args.prompt_embeddings else
            random_embeddings(transformer, 1, spec.text_tokens, torch.Generator().manual_seed(args.seed)))
    task = flow_task(transformer, bank, steps, spec.guidance, **spec.size)
    enable(transformer, _cache(args, steps, transformer), **MODE_OPTIONS[args.mode])
    first = torch.zeros(1, dtype=torch.long)
    return transformer, steps, lambda: flow_sample(task, first, generator=torch.Generator().manual_seed(args.seed))


GENERATIONS = {FLOW_LOOP: _flow_generation, PIPELINE_LOOP: _pipeline_generation}  # by `Family.loop`
TIMED = {FLOW_LOOP: "latents only", PIPELINE_LOOP: "decode included"}  # what a generation of each loop makes


def check_workload_steps(model: str, steps: int | None) -> None:
    """--steps against the sampler of the workload: a DiT/PixArt preset's own (the flow sampler takes any)."""
    spec = preset(model)
    if steps is not None and spec.family.loop == PIPELINE_LOOP:
        check_steps(spec.sampler, steps)


def _cache(args, steps: int, transformer):
    """The `--router`, else the `--config` schedule over the transformer's units."""
    if args.router:
        return Router.from_pretrained(args.router)
    return parse_schedule(args.config, steps, [name for name, _ in cached_units(transformer)])


def run(args) -> float:
    """Build, warm up and time one generation; returns its seconds (decode included)."""
    spec = preset(args.model)
    loop = spec.family.loop
    if args.prompt_embeddings and loop != FLOW_LOOP:
        raise ValueError(f"--prompt-embeddings: expected only with a flow model, got {args.model}")
    check_workload_steps(args.model, args.steps)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe, steps, generation = GENERATIONS[loop](args, spec, device)
    profiled = device == "cuda"
    with nvtx.PipelineRanges(pipe), torch.inference_mode():
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
    print(summary(pipe))
    print(f"timed generation: {elapsed * 1e3:.1f} ms after {args.warmup} warm-up "
          f"({TIMED[loop]})")
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmonica.profiling.workload", description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
