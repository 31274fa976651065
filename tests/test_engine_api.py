"""The engine's outside API (issue 24): no module outside harmonica/engine.py assigns an engine attribute;
they call `set_off`, `seek`, `swap_slots`, `refuse_contexts` instead; adapter state lives per engine and disable
restores exactly what enable found; the engine tells several listeners (events.py), `graphs.CollectiveLog` among
them. Tiny DiT / Wan on CPU."""

import ast
import copy
import functools
from pathlib import Path

import pytest
import torch
from _helpers import make_model, step_inputs, units_of
from test_adapters_wan import make_wan
from test_adapters_wan import step_inputs as wan_inputs
from test_engine import dit_adapter

import harmonica
from harmonica import CacheSchedule, events
from harmonica.graphs import CollectiveLog
from harmonica.units import cached_units

HARMONICA = Path(harmonica.__file__).parent


def _is_engine(node) -> bool:
    """`engine`, `self.engine`, `x.engine`, or any name ending in `engine`."""
    return ((isinstance(node, ast.Name) and node.id.endswith("engine"))
            or (isinstance(node, ast.Attribute) and node.attr == "engine"))


def _targets(node) -> list:
    if isinstance(node, (ast.Tuple, ast.List)):
        return [t for element in node.elts for t in _targets(element)]
    return [node.value] if isinstance(node, ast.Starred) else [node]


