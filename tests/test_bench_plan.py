"""`harmonica bench --plan`: the plan lists the rows the suite makes, its arithmetic on known cases, and the
default CUDA suite's size."""

import pytest
import torch

from harmonica.bench import command
from harmonica.bench.configs import parse_config
from harmonica.bench.plan import COSTS, CostModel, decode_macs, plan, row_seconds, total_seconds
from harmonica.bench.suite import PlannedRow, SuiteOptions, plan_group, run_suite
from harmonica.macs import count_macs
from harmonica.schedule import CacheSchedule


def test_plan_lists_the_rows_the_suite_runs():
    options = SuiteOptions(models=("tiny-dit",), configs=("fora:2", "fewer-steps", "fbcache"),
                           modes=("eager", "graphs"), repeat=1, device="cpu")
    planned = [(line.model, line.steps, line.row.config.name, line.row.mode,
                None if line.row.reason else line.row.row_steps, line.row.reason) for line in plan(options)]
    ran = [(r["model"], r["steps"], r["config"], r["mode"], r.get("row_steps"), r["reason"])
           for r in run_suite(options, progress=False)]
    assert planned == ran
    assert [row[2:5] for row in planned if not row[5]] == [
        ("no-cache", "eager", 20), ("fora:2", "eager", 20), ("fewer-steps", "eager", 12), ("fbcache", "eager", 20),
        ("skeleton", "eager", 20)]
    assert ("tiny-dit", 20, "fora:2", "graphs", None, "needs CUDA") in planned


def test_compile_rows_over_the_graph_limit_are_skipped():
    options = SuiteOptions(models=("tiny-dit",), configs=("no-cache", "fora:2"), modes=("graphs", "compile"),
                           max_compiled_graphs=2, device="cuda")
    rows = {(r.config.name, r.mode): r for r in plan_group("tiny-dit", 20, options)}
    assert (rows[("no-cache", "compile")].graphs, rows[("no-cache", "compile")].reason) == (2, None)
    assert rows[("fora:2", "graphs")].graphs == 2 and rows[("fora:2", "graphs")].reason is None
    assert rows[("fora:2", "compile")].reason == "needs 3 compiled graphs, over --max-compiled-graphs 2"
    # no skeleton compile row: no row that runs in compile mode reuses
    assert list(rows) == [("no-cache", "eager"), ("no-cache", "graphs"), ("no-cache", "compile"),
                          ("fora:2", "graphs"), ("fora:2", "compile"), ("skeleton", "graphs")]


COST = CostModel("test", flops=1e9, unit_host_s=1e-3, row_s=1.0, graph_s=0.5, compile_s=20.0, build_s=7.0,
                 start_s=3.0, timing_s=0.0)


@pytest.mark.parametrize("mode,host_s,fixed_s", [
    ("fused", 10 * 4 * 1e-3, 1.0),               # FORA:2 over 20 steps computes 10 steps x 4 units
    ("graphs", 0.0, 1.0 + 2 * 0.5),              # 2 distinct steps: 2 graphs
    ("compile", 0.0, 1.0 + 3 * 0.5 + 3 * 20.0),  # + 1 graph for the first step
])
def test_row_estimate_arithmetic(mode, host_s, fixed_s):
    macs = count_macs("tiny-dit")
    schedule = CacheSchedule.fora(20, 4, 2)
    options = SuiteOptions(models=("tiny-dit",), warmup=1, repeat=5, device="cpu")
    row = PlannedRow(parse_config("fora:2"), mode, 20, schedule)
    transformer_macs = 20 * macs.always_macs + 10 * sum(macs.unit_macs)
    generation = 2 * (2 * transformer_macs + 1e6) / 1e9 + host_s
    assert row_seconds(row, macs, 1e6, options, COST) == pytest.approx(fixed_s + 6 * generation)
    skipped = PlannedRow(parse_config("fora:2"), mode, 20, reason="needs CUDA")
    assert row_seconds(skipped, macs, 1e6, options, COST) == 0.0


def test_peer_rows_count_as_no_cache():
    macs = count_macs("tiny-dit")
    options = SuiteOptions(models=("tiny-dit",), warmup=1, repeat=1, device="cpu")
    peer = PlannedRow(parse_config("fbcache"), "eager", 20)
    no_cache = PlannedRow(parse_config("no-cache"), "eager", 20, CacheSchedule.no_cache(20, 4))
    assert row_seconds(peer, macs, 0.0, options, COST) == row_seconds(no_cache, macs, 0.0, options, COST)
    assert row_seconds(peer, macs, 0.0, options, COST) == pytest.approx(
        1.0 + 2 * (2 * 2 * 20 * macs.total / 1e9 + 20 * 4 * 1e-3))


def test_the_estimate_counts_each_baseline_twice():
    """The suite times each group's baseline again after the group (drift), and the estimate says so."""
    options = SuiteOptions(models=("tiny-dit",), configs=("fora:2",), modes=("eager",), device="cpu")
    lines = plan(options)
    baseline = next(line for line in lines if (line.row.config.name, line.row.mode) == ("no-cache", "eager"))
    cpu = COSTS["cpu"]
    assert total_seconds(lines, options, kernels=False) == pytest.approx(
        cpu.start_s + cpu.build_s + sum(line.seconds for line in lines) + baseline.seconds)


def test_default_cuda_suite_fits_15_minutes_and_full_is_larger():
    default, full = SuiteOptions(device="cuda"), SuiteOptions(device="cuda", full=True)
    default_s = total_seconds(plan(default), default, kernels=True)
    full_lines = plan(full)
    assert default_s <= 15 * 60
    assert total_seconds(full_lines, full, kernels=True) > default_s
    assert {line.model for line in full_lines} == {"dit-xl-2-256", "dit-xl-2-512", "pixart-alpha-256",
                                                   "pixart-alpha-512", "pixart-alpha-1024", "pixart-sigma-2048"}
    assert COSTS["cuda"].flops == 0.4 * 989e12


