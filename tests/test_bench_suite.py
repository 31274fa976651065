"""The sampling suite on CPU: options and their errors, synthetic schedules, quality metrics, gap
arithmetic, tables from a fixed JSON, the peers' unit counting, and a quick end-to-end run."""

import importlib.util
import json
import math

import pytest
import torch

import harmonica
from harmonica.bench import command, peers, table
from harmonica.bench.configs import MODE_OPTIONS, parse_config, synthetic_schedule
from harmonica.bench.gap import attribute_gap
from harmonica.bench.macs import mac_table
from harmonica.bench.peers import UnitCounter, make_peer
from harmonica.bench.quality import psnr, ssim
from harmonica.bench.suite import (
    MATRICES,
    FlowWorkload,
    SuiteOptions,
    _skip_reason,
    latent_psnr,
    run_suite,
    select_models,
)
from harmonica.bench.timing import spread
from harmonica.cli import main as cli_main
from harmonica.macs import count_macs
from harmonica.models import build_pipeline, build_transformer, preset
from harmonica.samplers import dit_ddim_sample
from harmonica.schedule import CacheSchedule

# ---- options ----


def test_models_and_families_by_resolution():
    cpu, cuda, full = (MATRICES[k].models for k in ("cpu", "cuda", "full"))
    assert select_models(None, None, cpu) == ["tiny-dit", "tiny-pixart"]
    assert select_models(["pixart-alpha"], (256, 1024), cuda) == ["pixart-alpha-256", "pixart-alpha-1024"]
    assert select_models(None, (2048,), cuda) == ["pixart-sigma-2048"]
    assert select_models(None, (512,), full) == ["dit-xl-2-512", "pixart-alpha-512"]
    assert select_models(["dit-xl-2-512", "tiny-dit"], None, cpu) == ["dit-xl-2-512", "tiny-dit"]


@pytest.mark.parametrize("models,resolutions,message", [
    (["dit-xl-3"], None, r"--models: expected preset or family names .* got 'dit-xl-3'"),
    (["dit-xl-2"], (1024,), r"--resolutions: dit-xl-2 takes \[256, 512\], got \[1024\]"),
    (["pixart-sigma-2048", "pixart-alpha"], (512,), r"--resolutions: pixart-sigma-2048 takes \[2048\], got \[512\]"),
    (None, (768,), r"--resolutions: none of the default models takes \[768\]"),
])
def test_bad_models_and_resolutions(models, resolutions, message):
    with pytest.raises(ValueError, match=message):
        select_models(models, resolutions, MATRICES["cuda"].models)


@pytest.mark.parametrize("spec,message", [
    ("taylor", r"--configs: expected names from .*'fbcache'.* got 'taylor'"),
    ("fora:x", r"--configs: could not read 'fora:x'"),
    ("fora:0", r"--configs: could not read 'fora:0' \(expected an integer >= 1\)"),
    ("harmonica:0.5", r"--configs: could not read 'harmonica:0.5' \(expected cur=C\)"),
    ("l2c:cur=1.5", r"--configs: could not read 'l2c:cur=1.5' \(expected 0 <= cur < 1\)"),
    ("no-cache:2", r"--configs: could not read 'no-cache:2' \(no-cache takes no parameter\)"),
    ("delta-dit:b=3", r"--configs: could not read 'delta-dit:b=3' \(expected b=B,n=N\[,blocks=C\]\)"),
    ("fbcache:-1", r"--configs: could not read 'fbcache:-1' \(expected a threshold >= 0\)"),
])
def test_bad_configs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_config(spec)


def test_good_configs_and_defaults():
    assert parse_config("harmonica").cur == 0.5 and parse_config("l2c").cur == 0.35
    assert parse_config("harmonica:cur=0.3").cur == 0.3
    assert parse_config("dbcache:0.1").is_peer and not parse_config("fora:2").is_peer
    options = SuiteOptions(models=("dit-xl-2-256", "pixart-alpha-512"), device="cuda", full=True)
    assert options.steps_for("dit-xl-2-256") == (10, 20, 50) and options.steps_for("pixart-alpha-512") == (20,)
    assert SuiteOptions(models=("dit-xl-2-256",), device="cuda").steps_for("dit-xl-2-256") == (20,)
    cpu = SuiteOptions(device="cpu", full=True)  # without CUDA, --full is the tiny models' matrix
    assert (cpu.model_names, cpu.modes) == (["tiny-dit", "tiny-pixart"], MATRICES["cpu"].modes)
    quick = SuiteOptions(models=("dit-xl-2-256",), quick=True, repeat=9, device="cpu")
    assert quick.steps_for("dit-xl-2-256") == (20,) and quick.repeat == 2


@pytest.mark.parametrize("fields,message", [
    ({"modes": ("eager", "fast")},
     r"--modes: expected names from \['eager', 'fused', 'graphs', 'graphs-step', 'compile'\], got 'fast'"),
    ({"repeat": 0}, r"--repeat: expected an integer >= 1, got 0"),
    ({"steps": (20, 1)}, r"--steps: expected step counts >= 2, got \[20, 1\]"),
    ({"max_compiled_graphs": 0}, r"--max-compiled-graphs: expected an integer >= 1, got 0"),
])
def test_bad_suite_options(fields, message):
    with pytest.raises(ValueError, match=message):
        SuiteOptions(device="cpu", **fields)


def test_cli_reports_a_bad_name(capsys):
    assert cli_main(["bench", "--models", "tiny-dot"]) == 2
    assert "harmonica: error: --models: expected preset or family names" in capsys.readouterr().err


