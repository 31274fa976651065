"""Learned linear forecasting (harmonica/forecast.py): the two-slot plan, the engine against a plain history
reference, pure reuse at a = 1, b = 0, the closed-form fit, the graph stand-in and compile counts with it on,
the router file round trip and `harmonica train --forecast`."""

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from _helpers import make_model, step_inputs, units_of
from graph_standin import StandInGraphs, runner_inputs
from safetensors.torch import load_file, save_file
from test_compile import KINDS, CountingBackend
from test_graphs import run

import harmonica
from harmonica import CacheSchedule, Router
from harmonica import kernels as ops
from harmonica.cli import main
from harmonica.digits import eval_batch, load_digits_dit
from harmonica.families.dit import DiTTask
from harmonica.forecast import Forecast, ForecastFit, ForecastPlan, choose_forecast
from harmonica.graphs import graph_plan
from harmonica.router import RouterInfo
from harmonica.search import (
    SELECTION_RANK,
    Rollouts,
    calibration_batch,
    equal_cost_start,
    forecast_search,
    keep_forecast,
    router_from_table,
    spread,
)
from harmonica.training import engine_attached

STEPS = 7
# unit 0: computes at 0, 1, 3 (the output of 0 is read by no reuse: no slot); unit 1: FORA-like with a lone reuse
# at step 1 (one computed output: pure reuse); the others: a random pattern
PATTERN = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]


def irregular(units: int) -> CacheSchedule:
    gen = torch.Generator().manual_seed(5)
    table = torch.rand(STEPS, units, generator=gen) < 0.5
    table[:, :4] = torch.tensor(PATTERN, dtype=torch.bool)
    table[0] = True
    return CacheSchedule(table, "irregular")


def random_forecast(schedule) -> Forecast:
    gen = torch.Generator().manual_seed(7)
    shape = schedule.table.shape
    a, b = 1 + 0.5 * torch.randn(shape, generator=gen), 0.5 * torch.randn(shape, generator=gen)
    return Forecast(a, b, schedule.table)


def test_the_plan_rotates_two_slots_and_falls_back_to_pure_reuse():
    table = torch.tensor([[1], [0], [1], [0], [0], [1], [1], [0], [1], [1], [0]], dtype=torch.bool)
    schedule = CacheSchedule(table, "one unit")
    forecast = Forecast(torch.full(table.shape, 0.5), torch.full(table.shape, 0.25), table)
    forecast.a[10, 0], forecast.b[10, 0] = 1.0, 0.0  # exactly pure reuse: the older output is not needed
    rows = [row[0] for row in ForecastPlan(schedule, forecast).rows]
    # computes 0, 2, 5, 6, 8, 9; reuses 1 (one output so far), 3 and 4 (2 and 0), 7 (6 and 5), 10 (9, a = 1 b = 0)
    assert rows == [0, (0, None, 1.0, 0.0), 1, (1, 0, 0.5, 0.25), (1, 0, 0.5, 0.25), 0, 1, (1, 0, 0.5, 0.25), None, 0,
                    (0, None, 1.0, 0.0)]
    with pytest.raises(ValueError, match=r"forecast: expected the schedule it was fitted along .*, got 'fora:2' "
                                         r"with 4 cells that differ"):
        ForecastPlan(CacheSchedule.fora(11, 1, 2), forecast)


def history_run(model, schedule, forecast, steps, monkeypatch):
    """The outputs of a plain definition: every computed output kept in a list per unit; a reused unit adds
    a * out[-1] + b * out[-2] of its list (out[-1] alone with fewer than two)."""
    history = defaultdict(list)
    engine = harmonica.enable(model, schedule)

    def run_unit(k, compute, gate, h, part=None):
        outputs = history[k]
        if engine.policy.row[k]:
            outputs.append(compute().clone())
            return ops.gated_residual_compute_ref(h, outputs[-1], gate)
        if len(outputs) < 2:
            return ops.gated_residual_reuse_ref(h, outputs[-1], gate)
        a, b = float(forecast.a[engine.step, k]), float(forecast.b[engine.step, k])
        return ops.gated_residual_forecast_ref(h, outputs[-1], outputs[-2], a, b, gate)

    monkeypatch.setattr(engine, "_run_unit", run_unit)
    outputs = run(model, steps)
    harmonica.disable(model)
    return outputs


