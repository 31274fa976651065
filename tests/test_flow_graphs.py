"""The flow-matching families (FLUX.1, SD3, SD3.5, Wan, Qwen-Image, FLUX.2, Z-Image, HunyuanVideo 1.5, LTX-2; their
tiny random presets) sampled by `flow_sample` under cuda_graphs: on the CPU graph stand-in (capture rules and graph
semantics), bitwise the eager engine's generation; on CUDA (gpu), under cuda_graphs and under cuda_graphs with
compile, equal to eager."""

import pytest
import torch
from graph_standin import StandInGraphs, runner_inputs

import harmonica
from harmonica import CacheSchedule
from harmonica.flow import VAE_FACTOR, flow_sample, flow_task
from harmonica.models import FLOW_PRESETS, build_transformer
from harmonica.prompts import random_embeddings
from harmonica.units import cached_units

TINY = ("tiny-flux", "tiny-sd3", "tiny-sd35", "tiny-wan", "tiny-qwen-image", "tiny-flux2", "tiny-z-image",
        "tiny-hunyuan-video15", "tiny-ltx2")
STEPS = 4  # FORA:2: two graphs (computing and reusing rows), each replayed from then on


def case(name: str, device: str):
    """(transformer, task, noise, FORA:2 schedule) of a tiny preset on `device`."""
    spec = FLOW_PRESETS[name]
    transformer = build_transformer(name).to(device)
    bank = random_embeddings(transformer, 2, spec.text_tokens, torch.Generator().manual_seed(0))
    task = flow_task(transformer, bank, STEPS, spec.guidance, **spec.size)
    noise = torch.randn(1, *task.latent_shape, generator=torch.Generator().manual_seed(1))
    return transformer, task, noise, CacheSchedule.fora(STEPS, len(cached_units(transformer)), 2)


def cached_tables(transformer, task) -> list:
    """Tensors the forward reads that caches keep alive across steps (graph inputs on a GPU too): the task's
    timesteps and coefficients on the device, Qwen-Image's and Z-Image's rotary tables."""
    tables = list(task._device_tensors.values())
    rope = getattr(transformer, "pos_embed", None)
    if hasattr(rope, "_compute_video_freqs"):
        cpu, side = torch.device("cpu"), (task.height // VAE_FACTOR // 2, task.width // VAE_FACTOR // 2)
        tables += [*rope._get_device_freqs(cpu), rope._compute_video_freqs(1, *side, 0, cpu)]
    rope = getattr(transformer, "rope_embedder", None)
    if rope is not None:
        tables += list(rope.freqs_cis)
    return tables


def sample_twice(transformer, task, noise, schedule, **options):
    """Eager latents, then two generations under `options`: (eager, [first, second], runner)."""
    with torch.no_grad():
        harmonica.enable(transformer, schedule)
        eager = flow_sample(task, torch.tensor([1]), latents=noise)
        harmonica.enable(transformer, schedule, cuda_graphs=True, **options)
        runner = transformer._harmonica.graphs
        if transformer.device.type == "cpu":
            runner.backend = StandInGraphs(lambda: runner_inputs(runner) + cached_tables(transformer, task))
        runs = [flow_sample(task, torch.tensor([1]), latents=noise) for _ in range(2)]
    harmonica.disable(transformer)
    return eager, runs, runner


@pytest.mark.parametrize("name", TINY)
def test_flow_sample_under_graphs_is_the_eager_engines(name):
    eager, runs, runner = sample_twice(*case(name, "cpu"))
    assert (runner.captures, runner.replays) == (2, 6)
    assert all(torch.equal(latents, eager) for latents in runs)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "graphs-compile"])
@pytest.mark.parametrize("name", TINY)
def test_cuda_flow_sample_under_graphs_and_compile_equals_eager(name, compile):
    eager, runs, runner = sample_twice(*case(name, "cuda"), compile=compile)
    assert (runner.captures, runner.replays) == (2, 6)
    scale = eager.abs().max().item()
    for latents in runs:  # compile: inductor's fused fp32 kernels round otherwise
        assert latents.device.type == "cuda" and torch.isfinite(latents).all()
        torch.testing.assert_close(latents, eager, rtol=0, atol=(1e-3 if compile else 1e-5) * scale)


def test_flow_sample_refuses_the_step_inside_the_graphs_one_transformer_or_several():
    """A flow task's velocity step runs after the graph, on one transformer as on experts that take turns by step
    (Wan 2.2 A14B's two, here one transformer twice): refused before any step."""
    transformer, task, noise, schedule = case("tiny-flux", "cpu")
    harmonica.enable(transformer, schedule, cuda_graphs=True, scheduler_in_graph=True)
    try:
        with pytest.raises(ValueError, match="scheduler_in_graph: expected off for the sampler "
                                             "FlowMatchEulerDiscreteScheduler"):
            flow_sample(task, torch.tensor([1]), latents=noise)
        task.experts = lambda: [(transformer, 0), (transformer, 2)]
        with pytest.raises(ValueError, match="scheduler_in_graph: expected off for a task of 2 transformers that "
                                             "take turns by step"):
            flow_sample(task, torch.tensor([1]), latents=noise)
    finally:
        harmonica.disable(transformer)