def engine_assignments(source: str) -> list:
    """[(line, text)] of every assignment, augmented assignment, deletion, setattr or delattr of an attribute
    of an engine in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets for t in _targets(target)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = [t for target in node.targets for t in _targets(target)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
              and node.args and _is_engine(node.args[0])):
            found.append((node.lineno, ast.unparse(node)))
        found += [(node.lineno, ast.unparse(t)) for t in targets
                  if isinstance(t, ast.Attribute) and _is_engine(t.value)]
    return sorted(found)


def test_the_scan_finds_each_way_of_assigning():
    source = ("engine.mode = 'off'\nself.engine.step = i\na, self.engine.slots = 1, 2\nengine.step += 1\n"
              "setattr(engine, 'x', 1)\ndelattr(self.engine, 'run_unit')\ndel engine.run_unit\n"
              "some_engine.embedding: int = 3\n"
              "engine.seek(1)\nstate.embedding = 1\nx = engine.slots\nengine.modulation.load(0)\n")
    assert [line for line, _ in engine_assignments(source)] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_no_module_outside_the_engine_assigns_an_engine_attribute():
    offenders = [f"{path.relative_to(HARMONICA.parent)}:{line}: {text}"
                 for path in sorted(HARMONICA.rglob("*.py")) if path.name != "engine.py" or path.parent != HARMONICA
                 for line, text in engine_assignments(path.read_text())]
    assert offenders == []


@pytest.fixture
def dit():
    """(model, engine under FORA:2 over 4 steps, K)."""
    model = make_model("tiny-dit")
    K = units_of(model)
    return model, harmonica.enable(model, CacheSchedule.fora(4, K, 2)), K


def forward(model, step):
    with torch.no_grad():
        return model(**step_inputs(model, step)).sample


def count_unit_calls(model) -> list:
    calls = []
    for _, module in cached_units(model):
        module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_set_off_computes_every_unit_and_writes_no_slot(dit):
    model, engine, K = dit
    plain = forward(make_model("tiny-dit"), 1)
    engine.set_off()
    calls = count_unit_calls(model)
    engine.seek(1)  # FORA:2's step 1 reuses every unit
    assert torch.equal(forward(model, 1), plain)
    assert len(calls) == K and engine.swap_slots([None] * K) == [None] * K


def test_seek_runs_the_rows_of_the_step_it_names(dit):
    model, engine, K = dit
    forward(model, 0)
    calls = count_unit_calls(model)
    engine.seek(2)  # without it, step 1: every unit reused
    forward(model, 2)
    assert len(calls) == K and engine.step == 3
    engine.seek(0)  # without it, step 3: every unit reused
    forward(model, 0)
    assert len(calls) == 2 * K
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=rf"^step: expected 0 <= step < 4, got {bad}$"):
            engine.seek(bad)


def test_each_policy_answers_for_the_current_step(dit):
    model, engine, K = dit  # FORA:2: steps 0 and 2 compute every unit, steps 1 and 3 reuse every unit
    keys = []
    for step in range(4):
        engine.seek(step)
        keys.append(engine.graph_key())
        assert [engine.policy.computes(k) for k in range(K)] == [step % 2 == 0] * K
    assert keys[0] == keys[2] != keys[1] == keys[3] and engine.policy.num_steps == 4
    with pytest.raises(ValueError, match=r"^start: expected 0 <= start < 4, got 4$"):
        engine.begin(start=4)
    engine.set_training(torch.ones(3, K), 0.1)
    assert engine.policy.num_steps == 3 and engine.policy.computes(0) and engine.policy.schedule is None
    engine.set_off()
    assert engine.policy.num_steps is None and not engine.policy.caches


def test_swap_slots_replaces_the_slots_and_returns_the_previous(dit):
    model, engine, K = dit
    reference = make_model("tiny-dit")
    harmonica.enable(reference, CacheSchedule.fora(4, K, 2))
    expected = [forward(reference, s) for s in (0, 1)]
    assert torch.equal(forward(model, 0), expected[0])
    filled = engine.swap_slots([None] * K)
    assert all(isinstance(slot, torch.Tensor) for slot in filled)
    with pytest.raises(RuntimeError, match="reuses a cache slot that no earlier step of this generation filled"):
        forward(model, 1)
    assert engine.swap_slots(filled) == [None] * K
    engine.seek(1)
    assert torch.equal(forward(model, 1), expected[1])
    with pytest.raises(ValueError, match=rf"^slots: expected {K} slots, got {K + 1}$"):
        engine.swap_slots([None] * (K + 1))


def two_contexts(model) -> None:
    with torch.no_grad():
        for context in ("cond", "uncond"):
            with model.cache_context(context):
                model(**wan_inputs(0))


def test_refuse_contexts_names_the_reason_at_a_second_context():
    allowed = make_wan()
    harmonica.enable(allowed, CacheSchedule.fora(4, 6, 2))
    two_contexts(allowed)  # two contexts are allowed by default
    model = make_wan()
    harmonica.enable(model, CacheSchedule.fora(4, 6, 2)).refuse_contexts("the test's reason")
    with pytest.raises(ValueError, match=r"^the test's reason: expected one cache context .* 'cond' and 'uncond'"):
        two_contexts(model)


def test_each_engine_has_its_own_adapters_and_disabling_one_leaves_the_other_caching():
    first, second = make_model("tiny-dit"), make_model("tiny-dit")
    with torch.no_grad():
        second.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(0.5)
    twin = copy.deepcopy(second)  # enabled afresh below: the second's reference
    engines = [harmonica.enable(model, CacheSchedule.fora(4, units_of(model), 2)) for model in (first, second)]
    adapters = [dit_adapter(engine) for engine in engines]
    assert adapters[0] is not adapters[1]
    assert [adapter.shared_embedding for adapter in adapters] == [True, False]
    forward(first, 0)
    assert adapters[0].embedding.shape == (2, 16) and adapters[1].embedding is None
    forward(second, 0)
    harmonica.disable(first)
    assert adapters[0].embedding is None and adapters[1].shared_embedding is False
    harmonica.enable(twin, CacheSchedule.fora(4, units_of(twin), 2))
    forward(twin, 0)
    calls = count_unit_calls(second)
    assert torch.equal(forward(second, 1), forward(twin, 1))  # FORA:2's step 1 reuses every unit's step-0 output
    assert calls == [] and engines[1].step == 2


def module_attributes(model) -> dict:
    """Per module: its instance attributes, each hook dict copied (its entries, not the dict object)."""
    return {name: {key: dict(value) if "hook" in key and isinstance(value, dict) else value
                   for key, value in vars(module).items()} for name, module in model.named_modules()}


def attributes(scheduler) -> dict:
    """The scheduler's instance attributes, tensors as lists (a generation makes new ones of equal values)."""
    return {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in vars(scheduler).items()}