def forecast_run(model, schedule, forecast, steps):
    harmonica.enable(model, schedule, forecast=forecast)
    outputs = run(model, steps)
    harmonica.disable(model)
    return outputs


@pytest.mark.parametrize("mutation", [None, "swap", "drop-b"])
def test_the_engine_forecasts_from_the_last_two_computed_outputs(mutation, monkeypatch):
    """Bitwise the history reference; a plan that swaps the two slots, or a forecast that drops b, is not."""
    model = make_model("tiny-pixart")
    schedule = irregular(units_of(model))
    forecast = random_forecast(schedule)
    expected = history_run(model, schedule, forecast, STEPS, monkeypatch)
    if mutation == "swap":
        rows = ForecastPlan.__init__

        def swapped(self, *args, **kwargs):
            rows(self, *args, **kwargs)
            self.rows = [tuple((e[1], e[0], *e[2:]) if isinstance(e, tuple) and e[1] is not None else e for e in row)
                         for row in self.rows]
        monkeypatch.setattr(ForecastPlan, "__init__", swapped)
    if mutation == "drop-b":
        monkeypatch.setattr(ops, "gated_residual_forecast",
                            lambda h, c1, c2, a, b, gate: ops.gated_residual_forecast_ref(h, c1, c2, a, 0.0, gate))
    got = forecast_run(model, schedule, forecast, STEPS)
    same = all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert same == (mutation is None)


def test_one_zero_is_pure_reuse_bitwise_with_no_second_slot():
    model = make_model("tiny-dit")
    schedule = irregular(units_of(model))
    harmonica.enable(model, schedule)
    reuse, reuse_bytes = run(model, STEPS), harmonica.summary(model).cache_bytes
    engine = harmonica.enable(model, schedule, forecast=Forecast.identity(schedule.table))
    assert all(torch.equal(a, b) for a, b in zip(reuse, run(model, STEPS), strict=True))
    assert engine.cache_bytes() == reuse_bytes
    harmonica.disable(model)


def test_the_ranks_schedule_check_covers_the_forecast():
    # under context parallelism every rank must forecast alike: the digest the ranks compare holds the plan
    from harmonica.parallel import schedule_digest
    model = make_model("tiny-dit")
    schedule = irregular(units_of(model))
    digests = []
    for forecast in (None, random_forecast(schedule), random_forecast(schedule), Forecast.identity(schedule.table)):
        digests.append(schedule_digest(harmonica.enable(model, schedule, forecast=forecast)))
    other = random_forecast(schedule)
    other.b[1:] *= 1.5  # one coefficient set of another rank
    digests.append(schedule_digest(harmonica.enable(model, schedule, forecast=other)))
    harmonica.disable(model)
    assert digests[1] == digests[2] and len({digests[0], digests[1], digests[3], digests[4]}) == 4


def test_the_summary_reports_the_second_slots():
    """FORA:2 over 5 steps: step 3 forecasts every unit from the outputs of steps 2 and 0, so every unit holds two
    slots; step 1 has one computed output (pure reuse)."""
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(5, units_of(model), 2)
    harmonica.enable(model, schedule)
    run(model, 5)
    single = harmonica.summary(model)
    harmonica.enable(model, schedule, forecast=random_forecast(schedule))
    run(model, 5)
    double = harmonica.summary(model)
    harmonica.disable(model)
    assert double.cache_bytes == 2 * single.cache_bytes > 0
    assert double.forecast and not single.forecast and "linear forecast: two slots per unit" in str(double)


def test_the_fit_recovers_known_coefficients():
    """Targets exactly a c1 + b c2: without ridge the 2x2 solve returns (a, b) to fp64 rounding; with ridge lam it
    moves towards (1, 0) by at most lam |(a, b) - (1, 0)| / the Gram matrix's smallest eigenvalue."""
    gen = torch.Generator().manual_seed(0)
    table = torch.tensor([[True], [True], [False]])
    schedule = CacheSchedule(table, "t")
    c1, c2 = (torch.randn(2, 40, 24, generator=gen) for _ in range(2))
    truth = torch.tensor([0.8, -0.45], dtype=torch.float64)
    target = truth[0].item() * c1 + truth[1].item() * c2
    for ridge in (0.0, 1e-3):
        fit = ForecastFit(schedule, ridge)
        fit.solve(2, 0, [(target[:1], c1[:1], c2[:1]), (target[1:], c1[1:], c2[1:])])  # two streams, one system
        got = torch.tensor(fit.coefficients(2, 0), dtype=torch.float64)
        x = torch.stack([c1.reshape(-1), c2.reshape(-1)], 1).double()
        gram = x.T @ x
        lam = ridge * gram.diagonal().mean()
        bound = lam * (truth - torch.tensor([1.0, 0.0], dtype=torch.float64)).norm() / torch.linalg.eigvalsh(gram)[0]
        bound += 1e-6 * truth.abs().max()  # the float32 storage of the coefficients
        assert (got - truth).abs().max() <= bound, (ridge, got, truth)
        if ridge:
            assert (got - truth).abs().max() > 1e-9  # the ridge pulls towards pure reuse


