"""The CUDA-graph runner: row dedupe, static inputs, recapture triggers (CPU, with a stand-in backend that
keeps a graph's semantics: a replay re-runs the captured call on the static inputs and writes a fixed
output buffer), and the real graphs on CUDA."""

import warnings

import pytest
import torch
from _helpers import cuda_inputs, make_model, step_inputs, units_of

import harmonica
from harmonica import CacheSchedule
from harmonica import graphs as graphs_module
from harmonica.graphs import StaticInputs, graph_plan, input_signature

MODELS = ["tiny-dit", "tiny-pixart"]


class StandInGraphs:
    """Graph semantics without CUDA: capture records the call (it reads the static inputs when it
    runs) and one output buffer, and like a real capture leaves the runner's sampler buffers as they
    were; replay re-runs the call and overwrites that buffer in place."""

    def __init__(self, runner):
        self.runner = runner

    def warm_up(self, fn):
        return fn()

    def capture(self, fn):
        saved = {name: b.clone() for name, b in self.runner.buffers.items()}
        output = fn()
        for name, b in saved.items():
            self.runner.buffers[name].copy_(b)
        return fn, output

    @staticmethod
    def replay(captured):
        fn, output = captured
        output.sample.copy_(fn().sample)
        return output

    @staticmethod
    def reserved() -> int:
        return 0


def enable_with_stand_in(model, schedule, **options):
    engine = harmonica.enable(model, schedule, cuda_graphs=True, **options)
    runner = getattr(model, "transformer", model)._harmonica.graphs
    runner.backend = StandInGraphs(runner)
    return engine, runner


@torch.no_grad()
def run(model, steps, batch=2):
    return [model(**step_inputs(model, s, batch)).sample for s in range(steps)]


def eager_run(model, schedule, steps):
    """Outputs of the eager cached engine (the reference of the graph and compile paths)."""
    harmonica.enable(model, schedule)
    outputs = run(model, steps)
    harmonica.disable(model)
    return outputs


@torch.no_grad()
def cuda_case(name, steps=5):
    """A CUDA model, FORA:2 over `steps`, its step inputs and the eager cached engine's outputs."""
    model = make_model(name).cuda()
    schedule = CacheSchedule.fora(steps, units_of(model), 2)
    inputs = [cuda_inputs(model, s) for s in range(steps)]
    harmonica.enable(model, schedule)
    eager = [model(**step).sample for step in inputs]
    harmonica.disable(model)
    return model, schedule, inputs, eager


def test_graph_plan_shares_graphs_between_equal_rows_and_writes():
    assert graph_plan(CacheSchedule.fora(6, 4, 2)) == [0, 1, 0, 1, 0, 1]
    # the last computing step writes no slot (nothing reads it later): a graph of its own
    assert graph_plan(CacheSchedule.fora(5, 4, 2)) == [0, 1, 0, 1, 2]
    assert graph_plan(CacheSchedule.no_cache(7, 4)) == [0] * 7
    table = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.bool)
    schedule = CacheSchedule(table, "mixed")
    assert graph_plan(schedule) == [0, 1, 2, 3, 4]
    assert schedule.step_keys[1] == ((True, False), (True, False))  # step 2 reuses unit 0
    assert schedule.step_keys[3] == ((True, False), (False, False))  # step 4 computes everything


def test_input_signature_tracks_shapes_dtypes_and_values():
    base = input_signature((torch.zeros(2, 3),), {"t": torch.zeros(2), "flag": False, "d": {"x": None}})
    assert base == input_signature((torch.ones(2, 3),), {"t": torch.ones(2), "flag": False, "d": {"x": None}})
    assert base != input_signature((torch.zeros(1, 3),), {"t": torch.zeros(2), "flag": False, "d": {"x": None}})
    assert base != input_signature((torch.zeros(2, 3, dtype=torch.float16),), {"t": torch.zeros(2), "flag": False,
                                                                               "d": {"x": None}})
    assert base != input_signature((torch.zeros(2, 3),), {"t": torch.zeros(2), "flag": True, "d": {"x": None}})
    assert base != input_signature((torch.zeros(3, 2).t(),), {"t": torch.zeros(2), "flag": False, "d": {"x": None}})


