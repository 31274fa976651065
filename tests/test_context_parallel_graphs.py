"""CUDA graphs and torch.compile under diffusers' context parallelism (graphs.py, parallel.py), 2 gloo ranks on the CPU.

One spawn of 2 ranks runs every check and writes each rank's findings to a JSON file; the tests below read them.
Per family (tiny FLUX, Wan, Qwen-Image) and kind (Ulysses, ring) of degree 2, each rank samples FORA:2 in one
process, then under context parallelism: eagerly, and twice with cuda_graphs on the strict graph stand-in
(graph_standin.py: a capture may issue collectives, as NCCL allows, and each replay re-issues them). On tiny FLUX
under Ulysses also: a capture whose collectives differ on rank 1 is refused (the schedule check patched out, as if
it had missed the difference); the stand-in refuses a host sync inserted inside each unit, and a graph that does not
wait for the output's all-gather (mutations); cuda_graphs with the unit bodies compiled (counting backend; the graph
backend re-running the compiled step, test_compile.py's) counts dynamo's graphs over four generations (FORA:2 and
all-distinct rows, at 3 and 4 steps) and logs the compiled units' collectives. (Compile counts of Wan and Qwen-Image
under Ulysses after one generation: test_context_parallel.py.)

The stand-ins for what a CPU lacks are test_context_parallel.py's (one accelerator counted, ring's log-sum-exp).
"""

import contextlib
import json
from unittest import mock

import pytest
import torch
from _helpers import rounding_bound
from test_compile import CountingBackend, ReplayingGraphs, many_rows
from test_compile_flow import FAMILIES as FLOW_COMPILED
from test_compile_flow import entries_per_kind
from test_context_parallel import every_case, join_gloo, sharding_terms, spawn_ranks
from test_flow_graphs import cached_tables
from test_flow_graphs import case as flow_case

WORLD = 2
STEPS = 4
FAMILIES = ("tiny-flux", "tiny-wan", "tiny-qwen-image")
KINDS = ("ulysses", "ring")
CASES = [f"{name} {kind}" for kind in KINDS for name in FAMILIES]


def _sample(task, noise):
    from harmonica.flow import flow_sample

    with torch.inference_mode():
        return flow_sample(task, torch.tensor([1]), latents=noise)


def _with_stand_in(transformer, task, schedule):
    """harmonica with cuda_graphs on the strict stand-in: (runner, stand-in)."""
    from graph_standin import StandInGraphs, runner_inputs

    import harmonica

    harmonica.enable(transformer, schedule, cuda_graphs=True)
    runner = transformer._harmonica.graphs
    runner.backend = StandInGraphs(lambda: runner_inputs(runner) + cached_tables(transformer, task))
    return runner, runner.backend


def _compiled_with_graphs(transformer, task, noise) -> dict:
    """One enable with cuda_graphs (the graph backend re-running the step, test_compile.py's) and the unit bodies
    compiled (counting backend) runs FORA:2 and all-distinct rows at 3 and 4 steps: dynamo's graphs after each
    generation and per (block class, unit kind) at the end; the latents and captured collectives of FORA:2 at 4."""
    import harmonica
    from harmonica import CacheSchedule
    from harmonica.units import cached_units

    units = len(cached_units(transformer))
    plan = [schedule for steps in (3, 4) for schedule in (CacheSchedule.fora(steps, units, 2), many_rows(steps, units))]
    backend = CountingBackend()
    engine = harmonica.enable(transformer, plan[0], cuda_graphs=True, compile={"backend": backend})
    runner = transformer._harmonica.graphs
    runner.backend = ReplayingGraphs()
    found = {"after each": []}
    for schedule in plan:
        engine.set_schedule(schedule)
        latents = _sample(task.with_steps(schedule.num_steps), noise)
        found["after each"].append(len(backend.graphs))
        if schedule is plan[2]:  # FORA:2 at 4 steps
            found["latents"] = latents
            found["captured"] = _captured(runner, runner_keys(schedule))
    found["per kind"] = {f"{block} {kind}": n for (block, kind), n in entries_per_kind(engine).items()}
    harmonica.disable(transformer)
    return found