def test_kernel_ops_choose_the_micro_benchmarks_cases(capsys, monkeypatch, tmp_path):
    from harmonica.bench import command

    with pytest.raises(SystemExit):
        cli_main(["bench", "--part", "kernels", "--kernel-ops", "reuses"])
    assert "--kernel-ops: invalid choice: 'reuses'" in capsys.readouterr().err
    measured = []
    monkeypatch.setattr(command.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(command, "machine_info", lambda: {"date": "2026-12-04", "commit": "c", "gpu": "g"})
    monkeypatch.setattr(command, "_host_cost", lambda: [])
    monkeypatch.setattr(command, "measure", lambda cases: measured.extend(cases) or [])
    monkeypatch.setattr(command, "format_rows", lambda rows: "")
    monkeypatch.setattr(command, "target_verdict", lambda rows: "")
    assert cli_main(["bench", "--part", "kernels", "--kernel-ops", "forecast", "reuse", "--out",
                     str(tmp_path / "k.json")]) == 0
    assert {case.op for case in measured} == {"forecast", "reuse"} and len(measured) == 16


# ---- synthetic schedules ----


@pytest.mark.parametrize("steps,units,cur", [(20, 56, 0.5), (10, 4, 0.37), (20, 84, 0.55), (50, 56, 0.0)])
def test_synthetic_harmonica_reaches_the_requested_cur(steps, units, cur):
    schedule = synthetic_schedule(steps, units, cur)
    assert schedule.cur == round(cur * steps * units) / (steps * units)
    assert abs(schedule.cur - cur) <= 0.5 / (steps * units)
    assert bool(schedule.table[0].all())
    assert schedule == synthetic_schedule(steps, units, cur)  # deterministic
    assert schedule.name == f"harmonica:synthetic,cur={cur:g}"
    if cur:  # early steps compute more than late ones
        half = steps // 2
        assert schedule.table[:half].float().mean() > schedule.table[half:].float().mean()


def test_synthetic_l2c_keeps_the_alternating_rows():
    schedule = synthetic_schedule(20, 56, 0.35, rule="l2c-alternating")
    forced = CacheSchedule.from_gates(torch.zeros(20, 56), 0.5, "l2c-alternating").table
    assert schedule.cur == round(0.35 * 20 * 56) / (20 * 56)
    assert bool(schedule.table[forced].all())
    with pytest.raises(ValueError, match=r"cur: the l2c-alternating rule reuses at most 0.500 of 20 steps x 56 units"):
        synthetic_schedule(20, 56, 0.6, rule="l2c-alternating")


# ---- quality and timing ----


def test_psnr_and_ssim_on_known_inputs():
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert psnr(image, image) == math.inf
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    x, y = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.3)
    assert psnr(y, x) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-4)  # MSE 0.01, peak-to-peak 2
    mx, my, c1 = 0.6, 0.65, 0.01 ** 2  # in [0, 1]; no variance, so only the luminance term is left
    assert ssim(y, x) == pytest.approx((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1), abs=1e-9)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    assert ssim(image + 0.05 * noise, image) > ssim(image + 0.2 * noise, image) > 0
    with pytest.raises(ValueError, match=r"images, reference: expected two \(B, C, H, W\) tensors of one shape"):
        ssim(image, image[:1])


def test_spread_of_repeats():
    assert spread([3.0, 1.0, 2.0, 4.0]) == {"median": 2.5, "p25": 1.75, "p75": 3.25, "min": 1.0, "max": 4.0, "n": 4}
    assert spread([5.0]) == {"median": 5.0, "p25": 5.0, "p75": 5.0, "min": 5.0, "max": 5.0, "n": 1}


# ---- gap attribution ----


def test_gap_attribution_on_fixed_numbers():
    # T = 10, always-run MAC share a = 0.1, half the unit MACs computed: S = 1 / (0.1 + 0.9 * 0.5) = 1 / 0.55.
    # Baseline: loop 100 ms (t_full 10 ms), text + decode 20 ms. Skeleton step 3 ms: loop 10 + 9 * 3 = 37 ms.
    gap = attribute_gap(steps=10, theoretical=1 / 0.55, always_share=0.1, baseline_loop_ms=100.0,
                        baseline_other_ms=20.0, loop_ms=70.0, other_ms=21.0, skeleton_loop_ms=37.0,
                        graphs_loop_ms=62.0)
    assert gap["ideal_ms"] == pytest.approx(120 * 0.55)
    assert gap["computed_share"] == pytest.approx(0.5)
    assert gap["gap_vae_text_ms"] == pytest.approx(21 - 20 * 0.55)  # 10
    assert gap["gap_always_run_ms"] == pytest.approx(10 * 0.5 * (3 - 0.1 * 10))  # 10
    assert gap["gap_launch_ms"] == pytest.approx(8.0)
    assert gap["gap_overhead_ms"] == pytest.approx((70 - 55) - 10 - 8)  # -3
    assert gap["gap_ms"] == pytest.approx(91 - 66)
    fewer = attribute_gap(steps=10, theoretical=2.0, always_share=0.1, baseline_loop_ms=100.0, baseline_other_ms=20.0,
                          loop_ms=52.0, other_ms=20.0)
    assert fewer["gap_always_run_ms"] is None and fewer["gap_launch_ms"] is None
    assert fewer["gap_overhead_ms"] == pytest.approx(2.0) and fewer["gap_vae_text_ms"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match=r"theoretical, steps, always_share: expected > 0, >= 2, in \[0, 1\)"):
        attribute_gap(steps=1, theoretical=2.0, always_share=0.1, baseline_loop_ms=1, baseline_other_ms=0,
                      loop_ms=1, other_ms=0)


# ---- tables ----