def test_static_inputs_copy_nested_tensors_and_count_bytes():
    gen = torch.Generator().manual_seed(0)
    first = ([torch.randn(2, 3, generator=gen)], {"cond": {"e": torch.randn(4, generator=gen)}, "n": 7})
    static = StaticInputs(*first)
    assert static.args[0] is not first[0][0] and torch.equal(static.args[0], first[0][0])
    second = ([torch.randn(2, 3, generator=gen)], {"cond": {"e": torch.randn(4, generator=gen)}, "n": 7})
    address = static.kwargs["cond"]["e"].data_ptr()
    static.copy_from(*second)
    assert torch.equal(static.args[0], second[0][0])
    assert torch.equal(static.kwargs["cond"]["e"], second[1]["cond"]["e"])
    assert static.kwargs["cond"]["e"].data_ptr() == address, "a static buffer moved"
    assert static.nbytes() == (6 + 4) * 4


@pytest.mark.parametrize("name", MODELS)
def test_replayed_generations_equal_the_eager_engine_bitwise(name):
    model = make_model(name)
    schedule = CacheSchedule.fora(5, units_of(model), 2)
    eager = eager_run(model, schedule, 5)

    _, runner = enable_with_stand_in(model, schedule)
    first, second = run(model, 5), run(model, 5)
    for a, b, c in zip(eager, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert runner.captures == len(set(graph_plan(schedule))) == 3
    assert runner.replays == 10 - 3
    report = harmonica.summary(model)
    assert report.graphs == 3
    assert report.static_bytes == runner.static.nbytes() > 0
    assert "3 CUDA graphs" in str(report)


def test_recapture_on_a_new_batch_shape_or_schedule():
    model = make_model("tiny-dit")
    K = units_of(model)
    engine, runner = enable_with_stand_in(model, CacheSchedule.fora(4, K, 2))
    run(model, 4)
    assert (runner.captures, runner.resets) == (2, 0)
    single = run(model, 4, batch=1)
    assert (runner.captures, runner.resets) == (4, 1)

    harmonica.disable(model)
    harmonica.enable(model, CacheSchedule.fora(4, K, 2))
    assert all(torch.equal(a, b) for a, b in zip(single, run(model, 4, batch=1)))
    harmonica.disable(model)

    engine, runner = enable_with_stand_in(model, CacheSchedule.fora(4, K, 2))
    run(model, 4)
    engine.set_schedule(CacheSchedule.no_cache(4, K))
    run(model, 4)
    assert (runner.captures, runner.resets, runner.replays) == (3, 1, 2 + 3)


def test_an_input_that_changes_within_a_generation_warns():
    model = make_model("tiny-dit")
    _, runner = enable_with_stand_in(model, CacheSchedule.fora(4, units_of(model), 2))
    inputs = [step_inputs(model, s) for s in range(4)]
    inputs[1]["return_dict"] = True  # a non-tensor argument that differs at step 1
    with pytest.warns(UserWarning, match=r"inputs changed within a generation \(step 1\)"), torch.no_grad():
        for step in inputs:
            model(**step)


def test_training_mode_runs_eagerly():
    model = make_model("tiny-dit")
    engine, runner = enable_with_stand_in(model, CacheSchedule.fora(2, units_of(model), 2))
    engine.set_training(torch.ones(2, units_of(model)), tau=0.1)
    run(model, 2)
    assert runner.captures == runner.replays == 0


def test_on_cpu_the_option_says_once_that_it_does_nothing(monkeypatch):
    monkeypatch.setattr(graphs_module, "_WARNED_CPU", False)
    model = make_model("tiny-pixart")
    schedule = CacheSchedule.fora(4, units_of(model), 2)
    eager = eager_run(model, schedule, 4)
    harmonica.enable(model, schedule, cuda_graphs=True)
    with pytest.warns(UserWarning, match="runs on the CPU, where there are no CUDA graphs") as record:
        graphed = run(model, 4)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, 4)
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    assert harmonica.summary(model).graphs == 0
    harmonica.disable(model)
    assert "forward" not in vars(model), "disable left the runner in place"


@torch.no_grad()
def dit_generation(model, guidance=1.5, steps=6):
    from harmonica.samplers import dit_ddim_sample

    device = next(model.parameters()).device
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    return dit_ddim_sample(model, torch.tensor([3, 7], device=device), num_steps=steps, guidance_scale=guidance,
                           latents=latents)


def test_dit_sampler_step_inside_the_graphs_equals_the_eager_sampler_bitwise():
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(6, units_of(model), 2)
    harmonica.enable(model, schedule)
    eager, eager_guided = dit_generation(model), dit_generation(model, guidance=4.0)

    _, runner = enable_with_stand_in(model, schedule, scheduler_in_graph=True)
    first, second = dit_generation(model), dit_generation(model)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert (runner.captures, runner.replays, runner.resets) == (2, 4 + 6, 0)
    assert runner.epilogue is None, "the sampler left its step in the runner"
    assert first.data_ptr() != second.data_ptr(), "a result aliases the runner's sample buffer"
    x_bytes, coefficient_bytes = 2 * 4 * 8 * 8 * 4, 5 * 4
    assert runner.static_bytes() == runner.static.nbytes() + x_bytes + coefficient_bytes
    # the guidance scale is baked into the captured step: a new one recaptures
    assert torch.equal(dit_generation(model, guidance=4.0), eager_guided)
    assert (runner.captures, runner.resets) == (4, 1)

    _, runner = enable_with_stand_in(model, schedule)  # the step after each replay
    assert torch.equal(dit_generation(model), eager) and runner.epilogue is None and not runner.buffers


