"""Profiling: NVTX ranges of a cached generation (recorded on the CPU through stand-ins for
torch.cuda.nvtx), the nsys/ncu command lines, the parsers on fixtures in the tools' CSV formats
(tests/fixtures/README.md) and a whole `harmonica profile` session with stand-in tools."""

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harmonica import events, samplers
from harmonica.cli import build_parser, main
from harmonica.models import build_pipeline, preset
from harmonica.profiling import ncu, nsys, nvtx, session, workload
from harmonica.profiling.tables import read_csv

FIXTURES = Path(__file__).parent / "fixtures"
NSYS_REPORTS = {name: (FIXTURES / "nsys" / f"profile_{name}.csv").read_text() for name in nsys.REPORTS}
NCU_RAW = (FIXTURES / "ncu" / "ncu_raw.csv").read_text()


def record_ranges(monkeypatch) -> list:
    """NVTX on through `set_enabled` (as on a CUDA build of torch), pushes and pops recorded as ('push', label) /
    ('pop',); the flag and the engine's listener are restored after the test."""
    pushed = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda label: pushed.append(("push", label)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: pushed.append(("pop",)))
    if not hasattr(torch._C, "_nvtx"):  # a CPU build of torch: set_enabled would stay off
        monkeypatch.setattr(torch._C, "_nvtx", object(), raising=False)
    monkeypatch.setattr(nvtx, "ENABLED", nvtx.ENABLED)  # what set_enabled changes, put back at teardown
    monkeypatch.setattr(events, "listeners", events.listeners)
    nvtx.set_enabled(True)
    assert nvtx.ENGINE_RANGES in events.listeners
    return pushed


@pytest.fixture
def ranges(monkeypatch):
    return record_ranges(monkeypatch)


def tree(recorded) -> list:
    """[(label, children)] of the recorded ranges; fails on a pop without a push or a range left open."""
    root = []
    stack = [root]
    for event in recorded:
        if event[0] == "push":
            stack[-1].append((event[1], []))
            stack.append(stack[-1][-1][1])
        else:
            assert len(stack) > 1, "a pop without a push"
            stack.pop()
    assert len(stack) == 1, f"{len(stack) - 1} ranges left open"
    return root


def expected_step(step: int, path: str, kinds: tuple) -> tuple:
    return (f"step {step}", [(f"transformer_blocks.{i}", [(f"transformer_blocks.{i}.{kind} {path}", [])
                                                          for kind in kinds]) for i in range(2)])


# ---- NVTX ranges ----

@pytest.mark.parametrize("model,kinds,printed", [
    ("tiny-dit", ("attn1", "ff"), "fora:2 (dit-ddim): 2 steps x 4 units, CUR 50.0%"),
    ("tiny-pixart", ("attn1", "attn2", "ff"), "fora:2 (DPMSolverMultistepScheduler): 2 steps x 6 units, CUR 50.0%"),
])
def test_workload_ranges_follow_the_schedule(ranges, capsys, model, kinds, printed):
    assert workload.main(["--model", model, "--random-weights", "--config", "fora:2", "--steps", "2",
                          "--warmup", "0"]) == 0
    # fora:2 computes every unit at step 0 and reuses every unit at step 1
    assert tree(ranges) == [("generation", [expected_step(0, "compute", kinds), ("scheduler step", []),
                                            expected_step(1, "reuse", kinds), ("scheduler step", []),
                                            ("vae decode", [])])]
    out = capsys.readouterr().out
    assert printed in out and "timed generation:" in out and "after 0 warm-up" in out


