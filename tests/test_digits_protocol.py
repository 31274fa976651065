"""The digits-dit protocol (bench/digits_protocol.py): its statistics on known inputs, and one tiny run."""

import importlib.util
import json
import math
import statistics

import pytest
import torch
from PIL import Image

import harmonica
from harmonica import CacheSchedule
from harmonica.bench import digits_protocol as protocol
from harmonica.bench.table import update_benchmarks
from harmonica.digits import GRID_GAP, GRID_SCALE, SIZE, load_digits_dit


def test_sign_test_is_the_exact_two_sided_binomial():
    assert protocol.sign_test(6, 0) == protocol.sign_test(0, 6) == pytest.approx(2 / 64)
    assert protocol.sign_test(5, 1) == pytest.approx(2 * 7 / 64)
    assert protocol.sign_test(9, 1) == pytest.approx(2 * 11 / 1024)
    assert protocol.sign_test(3, 3) == protocol.sign_test(0, 0) == 1.0


def test_interpolation_is_linear_in_cur_between_bracketing_points():
    curve = [(0.6, 15.0), (0.2, 30.0), (0.4, 25.0)]  # any order
    assert protocol.interpolate(curve, 0.45) == pytest.approx(22.5)
    assert protocol.interpolate(curve, 0.5) == pytest.approx(20.0)
    assert protocol.interpolate(curve, 0.4) == 25.0 and protocol.interpolate(curve, 0.6) == 15.0
    assert protocol.interpolate(curve, 0.1) is None and protocol.interpolate(curve, 0.7) is None
    with_inf = [(0.0, math.inf), (0.5, 20.0)]
    assert protocol.interpolate(with_inf, 0.45) is None and protocol.interpolate(with_inf, 0.5) == 20.0


def test_paired_differences_over_the_seeds_both_define():
    first = {0: 3.0, 1: 5.0, 2: 1.0, 3: None, 4: math.inf}
    second = {0: 1.0, 1: 1.0, 2: 2.0, 3: 0.0, 4: 9.0}
    result = protocol.paired(first, second)
    assert result["seeds"] == [0, 1, 2] and result["differences"] == [2.0, 4.0, -1.0]
    assert result["mean"] == pytest.approx(5 / 3)
    assert result["se"] == pytest.approx(statistics.stdev([2, 4, -1]) / math.sqrt(3))
    assert (result["positive"], result["negative"], result["sign_test_p"]) == (2, 1, 1.0)


def test_a_left_engine_is_caught():
    model = load_digits_dit()
    protocol.check_pristine(model)
    harmonica.enable(model, CacheSchedule.fora(4, 12, 2))
    with pytest.raises(RuntimeError, match="outlived"):
        protocol.check_pristine(model)
    harmonica.disable(model)
    protocol.check_pristine(model)


TINY = dict(seeds=2, workers=0, steps=4, iterations=4, batch=2, refresh=4, lambda_batch=2, samples=10, repeats=1,
            taus=(1e-3, 0.1, 0.99), fora=(2,), delta_dit=((2, 2, 3),), fewer_steps=(2,), search_batch=2,
            search_rounds=1, search_candidates=2, peers=("taylorseer:2", "magcache"), quick=True)


@pytest.fixture(scope="module")
def tiny_results():
    threads = torch.get_num_threads()
    results = protocol.run(protocol.ProtocolConfig(**TINY), "test")
    assert torch.get_num_threads() == threads  # the in-process workers' single thread ends with them
    return results


