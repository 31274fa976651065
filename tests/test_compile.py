"""torch.compile of the cached transformer (CPU, dynamo with a counting backend)."""

import pytest
import torch
from _helpers import make_model, units_of
from test_graphs import MODELS, eager_run, run

import harmonica
from harmonica import CacheSchedule
from harmonica.graphs import graph_plan


@pytest.mark.parametrize("name", MODELS)
def test_compile_traces_one_full_graph_per_schedule_row(name):
    model = make_model(name)
    schedule = CacheSchedule.fora(5, units_of(model), 2)
    eager = eager_run(model, schedule, 5)
    compiled = []

    def counting_backend(graph_module, example_inputs):
        compiled.append(graph_module)
        return graph_module.forward

    harmonica.enable(model, schedule, compile={"backend": counting_backend})
    outputs = run(model, 5) + run(model, 5)
    assert all(torch.equal(a, b) for a, b in zip(eager * 2, outputs))
    # 3 distinct rows, + 1: step 0 allocates the slots that step 2 (same row) finds allocated
    assert len(compiled) == len(set(graph_plan(schedule))) + 1 == 4
    harmonica.disable(model)
    assert "forward" not in vars(model)