def test_flow_workload_ranges_follow_the_schedule(ranges, capsys):
    """A flow preset: both FLUX block lists ranged, the solver step ranged, its (random) VAE's decode."""
    assert workload.main(["--model", "tiny-flux", "--random-weights", "--config", "fora:2", "--steps", "2",
                          "--warmup", "0"]) == 0
    blocks = {"transformer_blocks.0": ("attn", "ff", "ff_context"), "single_transformer_blocks.0": ("attn_mlp",)}

    def step(i, path):
        return (f"step {i}", [(block, [(f"{block}.{kind} {path}", []) for kind in kinds])
                              for block, kinds in blocks.items()])

    assert tree(ranges) == [("generation", [step(0, "compute"), ("scheduler step", []), step(1, "reuse"),
                                            ("scheduler step", []), ("vae decode", [])])]
    out = capsys.readouterr().out
    assert "fora:2 (FlowMatchEulerDiscreteScheduler): 2 steps x 4 units, CUR 50.0%" in out
    assert "(decode included)" in out
    with pytest.raises(ValueError, match="--prompt-embeddings: expected only with a text-conditional model, got "
                                         "tiny-dit"):
        workload.main(["--model", "tiny-dit", "--random-weights", "--prompt-embeddings", "p.safetensors"])


def test_nothing_is_pushed_when_off(ranges):
    nvtx.set_enabled(False)
    assert nvtx.ENGINE_RANGES not in events.listeners
    workload.main(["--model", "tiny-dit", "--random-weights", "--config", "fora:2", "--steps", "2", "--warmup", "0"])
    assert ranges == []


def test_a_stepping_schedulers_steps_are_ranged(ranges):
    """PixArt's SA-Solver has no table: `samplers.sample` steps a copy of the scheduler, whose steps are ranged."""
    from harmonica.generation import first_conditions
    from harmonica.models import preset_task
    from harmonica.prompts import random_embeddings

    pipe = build_pipeline("tiny-pixart", random_weights=True)
    bank = random_embeddings(pipe.transformer, 1, 8, torch.Generator().manual_seed(0))
    task = preset_task("tiny-pixart", [pipe.transformer], pipe.scheduler, bank, 3, 4.5, "sa-solver")
    with nvtx.PipelineRanges(pipe):
        samplers.sample(task, first_conditions(preset("tiny-pixart")), samplers.initial_noise(task, 1))
    assert [label for label, _ in tree(ranges) if not label.startswith("transformer_blocks")] == ["scheduler step"] * 3


def test_pipeline_ranges_are_removed():
    pipe = build_pipeline("tiny-dit", random_weights=True)
    solver_step, step, decode = samplers.solver_step, pipe.scheduler.step, pipe.vae.decode
    scheduler_step = samplers.SchedulerSteps.step
    with nvtx.PipelineRanges(pipe):
        assert samplers.solver_step is not solver_step and "step" in vars(pipe.scheduler)
        assert samplers.SchedulerSteps.step is not scheduler_step
        assert len(pipe.transformer.transformer_blocks[0]._forward_pre_hooks) == 1
    assert samplers.solver_step is solver_step and samplers.SchedulerSteps.step is scheduler_step
    assert "step" not in vars(pipe.scheduler) and pipe.scheduler.step == step
    assert "decode" not in vars(pipe.vae) and pipe.vae.decode == decode
    assert not pipe.transformer.transformer_blocks[0]._forward_pre_hooks
    assert not pipe.transformer.transformer_blocks[0]._forward_hooks


@pytest.mark.parametrize("capturing,compiling,recorded", [(False, False, True), (True, False, False),
                                                          (False, True, False)])
def test_no_range_inside_a_graph_capture_or_a_compile_trace(ranges, monkeypatch, capturing, compiling, recorded):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    assert nvtx.call_in_range("unit", lambda x: x + 1, 1) == 2
    assert ranges == ([("push", "unit"), ("pop",)] if recorded else [])


# ---- command lines ----

def test_nsys_command_lines():
    report = Path("/results/run/nsys")
    assert nsys.profile_command(report, ["python", "-m", "w"]) == [
        "nsys", "profile", "-c", "cudaProfilerApi", "-t", "cuda,nvtx,osrt", "--cuda-graph-trace", "node",
        "-o", "/results/run/nsys", "--force-overwrite", "true", "python", "-m", "w"]
    assert nsys.stats_command(report) == [
        "nsys", "stats", "--report", "nvtx_kern_sum,cuda_gpu_kern_sum,nvtx_gpu_proj_trace,cuda_gpu_trace",
        "--format", "csv", "--output", "/results/run/nsys", "--force-export", "true", "/results/run/nsys.nsys-rep"]
    assert nsys.report_path(report, "cuda_gpu_trace") == Path("/results/run/nsys_cuda_gpu_trace.csv")