ROWS = [
    {"model": "tiny-dit", "resolution": 64, "steps": 20, "row_steps": 20, "config": "no-cache", "mode": "eager",
     "status": "ok", "reason": None, "synthetic": False, "cur": 0.0, "theoretical_speedup": 1.0,
     "loop_speedup": 1.0, "pipeline_speedup": 1.0, "efficiency": 1.0, "psnr": math.inf, "ssim": 1.0,
     "loop_ms": 40.0, "loop_ms_min": 39.5, "loop_ms_max": 41.25, "pipeline_ms": 45.0, "cache_bytes": 0,
     "retained_bytes": None, "peak_bytes": None, "repeats": 5, "weights": "random", "dtype": "float32"},
    {"model": "tiny-dit", "resolution": 64, "steps": 20, "row_steps": 20, "config": "harmonica", "mode": "fused",
     "status": "ok", "reason": None, "synthetic": True, "cur": 0.5, "theoretical_speedup": 1.6806,
     "loop_speedup": 1.25, "pipeline_speedup": 1.2, "efficiency": 1.25 / 1.6806, "psnr": 31.44, "ssim": 0.98765,
     "loop_ms": 32.0, "loop_ms_min": 31.0, "loop_ms_max": 35.0, "pipeline_ms": 37.5, "cache_bytes": 3 * 2 ** 20,
     "retained_bytes": None, "peak_bytes": 2 ** 30, "repeats": 5, "weights": "random", "dtype": "float32",
     "ideal_ms": 26.78, "gap_ms": 10.72, "gap_always_run_ms": 7.5, "gap_overhead_ms": 1.0, "gap_launch_ms": None,
     "gap_vae_text_ms": 2.22},
    {"model": "tiny-dit", "resolution": 64, "steps": 20, "config": "harmonica", "mode": "graphs",
     "status": "skipped", "reason": "needs CUDA"},
    {"model": "tiny-dit", "resolution": 64, "steps": 20, "config": "fora:2", "mode": "graphs",
     "status": "skipped", "reason": "needs CUDA"},
]

def test_drift_lines_flag_a_baseline_that_moved():
    moved = [{**ROWS[0], "loop_ms_after": 43.0}, {**ROWS[0], "model": "tiny-pixart", "loop_ms_after": 41.0}]
    assert table.format_drift(moved) == (
        "- tiny-dit, 20 steps: baseline loop 40.0 ms first, 43.0 ms after the other rows (+7.5%, above 5%: "
        "differences between its rows that small are the machine's, not theirs)\n"
        "- tiny-pixart, 20 steps: baseline loop 40.0 ms first, 41.0 ms after the other rows (+2.5%, within 5%)")
    assert table.format_drift(ROWS) == "- not measured (results from before the re-timed baseline)"


SUITE_TABLE = """\
| model | res | steps | config | mode | CUR | theoretical | loop speedup | pipeline speedup | efficiency | PSNR dB \
| SSIM | loop ms (min-max) | cache MiB | peak MiB |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| tiny-dit | 64 | 20 | no-cache | eager | 0.0% | 1.00x | 1.00x | 1.00x | 1.00 | inf | 1.0000 | 40.0 (39.5-41.2) \
| 0 | - |
| tiny-dit | 64 | 20 | harmonica* | fused | 50.0% | 1.68x | 1.25x | 1.20x | 0.74 | 31.4 | 0.9877 | 32.0 (31.0-35.0) \
| 3 | 1.02e+03 |"""

GAP_TABLE = """\
| model | steps | config | mode | ideal ms | gap ms | always-run | cache/router overhead | launch gaps | VAE + text |
|---|---|---|---|---|---|---|---|---|---|
| tiny-dit | 20 | harmonica* | fused | 26.8 | 10.7 | 7.5 | 1.0 | - | 2.2 |"""

SKIPPED_TABLE = """\
| model | steps | mode | configs | reason |
|---|---|---|---|---|
| tiny-dit | 20 | graphs | harmonica, fora:2 | needs CUDA |"""


def test_tables_from_fixed_rows():
    assert table.format_suite_table(ROWS) == SUITE_TABLE
    assert table.format_gap_table(ROWS) == GAP_TABLE
    assert table.format_skipped(ROWS) == SKIPPED_TABLE


def test_benchmarks_section_is_regenerated_between_the_markers(tmp_path):
    machine = {"date": "2026-11-22T05:00:00+00:00", "commit": "abc1234", "cpu": "x86_64", "torch": "2.13.0",
               "triton": "3.9.0", "diffusers": "0.42.1"}
    results = {"command": "python -m harmonica.bench", "args": {"warmup": 1}, "machine_before": machine,
               "suite": ROWS}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nhand-written text\n")
    assert table.main([str(path), "--write", "--benchmarks", str(md)]) == 0
    first = md.read_text()
    assert first.startswith("# Benchmarks\n\nhand-written text\n\n" + table.BEGIN)
    assert SUITE_TABLE in first and GAP_TABLE in first and SKIPPED_TABLE in first
    assert ("- Command: `python -m harmonica.bench`; device cpu (x86_64, no GPU); date 2026-11-22; commit abc1234; "
            "torch 2.13.0, triton 3.9.0, diffusers 0.42.1") in first
    assert "Targets: The targets are defined on an H100; this run had no GPU" in first
    md.write_text(first + "\n## Later section\n")
    table.main([str(path), "--write", "--benchmarks", str(md)])
    assert md.read_text() == first + "\n## Later section\n"  # replaced in place, the rest kept
    with pytest.raises(ValueError, match="BENCHMARKS.md: expected both markers"):
        table.update_benchmarks(table.BEGIN + "\nno end", "\n".join([table.BEGIN, "section", table.END]))


