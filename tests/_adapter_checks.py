"""Checks shared by the adapter tests of each diffusers family (tests/test_adapters_*.py) on a tiny model.

`run(model, steps)` is a family's generation: the model's outputs, one (B, ...) tensor per step 0..steps-1."""

import torch
from graph_standin import StandInGraphs, runner_inputs

import harmonica
from harmonica import CacheSchedule
from harmonica.units import cached_units


def distinct_random_parameters(model, std=0.3):
    """Draws every parameter of `model` from N(0, std), each from its own seed: diffusers zero-initialises
    some, and the image and text streams' weights must differ. Returns `model`."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.normal_(0, std, generator=torch.Generator().manual_seed(i))
    return model


@torch.no_grad()
def trajectory(model, steps, inputs):
    """`model(**inputs(s)).sample` for s = 0..steps-1."""
    return [model(**inputs(s)).sample for s in range(steps)]


def all_equal(a, b) -> bool:
    """Whether two sequences of tensors have one length and are bitwise equal pair by pair."""
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_no_cache_is_plain(model, run, units, steps):
    """An all-compute schedule, then `disable`, give the plain model's generation bitwise; no patched
    forward outlives `disable`."""
    plain = run(model, steps)
    harmonica.enable(model, CacheSchedule.no_cache(steps, units))
    harmonica.reset(model)
    assert all_equal(run(model, steps), plain)
    harmonica.disable(model)
    assert all_equal(run(model, steps), plain)
    assert not any("forward" in vars(m) for m in model.modules())


def assert_fora_reuses(model, run, units, joint=(), image_only=(), taps=None):
    """FORA:2 over 4 steps: CUR 50%; reused units do not run (a forward hook on each unit's module records
    (step, unit) calls, which must be the schedule's table); each slot holds its unit's step-2 output,
    which step 3 reuses (step 2's generation is the plain one, step 3's is not).

    joint: units whose slot is (image (B, N, D), text (B, M, D)); image_only: units whose module returns
    both streams but whose slot keeps the image's alone; taps: {unit: module} whose output is the unit's
    fresh output where its module's is not."""
    steps, taps = 4, taps or {}
    plain = run(model, steps)
    schedule = CacheSchedule.fora(steps, units, 2)
    assert schedule.cur == 0.5
    engine = harmonica.enable(model, schedule)
    harmonica.reset(model)
    calls = torch.zeros(steps, units, dtype=torch.bool)
    fresh = {}  # unit -> its output at step 2

    def record(k, call):
        def hook(module, args, output):
            if call:
                calls[engine.step, k] = True
            if engine.step == 2 and (k in taps) != call:
                fresh[k] = output
        return hook

    hooks = [module.register_forward_hook(record(k, True)) for k, (_, module) in enumerate(cached_units(model))]
    hooks += [module.register_forward_hook(record(k, False)) for k, module in taps.items()]
    try:
        cached = run(model, steps)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(calls, schedule.table)
    assert sorted(fresh) == list(range(units))
    for k in range(units):
        slot, expected = engine.slots[k], fresh[k]
        if k in joint:
            assert isinstance(slot, tuple) and all_equal(slot, expected)
        elif k in image_only:
            assert torch.equal(slot, expected[0])
        else:
            assert torch.equal(slot, expected)
    assert torch.equal(cached[2], plain[2]) and not torch.equal(cached[3], plain[3])
    harmonica.disable(model)


def fora_batch_and_rows_alone(model, run_rows, units, steps, batch):
    """FORA:2 generations of a whole batch and of each of its rows alone: (the batch's [(B, ...)] per
    step, [[(1, ...)] per step] per row). run_rows(model, rows): the generation of the batch rows `rows`."""
    harmonica.enable(model, CacheSchedule.fora(steps, units, 2))
    harmonica.reset(model)
    together = run_rows(model, slice(None))
    alone = []
    for row in range(batch):
        harmonica.reset(model)
        alone.append(run_rows(model, slice(row, row + 1)))
    harmonica.disable(model)
    return together, alone


def assert_graph_replay_equals_eager(model, run, units, steps, graph_inputs=list):
    """FORA:2 over `steps` (5: 3 computing patterns captured, 2 replays) under the CPU graph stand-in gives
    the eager engine's generation bitwise. graph_inputs(): tensors besides the runner's a capture may read."""
    schedule = CacheSchedule.fora(steps, units, 2)
    harmonica.enable(model, schedule)
    harmonica.reset(model)
    eager = run(model, steps)
    harmonica.disable(model)
    harmonica.enable(model, schedule, cuda_graphs=True)
    runner = model._harmonica.graphs
    runner.backend = StandInGraphs(lambda: runner_inputs(runner) + graph_inputs())
    harmonica.reset(model)
    replayed = run(model, steps)
    harmonica.disable(model)
    assert all_equal(eager, replayed)
    assert runner.captures == 3 and runner.replays == 2