def test_ncu_command_lines_from_the_cli():
    args = build_parser().parse_args(["profile", "ncu", "--model", "dit-xl-2-256", "--random-weights", "--config",
                                      "fora:2", "--steps", "20", "--mode", "graphs", "--kernel", "gated_residual",
                                      "--nvtx-include", "regex:.* reuse/", "--launch-count", "56"])
    report = Path("/results/run/ncu")
    (profile, profile_out), (imported, imported_out) = session.commands(args, report)
    metrics = ("gpu__time_duration.sum,dram__bytes.sum.per_second,dram__bytes.sum.peak_sustained,"
               "dram__cycles_elapsed.avg.per_second,sm__warps_active.avg.pct_of_peak_sustained_active")
    assert profile == [
        "ncu", "--set", "full", "--metrics", metrics, "--clock-control", "none", "--profile-from-start", "off",
        "--kernel-name", "regex:gated_residual", "--launch-count", "56", "--nvtx", "--nvtx-include", "regex:.* reuse/",
        "--export", "/results/run/ncu", "--force-overwrite",
        sys.executable, "-m", "harmonica.profiling.workload", "--model", "dit-xl-2-256", "--random-weights",
        "--config", "fora:2", "--mode", "graphs", "--warmup", "1", "--seed", "0", "--steps", "20"]
    assert imported == ["ncu", "--import", "/results/run/ncu.ncu-rep", "--csv", "--page", "raw", "--print-units",
                        "base"]
    assert (profile_out, imported_out) == (None, Path("/results/run/ncu_raw.csv"))


@pytest.mark.parametrize("options", [["--model", "tiny-pixart", "--router", "runs/r"],
                                     ["--model", "tiny-wan", "--prompt-embeddings", "p.safetensors"]])
def test_workload_command_line_parses_back_to_the_same_options(options):
    args = build_parser().parse_args(["profile", "nsys", *options, "--warmup", "3", "--seed", "7"])
    argv = workload.workload_argv(args)
    assert argv[:3] == [sys.executable, "-m", "harmonica.profiling.workload"]
    parser = argparse.ArgumentParser()
    workload.add_arguments(parser)
    again = parser.parse_args(argv[3:])
    for option in ("model", "weights", "random_weights", "config", "router", "mode", "steps", "warmup", "seed",
                   "prompt_embeddings"):
        assert getattr(again, option) == getattr(args, option), option


# ---- parsers ----

def test_nsys_per_step_and_per_unit_table():
    stats = nsys.summarize(NSYS_REPORTS["nvtx_kern_sum"], NSYS_REPORTS["nvtx_gpu_proj_trace"],
                           NSYS_REPORTS["cuda_gpu_trace"])
    by_name = {s.name: s for s in stats}
    assert [s.name for s in stats] == [
        "generation", "step 0", "transformer_blocks.0", "transformer_blocks.0.attn1 compute",
        "transformer_blocks.0.ff compute", "scheduler step", "step 1", "transformer_blocks.0.attn1 reuse",
        "transformer_blocks.0.ff reuse", "vae decode"]
    # (instances, kernels, GPU ns, window ns, idle ns, longest gap ns), from the timeline in fixtures/README.md
    expected = {
        "step 0": (1, 8, 1905, 2150, 245, 100),
        "step 1": (1, 3, 110, 230, 120, 70),
        "transformer_blocks.0.attn1 compute": (1, 3, 740, 800, 60, 50),
        "transformer_blocks.0.ff compute": (1, 4, 1115, 1150, 35, 20),
        "transformer_blocks.0.attn1 reuse": (1, 1, 30, 30, 0, 0),
        "transformer_blocks.0": (2, 9, 1915, 2180, 265, 100),
        "scheduler step": (2, 2, 40, 40, 0, 0),
        "generation": (1, 14, 3055, 4100, 1045, 280),
    }
    for name, values in expected.items():
        s = by_name[name]
        assert (s.instances, s.kernels, s.gpu_ns, s.window_ns, s.idle_ns, s.max_gap_ns) == values, name
    text = nsys.format_summary(stats, nsys.top_kernels(NSYS_REPORTS["cuda_gpu_kern_sum"]))
    assert "| step 0 | 1.9 | 8 | 2.1 | 0.2 | 0.1 |" in text
    assert "| transformer_blocks.0.ff | compute | 1 | 1.1 | 4.0 | 0.0 |" in text
    assert "| scheduler step | 2 | 0.0 | 2 | 0.0 | 0.0 |" in text


