"""The CUDA-graph runner: row dedupe, static inputs, recapture triggers (CPU, with the stand-in backend of
graph_standin.py, which keeps a graph's semantics and refuses what a capture forbids), and the real graphs
on CUDA."""

import threading
import warnings

import pytest
import torch
from _helpers import cuda_inputs, make_model, step_inputs, units_of
from graph_standin import CaptureViolation, StandInGraphs, runner_inputs

import harmonica
from harmonica import CacheSchedule
from harmonica import graphs as graphs_module
from harmonica.graphs import StaticInputs, graph_plan, input_signature

MODELS = ["tiny-dit", "tiny-pixart"]


def enable_with_stand_in(model, schedule, **options):
    engine = harmonica.enable(model, schedule, cuda_graphs=True, **options)
    runner = getattr(model, "transformer", model)._harmonica.graphs
    runner.backend = StandInGraphs(lambda: runner_inputs(runner))
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
    assert report.graphs == 3 and report.graph_pool_bytes == runner.backend.pool_bytes() > 0
    assert report.static_bytes == runner.static.nbytes() > 0
    assert "3 CUDA graphs" in str(report)


def test_recapture_on_a_new_batch_shape_or_schedule():
    model = make_model("tiny-dit")
    K = units_of(model)
    engine, runner = enable_with_stand_in(model, CacheSchedule.fora(4, K, 2))
    run(model, 4)
    assert (runner.captures, runner.resets) == (2, 0)
    pool = runner.pool_bytes
    assert pool == runner.backend.pool_bytes() > 0
    single = run(model, 4, batch=1)
    assert (runner.captures, runner.resets) == (4, 1)
    # a fresh pool for the new graphs: the dropped ones' memory is not counted
    assert 0 < runner.pool_bytes == runner.backend.pool_bytes() < pool

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
    harmonica.reset(model)  # a second generation that nothing began would warn of that
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, 4)
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    assert harmonica.summary(model).graphs == 0
    harmonica.disable(model)
    assert "forward" not in vars(model), "disable left the runner in place"