@pytest.fixture(scope="module")
def digits():
    return load_digits_dit()


def test_the_fit_follows_the_deployed_trajectory_and_lowers_its_error(digits):
    """Fitting runs the cached trajectory with each cell's coefficients applied as soon as they are solved, so the
    fitting pass's final samples are bitwise those of sampling with the result; on the calibration batch the
    forecast's error is clearly below pure reuse's (0.72 of it, measured)."""
    steps = 6
    noise, labels = eval_batch(8, seed=101)
    task = DiTTask(digits, steps, 1.5)
    table = CacheSchedule.fora(steps, 12, 2).table
    with engine_attached(digits) as engine:
        rollouts = Rollouts(task, engine, noise, {"class_labels": labels}, steps, clip=(-1, 1))
        fit = ForecastFit(CacheSchedule(table, "fora:2"))
        fitted = rollouts.sample(table, forecast=fit)
        forecast = fit.forecast
        assert torch.equal(rollouts.sample(table, forecast=forecast), fitted)
        reuse, forecast_error = rollouts.error(table), rollouts.error(table, forecast)
    assert (forecast.b[3] != 0).all() and (forecast.b[:3] == 0).all()  # steps 1 (one output), 0 and 2 (compute)
    assert forecast_error < 0.9 * reuse


def test_graphs_replay_the_forecast_with_each_steps_own_constants(monkeypatch):
    """The stand-in replays captured arguments: each step's coefficients and slots are in its graph's key, so the
    replays equal the eager forecast bitwise; a key without them replays another step's constants."""
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(7, units_of(model), 2)  # steps 3 and 5 share their rows, not their coefficients
    forecast = random_forecast(schedule)
    eager = forecast_run(model, schedule, forecast, 7)
    for drop_forecast_row in (False, True):
        engine = harmonica.enable(model, schedule, cuda_graphs=True, forecast=forecast)
        runner = model._harmonica.graphs
        runner.backend = StandInGraphs(lambda runner=runner: runner_inputs(runner))
        if drop_forecast_row:
            monkeypatch.setattr(engine, "graph_key", lambda engine=engine: (engine.policy.row, engine.policy.write_row))
        outputs = run(model, 7) + run(model, 7)
        same = all(torch.equal(a, b) for a, b in zip(eager * 2, outputs, strict=True))
        assert same != drop_forecast_row
        keys = set(zip(schedule.step_keys, ForecastPlan(schedule, forecast).rows))  # steps 0 and 4 share one
        captures = len(keys) if not drop_forecast_row else 3
        assert runner.captures == captures and len(set(graph_plan(schedule))) == 3
        harmonica.disable(model)


def test_compiled_units_with_the_forecast_compile_once_per_unit_kind():
    model = make_model("tiny-dit")
    schedule = irregular(units_of(model))
    forecast = random_forecast(schedule)
    eager = forecast_run(model, schedule, forecast, STEPS)
    backend = CountingBackend()
    harmonica.enable(model, schedule, forecast=forecast, compile={"backend": backend})
    outputs = run(model, STEPS) + run(model, STEPS)
    harmonica.disable(model)
    assert all(torch.equal(a, b) for a, b in zip(eager * 2, outputs, strict=True))
    assert len(backend.graphs) == len(KINDS["tiny-dit"])