def _differing_collectives(transformer, task, noise, rank) -> str | None:
    """Two steps: all units compute, then rank 0 computes FLUX's joint attention (unit 0) and rank 1 its single
    block's (unit 3), both reusing the rest: the same collectives of the same shapes, from other units. The
    schedule check is patched out (as if it had missed the difference). The refusal's message, else None."""
    import harmonica
    from harmonica import CacheSchedule, parallel

    table = torch.ones(2, 4, dtype=torch.bool)
    table[1] = torch.tensor([rank == 0, False, False, rank == 1])
    with mock.patch.object(parallel, "check_same_schedule"):
        _with_stand_in(transformer, task, CacheSchedule(table, f"rank {rank}'s"))
        try:
            _sample(task.with_steps(2), noise)
            return None
        except ValueError as error:
            return str(error)
        finally:
            harmonica.disable(transformer)


@contextlib.contextmanager
def _host_sync_in_each_unit(engine):
    """Mutation: each unit reads a device value on the host (`float` of a tensor) before computing."""
    run_unit = engine.run_unit

    def run_unit_with_host_sync(k, compute, gate, h):
        def compute_after_sync():
            float((h[0] if isinstance(h, tuple) else h).abs().max())
            return compute()
        return run_unit(k, compute_after_sync, gate, h)

    engine.run_unit = run_unit_with_host_sync
    try:
        yield
    finally:
        del engine.run_unit


def _output_not_waited(engine):
    """Mutation: the runner returns diffusers' gathered output without waiting for its all-gather."""
    from harmonica import graphs

    return mock.patch.object(graphs, "_waited", lambda output: output)


def _capture_refusal(transformer, task, noise, schedule, mutation) -> str | None:
    """FORA:2 with cuda_graphs on the stand-in under `mutation(engine)` (on both ranks): the stand-in's refusal,
    else None."""
    from graph_standin import CaptureViolation

    import harmonica

    _with_stand_in(transformer, task, schedule)
    try:
        with mutation(transformer._harmonica.engine):
            _sample(task, noise)
        return None
    except CaptureViolation as error:
        return str(error)
    finally:
        harmonica.disable(transformer)


def runner_keys(schedule) -> list:
    """The graph runner's key of each step (`engine.graph_key`): rows, writes, no forecast, no modulation table."""
    return [(*key, None, False) for key in schedule.step_keys]


def _captured(runner, keys) -> dict:
    """The runner's captured collectives by the first step of each graph (keys: the runner's key of each step)."""
    return {str(keys.index(key)): calls for key, calls in runner.collectives.items()}