def test_nsys_top_kernels():
    kernels = nsys.top_kernels(NSYS_REPORTS["cuda_gpu_kern_sum"], count=2)
    assert kernels == [("ampere_fp16_s16816gemm_fp16_128x64_ldg8_f2f_stages_64x4_tn", 3, 1380.0, 45.2),
                       ("sm80_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x32_stage4_"
                        "warpsize2x2x1_g1_tensor16x8x16_kernel", 1, 1000.0, 32.7)]


def test_idle_gaps_of_overlapping_and_clipped_kernels():
    trace = "Start (ns),Duration (ns),Name\n0,10,a\n5,10,b\n30,10,c\n45,100,d\n"
    busy = nsys.busy_intervals(trace)
    assert busy == [(0, 15), (30, 40), (45, 145)]  # a and b overlap (two streams)
    starts = [s for s, _ in busy]
    assert nsys.idle_in((0, 50), busy, starts) == (20, 15)  # gaps [15, 30] and [40, 45]
    assert nsys.idle_in((35, 60), busy, starts) == (5, 5)
    assert nsys.idle_in((150, 160), busy, starts) == (10, 10)


def test_ncu_bandwidth_against_peak_occupancy_and_top_stall():
    gated, copy = ncu.parse_raw(NCU_RAW)
    # three launches of 20, 20 and 10 us: duration-weighted means
    assert (gated.kernel, gated.launches) == ("_gated_residual_fwd_kernel", 3)
    assert gated.duration_us == pytest.approx(50 / 3)
    assert gated.dram_gbps == pytest.approx((2500 * 20 + 2600 * 20 + 2000 * 10) / 50)  # 2440
    assert gated.peak_gbps == pytest.approx(1280 * 2.619)  # bytes/cycle x DRAM GHz
    assert gated.dram_pct_of_peak == pytest.approx(100 * 2440 / 3352.32)
    assert gated.occupancy_pct == pytest.approx(76.8)
    # 'selected' (6.8 cycles/issue) is the issuing itself, not a stall
    assert (gated.top_stall, gated.top_stall_cycles) == ("long_scoreboard", pytest.approx(11.6))
    assert (copy.kernel, copy.launches, copy.duration_us, copy.dram_gbps) == ("_cache_copy_fwd_kernel", 1, 5.0, 1500.0)
    assert (copy.top_stall, copy.top_stall_cycles) == ("wait", 4.0)  # its barrier value is n/a
    assert "| _gated_residual_fwd_kernel | 3 | 16.7 | 2,440.0 | 3,352.3 | 72.8 | 76.8 | long_scoreboard (11.6) |" \
        in ncu.format_summary([gated, copy])


def test_ncu_without_the_bandwidth_metrics_names_them():
    rows = list(csv.reader(io.StringIO(NCU_RAW)))
    drop = rows[0].index("dram__bytes.sum.peak_sustained")
    text = io.StringIO()
    csv.writer(text).writerows([value for i, value in enumerate(row) if i != drop] for row in rows)
    with pytest.raises(ValueError, match=r"expected the metrics \['dram__bytes.sum.peak_sustained'\]"):
        ncu.parse_raw(text.getvalue())


@pytest.mark.parametrize("unit,scale", [("Gbyte/second", 1e9), ("byte/second", 1.0), ("usecond", 1e-6),
                                        ("nsecond", 1e-9), ("second", 1.0), ("ms", 1e-3), ("cycle/nsecond", 1e9),
                                        ("Ghz", 1e9), ("%", 1.0), ("register/thread", 1.0)])
def test_unit_scale(unit, scale):
    assert ncu.unit_scale(unit) == pytest.approx(scale)