def test_the_router_file_carries_the_forecast_and_old_files_load_as_pure_reuse(tmp_path):
    model = make_model("tiny-dit")
    units = units_of(model)
    table = irregular(units).table
    router = router_from_table(table, RouterInfo.for_model(model))
    forecast = random_forecast(router.schedule())
    router.set_forecast(forecast)
    router.save_pretrained(tmp_path / "new")
    loaded = Router.from_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "router.json").read_text())["format_version"] == 3
    for name in ("a", "b", "table"):
        assert torch.equal(getattr(loaded.forecast, name), getattr(forecast, name))
    engine = harmonica.enable(model, loaded)
    assert engine.policy.forecast_plan is not None
    assert harmonica.enable(model, loaded, forecast=False).policy.forecast_plan is None
    with pytest.raises(ValueError, match=r"the router's forecast: expected the schedule it was fitted along .* "
                                         r"\(tau 0.999 gives another schedule than its training tau\)"):
        harmonica.enable(model, loaded, tau=0.999)
    assert not hasattr(model, "_harmonica")  # refused: nothing attached
    with pytest.raises(ValueError, match=r"^forecast: expected a Forecast, None or False, got str"):
        harmonica.enable(model, loaded, forecast="yes")

    old = tmp_path / "old"  # a format-2 file: no forecast tensors
    router_from_table(table, RouterInfo.for_model(model)).save_pretrained(old)
    info = json.loads((old / "router.json").read_text())
    (old / "router.json").write_text(json.dumps({**info, "format_version": 2}))
    assert Router.from_pretrained(old).forecast is None
    assert harmonica.enable(model, Router.from_pretrained(old)).policy.forecast_plan is None
    harmonica.disable(model)

    tensors = load_file(str(tmp_path / "new" / "router.safetensors"))
    del tensors["forecast_b"]
    save_file(tensors, str(old / "router.safetensors"))
    with pytest.raises(ValueError, match=r"router.safetensors: expected all of \['forecast_a', 'forecast_b', "
                                         r"'forecast_table'\] or none, got only \['forecast_a', 'forecast_table'\]"):
        Router.from_pretrained(old)
    tensors = load_file(str(tmp_path / "new" / "router.safetensors"))
    tensors["forecast_a"][3, 1] = float("nan")
    save_file(tensors, str(old / "router.safetensors"))
    with pytest.raises(ValueError, match=r"router.safetensors: forecast.a: expected finite coefficients, got 1 NaN"):
        Router.from_pretrained(old)