def dit_inputs(device):
    """Latents (2, 4, 8, 8) and class labels (2,) of a DiT generation, on `device`."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return latents.to(device), torch.tensor([3, 7]).to(device)


@torch.no_grad()
def dit_generation(model, inputs, guidance=1.5, steps=6):
    from harmonica.samplers import dit_ddim_sample

    latents, labels = inputs
    return dit_ddim_sample(model, labels, num_steps=steps, guidance_scale=guidance, latents=latents)


def test_dit_sampler_step_inside_the_graphs_equals_the_eager_sampler_bitwise():
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(6, units_of(model), 2)
    inputs = dit_inputs("cpu")
    harmonica.enable(model, schedule)
    eager, eager_guided = dit_generation(model, inputs), dit_generation(model, inputs, guidance=4.0)

    _, runner = enable_with_stand_in(model, schedule, scheduler_in_graph=True)
    first, second = dit_generation(model, inputs), dit_generation(model, inputs)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert (runner.captures, runner.replays, runner.resets) == (2, 4 + 6, 0)
    assert runner.epilogue is None, "the sampler left its step in the runner"
    assert first.data_ptr() != second.data_ptr(), "a result aliases the runner's sample buffer"
    x_bytes, coefficient_bytes = 2 * 4 * 8 * 8 * 4, 5 * 4
    assert runner.static_bytes() == runner.static.nbytes() + x_bytes + coefficient_bytes
    # the guidance scale is baked into the captured step: a new one recaptures
    assert torch.equal(dit_generation(model, inputs, guidance=4.0), eager_guided)
    assert (runner.captures, runner.resets) == (4, 1)

    _, runner = enable_with_stand_in(model, schedule)  # the step after each replay
    assert torch.equal(dit_generation(model, inputs), eager) and runner.epilogue is None and not runner.buffers


def pixart_inputs(device):
    """Prompt embeddings (2, 8, 32) and mask, the unconditional pair and latents (2, 4, 8, 8), on `device`."""
    embeds = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(embeds.shape[:2], device=device)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    return embeds, mask, torch.zeros_like(embeds), mask, latents


@torch.no_grad()
def pixart_generation(pipe, inputs, steps=6):
    from harmonica.samplers import pixart_sample

    *prompt, latents = inputs
    return pixart_sample(pipe, *prompt, num_steps=steps, latents=latents)


def test_pixart_sampler_step_inside_the_graphs_equals_the_eager_sampler_bitwise():
    from harmonica.models import build_pipeline

    pipe = build_pipeline("tiny-pixart", random_weights=True)
    schedule = CacheSchedule.fora(6, units_of(pipe.transformer), 2)
    inputs = pixart_inputs("cpu")
    harmonica.enable(pipe, schedule)
    eager = pixart_generation(pipe, inputs)
    _, runner = enable_with_stand_in(pipe, schedule, scheduler_in_graph=True)
    runner.buffer("x0_prev", (2, 4, 8, 8), torch.float32, "cpu").fill_(float("nan"))  # read at step 0 with c = 0
    first, second = pixart_generation(pipe, inputs), pixart_generation(pipe, inputs)
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


def graphed(fn, inputs, warm_up=None):
    """Warm `warm_up` (default `fn`) up on the stand-in, capture `fn` and replay it once."""
    backend = StandInGraphs(lambda: inputs)
    backend.warm_up(warm_up or fn)
    return backend.replay(backend.capture(fn))


def test_the_stand_in_keeps_graph_semantics():
    x, y = torch.arange(4.0), torch.zeros(4)

    def step():
        y.add_(x)
        return y * 2

    backend = StandInGraphs(lambda: [x, y])
    backend.warm_up(step)
    captured = backend.capture(step)
    assert torch.equal(y, x), "the capture changed an input"
    assert captured.output.isnan().all(), "the captured output holds values before any replay"
    output = backend.replay(captured)
    assert output is captured.output and torch.equal(output, 4 * x) and torch.equal(y, 2 * x)
    assert backend.pool_bytes() == 4 * 4  # y * 2; y.add_ writes in place


HOST_SYNCS = {
    "item": lambda x: x * x.sum().item(),
    "if": lambda x: x + 1 if x[1] > 0 else x,
    "equal": lambda x: x + 1 if torch.equal(x, x) else x,
    "nonzero": lambda x: x.nonzero(),
    "mask": lambda x: x[x > 2],
    "tolist": lambda x: x * len(x.tolist()),
}


@pytest.mark.parametrize("name", HOST_SYNCS)
def test_the_stand_in_refuses_a_host_sync(name):
    x = torch.arange(6.0)
    with pytest.raises(CaptureViolation, match="^capture: host sync"):
        graphed(lambda: HOST_SYNCS[name](x), [x])


def test_the_stand_in_refuses_host_data_and_tensors_that_are_no_graph_input():
    x, outside = torch.arange(6.0), torch.ones(6)
    assert torch.equal(graphed(lambda: x + outside, [x, outside]), x + 1)
    with pytest.raises(CaptureViolation, match=r"^capture: host-to-device copy \(aten.lift_fresh"):
        graphed(lambda: x + torch.tensor([1.0] * 6), [x])
    with pytest.raises(CaptureViolation, match="^capture: aten.add.Tensor reads a .* neither a graph input"):
        graphed(lambda: x + outside, [x])
    with pytest.raises(CaptureViolation, match="^capture: aten.copy_.default reads"):
        graphed(lambda: x.copy_(outside), [x])


def test_the_stand_in_allows_a_number_assigned_into_a_slice():
    """`t[a:b] = number` is a fill whose argument is the number (torch's setitem `fill_`s a 0-d host tensor): a
    replay fills again; `t[i] = number` copies the 0-d host tensor into a 0-d element: a host-to-device copy."""
    x = torch.arange(6.0)

    def fill():
        x[1:3] = 7
        return x * 1

    assert torch.equal(graphed(fill, [x]), torch.tensor([0.0, 7, 7, 3, 4, 5]))
    with pytest.raises(CaptureViolation, match=r"^capture: host-to-device copy \(aten.copy_.default reads a number"):
        graphed(lambda: x.__setitem__(4, 7), [x])


def test_the_stand_in_refuses_memory_outside_the_graphs_pool():
    x, state = torch.arange(6.0), {"buffer": torch.ones(6)}
    backend = StandInGraphs(lambda: [x, state["buffer"]])
    step = lambda: x + state["buffer"]  # noqa: E731
    captured = backend.capture(step)
    assert torch.equal(backend.replay(captured), x + 1)
    state["buffer"] = torch.full((6,), 5.0)  # reallocated after the capture: the graph still reads the old one
    with pytest.raises(CaptureViolation, match="^replay: reads memory that is no graph input any more"):
        backend.replay(captured)

    def scratch():  # allocated on first use: by the warm-up, then again after a drop
        if "scratch" not in state:
            state["scratch"] = torch.empty(6)
        return torch.mul(x, 2, out=state["scratch"])

    backend = StandInGraphs(lambda: [x, state["scratch"]])
    backend.warm_up(scratch)
    captured = backend.capture(scratch)
    assert torch.equal(backend.replay(captured), 2 * x)
    del state["scratch"]
    scratch()
    with pytest.raises(CaptureViolation, match="^replay: reads memory that is no graph input any more"):
        backend.replay(captured)


def test_the_stand_in_replays_the_captured_work_whatever_the_host_state():
    """A GPU replays what was captured: the rows, branch, view and host numbers of the capture, not those the
    Python would pick now (the old stand-in re-ran the Python and gave the host's answer)."""
    x, table = torch.arange(6.0), torch.arange(12.0).view(4, 3)
    host = {"rows": 6, "flag": True, "step": 1, "scale": 2.0}
    cases = {  # step: (capture-time result, what re-running the Python now would give)
        "rows": lambda: x[:host["rows"]] * 2,
        "branch": lambda: x * 2 if host["flag"] else x + 2,
        "view": lambda: table[host["step"]] * 1,
        "float": lambda: x * host["scale"],
    }
    backend = StandInGraphs(lambda: [x, table])
    captured = {name: backend.capture(step) for name, step in cases.items()}
    host.update(rows=3, flag=False, step=2, scale=3.0)
    assert torch.equal(backend.replay(captured["rows"]), 2 * x)
    assert torch.equal(backend.replay(captured["branch"]), 2 * x)
    assert torch.equal(backend.replay(captured["view"]), table[1])
    assert torch.equal(backend.replay(captured["float"]), 2 * x)
    x.add_(1)  # inputs are read at replay time
    assert torch.equal(backend.replay(captured["float"]), 2 * x)


DEVICE_TO_HOST = {
    "cpu": lambda x: x.cpu() + 1,
    "to-cpu": lambda x: x.to("cpu") + 1,
    "synchronize": lambda x: torch.cuda.synchronize() or x + 1,
    "event-query": lambda x: torch.cuda.Event.query(None) or x + 1,
    "stream-synchronize": lambda x: torch.cuda.Stream.synchronize(None) or x + 1,
}


@pytest.mark.parametrize("name", DEVICE_TO_HOST)
def test_the_stand_in_refuses_device_to_host_copies_and_host_waits(name):
    x = torch.arange(6.0)
    with pytest.raises(CaptureViolation, match="^capture: host sync"):
        StandInGraphs(lambda: [x]).capture(lambda: DEVICE_TO_HOST[name](x))


def test_the_stand_in_refuses_a_read_of_host_memory():
    """On a GPU a CPU input (a timestep passed as a CPU tensor, say) is host memory: reading it in a capture is a
    host-to-device copy, and a CPU op on it runs at capture time only."""
    x, on_host = torch.arange(6.0), torch.ones(6)
    backend = StandInGraphs(lambda: [x, on_host], host=lambda: [on_host])
    with pytest.raises(CaptureViolation, match=r"^capture: host-to-device copy \(aten.add.Tensor reads .* host memory"):
        backend.capture(lambda: x + on_host.to(x.device))


def test_a_host_chosen_modulation_row_fails_the_graph_tests(monkeypatch):
    """Mutation: DiT's modulation table read as `table[step]` chosen on the host (instead of copied into its
    step buffer) gives the eager engine's result when the Python re-runs, the capture's row on a GPU: the graph
    test must fail."""
    from harmonica import modulation

    def host_view(self, step):
        self.step_buffer = self.modulations[step]  # a view: its row is fixed at capture

    monkeypatch.setattr(modulation.ModulationTable, "load", host_view)
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(4, units_of(model), 2)
    inputs = dit_inputs("cpu")
    harmonica.enable(model, schedule)
    eager = dit_generation(model, inputs, guidance=1.0, steps=4)
    enable_with_stand_in(model, schedule)
    graphed_outputs = dit_generation(model, inputs, guidance=1.0, steps=4)
    assert not all(torch.equal(a, b) for a, b in zip(eager, graphed_outputs))


def test_the_stand_in_puts_back_the_whole_storage_of_an_input_a_capture_wrote():
    """A graph input may be declared as a view (a row of a table): its whole storage is graph memory, so a capture
    may write another row of it; a GPU capture runs nothing, so that row too must hold its old value (the old
    stand-in put back only the declared view)."""
    state = torch.zeros(2, 3)
    backend = StandInGraphs(lambda: [state[0]])
    captured = backend.capture(lambda: state[1].add_(1) * 2)
    assert torch.equal(state, torch.zeros(2, 3)), "the capture's write outside the declared view stayed"
    assert torch.equal(backend.replay(captured), torch.full((3,), 2.0)) and torch.equal(state[1], torch.ones(3))


def test_a_replay_overwrites_the_outputs_of_the_graphs_captured_after_it_in_its_pool():
    """One pool: the later capture may take memory the earlier one's intermediates freed, so replaying the earlier
    graph overwrites the later graph's output; the earlier output, alive during the later capture, stays. Graphs
    of another pool are untouched."""
    x = torch.arange(4.0)
    backend = StandInGraphs(lambda: [x])
    first, second = backend.capture(lambda: (x * 3) - x), backend.capture(lambda: x + 1)
    assert torch.equal(backend.replay(first), 2 * x) and torch.equal(backend.replay(second), x + 1)
    assert torch.equal(first.output, 2 * x), "a later graph's replay overwrote an earlier graph's live output"
    backend.replay(first)
    assert second.output.isnan().all(), "the earlier graph's replay left the later graph's output intact"
    backend.new_pool()
    third = backend.capture(lambda: x - 1)
    backend.replay(third)
    backend.replay(first)
    assert torch.equal(third.output, x - 1), "a graph of another pool was overwritten"


@torch.no_grad()
def read_one_step_late(model, steps):
    """Each step's output, read only after the next step ran (as a multistep solver keeps the previous one)."""
    outputs, previous = [], None
    for s in range(steps):
        current = model(**step_inputs(model, s)).sample
        if previous is not None:
            outputs.append(previous.clone())
        previous = current
    return outputs + [previous.clone()]


def test_an_uncloned_output_read_after_another_graphs_replay_fails_the_graph_tests(monkeypatch):
    """Mutation: the runner returns each graph's own output, not a copy. Read one step late, every output is read
    before its own graph replays again, so the old stand-in gave the eager result; on a GPU the output of the graph
    captured second lies in memory the first graph's replay reuses. With the copy the outputs are the eager ones."""
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(6, units_of(model), 2)  # graphs A B A B A B
    harmonica.enable(model, schedule)
    eager = read_one_step_late(model, 6)
    _, runner = enable_with_stand_in(model, schedule)
    assert all(torch.equal(a, b) for a, b in zip(eager, read_one_step_late(model, 6)))
    monkeypatch.setattr(graphs_module, "_clone_output", lambda output: output)
    _, runner = enable_with_stand_in(model, schedule)
    late = read_one_step_late(model, 6)
    assert runner.replays == 4 and not all(torch.equal(a, b) for a, b in zip(eager, late))


def test_a_refused_call_the_code_catches_invalidates_the_capture():
    x = torch.arange(6.0)

    def swallowed():  # a fallback that hides the host sync from the caller
        try:
            scale = x.sum().item()
        except RuntimeError:
            scale = 1.0
        return x * scale

    with pytest.raises(CaptureViolation, match=r"^capture: invalidated .*\(host sync \(aten._local_scalar_dense"):
        StandInGraphs(lambda: [x]).capture(swallowed)


def test_another_threads_host_call_fails_during_a_capture_and_invalidates_it():
    """Global capture mode (torch.cuda.graph's default): an unsafe call on another thread while a capture runs
    errors on that thread, and the capture fails."""
    x, refused = torch.arange(6.0), []

    def other_thread():
        try:
            torch.cuda.synchronize()
        except CaptureViolation as error:
            refused.append(error)

    def step():
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        return x * 2

    with pytest.raises(CaptureViolation, match=r"^capture: invalidated .*torch.cuda.synchronize"):
        StandInGraphs(lambda: [x]).capture(step)
    assert len(refused) == 1


def test_the_stand_in_refuses_a_kernel_variant_the_warm_up_did_not_run():
    from harmonica.kernels import gated_residual_compute, solver_step

    gen = torch.Generator().manual_seed(0)
    h, fresh, gate = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen), torch.randn(2, 4)
    wide = torch.randn(2, 3, 8, generator=gen)[..., ::2]  # fresh's values with other strides
    wide.copy_(fresh)
    inputs = [h, fresh, gate, wide]
    plain = lambda: gated_residual_compute(h, fresh)  # noqa: E731
    assert torch.equal(graphed(plain, inputs), h + fresh)
    for other in (lambda: gated_residual_compute(h, fresh, gate), lambda: gated_residual_compute(h, wide)):
        with pytest.raises(CaptureViolation, match="^capture: first launch of .*gated_residual_compute_ref"):
            graphed(other, inputs, warm_up=plain)
    x, coefficients = torch.randn(2, 4, 1, 1, generator=gen), torch.rand(5, generator=gen)
    step = lambda prev: solver_step(x, fresh.view(2, 12, 1, 1), coefficients, x0_prev=prev)  # noqa: E731
    with pytest.raises(CaptureViolation, match="^capture: first launch of a fused-op variant .*solver_step_ref"):
        graphed(lambda: step(x.float()), [x, fresh, coefficients], warm_up=lambda: step(None))


def test_pool_bytes_count_the_segments_of_the_graphs_pool_only():
    segments = [{"segment_pool_id": (0, 0), "total_size": 2 << 20},  # default pool: caches, cuBLAS workspaces
                {"segment_pool_id": (0, 5), "total_size": 20 << 20},
                {"segment_pool_id": [0, 5], "total_size": 2 << 20},
                {"segment_pool_id": (0, 6), "total_size": 1 << 20}]  # the pool before a recapture
    assert graphs_module.pool_segment_bytes(segments, (0, 5)) == 22 << 20
    assert graphs_module.pool_segment_bytes(segments, (1, 5)) == 0


def test_the_warm_up_runs_the_step_twice_on_the_static_buffers():
    model = make_model("tiny-dit")
    _, runner = enable_with_stand_in(model, CacheSchedule.fora(4, units_of(model), 2))
    forward, seen = runner.forward, []

    def spy(*args, **kwargs):
        seen.append(kwargs["hidden_states"].data_ptr())
        return forward(*args, **kwargs)

    runner.forward = spy
    run(model, 1)
    assert seen == [runner.static.kwargs["hidden_states"].data_ptr()] * 3  # warm-up twice, capture


@torch.no_grad()
def test_a_graph_captured_with_the_modulation_table_is_not_replayed_without_it():
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(4, units_of(model), 2)
    inputs = dit_inputs("cpu")
    latents, labels = inputs

    def plain_loop():  # no timesteps announced: the modulation table is off; the arguments passed as `sample` does
        harmonica.reset(model)  # (the timestep a view of one element, as DiTPipeline passes it too)
        return [model(hidden_states=latents, timestep=torch.tensor(t).expand(2), class_labels=labels).sample
                for t in (999, 666, 333, 0)]

    harmonica.enable(model, schedule)
    eager = plain_loop()
    engine, runner = enable_with_stand_in(model, schedule)
    dit_generation(model, inputs, guidance=1.0, steps=4)
    assert engine.modulation_active and runner.captures == 2
    graphed_outputs = plain_loop()
    assert not engine.modulation_active
    assert (runner.captures, runner.resets) == (4, 0)
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed_outputs))


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
        generation, inputs = dit_generation, dit_inputs("cuda")
    else:
        target = build_pipeline("tiny-pixart", random_weights=True).to("cuda")
        transformer, generation, inputs = target.transformer, pixart_generation, pixart_inputs("cuda")
    schedule = CacheSchedule.fora(6, units_of(transformer), 2)
    harmonica.enable(target, schedule)
    eager = generation(target, inputs)
    harmonica.enable(target, schedule, cuda_graphs=True, scheduler_in_graph=scheduler_in_graph)
    generation(target, inputs)  # capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # inputs made before: a blocking upload here would fail the test
    try:
        replayed = generation(target, inputs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(eager, replayed)