def test_csv_after_progress_lines_and_a_missing_header():
    text = "Processing [profile.sqlite] with [cuda_gpu_kern_sum.py]...\n\n\"Time (%)\",\"Name\"\n\"100.0\",\"k\"\n"
    assert read_csv(text, "Time (%)", "cuda_gpu_kern_sum") == [{"Time (%)": "100.0", "Name": "k"}]
    with pytest.raises(ValueError, match=r"cuda_gpu_trace: expected a CSV table whose first column is 'Start \(ns\)'"):
        read_csv("nothing here\n", "Start (ns)", "cuda_gpu_trace")


# ---- sessions ----

FAKE_TOOL = """#!{python}
import os, shutil, sys
args = sys.argv[1:]
with open(os.path.join(os.path.dirname(sys.argv[0]), "calls.txt"), "a") as log:
    log.write(os.environ.get("HARMONICA_NVTX", "-") + " " + os.path.basename(sys.argv[0]) + " " + args[0] + "\\n")
if args[0] == "stats":
    base = args[args.index("--output") + 1]
    for name in args[args.index("--report") + 1].split(","):
        shutil.copy(os.path.join({fixtures!r}, "nsys", "profile_" + name + ".csv"), base + "_" + name + ".csv")
if args[0] == "--import":
    sys.stdout.write(open(os.path.join({fixtures!r}, "ncu", "ncu_raw.csv")).read())
sys.exit({status})
"""