class DiTPipe:  # the two attributes enable reads from a pipeline
    def __init__(self):
        from diffusers import DDIMScheduler

        self.transformer, self.scheduler = make_model("tiny-dit"), DDIMScheduler()


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_disable_restores_exactly_the_attributes_enable_found(cuda_graphs):
    """The user's own scheduler.set_timesteps and transformer.forward (instance attributes set before enable) are
    back after disable; one set after enable, over harmonica's, stays."""
    pipe = DiTPipe()
    model, scheduler = pipe.transformer, pipe.scheduler
    model.forward = functools.partial(type(model).forward, model)  # e.g. a profiler's wrapper
    calls = []

    def own(*args, **kwargs):  # e.g. a logging wrapper
        calls.append(args)
        return type(scheduler).set_timesteps(scheduler, *args, **kwargs)

    scheduler.set_timesteps = own
    scheduler.set_timesteps(4)
    before, scheduler_before = module_attributes(model), attributes(scheduler)
    engine = harmonica.enable(pipe, CacheSchedule.fora(4, units_of(model), 2), cuda_graphs=cuda_graphs)
    assert (vars(model)["forward"] is before[""]["forward"]) != cuda_graphs  # the graph runner replaces it
    engine.step = 3
    pipe.scheduler.set_timesteps(4)  # the user's, then harmonica begins a generation
    assert calls == [(4,), (4,)] and engine.step == 0
    harmonica.disable(pipe)
    assert module_attributes(model) == before and attributes(scheduler) == scheduler_before

    harmonica.enable(pipe, CacheSchedule.fora(4, units_of(model), 2), cuda_graphs=cuda_graphs)
    scheduler.set_timesteps = theirs = functools.partial(own)  # set over harmonica's
    harmonica.disable(pipe)
    assert vars(scheduler)["set_timesteps"] is theirs and module_attributes(model) == before


class Recorder(events.Listener):
    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def step_started(self, step):
        self.seen.append((self.name, "step", step))

    def step_finished(self):
        self.seen.append((self.name, "end"))

    def around_unit(self, name, computes, run, *args):
        self.seen.append((self.name, name, computes))
        out = run(*args)
        self.seen.append((self.name, "after"))
        return out


def test_every_listener_is_told_in_the_order_it_listened(dit, monkeypatch):
    model, engine, K = dit
    monkeypatch.setattr(events, "listeners", ())
    seen = []
    first, second = Recorder("a", seen), Recorder("b", seen)
    for listener in (first, second, first):  # a second listen of the same listener changes nothing
        events.listen(listener)
    assert events.listeners == (first, second)
    forward(model, 0)
    names = [name for name, _ in cached_units(model)]
    unit = [[("a", name, True), ("b", name, True), ("b", "after"), ("a", "after")] for name in names]
    assert seen == [("a", "step", 0), ("b", "step", 0), *sum(unit, []), ("b", "end"), ("a", "end")]
    events.unlisten(first)
    events.unlisten(first)  # not listening: a no-op
    seen.clear()
    forward(model, 1)  # FORA:2: step 1 reuses
    assert seen[:2] == [("b", "step", 1), ("b", names[0], False)] and len(seen) == 2 + 2 * K


def test_collective_log_names_the_running_unit_while_entered(dit, monkeypatch):
    model, engine, K = dit
    monkeypatch.setattr(events, "listeners", ())
    log, seen = CollectiveLog(), []
    for _, module in cached_units(model):
        module.register_forward_hook(lambda *_: seen.append(log.unit))
    with log:
        assert events.listeners == (log,)
        forward(model, 0)
    assert seen == [name for name, _ in cached_units(model)] and log.unit is None
    assert events.listeners == () and log.calls == []