def test_the_tiny_protocol_end_to_end(tiny_results, tmp_path):
    results = tiny_results
    baselines = {r["config"]: r for r in results["baselines"]}
    uncached = baselines["no-cache"]
    assert uncached["psnr"] == math.inf and uncached["agreement"] == 1.0 and uncached["cur"] == 0
    assert uncached["ssim"] == 1.0 and 0 < baselines["fora:2"]["ssim"] < 1  # SSIM of identical images: exactly 1
    # identical features: 0 up to the float64 eigendecomposition of a rank-deficient covariance (10 samples,
    # 64 features), whose square root turns eps into sqrt(eps): tiny against any real difference
    assert abs(uncached["fd_vs_uncached"]) < 1e-3 * baselines["fora:2"]["fd_vs_uncached"]
    assert baselines["fora:2"]["cur"] == 0.5 and baselines["fewer-steps:2"]["theoretical_speedup"] == 2.0
    assert baselines["fewer-steps:2"]["psnr"] < math.inf
    taylorseer = baselines["taylorseer:2"]  # full steps 0 .. 2, then every 2nd: step 3 predicted
    assert taylorseer["peer"] and taylorseer["cur"] == pytest.approx(0.25) and taylorseer["psnr"] < math.inf
    assert results["skipped"] == [{"config": "magcache", "reason": "magcache runs through enable_cache; "
                                   "DiTTransformer2DModel is not a diffusers CacheMixin"}]
    assert results["reference"] == {"fingerprint": results["reference"]["fingerprint"],
                                    "equal_to_second_fresh_load": True, "equal_in_every_worker": True}
    routers = results["routers"]
    assert sorted((r["objective"], r["seed"]) for r in routers) == sorted(
        (o, s) for o in protocol.OBJECTIVES for s in range(2))
    search = [r for r in routers if r["objective"] == "search"]
    for r in search:  # logits +-5: the searched table at every tau in (0.007, 0.993), all-compute below
        assert {t: row["cur"] for row in r["curve"] for t in row["taus"]} == {1e-3: 0.0, 0.1: 0.5, 0.99: 0.5}
    for r in routers:
        curs = [row["cur"] for row in r["curve"]]
        assert curs == sorted(curs) and len(set(curs)) == len(curs)  # distinct schedules, nested in tau
        assert sorted(t for row in r["curve"] for t in row["taus"]) == sorted(TINY["taus"])
        assert r["rule"] == ("l2c-alternating" if r["objective"] == "l2c" else "harmonica")
        if r["objective"] == "l2c":
            assert max(curs) <= 0.5
        points = [(row["cur"], row["psnr"]) for row in r["curve"]]
        assert r["metrics"]["psnr_at_cur_0.50"] == protocol.interpolate(points, 0.5)
        assert r["metrics"]["ssim_at_tau"] == next(row["ssim"] for row in r["curve"] if 0.1 in row["taus"])
    assert len(results["paired"]) == 3 * len(protocol.COMPARED) + 2 == len(results["outcome"])
    forecast_row = baselines["fora:2+forecast"]  # FORA:2 with its fitted forecast: the same cost, another image
    assert forecast_row["forecast"] and forecast_row["cur"] == 0.5
    assert forecast_row["psnr"] != baselines["fora:2"]["psnr"]
    assert all(isinstance(r["forecast"], bool) for r in routers)
    for static, with_forecast in zip(results["paired"][-2:], (False, True)):  # without, then with the forecast
        best = max((b for b in results["baselines"] if b["cur"] >= 0.5 and not b.get("peer")
                    and b.get("forecast", False) == with_forecast), key=lambda b: b["psnr"])
        assert static["second"] == f"best static ({best['config']})"
        assert static["differences"] == [r["metrics"]["psnr_at_cur_0.50"] - best["psnr"] for r in search]
    path = protocol.write_outputs(results, tmp_path, write_benchmarks=False, progress=lambda _: None)
    assert json.loads(path.read_text())["eval_seed"] == protocol.EVAL_SEED
    for objective in protocol.OBJECTIVES:
        grid = Image.open(path.with_name(f"{path.stem}-grid-{objective}.png"))
        assert grid.size[0] == 10 * (SIZE * GRID_SCALE + GRID_GAP) + GRID_GAP  # one column per class
    drawn = importlib.util.find_spec("matplotlib") is not None  # the bench extra; `make test` installs only test
    assert path.with_suffix(".png").is_file() == drawn and (not drawn or path.with_suffix(".png").stat().st_size > 0)


def test_the_section_replaces_its_markers_only(tiny_results):
    section = protocol.digits_section(tiny_results, "bench/results/x-digits.json")
    lines = section.splitlines()
    begin, end = protocol.markers("digits-dit-t4")  # TINY: 4 steps
    assert lines[0] == begin and lines[-1] == end and "--quick" in section
    assert "T = 4" in lines[1] and "the search holds CUR 0.5 exactly" in section
    fora = next(r for r in tiny_results["baselines"] if r["config"] == "fora:2")
    assert "| SSIM |" in section and f"| {fora['ssim']:.4f} |" in section  # the baselines' SSIM column
    markdown = f"# B\n\n{begin}\nold\n{end}\n\n## after\n"
    updated = update_benchmarks(markdown, section)
    assert updated == f"# B\n\n{section}\n\n## after\n"


def test_the_references_are_sampled_on_the_workers_single_thread(monkeypatch):
    # the workers sample on one thread and their references are compared bitwise with this one's
    threads = []

    def reference(config):
        threads.append(torch.get_num_threads())
        raise RuntimeError("stop here")

    monkeypatch.setattr(protocol, "fresh_reference", reference)
    with pytest.raises(RuntimeError, match="stop here"):
        protocol.run(protocol.ProtocolConfig(**TINY), "test")
    assert threads == [1]


def test_references_must_agree_across_fresh_loads(monkeypatch):
    draws = iter([torch.zeros(2), torch.ones(2)])
    monkeypatch.setattr(protocol, "fresh_reference", lambda config: next(draws))
    with pytest.raises(RuntimeError, match="two fresh loads"):
        protocol.run(protocol.ProtocolConfig(**TINY), "test")


def test_harmonica_bench_suite_digits_runs_the_protocol(monkeypatch):
    from harmonica.cli import main

    called = []
    monkeypatch.setattr(protocol, "bench_main",
                        lambda config, command, out: called.append((config.quick, command)) or 0)
    assert main(["bench", "--suite", "digits", "--quick"]) == 0
    assert called == [(True, "harmonica bench --quick --suite digits")]


def test_each_job_times_its_uncached_baseline_just_before_its_rows(monkeypatch):
    """A baseline job's speedup divides by an uncached timing taken in the job, not the one the worker took
    at its start (the committed 1fd7322 run did that: its no-cache row read 5.64x)."""
    calls = []

    class Clocked:  # an Evaluator whose uncached sampling took 10 s at the worker's start and 2 s now
        config = protocol.ProtocolConfig(quick=True)
        reference = torch.zeros(1)
        base_seconds = 10.0

        def timed(self, schedule, steps, repeats=None):
            calls.append(schedule)
            return None, 2.0

        retime_base = protocol.Evaluator.retime_base

        def row(self, schedule, steps, repeats=None):
            calls.append(("row", schedule))
            return {"measured_speedup": self.base_seconds / 2.0}

    monkeypatch.setattr(protocol, "_EVALUATOR", Clocked())
    result = protocol.run_job(("baseline", "no-cache", 10, None))
    assert calls == [None, ("row", None)]  # the uncached timing first, then the row's own
    assert result["base_seconds"] == 2.0 and result["measured_speedup"] == 1.0