def test_flow_rows_get_their_own_section_and_leave_the_dit_pixart_one(tmp_path):
    """A results file of flow presets rewrites only the bench-suite-flow section (SSIM '-': latents have none);
    a file with both kinds writes each kind's rows into its own section."""
    machine = {"date": "2026-11-22T05:00:00+00:00", "commit": "abc1234", "cpu": "x86_64", "torch": "2.13.0",
               "triton": "3.9.0", "diffusers": "0.42.1"}
    flow_rows = [{**row, "model": "tiny-flux", **({"ssim": None} if "ssim" in row else {})} for row in ROWS]
    md = tmp_path / "BENCHMARKS.md"
    kept = f"# B\n\n{table.BEGIN}\nthe DiT/PixArt rows\n{table.END}\n"
    md.write_text(kept)
    for name, rows in (("flow", flow_rows), ("both", ROWS + flow_rows)):
        results = {"command": "python -m harmonica.bench", "args": {"warmup": 1}, "machine_before": machine,
                   "suite": rows}
        (tmp_path / f"{name}.json").write_text(json.dumps(results))
    assert table.main([str(tmp_path / "flow.json"), "--write", "--benchmarks", str(md)]) == 0
    text = md.read_text()
    assert text.startswith(kept) and text.rstrip().endswith(table.FLOW_END)
    flow = text[text.index(table.FLOW_BEGIN):]
    assert "| tiny-flux | 64 | 20 | harmonica* | fused | 50.0% | 1.68x | 1.25x | 1.20x | 0.74 | 31.4 | - |" in flow
    assert "tiny-dit" not in flow and "final latents" in flow
    assert table.main([str(tmp_path / "both.json"), "--write", "--benchmarks", str(md)]) == 0
    text = md.read_text()
    dit, flow = text[text.index(table.BEGIN):text.index(table.END)], text[text.index(table.FLOW_BEGIN):]
    assert SUITE_TABLE in dit and "tiny-flux" not in dit
    assert "tiny-dit" not in flow and "| tiny-flux | 64 | 20 | no-cache | eager |" in flow