def fake_tools(tmp_path, monkeypatch, status=0) -> Path:
    """`nsys` and `ncu` on PATH that log their calls and write the fixtures instead of profiling."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("nsys", "ncu"):
        path = bin_dir / tool
        path.write_text(FAKE_TOOL.format(python=sys.executable, fixtures=str(FIXTURES), status=status))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_nsys_session_writes_commands_and_summary(tmp_path, monkeypatch, capsys):
    bin_dir = fake_tools(tmp_path, monkeypatch)
    out = tmp_path / "run"
    assert main(["profile", "nsys", "--model", "tiny-dit", "--random-weights", "--config", "fora:2",
                 "--out", str(out)]) == 0
    workload_line = f"{sys.executable} -m harmonica.profiling.workload --model tiny-dit --random-weights " \
                    "--config fora:2 --mode fused --warmup 1 --seed 0"
    assert (out / "command.txt").read_text().splitlines() == [
        f"HARMONICA_NVTX=1 nsys profile -c cudaProfilerApi -t cuda,nvtx,osrt --cuda-graph-trace node -o {out}/nsys "
        f"--force-overwrite true {workload_line}",
        "HARMONICA_NVTX=1 nsys stats --report nvtx_kern_sum,cuda_gpu_kern_sum,nvtx_gpu_proj_trace,cuda_gpu_trace "
        f"--format csv --output {out}/nsys --force-export true {out}/nsys.nsys-rep"]
    assert (bin_dir / "calls.txt").read_text().splitlines() == ["1 nsys profile", "1 nsys stats"]
    summary = json.loads((out / "summary.json").read_text())
    step1 = next(r for r in summary["ranges"] if r["name"] == "step 1")
    assert (step1["gpu_ns"], step1["kernels"], step1["idle_ns"]) == (110, 3, 120)
    assert summary["args"]["config"] == "fora:2" and summary["machine"]["commit"]
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("# nsys: tiny-dit, fora:2, mode fused") and "| step 1 | 0.1 | 3 |" in markdown
    assert "## Per step" in capsys.readouterr().out


def test_ncu_session_summarises_the_imported_raw_page(tmp_path, monkeypatch):
    fake_tools(tmp_path, monkeypatch)
    out = tmp_path / "run"
    assert main(["profile", "ncu", "--model", "tiny-dit", "--random-weights", "--out", str(out)]) == 0
    assert (out / "command.txt").read_text().splitlines()[1] == (
        f"HARMONICA_NVTX=1 ncu --import {out}/ncu.ncu-rep --csv --page raw --print-units base > {out}/ncu_raw.csv")
    kernels = json.loads((out / "summary.json").read_text())["kernels"]
    assert [(k["kernel"], k["launches"], k["top_stall"]) for k in kernels] == [
        ("_gated_residual_fwd_kernel", 3, "long_scoreboard"), ("_cache_copy_fwd_kernel", 1, "wait")]
    assert kernels[0]["dram_pct_of_peak"] == pytest.approx(100 * 2440 / 3352.32)


def test_failing_tool_is_an_error(tmp_path, monkeypatch, capsys):
    fake_tools(tmp_path, monkeypatch, status=3)
    assert main(["profile", "nsys", "--model", "tiny-dit", "--out", str(tmp_path / "run")]) == 2
    assert "`nsys profile` exited with status 3" in capsys.readouterr().err


@pytest.mark.parametrize("tool,product", [("nsys", "NVIDIA Nsight Systems"), ("ncu", "NVIDIA Nsight Compute")])
def test_missing_tool_says_what_to_install(tmp_path, monkeypatch, capsys, tool, product):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "run"
    assert main(["profile", tool, "--model", "tiny-dit", "--random-weights", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"harmonica: error: {tool}: not found on PATH; install {product} (its command-line tool `{tool}`" in error
    assert not out.exists()


def test_nvtx_on_a_torch_without_it_warns_and_stays_off(monkeypatch):
    """A CPU build of torch has no NVTX: HARMONICA_NVTX=1 must not stop a generation."""
    cpu_build = not hasattr(torch._C, "_nvtx")
    monkeypatch.delattr(torch._C, "_nvtx", raising=False)
    monkeypatch.setattr(nvtx, "ENABLED", False)
    with pytest.warns(UserWarning, match="no NVTX"):
        nvtx.set_enabled(True)
    assert nvtx.ENABLED is False
    env = {**os.environ, "HARMONICA_NVTX": "1"}
    code = "import torch; from harmonica.profiling import nvtx; print(nvtx.ENABLED)"
    if cpu_build:  # this torch: the environment variable alone must not break anything
        result = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True)
        assert result.stdout.strip() == "False" and "no NVTX" in result.stderr


def test_the_nvtx_runner_runs_a_script_with_the_ranges_on(monkeypatch, tmp_path):
    # `python -m harmonica.profiling.nvtx SCRIPT ARGS`: the script runs as __main__ with its own argv and the
    # engine's listener set, though it never imports harmonica.profiling
    record_ranges(monkeypatch)
    nvtx.set_enabled(False)
    monkeypatch.setattr(sys, "argv", sys.argv)
    script, out = tmp_path / "user.py", tmp_path / "seen.json"
    script.write_text("import json, sys\nfrom harmonica import events\n"
                      "names = [type(listener).__name__ for listener in events.listeners]\n"
                      "json.dump([__name__, sys.argv, names], open(sys.argv[1], 'w'))\n")
    nvtx.main([str(script), str(out), "--steps", "3"])
    assert json.loads(out.read_text()) == ["__main__", [str(script), str(out), "--steps", "3"], ["EngineRanges"]]
    assert nvtx.ENGINE_RANGES in events.listeners
    with pytest.raises(SystemExit, match="usage"):
        nvtx.main([])


def test_the_cli_loads_the_nvtx_ranges():
    # HARMONICA_NVTX=1 harmonica ...: the CLI imports harmonica.profiling.nvtx, whose import reads the variable
    import harmonica.cli as cli
    assert cli.nvtx is nvtx


def test_workload_of_two_experts_ranges_both(ranges, capsys):
    """Wan 2.2 A14B (tiny): both experts run, one engine each; the block ranges of the high-noise expert at steps 0
    and 1, of the low-noise one from its first step (2, computing) on, the solver step ranged after each."""
    assert workload.main(["--model", "tiny-wan2.2", "--random-weights", "--config", "fora:2", "--steps", "4",
                          "--warmup", "0"]) == 0
    kinds = ("attn1", "attn2", "ffn")
    steps = [(f"step {i}", [(f"blocks.{b}", [(f"blocks.{b}.{kind} {path}", []) for kind in kinds]) for b in range(2)])
             for i, path in enumerate(("compute", "reuse") * 2)]
    assert tree(ranges) == [("generation", [part for step in steps for part in (step, ("scheduler step", []))]
                             + [("vae decode", [])])]
    assert "fora:2 (FlowMatchEulerDiscreteScheduler): 4 steps x 6 units, CUR 50.0%" in capsys.readouterr().out