def _family(name, kind, rank) -> dict:
    """The checks of one family and kind on this rank; returns its findings."""
    from diffusers import ContextParallelConfig

    import harmonica
    from harmonica import CacheSchedule
    from harmonica.models import FLOW_PRESETS
    from harmonica.units import cached_units

    transformer, task, noise, schedule = flow_case(name, "cpu")
    found = {}
    engine = harmonica.enable(transformer, schedule)
    single = _sample(task, noise)
    found["terms"] = sharding_terms(engine, FLOW_PRESETS[name].text_tokens, STEPS)
    harmonica.disable(transformer)
    transformer.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": WORLD}))
    harmonica.enable(transformer, schedule)
    eager = _sample(task, noise)
    harmonica.disable(transformer)
    runner, stand_in = _with_stand_in(transformer, task, schedule)
    runs = [_sample(task, noise) for _ in range(2)]
    harmonica.disable(transformer)
    keys = runner_keys(schedule)
    replayed = [t for t in range(STEPS) if keys.index(keys[t]) < t] + list(range(STEPS))  # the second run: all
    found.update({
        "reference_max": single.abs().max().item(),
        "eager vs one process": (eager - single).abs().max().item(),
        "graphs vs eager": [(run - eager).abs().max().item() for run in runs],
        "graphs vs one process": [(run - single).abs().max().item() for run in runs],
        "captures, replays": [runner.captures, runner.replays],
        "rows": {str(keys.index(key)): list(key[0]) for key in runner.collectives},  # by the graph's first step
        "units": [unit for unit, _ in cached_units(transformer)],
        "captured": _captured(runner, keys),
        "issued": stand_in.issued,
        "expected issued": [op for t in replayed for _, op, _ in runner.collectives[keys[t]]],
        "outputs": runs[1].flatten()[:8].tolist(),
    })
    if name == "tiny-flux" and kind == "ulysses":
        try:  # FORA:2 on rank 0, FORA:3 on rank 1
            harmonica.enable(transformer, CacheSchedule.fora(STEPS, len(found["units"]), 2 + rank), cuda_graphs=True)
            found["differing schedule"] = None
        except ValueError as error:
            found["differing schedule"] = str(error)
        found["differing collectives"] = _differing_collectives(transformer, task, noise, rank)
        for label, mutation in (("host sync", _host_sync_in_each_unit), ("output not waited", _output_not_waited)):
            found[label] = _capture_refusal(transformer, task, noise, schedule, mutation)
        found["compiled"] = _compiled_with_graphs(transformer, task, noise)
        found["compiled"]["vs eager"] = (found["compiled"].pop("latents") - eager).abs().max().item()
    return found


def _rank(rank, port, out):
    import torch.distributed as dist

    join_gloo(rank, port)
    try:
        findings = every_case(_family, rank)
    finally:
        dist.destroy_process_group()
    with open(out / f"rank{rank}.json", "w") as f:
        json.dump(findings, f)


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    """The 2 ranks' findings."""
    return spawn_ranks(_rank, tmp_path_factory.mktemp("cp-graphs"))


def _replayed(f):
    return sum(f["captures, replays"])


@pytest.mark.parametrize("case", CASES)
def test_graph_replays_equal_the_eager_generation_under_the_same_ranks(findings, case):
    """FORA:2 on 2 ranks, two generations with cuda_graphs on the stand-in (2 graphs, 6 replays) against the eager
    engine under the same ranks: a replay re-executes the captured ops, collectives included, on the same values in
    the same order, so no rounding differs: bitwise."""
    for found in findings:
        f = found[case]
        assert f["captures, replays"] == [2, 6]
        assert f["graphs vs eager"] == [0.0, 0.0]


@pytest.mark.parametrize("case", CASES)
def test_graph_replays_equal_the_one_process_generation(findings, case):
    """Against the same schedule in one process: rounding only (sharding reorders the attention's reductions; bound
    as in test_context_parallel.py), and the same gathered output on both ranks."""
    for found in findings:
        f = found[case]
        bound = rounding_bound(torch.tensor([f["reference_max"]]), f["terms"])
        for diff in [f["eager vs one process"], *f["graphs vs one process"]]:
            assert diff <= bound, f"{case}: {diff:.3g} > {bound:.3g}"
    assert findings[0][case]["outputs"] == findings[1][case]["outputs"]


@pytest.mark.parametrize("case", CASES)
def test_a_replay_reissues_the_captured_collectives_in_order(findings, case):
    """Each replay issued its graph's captured collectives in the captured order (first generation: steps 2 and 3;
    second: all four); both ranks captured the same ones."""
    for found in findings:
        f = found[case]
        assert f["issued"] == f["expected issued"] and len(f["issued"]) > _replayed(f)
    assert findings[0][case]["captured"] == findings[1][case]["captured"]


