"""torch.compile of the cached transformer (CPU): one compiled graph per unit kind, whatever the steps
and schedule rows (dynamo with a counting backend), no compiled state after `disable`, the CUDA-graph
runner on top, NVTX unit ranges kept, and the real inductor backend."""

import pytest
import torch
from _helpers import make_model, step_inputs, units_of
from test_engine import dit_adapter
from test_graphs import eager_run, run
from test_profiling import record_ranges, tree
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.exc import FailOnRecompileLimitHit
from torch._dynamo.utils import counters

import harmonica
from harmonica import CacheSchedule
from harmonica.graphs import graph_plan
from harmonica.samplers import dit_ddim_sample

KINDS = {"tiny-dit": ("attn1", "ff"), "tiny-pixart": ("attn1", "attn2", "ff")}


class CountingBackend:
    """A dynamo backend that records each graph and runs it as traced (bitwise the eager ops)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


class ReplayingGraphs:
    """A graph backend for `GraphRunner` on the CPU: capture records the call and its output, replay re-runs
    the call into that output. No dispatch mode (dynamo refuses to run compiled code under one, so the
    rule-checking `graph_standin.StandInGraphs` cannot host compiled units)."""

    def new_pool(self) -> None:
        pass

    def pool_bytes(self) -> int:
        return 0

    def warm_up(self, fn):
        return fn()

    def capture(self, fn):
        return fn, fn()

    @staticmethod
    def replay(captured):
        fn, output = captured
        output[0].copy_(fn()[0])  # the sample: a diffusers output or a tuple (return_dict=False)
        return output


def many_rows(steps: int, units: int) -> CacheSchedule:
    """Row t computes the units whose bit is set in (2^K - 1 - t) mod 2^K: all at step 0, then every
    compute pattern in turn (each row distinct for 2^K steps)."""
    pattern = (2 ** units - 1 - torch.arange(steps))[:, None] % 2 ** units
    return CacheSchedule((pattern >> torch.arange(units)) % 2 == 1, "many-rows")


def compiled_entries(code) -> int:
    return len(_debug_get_cache_entry_list(code))


@pytest.mark.parametrize("name", list(KINDS))
def test_compiles_once_per_unit_kind_whatever_the_steps_and_rows(name):
    """At 10, 20 and 50 steps, one enable runs FORA:3, then a schedule of many distinct rows."""
    model = make_model(name)
    kinds, units = KINDS[name], units_of(model)
    counts, distinct_keys = [], []
    for steps in (10, 20, 50):
        schedules = CacheSchedule.fora(steps, units, 3), many_rows(steps, units)
        eager = [out for schedule in schedules for out in eager_run(model, schedule, steps)]
        backend = CountingBackend()
        counters.clear()
        engine = harmonica.enable(model, schedules[0], compile={"backend": backend})
        outputs = run(model, steps)
        engine.set_schedule(schedules[1])
        outputs += run(model, steps)
        harmonica.disable(model)
        assert all(torch.equal(a, b) for a, b in zip(eager, outputs, strict=True))
        assert not counters["graph_break"]
        counts.append(len(backend.graphs))
        distinct_keys.append(len(set(schedules[0].step_keys) | set(schedules[1].step_keys)))
    # the whole forward compiled with the cache decisions inside compiles once per distinct step key
    assert distinct_keys == ([13, 18, 18] if name == "tiny-dit" else [13, 22, 52])
    # the blocks of a kind share one graph
    assert counts == [len(kinds)] * 3


def test_dit_modulation_table_and_shared_embedding_share_the_compiled_graphs():
    """`dit_ddim_sample` announces its timesteps (every step's modulations come from the table), plain
    forwards do not (block 0's shared embedding, then each block's linear): the same two graphs serve both."""
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(6, units_of(model), 2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def generation():  # batch 2 as `run`'s (no guidance)
        return dit_ddim_sample(model, torch.tensor([3, 7]), num_steps=6, guidance_scale=1, latents=latents)

    harmonica.enable(model, schedule)
    eager = generation(), run(model, 6)
    backend = CountingBackend()
    engine = harmonica.enable(model, schedule, compile={"backend": backend})
    assert torch.equal(generation(), eager[0]) and engine.modulation_active
    assert all(torch.equal(a, b) for a, b in zip(eager[1], run(model, 6), strict=True))
    assert not engine.modulation_active and dit_adapter(engine).shared_embedding
    harmonica.disable(model)
    assert len(backend.graphs) == 2


@torch._dynamo.config.patch(recompile_limit=1)
def test_disable_leaves_no_compiled_state_and_each_enable_compiles_afresh():
    """With a recompile limit of 1, a second input shape within one enable raises (no fallback to
    eager), while enable -> disable -> enable with another schedule and shape compiles afresh."""
    model = make_model("tiny-dit")
    class_codes = {type(m).forward.__code__ for m in model.modules()}
    for steps, batch in ((3, 2), (4, 1)):
        backend = CountingBackend()
        engine = harmonica.enable(model, CacheSchedule.fora(steps, units_of(model), 2), compile={"backend": backend})
        run(model, steps, batch)
        codes = list(engine._compiled_codes)
        assert [compiled_entries(code) for code in codes] == [1, 0, 1]  # attn1, attn2 (DiT has none), ff
        with pytest.raises(FailOnRecompileLimitHit), torch.no_grad():
            model(**step_inputs(model, 0, 3 - batch))
        harmonica.disable(model)
        assert len(backend.graphs) == 2
        assert [compiled_entries(code) for code in codes] == [0, 0, 0]
        assert not any(compiled_entries(code) for code in class_codes)
        assert not any("forward" in vars(m) for m in model.modules())


def test_compile_with_graph_runner_matches_eager():
    model = make_model("tiny-pixart")
    schedule = many_rows(10, units_of(model))
    eager = eager_run(model, schedule, 10)
    backend = CountingBackend()
    harmonica.enable(model, schedule, cuda_graphs=True, compile={"backend": backend})
    runner = model._harmonica.graphs
    runner.backend = ReplayingGraphs()
    outputs = run(model, 10) + run(model, 10)
    assert all(torch.equal(a, b) for a, b in zip(eager * 2, outputs, strict=True))
    assert (runner.captures, len(backend.graphs)) == (len(set(graph_plan(schedule))), 3)
    harmonica.disable(model)


def test_compiled_units_keep_their_nvtx_ranges(monkeypatch):
    events = record_ranges(monkeypatch)
    model = make_model("tiny-dit")
    harmonica.enable(model, CacheSchedule.fora(2, units_of(model), 2), compile={"backend": CountingBackend()})
    run(model, 2)
    harmonica.disable(model)
    assert tree(events) == [(f"step {t}", [(f"transformer_blocks.{i}.{kind} {path}", []) for i in range(2)
                                           for kind in KINDS["tiny-dit"]])
                            for t, path in enumerate(("compute", "reuse"))]


def test_inductor_matches_eager_within_fp32_rounding():
    model = make_model("tiny-pixart")
    schedule = CacheSchedule.fora(3, units_of(model), 2)
    eager = eager_run(model, schedule, 3)
    harmonica.enable(model, schedule, compile=True)
    compiled = run(model, 3)
    harmonica.disable(model)
    # inductor may reorder each reduction (LayerNorm and linears over D or 4D, softmax and attention over
    # the N tokens): each rounds to ~length x eps, and the blocks run in sequence
    config = model.config
    hidden = config.num_attention_heads * config.attention_head_dim
    tokens = (config.sample_size // config.patch_size) ** 2
    tol = config.num_layers * (7 * hidden + 2 * tokens) * torch.finfo(torch.float32).eps
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=tol * a.abs().max().item())