def test_train_fits_the_forecast_by_default_and_not_with_no_forecast(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-dit", "--random-weights", "--steps", "4", "--batch", "2", "--rounds", "1",
            "--candidates", "1", "--eval-batch", "0", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "forecast: fitted on 2 calibration noises" in printed and "on 2 other noises: learned " in printed
    router = Router.from_pretrained(out / "router")  # the forecast of this random model does not lower the error
    assert "the router keeps learned without a forecast (pure reuse)" in printed and router.forecast is None
    assert main(argv[:-1] + [str(tmp_path / "plain"), "--no-forecast"]) == 0
    assert "forecast:" not in capsys.readouterr().out
    assert Router.from_pretrained(tmp_path / "plain" / "router").forecast is None
    assert main(["train", "--model", "tiny-dit", "--random-weights", "--steps", "1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--steps: expected 2 to 1000" in capsys.readouterr().err


class FakeRollouts:
    """`error(table, forecast)`: a fixed error per (table, with a forecast or not); the forecast's error comes from
    its fitting pass (a `ForecastFit`), which the engine's real fit is bitwise
    (test_the_fit_follows_the_deployed_trajectory_and_lowers_its_error)."""

    def __init__(self, errors: dict):
        self.errors, self.fitted = errors, []

    def error(self, table, forecast=None):
        if forecast is not None:
            assert isinstance(forecast, ForecastFit)
            self.fitted.append(table)
        return self.errors[(int(table.sum()), forecast is not None)]


def test_choose_forecast_keeps_the_lowest_error_with_the_forecast():
    """The lowest calibration error of every candidate with its forecast or without; ties keep the first;
    every candidate fitted."""
    low, high = CacheSchedule.fora(5, 2, 3).table, CacheSchedule.fora(5, 2, 2).table  # 4 and 6 computed cells
    rollouts = FakeRollouts({(4, False): 1.0, (4, True): 0.3, (6, False): 0.5, (6, True): 0.4})
    choice = choose_forecast(rollouts, {"a": low, "b": high})
    assert (choice.name, choice.with_forecast) == ("a", True) and torch.equal(choice.table, low)
    assert torch.equal(choice.forecast.table, low) and torch.equal(choice.forecasts["b"].table, high)
    assert choice.errors == {"a": (1.0, 0.3), "b": (0.5, 0.4)} and len(rollouts.fitted) == 2
    rollouts = FakeRollouts({(4, False): 1.0, (4, True): 0.4, (6, False): 0.5, (6, True): 0.4})
    assert choose_forecast(rollouts, {"b": high, "a": low}).name == "b"
    rollouts = FakeRollouts({(4, False): 0.2, (4, True): 0.3, (6, False): 0.5, (6, True): 0.4})
    choice = choose_forecast(rollouts, {"a": low, "b": high})  # a forecast that raises the final error: none
    assert (choice.name, choice.with_forecast, choice.forecast, choice.label) == ("a", False, None, "a")
    with pytest.raises(ValueError, match=r"candidates: expected at least one schedule, got none"):
        choose_forecast(rollouts, {})


class FakeJudge:
    """`error(table, forecast)` on other noises: a fixed error per (table, with a forecast or not); the forecast
    is the one fitted on the calibration rollouts (a `Forecast` along that table)."""

    def __init__(self, errors: dict):
        self.errors = errors

    def error(self, table, forecast=None):
        assert forecast is None or (isinstance(forecast, Forecast) and torch.equal(forecast.table, table))
        return self.errors[(int(table.sum()), forecast is not None)]


def test_a_judge_chooses_the_forecast_on_its_own_noises():
    """With a judge the lowest of its errors wins, whatever the calibration errors say; both are recorded, and
    `error` is the judge's of the kept option."""
    low, high = CacheSchedule.fora(5, 2, 3).table, CacheSchedule.fora(5, 2, 2).table
    calibration = {(4, False): 1.0, (4, True): 0.3, (6, False): 0.5, (6, True): 0.4}
    judged = {(4, False): 1.1, (4, True): 0.9, (6, False): 0.6, (6, True): 0.7}
    choice = choose_forecast(FakeRollouts(calibration), {"a": low, "b": high}, judge=FakeJudge(judged))
    assert (choice.label, choice.error) == ("b", 0.6) and torch.equal(choice.table, high)
    assert choice.errors == {"a": (1.0, 0.3), "b": (0.5, 0.4)} and choice.judged == {"a": (1.1, 0.9), "b": (0.6, 0.7)}
    assert choose_forecast(FakeRollouts(calibration), {"a": low, "b": high}).error == 0.3  # no judge: calibration


class WeightedRollouts:
    """A calibration error whose optimum is known: each reused cell (t, k) costs weights[with a forecast][t, k];
    `sample` records the fitting passes (`fit_forecast`)."""

    def __init__(self, pure: torch.Tensor, forecast: torch.Tensor):
        self.weights, self.fitted, self.sampled = {False: pure, True: forecast}, [], []

    def error(self, table, forecast=None):
        if forecast is not None:
            assert isinstance(forecast, ForecastFit) and torch.equal(forecast.forecast.table, table)  # fitted along it
            self.fitted.append(table.clone())
        return float((self.weights[forecast is not None] * ~table).sum())

    def sample(self, table, forecast=None):
        self.sampled.append((table.clone(), forecast))


def test_the_forecast_search_minimises_each_schedules_error_with_its_own_forecast():
    """The table of the lowest error with a forecast fitted along it (not the pure-reuse optimum), at the start's
    cells and MACs; the returned forecast is fitted along that table."""
    gen = torch.Generator().manual_seed(2)
    pure, forecast = torch.rand(6, 4, generator=gen), torch.rand(6, 4, generator=gen)
    start = spread(6, 4, 12)

    def best(weights):
        table = torch.zeros(6, 4, dtype=torch.bool)
        table[0] = True
        table.view(-1)[(weights[1:].reshape(-1).topk(8).indices + 4)] = True
        return table

    assert not torch.equal(best(pure), best(forecast))
    rollouts = WeightedRollouts(pure, forecast)
    result, fitted = forecast_search(rollouts, start, rounds=20, candidates=40)
    assert torch.equal(result.table, best(forecast))
    assert result.loss == pytest.approx(float((forecast * ~best(forecast)).sum()))
    assert len(rollouts.fitted) == result.rollouts and all(int(t.sum()) in (11, 12, 13) for t in rollouts.fitted)
    assert torch.equal(fitted.table, result.table) and torch.equal(rollouts.sampled[-1][0], result.table)
    costly = forecast_search(WeightedRollouts(pure, forecast), start, unit_cost=[1.0, 1.0, 1.0, 9.0], rounds=20,
                             candidates=40)[0]
    assert costly.table[:, 3].sum() <= start[:, 3].sum()  # the MACs held: unit 3 is never traded in


def test_keep_forecast_deploys_the_forecast_search_where_it_lowers_the_error():
    """rounds = 0: the option `choose_forecast` kept; rounds > 0: the searched table with the forecast fitted along
    it, its calibration error that of sampling with them, at the kept schedule's cells and at most its MACs, kept
    where it lowers the calibration error (selection = 0) and also the selection noises' (the default; here it
    does not: the search overfits 4 noises)."""
    model = load_digits_dit()
    task = DiTTask(model, 6, 1.5)
    macs = task.macs()
    start = equal_cost_start(6, 12, 36)
    router = router_from_table(start.table, RouterInfo.for_model(model))
    kept, choice, refined, label = keep_forecast(task, router, 4, 0, (-1, 1), selection=0)
    assert refined is None and label == "learned+forecast" and torch.equal(kept.schedule().table, start.table)
    kept, choice, refined, label = keep_forecast(task, router, 4, 0, (-1, 1), macs=macs, rounds=1, candidates=12,
                                                 selection=0)
    assert refined.loss < refined.start_loss == pytest.approx(choice.errors["learned"][1], rel=1e-6)
    table = kept.schedule().table
    assert label == "refined+forecast" and torch.equal(table, refined.table) and not torch.equal(table, start.table)
    assert torch.equal(kept.forecast.table, table) and int(table.sum()) == 36
    unit_macs = torch.tensor(macs.unit_macs, dtype=torch.float64)
    assert (table.double() @ unit_macs).sum() <= (start.table.double() @ unit_macs).sum() * (1 + 1e-9)
    noise, cond = calibration_batch(task, 4, 0)  # the error of deploying it, on the calibration batch
    with engine_attached(model) as engine:
        rollouts = Rollouts(task, engine, noise, cond, 6, clip=(-1, 1))
        assert rollouts.error(table, kept.forecast) == pytest.approx(refined.loss, rel=1e-5)
        judge = Rollouts(task, engine, *calibration_batch(task, 4, 0, SELECTION_RANK), 6, clip=(-1, 1))
        overfit = judge.error(table, kept.forecast)
    kept, choice, refined, label = keep_forecast(task, router, 4, 0, (-1, 1), macs=macs, rounds=1, candidates=12)
    assert torch.equal(refined.table, table) and overfit >= choice.error  # on the selection noises: worse
    assert label == "learned+forecast" and torch.equal(kept.schedule().table, start.table)


def test_keep_forecast_chooses_on_noises_it_did_not_fit_on():
    """The searched schedule and its equal-cost start, each with its forecast (fitted on the calibration noises)
    and without, scored on `selection` other noises: the kept option is the lowest of those errors, which differ
    from the calibration ones; selection = 0 chooses on the calibration errors."""
    model = load_digits_dit()
    task = DiTTask(model, 6, 1.5)
    table = torch.rand(6, 12, generator=torch.Generator().manual_seed(3)) < 0.5
    table[0] = True
    learned = CacheSchedule(table, "searched")
    start = equal_cost_start(6, 12, int(table.sum()))
    router = router_from_table(table, RouterInfo.for_model(model))
    kept, choice, _, label = keep_forecast(task, router, 4, 0, (-1, 1), selection=3)
    with engine_attached(model) as engine:
        judge = Rollouts(task, engine, *calibration_batch(task, 3, 0, SELECTION_RANK), 6, clip=(-1, 1))
        for name, table in (("learned", learned.table), (start.name, start.table)):
            measured = (judge.error(table), judge.error(table, choice.forecasts[name]))
            assert choice.judged[name] == pytest.approx(measured, rel=1e-5)
            assert choice.judged[name] != pytest.approx(choice.errors[name], rel=1e-3)
    best = min(choice.judged, key=lambda name: min(choice.judged[name]))
    assert label == choice.label and choice.name == best and choice.error == min(choice.judged[best])
    assert torch.equal(kept.schedule().table, choice.table)
    calibrated = keep_forecast(task, router, 4, 0, (-1, 1), selection=0)[1]
    assert calibrated.judged == {} and calibrated.errors.keys() == choice.errors.keys()
    assert all(calibrated.errors[name] == pytest.approx(choice.errors[name], rel=1e-6) for name in choice.errors)


def test_forecast_inputs_are_checked(tmp_path):
    table = CacheSchedule.fora(4, 2, 2).table
    with pytest.raises(ValueError, match=r"forecast.b: expected a float tensor of shape \(4, 2\) \(from "
                                         r"forecast.table\), got torch.float32 of shape \(4, 3\)"):
        Forecast(torch.ones(4, 2), torch.zeros(4, 3), table)
    with pytest.raises(ValueError, match=r"ridge: expected a finite number >= 0, got -1"):
        ForecastFit(CacheSchedule(table, "t"), -1)
    model = make_model("tiny-dit")
    with pytest.raises(ValueError, match=r"forecast: expected the schedule it was fitted along"):
        harmonica.enable(model, CacheSchedule.fora(4, units_of(model), 3),
                         forecast=Forecast.identity(CacheSchedule.fora(4, units_of(model), 2).table))
    assert not hasattr(model, "_harmonica")
    model(**step_inputs(model, 0))  # nothing left attached


def test_the_fit_under_ranks_solves_the_system_of_every_ranks_batch():
    """average: the mean of the 2x2 systems over the ranks; a rank fitting half the data with the other half's
    system averaged in gets the coefficients of all of it (a fit that ignores `average` does not)."""
    gen = torch.Generator().manual_seed(1)
    schedule = CacheSchedule(torch.tensor([[True], [True], [False]]), "t")
    y, c1, c2 = (torch.randn(4, 30, 8, generator=gen) for _ in range(3))

    def solved(parts, average=None):
        fit = ForecastFit(schedule, average=average)
        fit.solve(2, 0, [(y[parts], c1[parts], c2[parts])])
        return fit.coefficients(2, 0)

    sums_b = torch.stack([c1[2:].flatten().double() @ c1[2:].flatten().double(),
                          c1[2:].flatten().double() @ c2[2:].flatten().double(),
                          c2[2:].flatten().double() @ c2[2:].flatten().double(),
                          c1[2:].flatten().double() @ y[2:].flatten().double(),
                          c2[2:].flatten().double() @ y[2:].flatten().double()])  # the other rank's system
    both = solved(slice(0, 4))
    assert solved(slice(0, 2), average=lambda sums: (sums + sums_b) / 2) == pytest.approx(both, rel=1e-6)
    assert solved(slice(0, 2)) != pytest.approx(both, rel=1e-3)


def test_train_keeps_the_equal_cost_start_when_it_forecasts_better(tmp_path, capsys, monkeypatch):
    import harmonica.forecast as forecast_module
    from harmonica.cli.train import _fit_forecast

    real = forecast_module.choose_forecast
    offered = []

    def prefer_the_start(rollouts, candidates, **kwargs):  # the start wins, as it did at T = 20 on digits-dit
        offered.append(list(candidates))
        start = next(name for name in candidates if name != "learned")
        choice = real(rollouts, {start: candidates[start]}, **kwargs)
        choice.with_forecast = True
        return choice

    monkeypatch.setattr(forecast_module, "choose_forecast", prefer_the_start)
    model = make_model("tiny-dit")
    learned = irregular(units_of(model))
    router = router_from_table(learned.table, RouterInfo.for_model(model))
    args = SimpleNamespace(batch=2, out=str(tmp_path), objective="search", forecast_rounds=0, candidates=4)
    config = SimpleNamespace(num_steps=STEPS, seed=0)
    task = DiTTask(model, STEPS, 1.5)
    kept = _fit_forecast(args, task, router, config, None, 0, task.macs())
    start = equal_cost_start(STEPS, learned.num_units, int(learned.table.sum()))
    assert offered == [["learned", start.name]] and not torch.equal(start.table, learned.table)
    assert f"the router keeps {start.name} with its forecast" in capsys.readouterr().out
    saved = Router.from_pretrained(tmp_path / "router")
    for got in (kept, saved):
        assert torch.equal(got.schedule().table, start.table) and torch.equal(got.forecast.table, start.table)