@pytest.mark.parametrize("case", CASES)
def test_a_reused_unit_captures_no_collective(findings, case):
    """FORA:2's computing graph: each unit with a context-parallel attention issues its collectives (Ulysses: the
    all-to-alls of q, k, v and the output; ring: one all-gather of k and v) and the output is gathered; its reusing
    graph issues the gather only. Wan's cross-attention (attn2) runs locally: no collective. Qwen-Image's text mask
    is all-gathered (Ulysses) inside the attention."""
    name, kind = case.split()
    per_attention = {"ulysses": ["all_to_all_single"] * 4, "ring": ["all_gather_into_tensor"]}[kind]
    if case == "tiny-qwen-image ulysses":  # its text mask too, all-gathered before the attention
        per_attention = ["all_to_all_single"] * 3 + ["allgather_", "all_to_all_single"]
    for found in findings:
        f = found[case]
        assert sorted(f["rows"].values()) == [[False] * len(f["units"]), [True] * len(f["units"])]
        for graph, calls in f["captured"].items():
            ops = {}
            for unit, op, _ in calls:
                ops.setdefault(unit, []).append(op.split(".")[1])
            gathers = ops.pop(None)
            assert gathers == ["all_gather_into_tensor"]  # the output after proj_out
            computed = [unit for unit, row in zip(f["units"], f["rows"][graph]) if row]
            assert set(ops) <= set(computed)
            assert all(calls == per_attention for calls in ops.values())
            attentions = [u for u in computed if u.endswith(("attn", "attn1", "attn_mlp"))]
            assert sorted(ops) == sorted(attentions)


def test_a_rank_whose_schedule_or_collectives_differ_is_refused(findings):
    """With cuda_graphs, a schedule that differs on rank 1 is refused at enable, as without. Past that check (patched
    out): rank 0 computes FLUX's joint attention where rank 1 computes its single block's, the same collectives of
    the same shapes (gloo pairs them without complaint, and NCCL would) from other units: refused at the capture."""
    for found in findings:
        assert found["tiny-flux ulysses"]["differing schedule"] == (
            "router_or_schedule: expected the same cache schedule on every rank of the context-parallel group, got "
            "rank 1's differing from rank 0's")
        assert found["tiny-flux ulysses"]["differing collectives"] == (
            "cuda_graphs: expected the same collectives captured on every rank of the context-parallel group, got "
            "rank 1's differing from rank 0's (the graph of step 1)")


def test_the_stand_in_refuses_a_host_sync_inside_a_unit(findings):
    """Mutation: each unit reads a device value on the host before computing; under the ranks the stand-in refuses
    the capture (the same setup without it passes above)."""
    for found in findings:
        refusal = found["tiny-flux ulysses"]["host sync"]
        assert refusal is not None and refusal.startswith("capture: host sync (aten.item.default")


def test_the_stand_in_refuses_a_graph_that_does_not_wait_for_its_output_gather(findings):
    """Mutation: the runner hands on diffusers' gathered output (an AsyncCollectiveTensor) unwaited; a GPU capture
    would end with the all-gather's stream unjoined: the stand-in refuses it."""
    for found in findings:
        assert found["tiny-flux ulysses"]["output not waited"] == (
            "capture: a collective whose result the capture never waited for (on a GPU its stream is not joined back "
            "into the captured one)")


def test_compiled_units_with_graphs_do_not_recompile_across_steps_under_ulysses(findings):
    """Tiny FLUX under Ulysses degree 2, cuda_graphs with compiled unit bodies, one enable and four generations
    (FORA:2 and all-distinct rows, 3 and 4 steps): every dynamo graph comes from the first generation, one per
    (block class, unit kind) as in one process (test_compile_flow.py's table: 4); FORA:2 at 4 steps is the eager
    generation bitwise (the counting backend runs the traced ops), and the collective log sees the compiled units'
    collectives as the stand-in's capture saw the eager ones."""
    one_process = {f"{block} {kind}": n for (block, kind), n in FLOW_COMPILED["flux"][2].items()}
    for found in findings:
        f = found["tiny-flux ulysses"]["compiled"]
        assert f["per kind"] == one_process
        assert f["after each"] == [sum(one_process.values())] * 4 == [4] * 4
        assert f["vs eager"] == 0.0
        assert f["captured"] == found["tiny-flux ulysses"]["captured"]