@torch.no_grad()
def pixart_generation(pipe, steps=6):
    from harmonica.models import random_prompt_embeds
    from harmonica.samplers import pixart_sample

    device = pipe.transformer.device
    embeds = random_prompt_embeds("tiny-pixart", 2, torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(embeds.shape[:2], device=device)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    return pixart_sample(pipe, embeds, mask, torch.zeros_like(embeds), mask, num_steps=steps, latents=latents)


def test_pixart_sampler_step_inside_the_graphs_equals_the_eager_sampler_bitwise():
    from harmonica.models import build_pipeline

    pipe = build_pipeline("tiny-pixart", random_weights=True)
    schedule = CacheSchedule.fora(6, units_of(pipe.transformer), 2)
    harmonica.enable(pipe, schedule)
    eager = pixart_generation(pipe)
    _, runner = enable_with_stand_in(pipe, schedule, scheduler_in_graph=True)
    runner.buffer("x0_prev", (2, 4, 8, 8), torch.float32, "cpu").fill_(float("nan"))  # read at step 0 with c = 0
    first, second = pixart_generation(pipe), pixart_generation(pipe)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert (runner.captures, runner.replays) == (2, 4 + 6)


def test_sampler_buffers_keep_their_address_until_their_shape_changes():
    model = make_model("tiny-dit")
    _, runner = enable_with_stand_in(model, CacheSchedule.fora(4, units_of(model), 2))
    run(model, 4)
    first = runner.buffer("x", (2, 4, 8, 8), torch.float32, "cpu")
    assert runner.buffer("x", (2, 4, 8, 8), torch.float32, torch.device("cpu")) is first
    assert runner.graphs == {}, "graphs captured before a new buffer existed were kept"
    run(model, 4)
    bigger = runner.buffer("x", (4, 4, 8, 8), torch.float32, "cpu")
    assert bigger is not first and runner.graphs == {}


def test_scheduler_in_graph_needs_cuda_graphs():
    model = make_model("tiny-dit")
    with pytest.raises(ValueError, match="scheduler_in_graph: expected together with cuda_graphs=True"):
        harmonica.enable(model, CacheSchedule.fora(4, units_of(model), 2), scheduler_in_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_graph_replay_equals_eager_without_host_sync(name):
    model, schedule, inputs, eager = cuda_case(name)
    with torch.no_grad():
        harmonica.enable(model, schedule, cuda_graphs=True)
        first = [model(**step).sample for step in inputs]  # warm-up + capture
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            replayed = [model(**step).sample for step in inputs]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    runner = getattr(model, "transformer", model)._harmonica.graphs
    assert (runner.captures, runner.replays) == (3, 7)
    for a, b, c in zip(eager, first, replayed):
        assert torch.equal(a, b) and torch.equal(a, c)
    report = harmonica.summary(model)
    assert report.graph_pool_bytes > 0 and report.capture_seconds > 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_compile_with_graphs_matches_eager(name):
    model, schedule, inputs, eager = cuda_case(name)
    with torch.no_grad():
        harmonica.enable(model, schedule, compile=True, cuda_graphs=True)
        outputs = [model(**step).sample for _ in range(2) for step in inputs]
    for a, b in zip(eager * 2, outputs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("scheduler_in_graph", [False, True], ids=["step-outside", "step-inside"])
@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_cuda_whole_generation_with_graphs_has_no_host_sync(family, scheduler_in_graph):
    from harmonica.models import build_pipeline

    if family == "dit":
        target = transformer = make_model("tiny-dit").cuda()
        generation = dit_generation
    else:
        target = build_pipeline("tiny-pixart", random_weights=True).to("cuda")
        transformer, generation = target.transformer, pixart_generation
    schedule = CacheSchedule.fora(6, units_of(transformer), 2)
    harmonica.enable(target, schedule)
    eager = generation(target)
    harmonica.enable(target, schedule, cuda_graphs=True, scheduler_in_graph=scheduler_in_graph)
    generation(target)  # capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        replayed = generation(target)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(eager, replayed)