def test_table_prints_the_sections_and_writes_the_file_only_with_write(tmp_path, capsys):
    machine = {"date": "2026-11-22T05:00:00+00:00", "commit": "abc1234", "cpu": "x86_64", "torch": "2.13.0",
               "triton": "3.9.0", "diffusers": "0.42.1"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"command": "python -m harmonica.bench", "args": {"warmup": 1},
                                "machine_before": machine, "suite": ROWS}))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    assert table.main([str(path), "--benchmarks", str(md)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(table.BEGIN) and SUITE_TABLE in printed
    assert md.read_text() == "# Benchmarks\n"


def test_kernel_section_from_the_kernel_rows(tmp_path):
    machine = {"date": "2026-11-30T08:00:00+00:00", "commit": "abc1234", "gpu": "NVIDIA H100 80GB HBM3",
               "driver": "570.86", "torch": "2.13.0", "triton": "3.9.0", "diffusers": "0.42.1"}
    rows = [{"kernel": "compute", "provider": provider, "shape": [2, 4096, 1152], "dtype": "bf16", "median": ms,
             "gbps": 2.0, "bytes": 1, "byte_ratio": 1.75, "copy_fraction": 0.057 / ms, "speedup_vs_eager": 0.1 / ms}
            for provider, ms in (("eager", 0.1), ("fused", 0.0625), ("copy", 0.057))]
    kernels, suite = tmp_path / "kernels.json", tmp_path / "suite.json"
    kernels.write_text(json.dumps({"command": "python -m harmonica.bench --part kernels", "machine_before": machine,
                                   "kernels": rows, "suite": []}))
    suite.write_text(json.dumps({"command": "python -m harmonica.bench", "args": {"warmup": 1},
                                 "machine_before": machine, "kernels": [], "suite": ROWS}))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    assert table.main([str(kernels), str(suite), "--write", "--benchmarks", str(md)]) == 0
    text = md.read_text()
    assert text.index(table.KERNELS_BEGIN) < text.index(table.KERNELS_END) < text.index(table.BEGIN)
    assert ("- Command: `python -m harmonica.bench --part kernels`; device NVIDIA H100 80GB HBM3 (driver 570.86); "
            "date 2026-11-30; commit abc1234") in text
    assert "| compute | 2, 4096, 1152 | bf16 | 0.1000 | 0.0625 | 1.60x | 1.75 | 2 |" in text
    assert "Target: target (fused compute, B2 N4096 D1152 bf16): 91% of copy bandwidth" in text
    assert text.rstrip().endswith(table.END) and SUITE_TABLE in text
    (tmp_path / "empty.json").write_text(json.dumps({"kernels": [], "suite": []}))
    with pytest.raises(SystemExit, match="empty.json: expected a results file with kernel, host cost or suite rows"):
        table.main([str(tmp_path / "empty.json"), "--write", "--benchmarks", str(md)])


def test_target_verdicts_on_a_gpu_run():
    rows = [dict(ROWS[1], model="pixart-alpha-256", mode="graphs", efficiency=0.93),
            dict(ROWS[1], model="pixart-alpha-256", config="fbcache", synthetic=False, loop_ms=33.0, psnr=30.0)]
    lines = table.target_verdicts(rows, "cuda")
    assert "efficiency >= 0.90 for pixart-alpha-256 at 20 steps (graphs): 0.93, met" in lines
    assert "efficiency >= 0.95 for pixart-alpha-1024 (graphs): not measured (no such row)" in lines
    assert ("faster than fbcache at >= PSNR, pixart-alpha-256 20 steps: harmonica (graphs) 32.0 ms at 31.4 dB vs "
            "33.0 ms at 30.0 dB, met") in lines
    assert "faster than dbcache at >= PSNR, pixart-alpha-256 20 steps: not measured (no dbcache row)" in lines


# ---- peers and the unit counter ----


@pytest.fixture(scope="module")
def tiny_dit():
    return build_pipeline("tiny-dit", random_weights=True).transformer


def _sample(transformer):
    return dit_ddim_sample(transformer, torch.tensor([1]), num_steps=10, generator=torch.Generator().manual_seed(0))


def test_first_block_cache_skips_all_but_block_zero(tiny_dit):
    reference = _sample(tiny_dit)
    peer = make_peer(parse_config("fbcache:1000"), tiny_dit)  # a threshold every step stays under
    with UnitCounter(peer.transformer) as counter, peer.generation(10):
        cached = _sample(peer.transformer)
    table = counter.table()  # units: block 0 attn1, ff; block 1 attn1, ff
    assert table.shape == (10, 4) and bool(table[0].all())
    assert bool(table[1:, :2].all()) and not bool(table[1:, 2:].any())
    assert not torch.equal(cached, reference)
    assert torch.equal(_sample(tiny_dit), reference)  # the peer ran on a copy


def test_counter_sees_the_engine_schedule(tiny_dit):
    schedule = CacheSchedule.fora(10, 4, 3)
    harmonica.enable(tiny_dit, schedule, fused=False)
    try:
        with UnitCounter(tiny_dit) as counter:
            _sample(tiny_dit)
    finally:
        harmonica.disable(tiny_dit)
    assert torch.equal(counter.table(), schedule.table)


def without_cache_dit(monkeypatch):
    """As if cache-dit were not installed; every other module is found as usual (diffusers, imported later,
    asks for torch this way)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name, *args: None if name == "cache_dit" else find_spec(name, *args))


def test_missing_cache_dit_is_a_skip_reason(tiny_dit, monkeypatch):
    without_cache_dit(monkeypatch)
    with pytest.raises(peers.PeerUnavailable, match=r"cache-dit not installed \(pip install -e '.\[peers\]'\)"):
        make_peer(parse_config("dbcache"), tiny_dit)


# ---- end to end ----


def test_quick_run_on_tiny_dit(tmp_path, monkeypatch, capsys):
    without_cache_dit(monkeypatch)
    monkeypatch.setattr(command, "mac_table", lambda: mac_table(("tiny-dit",)))  # the real presets take seconds
    out = tmp_path / "run.json"
    argv = ["--models", "tiny-dit", "--configs", "fora:2", "harmonica", "fewer-steps", "dbcache",
            "--modes", "eager", "graphs", "--repeat", "1", "--out", str(out), "--no-progress"]
    assert command.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["command"] == ("python -m harmonica.bench --models tiny-dit --configs fora:2 harmonica "
                                  "fewer-steps dbcache --modes eager graphs --repeat 1")
    assert {"machine_before", "machine_after", "macs", "kernels", "suite"} <= set(results)
    assert [r["model"] for r in results["macs"]] == ["tiny-dit"]
    rows = {(r["config"], r["mode"]): r for r in results["suite"]}
    for row in results["suite"]:  # long format: flat rows
        assert all(not isinstance(v, dict) for v in row.values())
    macs = count_macs("tiny-dit")
    base, fora, learned = rows[("no-cache", "eager")], rows[("fora:2", "eager")], rows[("harmonica", "eager")]
    assert (base["cur"], base["theoretical_speedup"], base["psnr"], base["loop_speedup"]) == (0, 1, math.inf, 1)
    assert base["loop_ms_after"] > 0 and "loop_ms_after" not in fora  # the baseline timed again after the group
    assert fora["cur"] == 0.5
    assert fora["theoretical_speedup"] == pytest.approx(CacheSchedule.fora(20, 4, 2).theoretical_speedup(macs))
    assert fora["theoretical_speedup"] == pytest.approx(1.6647, abs=1e-4)
    assert learned["synthetic"] and learned["cur"] == 0.5 and learned["schedule"] == "harmonica:synthetic,cur=0.5"
    matched = synthetic_schedule(20, 4, 0.5).theoretical_speedup(macs)
    assert learned["theoretical_speedup"] == pytest.approx(matched)
    fewer = rows[("fewer-steps", "eager")]
    assert fewer["row_steps"] == round(20 / matched) and fewer["theoretical_speedup"] == pytest.approx(20 / 12)
    assert rows[("dbcache", "eager")]["status"] == "skipped"
    assert rows[("dbcache", "eager")]["reason"] == "cache-dit not installed (pip install -e '.[peers]')"
    assert rows[("skeleton", "eager")]["cur"] == 0.95
    if not torch.cuda.is_available():
        assert rows[("fora:2", "graphs")]["reason"] == "needs CUDA"
    for row in (fora, learned):
        parts = (row["gap_always_run_ms"], row["gap_overhead_ms"], row["gap_launch_ms"] or 0, row["gap_vae_text_ms"])
        assert row["gap_ms"] == pytest.approx(sum(parts))
        assert row["efficiency"] == pytest.approx(row["loop_speedup"] / row["theoretical_speedup"])
        assert 0 < row["psnr"] < math.inf and 0 < row["ssim"] <= 1
    printed = capsys.readouterr().out
    assert "| tiny-dit | 64 | 20 | fora:2 | eager | 50.0% | 1.66x |" in printed
    assert "- tiny-dit, 20 steps: baseline loop " in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in printed
    else:
        assert out.with_suffix(".png").stat().st_size > 0


def test_the_step_inside_the_graph_needs_cuda_and_a_table_sampler():
    config = parse_config("fora:2")
    assert _skip_reason(config, "graphs-step", "cpu", "dit-ddim") == "needs CUDA"
    assert _skip_reason(config, "graphs-step", "cuda", "dpm-solver++") is None
    assert "sa-solver step cannot run inside a graph" in _skip_reason(config, "graphs-step", "cuda", "sa-solver")
    assert MODE_OPTIONS["graphs-step"] == {"cuda_graphs": True, "scheduler_in_graph": True}


@pytest.mark.gpu
def test_graph_and_compile_rows_on_cuda():
    options = SuiteOptions(models=("tiny-pixart",), configs=("fora:2", "harmonica", "fbcache"),
                           modes=("fused", "graphs", "graphs-step", "compile"), repeat=2, device="cuda")
    rows = {(r["config"], r["mode"]): r for r in run_suite(options, progress=False)}
    for config in ("fora:2", "harmonica"):
        fused, graphs, step, compiled = (rows[(config, m)] for m in ("fused", "graphs", "graphs-step", "compile"))
        assert all(r["status"] == "ok" for r in (graphs, step, compiled)), (graphs, step, compiled)
        assert graphs["psnr"] == pytest.approx(fused["psnr"], abs=0.5)  # replays compute what fused computes
        assert step["psnr"] == pytest.approx(graphs["psnr"], abs=0.5)
        assert graphs["retained_bytes"] > 0 and graphs["peak_bytes"] > 0 and graphs["cache_bytes"] > 0
    assert rows[("fora:2", "graphs")]["graphs"] == 2  # two distinct schedule rows
    assert rows[("fbcache", "eager")]["status"] == "ok"
    assert rows[("fora:2", "graphs")]["gap_launch_ms"] is None  # graph rows are the launch-free reference
    assert rows[("fora:2", "fused")]["gap_launch_ms"] is not None


# ---- the tiny flow presets ----

FLOW_STEPS = 4


@pytest.fixture(scope="module")
def tiny_flux():
    return FlowWorkload("tiny-flux", SuiteOptions(models=("tiny-flux",), device="cpu"))


@pytest.mark.parametrize("spec, mixin_hook", [("fbcache:1000", "fbc_leader_block_hook"),
                                              ("taylorseer:2", "taylorseer_cache"),
                                              ("magcache:1000", "mag_cache_leader_block_hook")])
def test_flow_peer_runs_through_enable_cache_and_leaves_nothing(tiny_flux, spec, mixin_hook):
    reference = tiny_flux.loop(None, FLOW_STEPS, tiny_flux.pipe.transformer)
    peer = make_peer(parse_config(spec), tiny_flux.pipe.transformer, FLOW_STEPS)
    try:
        assert peer.transformer.is_cache_enabled and peer.mixin  # diffusers' CacheMixin.enable_cache
        peer.calibrate(lambda: tiny_flux.loop(None, FLOW_STEPS, peer.transformer))
        hooks = {name for module in peer.transformer.modules() if hasattr(module, "_diffusers_hook")
                 for name in module._diffusers_hook.hooks}
        assert mixin_hook in hooks and peers.leftovers(peer.transformer)
        with UnitCounter(peer.transformer) as counter, peer.generation(FLOW_STEPS):
            cached = tiny_flux.loop(None, FLOW_STEPS, peer.transformer)
    finally:
        peer.close()
    assert not peer.transformer.is_cache_enabled and peers.leftovers(peer.transformer) == []
    assert counter.table().shape[0] == FLOW_STEPS and not bool(counter.table().all())  # some unit was skipped
    assert not torch.equal(cached, reference)
    assert torch.equal(tiny_flux.loop(None, FLOW_STEPS, tiny_flux.pipe.transformer), reference)  # ran on a copy


def dbcache_run(workload, steps: int) -> tuple:
    """(units computed per step (steps, K), cached latents, uncached latents) of `workload`'s loop under cache-dit's
    DBCache at a threshold nothing stays under."""
    reference = workload.loop(None, steps, workload.pipe.transformer)
    peer = make_peer(parse_config("dbcache:10"), workload.pipe.transformer, steps)
    try:
        with UnitCounter(peer.transformer) as counter, peer.generation(steps):
            cached = workload.loop(None, steps, peer.transformer)
    finally:
        peer.close()
    return counter.table(), cached, reference


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit (the peers extra) not installed")
def test_dbcache_runs_sd3_through_cache_dits_own_block_pattern():
    """cache-dit takes SD3 only through its pipeline adapter: the transformer alone gets that adapter's blocks
    and pattern; past DBCache's 8 warm-up steps, at a threshold nothing stays under, later steps skip blocks."""
    steps = 12
    workload = FlowWorkload("tiny-sd35", SuiteOptions(models=("tiny-sd35",), device="cpu"))
    computed, cached, reference = dbcache_run(workload, steps)
    assert computed.shape[0] == steps and computed[:8].all() and not computed[8:].all()
    assert not torch.equal(cached, reference)
    assert torch.equal(workload.loop(None, steps, workload.pipe.transformer), reference)  # ran on a copy


@pytest.fixture(scope="module")
def tiny_z_image():
    return FlowWorkload("tiny-z-image", SuiteOptions(models=("tiny-z-image",), device="cpu"))


def test_z_image_peers_run_through_their_apply_functions_or_are_stated_skips(tiny_z_image):
    """Z-Image is no diffusers CacheMixin: TaylorSeer runs through `apply_taylorseer_cache` on its main layers' units
    (some skipped, nothing left after `close`); First Block Cache (its hook reads a `hidden_states` argument the block
    names `x`) and MagCache (enable_cache only) are skips with their reason."""
    reference = tiny_z_image.loop(None, FLOW_STEPS, tiny_z_image.pipe.transformer)
    peer = make_peer(parse_config("taylorseer:2"), tiny_z_image.pipe.transformer, FLOW_STEPS)
    try:
        assert not peer.mixin
        with UnitCounter(peer.transformer) as counter, peer.generation(FLOW_STEPS):
            cached = tiny_z_image.loop(None, FLOW_STEPS, peer.transformer)
    finally:
        peer.close()
    assert peers.leftovers(peer.transformer) == []
    assert counter.table().shape == (FLOW_STEPS, 4) and not bool(counter.table().all())
    assert not torch.equal(cached, reference)
    with pytest.raises(peers.PeerUnavailable, match=r"does not run ZImageTransformer2DModel \(its block's forward "
                                                      r"takes `x`"):
        make_peer(parse_config("fbcache"), tiny_z_image.pipe.transformer)
    with pytest.raises(peers.PeerUnavailable, match="ZImageTransformer2DModel is not a diffusers CacheMixin"):
        make_peer(parse_config("magcache"), tiny_z_image.pipe.transformer, FLOW_STEPS)


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit (the peers extra) not installed")
def test_dbcache_runs_z_image_through_cache_dits_own_adapter(tiny_z_image):
    """cache-dit takes the Z-Image transformer alone through its ZImage adapter (the `layers`): past DBCache's 8
    warm-up steps, at a threshold nothing stays under, the blocks after its first (Fn) are skipped."""
    steps = 12
    computed, cached, reference = dbcache_run(tiny_z_image, steps)
    assert computed[:8].all() and computed[8:, :2].all() and not computed[8:, 2:].any()
    assert not torch.equal(cached, reference)
    assert torch.equal(tiny_z_image.loop(None, steps, tiny_z_image.pipe.transformer), reference)  # ran on a copy


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit (the peers extra) not installed")
@pytest.mark.parametrize("name, layers, skipped", [
    # its two block lists each run Fn = 1 (the longest list's length - 1): their second blocks are skipped;
    # the preset's 1 + 1 layers leave no block past Fn to skip
    ("tiny-flux2", {"num_layers": 2, "num_single_layers": 2}, [3, 4, 5, 7]),
    # cache-dit's adapter says separate CFG forwards; the loop makes one forward per step
    ("tiny-hunyuan-video15", {}, [3, 4, 5]),
], ids=["flux2", "hunyuan-video15"])
def test_dbcache_runs_through_cache_dits_own_adapter(monkeypatch, name, layers, skipped):
    """FLUX.2 and HunyuanVideo 1.5 through cache-dit's own adapters: past DBCache's 8 warm-up steps, at a threshold
    nothing stays under, each block list's blocks after its first are skipped (units by block: FLUX.2's joint
    blocks attn, ff, ff_context, then its single blocks' attn_mlp; HunyuanVideo 1.5's 3 units per block)."""
    for key, value in layers.items():
        monkeypatch.setitem(preset(name).config, key, value)
    steps = 10
    workload = FlowWorkload(name, SuiteOptions(models=(name,), device="cpu"))
    computed, cached, reference = dbcache_run(workload, steps)
    expected = torch.ones_like(computed)
    expected[8:, skipped] = False
    assert torch.equal(computed, expected), computed.int()
    assert not torch.equal(cached, reference)
    assert torch.equal(workload.loop(None, steps, workload.pipe.transformer), reference)  # ran on a copy


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit (the peers extra) not installed")
@pytest.mark.parametrize("name, message", [
    ("tiny-ltx2", r"^dbcache: cache-dit's DBCache does not run LTX2VideoTransformer3DModel \(cache-dit 1\.5\.3's "
                  r"LTX-2 adapter swaps the forward .* without this diffusers' `sigma` and `use_cross_timestep` "
                  r"arguments\)$"),
    ("tiny-flux2", r"^dbcache: cache-dit's DBCache skips no block of Flux2Transformer2DModel \(its block lists of "
                   r"\[1, 1\] blocks each compute their first Fn >= 1\)$"),
], ids=["ltx2", "flux2-1+1-layers"])
def test_dbcache_stated_skips(name, message):
    """A row cache-dit cannot cache is a skip with the reason, not a failure or an uncached row: cache-dit 1.5.3's
    LTX-2 adapter swaps the forward for one without this diffusers' arguments (a TypeError on `sigma`); in tiny FLUX.2's
    two 1-block lists nothing is past Fn."""
    with pytest.raises(peers.PeerUnavailable, match=message):
        make_peer(parse_config("dbcache"), build_transformer(name))


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit (the peers extra) not installed")
def test_dbcache_without_a_cache_dit_adapter_is_a_stated_skip():
    with pytest.raises(peers.PeerUnavailable, match=r"^dbcache: cache-dit has no adapter for Linear$"):
        make_peer(parse_config("dbcache"), torch.nn.Linear(2, 2))


def test_magcache_calibrates_its_ratios(tiny_flux):
    peer = make_peer(parse_config("magcache"), tiny_flux.pipe.transformer, FLOW_STEPS)
    try:
        assert peer.cache_config.calibrate
        peer.calibrate(lambda: tiny_flux.loop(None, FLOW_STEPS, peer.transformer))
    finally:
        peer.close()
    ratios = peer.cache_config.mag_ratios
    assert not peer.cache_config.calibrate and ratios.shape == (FLOW_STEPS,) and ratios[0] == 1.0
    assert peer.cache_config.threshold == peers.MAGCACHE_THRESHOLD and bool((ratios[1:] != 1.0).all())
    with pytest.raises(peers.PeerUnavailable, match="magcache runs through enable_cache; DiTTransformer2DModel "
                                                      "is not a diffusers CacheMixin"):
        make_peer(parse_config("magcache"), build_pipeline("tiny-dit", random_weights=True).transformer, 10)


@pytest.mark.parametrize("name,block", [("tiny-hunyuan-video15", "HunyuanVideo15TransformerBlock"),
                                        ("tiny-ltx2", "LTX2VideoTransformerBlock")])
def test_magcache_on_a_block_diffusers_has_not_registered_is_a_stated_skip(name, block):
    """MagCache hooks read each block through diffusers' TransformerBlockRegistry: a transformer whose block class is
    not there is a skip with that reason before any work, not a failed row."""
    transformer = build_transformer(name)
    assert peers.unregistered_block_classes(transformer) == {block}
    with pytest.raises(peers.PeerUnavailable, match=f"^magcache: diffusers' MagCache does not run .* \\(its block "
                                                    f"class {block} is not in diffusers' TransformerBlockRegistry\\)$"):
        make_peer(parse_config("magcache"), transformer, 10)
    assert peers.unregistered_block_classes(build_transformer("tiny-flux")) == set()


def test_leftovers_names_a_patched_forward(tiny_dit):
    assert peers.leftovers(tiny_dit) == []
    block = tiny_dit.transformer_blocks[1]
    block.forward = lambda *a, **k: None
    try:
        assert peers.leftovers(tiny_dit) == ["transformer_blocks.1"]
    finally:
        del block.forward
    handle = tiny_dit.proj_out_1.register_forward_pre_hook(lambda *_: None)
    assert peers.leftovers(tiny_dit) == ["proj_out_1"]
    handle.remove()


def test_quick_run_on_two_experts():
    """tiny-wan2.2's rows run both experts, one engine each: at 6 steps the low-noise expert begins at step 3, where
    FORA:2 would reuse, so the row runs fora:2+row3 (CUR 2/6) and reuses; a peer, which runs on one transformer, is
    a stated skip."""
    options = SuiteOptions(models=("tiny-wan2.2",), configs=("no-cache", "fora:2", "fbcache"), modes=("eager",),
                           steps=(6,), repeat=1, device="cpu")
    rows = {(r["config"], r["mode"]): r for r in run_suite(options, progress=False)}
    assert list(rows) == [("no-cache", "eager"), ("fora:2", "eager"), ("fbcache", "eager"), ("skeleton", "eager")]
    fora, peer = rows[("fora:2", "eager")], rows[("fbcache", "eager")]
    assert fora["status"] == "ok" and fora["schedule"] == "fora:2+row3" and fora["cur"] == pytest.approx(2 / 6)
    assert math.isfinite(fora["psnr"]) and rows[("skeleton", "eager")]["status"] == "ok"
    assert peer["status"] == "skipped" and peer["reason"] == ("tiny-wan2.2's pipeline switches between 2 "
                                                              "transformers by step; a peer runs on one")
    workload = FlowWorkload("tiny-wan2.2", options)  # the row's generation by hand: both experts enabled
    plain = workload.decode(workload.loop(workload.prompt, 6, workload.pipe.transformer))
    harmonica.enable(workload.transformers, CacheSchedule.fora(6, 6, 2).computing((3,)), fused=False)
    cached = workload.decode(workload.loop(workload.prompt, 6, workload.pipe.transformer))
    harmonica.disable(workload.transformers)
    assert fora["psnr"] == latent_psnr(cached, plain)


def test_quick_run_on_tiny_flux():
    options = SuiteOptions(models=("tiny-flux",), configs=("no-cache", "fora:2", "harmonica", "magcache"),
                           modes=("eager",), steps=(FLOW_STEPS,), repeat=1, device="cpu")
    rows = {(r["config"], r["mode"]): r for r in run_suite(options, progress=False)}
    assert list(rows) == [("no-cache", "eager"), ("fora:2", "eager"), ("harmonica", "eager"), ("magcache", "eager"),
                          ("skeleton", "eager")]
    assert all(r["status"] == "ok" and r["resolution"] == 64 and r["ssim"] is None for r in rows.values())
    macs = count_macs("tiny-flux")
    base, fora, mag = rows[("no-cache", "eager")], rows[("fora:2", "eager")], rows[("magcache", "eager")]
    assert (base["cur"], base["psnr"]) == (0, math.inf)
    assert fora["cur"] == 0.5
    assert fora["theoretical_speedup"] == pytest.approx(CacheSchedule.fora(FLOW_STEPS, len(macs.names), 2)
                                                        .theoretical_speedup(macs))
    assert rows[("harmonica", "eager")]["schedule"] == "harmonica:synthetic,cur=0.5"
    assert "mag_ratios calibrated" in mag["peer_config"]
    for row in (fora, mag):
        assert 0 < row["psnr"] < math.inf


def test_real_flow_presets_run_their_pipeline_steps_and_load_hub_transformers(monkeypatch):
    """flux.1-dev etc. are bench models: their pipeline's default steps (the tiny ones 20), random weights by
    default, the hub transformer with --real-weights (a tiny preset has none: a clear error)."""
    from harmonica.bench import suite

    options = SuiteOptions(models=("flux.1-dev", "tiny-wan"), device="cpu")
    assert options.model_names == ["flux.1-dev", "tiny-wan"]
    assert (options.steps_for("flux.1-dev"), options.steps_for("tiny-wan")) == ((28,), (20,))
    loads = []

    def load(name, *, random_weights, seed, device):  # the tiny transformer of the family stands in for the real one
        loads.append((name, random_weights, device))
        return [build_transformer("tiny-flux", seed=seed, device=device)]

    monkeypatch.setattr(suite, "load_experts", load)
    FlowWorkload("flux.1-dev", SuiteOptions(models=("flux.1-dev",), device="cpu", real_weights=True))
    random = FlowWorkload("flux.1-dev", SuiteOptions(models=("flux.1-dev",), device="cpu"))
    cpu = torch.device("cpu")
    assert loads == [("flux.1-dev", False, cpu), ("flux.1-dev", True, cpu)]
    assert random.task(28).num_steps == 28 and random.task(28).image_seq_len == 4096  # the 1024² FLUX task
    with pytest.raises(ValueError, match="--real-weights: tiny-wan runs with random weights only"):
        FlowWorkload("tiny-wan", SuiteOptions(models=("tiny-wan",), device="cpu", real_weights=True))


def test_random_weights_are_built_on_the_requested_device():
    """A real-size model is initialised where it runs (seconds on a GPU, not minutes of CPU work)."""

    meta = build_transformer("tiny-flux", device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    with torch.device("meta"):  # MAC counting builds real-size models this way: no device means the ambient one
        assert {p.device.type for p in build_transformer("flux.1-dev").parameters()} == {"meta"}
    cpu = build_transformer("tiny-flux", seed=3)
    assert {p.device.type for p in cpu.parameters()} == {"cpu"}
    assert all(torch.equal(a, b) for a, b in zip(cpu.parameters(), build_transformer("tiny-flux", seed=3).parameters()))


def test_fbcache_on_sd3_is_a_stated_skip():
    """diffusers' First Block Cache raises a TypeError inside its hook on SD3 (the last block returns no text
    stream): the row is skipped with the reason, not failed."""

    with pytest.raises(peers.PeerUnavailable, match="does not run SD3Transformer2DModel"):
        make_peer(parse_config("fbcache"), build_transformer("tiny-sd3"))