def _cuda_family(name, kind, rank) -> dict:
    """On this rank's GPU: FORA:2 eagerly in one process and under the ranks, then two generations with cuda_graphs
    (real capture: each computing unit's NCCL collectives inside the graphs), without and with compile (inductor)."""
    from diffusers import ContextParallelConfig

    import harmonica
    from harmonica.models import FLOW_PRESETS
    from harmonica.units import cached_units

    transformer, task, noise, schedule = flow_case(name, f"cuda:{rank}")
    engine = harmonica.enable(transformer, schedule)
    single = _sample(task, noise)
    found = {"terms": sharding_terms(engine, FLOW_PRESETS[name].text_tokens, STEPS),
             "units": len(cached_units(transformer)), "reference_max": single.abs().max().item()}
    harmonica.disable(transformer)
    transformer.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": WORLD}))
    harmonica.enable(transformer, schedule)
    eager = _sample(task, noise)
    harmonica.disable(transformer)
    found["eager vs one process"] = (eager - single).abs().max().item()
    keys = runner_keys(schedule)
    for label, compile in (("graphs", False), ("graphs and compile", True)):
        harmonica.enable(transformer, schedule, cuda_graphs=True, compile=compile)
        runs = [_sample(task, noise) for _ in range(2)]
        runner, report = transformer._harmonica.graphs, harmonica.summary(transformer)
        found[label] = {"vs eager": [(run - eager).abs().max().item() for run in runs],
                        "finite": all(bool(torch.isfinite(run).all()) for run in runs),
                        "captures, replays": [runner.captures, runner.replays], "pool bytes": report.graph_pool_bytes,
                        "captured": _captured(runner, keys), "outputs": runs[1].flatten()[:8].tolist()}
        harmonica.disable(transformer)
    return found


def _cuda_rank(rank, port, out):
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=WORLD, device_id=torch.device("cuda", rank),
                            timeout=datetime.timedelta(minutes=3))  # a capture that hangs fails the test
    try:
        findings = every_case(_cuda_family, rank)  # ring: the native op with its log-sum-exp, as on the CPU
    finally:
        dist.destroy_process_group()
    with open(out / f"rank{rank}.json", "w") as f:
        json.dump(findings, f)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 CUDA devices (NCCL: one rank per GPU)")
def test_cuda_graphs_under_context_parallelism_on_two_gpus(tmp_path):
    """2 NCCL ranks, one per GPU (what the CPU stand-in cannot show: NCCL collectives captured in the ranks' graphs
    and replayed in lockstep, each rank's graphs in its own pool): FORA:2 with cuda_graphs, without and with compile,
    equals the eager generation under the same ranks (rounding of the same computation: eps x the longest reduction x
    the steps; compile: inductor may reorder every unit's reductions, x the units), on both ranks alike."""
    findings = spawn_ranks(_cuda_rank, tmp_path)
    for case in CASES:
        for found in findings:
            f = found[case]
            reference = torch.tensor([f["reference_max"]])
            assert f["eager vs one process"] <= rounding_bound(reference, f["terms"])
            for label, terms in (("graphs", f["terms"]), ("graphs and compile", f["terms"] * f["units"])):
                g = f[label]
                assert g["finite"] and g["captures, replays"] == [2, 6] and g["pool bytes"] > 0
                assert max(g["vs eager"]) <= rounding_bound(reference, terms), f"{case} {label}: {g['vs eager']}"
                assert len(g["captured"]) == 2 and all(g["captured"].values())  # the gather, at least
        for label in ("graphs", "graphs and compile"):
            assert findings[0][case][label]["outputs"] == findings[1][case][label]["outputs"]
            assert findings[0][case][label]["captured"] == findings[1][case][label]["captured"]