def test_plan_command_prints_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(command, "run_suite", lambda *a, **k: pytest.fail("--plan ran the suite"))
    monkeypatch.setattr(command, "machine_info", lambda: pytest.fail("--plan read the machine"))
    argv = ["--plan", "--models", "tiny-pixart", "--configs", "fora:2", "--modes", "fused", "graphs"]
    assert command.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Plan of `python -m harmonica.bench --models tiny-pixart --configs fora:2 --modes "
                              "fused graphs` on cpu")
    assert "| tiny-pixart | 64 | 20 | fora:2 | graphs | 20 | - | 0.0 | needs CUDA |" in printed
    # baseline, fora:2 fused and graphs, skeleton fused
    assert ("Suite: 4 rows (3 run, 1 skipped), 1 model builds, 1 warm-up + 5 timed generations per row; each "
            "baseline (no-cache eager) timed again after its group." in printed)
    assert "Cost model (cpu): CPU: simple assumed constants, not measured" in printed
    assert "Nothing was run." in printed


def test_running_cuda_rows_without_cuda_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert command.main(["--device", "cuda", "--models", "tiny-dit"]) == 2
    assert "--device: cuda requested, but torch sees no CUDA device" in capsys.readouterr().err


def test_plan_of_a_flow_preset():
    options = SuiteOptions(models=("tiny-flux",), configs=("fora:2", "magcache"), modes=("eager", "fused"), repeat=1,
                           device="cpu")
    lines = plan(options)
    assert [(line.model, line.resolution, line.steps, line.row.config.name, line.row.mode) for line in lines] == [
        ("tiny-flux", 64, 20, "no-cache", "eager"), ("tiny-flux", 64, 20, "fora:2", "eager"),
        ("tiny-flux", 64, 20, "fora:2", "fused"), ("tiny-flux", 64, 20, "magcache", "eager"),
        ("tiny-flux", 64, 20, "skeleton", "eager"), ("tiny-flux", 64, 20, "skeleton", "fused")]
    assert decode_macs("tiny-flux") == 0  # the transformer alone: no VAE
    macs = count_macs("tiny-flux")
    assert [line.seconds for line in lines] == [row_seconds(line.row, macs, 0.0, options, COSTS["cpu"])
                                                for line in lines]
    assert lines[1].seconds < lines[0].seconds  # FORA:2 computes half the units


def test_plan_of_z_image_turbo_at_its_real_size():
    """The hub model's rows: 1024x1024 at its 9 steps (FORA:2 over 9 steps: 3 distinct rows, 3 graphs), each row's
    estimate from the transformer's MACs at that size (31.25 TMACs per forward) and no VAE (the transformer alone)."""
    options = SuiteOptions(models=("z-image-turbo",), configs=("fora:2",), modes=("eager", "graphs"), repeat=1,
                           device="cuda")
    lines = plan(options)
    assert {(line.model, line.resolution, line.steps) for line in lines} == {("z-image-turbo", 1024, 9)}
    assert [(line.row.config.name, line.row.mode, line.row.graphs, line.row.reason) for line in lines] == [
        ("no-cache", "eager", None, None), ("fora:2", "eager", None, None), ("fora:2", "graphs", 3, None),
        ("skeleton", "eager", None, None), ("skeleton", "graphs", 2, None)]
    macs = count_macs("z-image-turbo")
    assert macs.total / 1e12 == pytest.approx(31.25, abs=0.005) and decode_macs("z-image-turbo") == 0
    assert [line.seconds for line in lines] == [row_seconds(line.row, macs, 0.0, options, COSTS["cuda"])
                                                for line in lines]


def test_plan_of_wan22_a14b_computes_the_boundary_row_and_counts_one_expert_per_step():
    """Wan 2.2 A14B's rows: 720p, 81 frames at its 40 steps; every schedule computes step 17, where the low-noise
    expert begins (FORA:2 is planned as fora:2+row17); each step's estimate from one expert's MACs (a step runs the
    high- or the low-noise expert, never both); a peer, which runs on one transformer, is a stated skip."""
    options = SuiteOptions(models=("wan2.2-t2v-a14b",), configs=("fora:2", "fbcache"), modes=("eager",), repeat=1,
                           device="cuda")
    lines = plan(options)
    assert [(line.resolution, line.steps, line.row.config.name) for line in lines] == [
        (720, 40, "no-cache"), (720, 40, "fora:2"), (720, 40, "fbcache"), (720, 40, "skeleton")]
    fora, peer, skeleton = (line.row for line in lines[1:])
    assert fora.schedule == CacheSchedule.fora(40, 120, 2).computing((17,)) and fora.schedule.name == "fora:2+row17"
    table = skeleton.table.table
    assert table[[0, 17]].all() and not table[1:17].any() and not table[18:].any()
    assert peer.reason == "wan2.2-t2v-a14b's pipeline switches between 2 transformers by step; a peer runs on one"
    macs = count_macs("wan2.2-t2v-a14b")
    assert macs.total == count_macs("wan2.2-t2v-a14b-720p").total
    assert [line.seconds for line in lines] == [row_seconds(line.row, macs, 0.0, options, COSTS["cuda"])
                                                for line in lines]


def test_two_experts_are_refused_under_context_parallelism(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--context-parallel: expected models of one transformer, got tiny-wan2.2, "
                                         r"whose pipeline switches between 2 by step"):
        SuiteOptions(models=("tiny-wan", "tiny-wan2.2"), configs=("fora:2",), modes=("eager",), repeat=1,
                     device="cpu", context_parallel="ulysses=2")
