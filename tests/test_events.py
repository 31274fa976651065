"""harmonica.events: several listeners of the engine's steps and units at once (NVTX ranges and the graphs'
collective log can listen together), each told in the order it came; the engine's outputs unchanged."""

import pytest
import torch
from _helpers import make_model, units_of
from test_graphs import run

import harmonica
from harmonica import CacheSchedule, events
from harmonica.graphs import CollectiveLog

STEPS = 3


class Recorder:
    def __init__(self, tag: str, told: list, probe=None):
        self.tag, self.told, self.probe = tag, told, probe

    def step_started(self, step):
        self.told.append((self.tag, "step", step))

    def step_finished(self):
        self.told.append((self.tag, "end"))

    def around_unit(self, name, computes, run, *args):
        self.told.append((self.tag, name, computes, None if self.probe is None else self.probe()))
        try:
            return run(*args)
        finally:
            self.told.append((self.tag, "left", name))


@pytest.fixture(autouse=True)
def no_listeners(monkeypatch):
    monkeypatch.setattr(events, "_listening", [])
    monkeypatch.setattr(events, "listener", None)


def test_every_listener_is_told_in_the_order_it_came():
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(STEPS, units_of(model), 2)
    harmonica.enable(model, schedule)
    plain = run(model, STEPS)
    told = []
    first, second = Recorder("a", told), Recorder("b", told)
    for listener in (first, second, first):  # the second listen of `first` changes nothing
        events.listen(listener)
    assert isinstance(events.listener, events.Listeners) and events.listener.listeners == (first, second)
    heard = run(model, STEPS)
    harmonica.disable(model)
    assert all(torch.equal(a, b) for a, b in zip(plain, heard, strict=True))
    names = [name for name, _ in harmonica.units.cached_units(model)]
    expected = []
    for step in range(STEPS):
        expected += [("a", "step", step), ("b", "step", step)]
        for name in names:  # the first listener's around_unit outermost
            computes = bool(schedule.table[step, names.index(name)])
            expected += [("a", name, computes, None), ("b", name, computes, None), ("b", "left", name),
                         ("a", "left", name)]
        expected += [("b", "end"), ("a", "end")]
    assert told == expected
    events.unlisten(first)
    assert events.listener is second
    events.unlisten(second)
    events.unlisten(second)  # not listening: nothing
    assert events.listener is None and events._listening == []


def test_the_collective_log_knows_the_running_unit_beside_another_listener():
    """The log is a listener for its `with` only; a listener that came after it (inside) sees its unit set."""
    model = make_model("tiny-dit")
    harmonica.enable(model, CacheSchedule.fora(STEPS, units_of(model), 2))
    told = []
    outer = Recorder("nvtx", told)
    events.listen(outer)
    with CollectiveLog() as log:
        inner = Recorder("probe", told, probe=lambda: log.unit)
        events.listen(inner)
        run(model, 1)
        events.unlisten(inner)
        assert events._listening == [outer, log]
    harmonica.disable(model)
    assert events.listener is outer and log.unit is None
    probed = [entry for entry in told if entry[0] == "probe" and len(entry) == 4]
    assert probed and all(entry[3] == entry[1] for entry in probed)  # the log's unit: the one running
