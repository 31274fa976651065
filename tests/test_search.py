"""The schedule search (harmonica.search), `harmonica train`'s default objective, and the closing comparison."""

import pytest
import torch

import harmonica
from harmonica.digits import eval_batch, load_digits_dit
from harmonica.families.dit import DiTTask
from harmonica.flow import flow_sample
from harmonica.router import Router
from harmonica.samplers import dit_ddim_sample
from harmonica.schedule import CacheSchedule
from harmonica.search import (
    Rollouts,
    Row,
    SearchConfig,
    budget_for_cur,
    compare,
    search_router,
    search_schedule,
    spread,
    verdict,
)
from harmonica.training import engine_attached
from harmonica.units import cached_units


def test_the_budget_and_its_evenly_spread_start():
    assert budget_for_cur(0.5, 10, 12) == 60 and budget_for_cur(0.95, 4, 3) == 3  # row 0 at least
    assert torch.equal(spread(10, 12, 60), CacheSchedule.fora(10, 12, 2).table)
    assert torch.equal(spread(9, 4, 12), CacheSchedule.fora(9, 4, 3).table)
    table = spread(4, 3, 7)  # two full rows (0, 2) and one cell of row 1
    assert table.int().tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]]


def linear_loss(weights):
    """A loss whose optimum at a fixed number of computed cells is known: each reused cell costs its weight."""
    calls = []

    def loss(table):
        calls.append(table.clone())
        return float((weights * ~table).sum())
    return loss, calls


def test_the_search_finds_the_best_table_of_equal_cost_and_never_rises():
    weights = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    weights[0] = 0
    loss, calls = linear_loss(weights)
    start = spread(6, 4, 12)
    result = search_schedule(loss, start, rounds=20, candidates=40)
    best = torch.zeros(6, 4, dtype=torch.bool)
    best[0] = True
    best.view(-1)[weights.view(-1).topk(8).indices] = True  # the 8 free cells that cost most when reused
    assert torch.equal(result.table, best)
    assert result.loss == pytest.approx(float((weights * ~best).sum())) and result.start_loss == loss(start)
    assert all(int(t.sum()) in (11, 12, 13) for t in calls)  # flips of one cell, swaps keep the count
    assert result.history == sorted(result.history, reverse=True) and result.rollouts == len(calls) - 1


def test_the_search_keeps_the_cost_in_macs_at_most_the_start():
    weights = torch.zeros(3, 2)
    weights[1:, 1] = 1.0  # unit 1 is the one worth computing, but it costs twice unit 0
    loss, _ = linear_loss(weights)
    start = spread(3, 2, 4)  # rows 0 and 1
    free = search_schedule(loss, start.clone(), rounds=5, candidates=8)
    assert free.table[:, 1].all()
    kept = search_schedule(loss, start.clone(), unit_cost=[1.0, 2.0], rounds=5, candidates=8)
    assert torch.equal(kept.table, start)  # trading unit 0 for unit 1 would cost more


def test_the_search_stops_when_told_and_keeps_its_best():
    loss, calls = linear_loss(torch.rand(4, 3, generator=torch.Generator().manual_seed(1)))
    start = spread(4, 3, 6)
    result = search_schedule(loss, start, stopped=lambda: len(calls) >= 5)
    assert len(calls) == 5 and torch.equal(result.table, start) and result.loss == result.start_loss


@pytest.fixture(scope="module")
def digits():
    return load_digits_dit()


def deployed(model, schedule, noise, labels, steps):
    """The final samples of the public API: harmonica.enable with the schedule, the DiT DDIM sampler."""
    if schedule is not None:
        harmonica.enable(model, schedule)
    try:
        return dit_ddim_sample(model, labels, num_steps=steps, latents=noise.clone())
    finally:
        if schedule is not None:
            harmonica.disable(model)


def test_the_objective_is_the_deployed_schedules_final_error(digits):
    steps = 4
    noise, labels = eval_batch(4, seed=3)
    task = DiTTask(digits, steps, 1.5)
    reference = deployed(digits, None, noise, labels, steps).clamp(-1, 1)
    table = CacheSchedule.fora(steps, 12, 2).table.clone()
    table[1, 3] = True
    table[2, 5] = False
    expected = torch.mean((deployed(digits, CacheSchedule(table, "t"), noise, labels, steps).clamp(-1, 1)
                           - reference) ** 2).item()
    with engine_attached(digits) as engine:
        rollouts = Rollouts(task, engine, noise, {"class_labels": labels}, steps, clip=(-1, 1))
        assert rollouts.error(torch.ones(steps, 12, dtype=torch.bool)) == 0
        assert rollouts.error(table) == pytest.approx(expected, rel=1e-5) and expected > 1e-5
        rollouts.set_base(CacheSchedule.fora(steps, 12, 2).table)
        assert rollouts.loss(table) == pytest.approx(expected, rel=1e-5)  # sampled from step 1 on
        late = rollouts.base.clone()
        late[3, 0] = True
        assert rollouts.loss(late) == pytest.approx(rollouts.error(late), rel=1e-5)  # from step 3 on
        dense = torch.ones(steps, 12, dtype=torch.bool)
        rollouts.set_base(dense)
        reuse = dense.clone()
        reuse[2, 0] = False  # reads the slot step 1 wrote, though the base's step 2 did not need it
        assert rollouts.loss(reuse) == pytest.approx(rollouts.error(reuse), rel=1e-5) and rollouts.error(reuse) > 0
        unclipped = Rollouts(task, engine, noise, {"class_labels": labels}, steps).error(table)
    assert unclipped > expected  # the samples leave [-1, 1]: the clipped error is the image's


def test_the_default_search_holds_the_cells_and_the_macs_of_its_start(digits, tmp_path):
    task = DiTTask(digits, 4, 1.5)
    macs = task.macs()
    config = SearchConfig(num_steps=4, target_cur=0.5, batch=4, rounds=2, candidates=10, clip=(-1, 1))
    _, result = search_router(task, config, tmp_path, macs)
    fora = CacheSchedule.fora(4, 12, 2)
    searched = CacheSchedule(result.table, "searched")
    assert searched.cur == 0.5 and not torch.equal(result.table, fora.table)  # it moved, at equal cells
    assert searched.theoretical_speedup(macs) >= fora.theoretical_speedup(macs) * (1 - 1e-12)  # and no more MACs


def test_search_router_writes_the_searched_schedule_within_the_cost(digits, tmp_path):
    task = DiTTask(digits, 4, 1.5)
    macs = task.macs()
    fora = CacheSchedule.fora(4, 12, 2)
    config = SearchConfig(num_steps=4, target_cur=0.5, target_speedup=fora.theoretical_speedup(macs), batch=4,
                          rounds=1, candidates=10, clip=(-1, 1))
    lines = []
    router, result = search_router(task, config, tmp_path, macs=macs, log=lines.append)
    loaded = Router.from_pretrained(tmp_path / "router")
    assert torch.equal(loaded.schedule().table, result.table) and loaded.info.complete
    assert loaded.schedule().cur == 0.5 and result.loss < result.start_loss
    assert loaded.schedule().theoretical_speedup(macs) >= fora.theoretical_speedup(macs) * (1 - 1e-9)
    assert lines[0].startswith("round 1: calibration loss ")


def test_compare_measures_each_rival_against_the_uncached_samples(digits):
    steps = 4
    noise, labels = eval_batch(4, seed=5)
    task = DiTTask(digits, steps, 1.5)
    macs = task.macs()
    fora = CacheSchedule.fora(steps, 12, 2)
    with engine_attached(digits) as engine:
        rows = compare(task, engine, fora.table, macs, noise, {"class_labels": labels}, clip=(-1, 1))
    names = [r.name for r in rows]
    assert names == ["learned", "fora:2", "fora:3", "delta-dit:b=2,n=2", "2 steps"]
    by_name = {r.name: r for r in rows}
    assert by_name["learned"].mse == by_name["fora:2"].mse > 0  # the learned table is FORA:2 here
    reference = deployed(digits, None, noise, labels, steps).clamp(-1, 1)
    two = deployed(digits, None, noise, labels, 2).clamp(-1, 1)
    assert by_name["2 steps"].mse == pytest.approx(torch.mean((two - reference) ** 2).item(), rel=1e-5)
    assert by_name["2 steps"].speedup == 2.0 and by_name["2 steps"].cur == 0.5
    assert by_name["fora:2"].psnr == pytest.approx(10 * torch.log10(torch.tensor(4 / by_name["fora:2"].mse)).item())
    assert by_name["fora:2"].speedup == pytest.approx(fora.theoretical_speedup(macs))


def test_the_verdict_says_when_a_static_schedule_is_better():
    learned = Row("learned", 0.5, 1.80, 0.02, 23.0, True)
    assert verdict([learned, Row("fora:2", 0.5, 1.85, 0.01, 26.0), Row("fora:3", 0.6, 2.2, 0.015, 24.0)]) == (
        "a static schedule is better: fora:2 (1.85x, CUR 50.0%) has +3.00 dB over learned (1.80x); deploy it instead")
    assert verdict([learned, Row("fora:2", 0.5, 1.79, 0.03, 21.0), Row("dense", 0.2, 1.2, 0.001, 40.0)]) == (
        "learned beats every static schedule of at most its cost: +2.00 dB over the best, fora:2")
    assert verdict([learned, Row("dense", 0.2, 1.2, 0.001, 40.0)]) == (
        "no static schedule here costs at most learned's (1.80x)")


def test_train_searches_by_default_and_ends_with_the_comparison(tmp_path, capsys, monkeypatch):
    import harmonica.forecast as forecast_module
    from harmonica.cli import main

    argv = ["train", "--model", "tiny-dit", "--random-weights", "--steps", "4", "--batch", "2", "--rounds", "1",
            "--candidates", "2", "--eval-batch", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    router = Router.from_pretrained(tmp_path / "router")
    assert router.schedule().cur == 0.5 and router.info.complete
    assert "search: calibration error " in printed and "router searched: " in printed
    assert "forecast search from " not in printed  # --forecast-rounds 0, the default
    table = printed[printed.index("held-out comparison on 3 calibration noises"):].splitlines()
    rivals = ["fora:2", "fora:3", "delta-dit:b=2,n=2"]  # with the forecast (the default), each with its own too
    learned = "learned+forecast" if router.forecast is not None else "learned"  # as the selection noises chose
    assert [line.split()[0] for line in table[2:10]] == [learned, *rivals, *(f"{r}+forecast" for r in rivals), "2"]
    assert table[10].startswith(("a static schedule is better: ", f"{learned} beats every static schedule"))
    assert main(argv + ["--overwrite", "--forecast-rounds", "1"]) == 0
    assert "forecast search: none: learned was kept without a forecast" in capsys.readouterr().out
    choose = forecast_module.choose_forecast

    def with_its_forecast(*args, **kwargs):  # the forecast of this random model does not lower the error: force it
        choice = choose(*args, **kwargs)
        choice.with_forecast = True
        return choice

    monkeypatch.setattr(forecast_module, "choose_forecast", with_its_forecast)
    assert main(argv + ["--overwrite", "--forecast-rounds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "forecast search from learned+forecast" in printed and "schedules measured; the router keeps " in printed
    assert Router.from_pretrained(tmp_path / "router").info.complete
    assert main(argv[:-2] + ["--out", str(tmp_path), "--resume"]) == 2
    assert ("--resume: expected only with an SDT --objective (iepo, cumulative, leave-one-out, l2c), got --resume "
            "with --objective search") in capsys.readouterr().err


def test_the_checks_sign_test():
    from harmonica.bench.search_check import sign_test

    assert sign_test(2, 2) == 0.25 and sign_test(0, 3) == 1.0 and sign_test(2, 3) == 0.5


def test_a_stopped_search_saves_its_best_table_as_partial(digits, tmp_path):
    asked = []
    config = SearchConfig(num_steps=3, batch=2, clip=(-1, 1))
    task = DiTTask(digits, 3, 1.5)
    router, result = search_router(task, config, tmp_path, task.macs(),
                                   stopped=lambda: asked.append(1) or len(asked) > 3)
    with pytest.warns(UserWarning, match="partial"):
        loaded = Router.from_pretrained(tmp_path / "router")
    assert not loaded.info.complete and torch.equal(loaded.schedule().table, result.table)
    assert result.rollouts == 3 and torch.equal(result.table, spread(3, 12, 18))


def test_rollouts_resume_a_flux_model_whose_joint_units_keep_two_tensors():
    """digits-flux's joint attention slots hold (image, text) tuples: a rollout resumed from a kept state
    equals the deployed schedule sampled from the start through harmonica.enable and flow_sample."""
    from harmonica.digits import DigitsFlux

    flux, steps = DigitsFlux(), 5
    task = flux.task(steps, 1.0)
    noise, labels = eval_batch(3, seed=5)
    latents = flux.latents(noise)
    units = len(cached_units(flux.transformer))
    table = CacheSchedule.fora(steps, units, 2).table.clone()
    table[3, 0] = True  # a joint unit computes at step 3 only in `table`
    table[2, 1] = False

    def deployed(schedule):
        if schedule is not None:
            harmonica.enable(flux.transformer, schedule)
        try:
            return flow_sample(task, labels, latents=latents.clone()).clamp(-1, 1)
        finally:
            if schedule is not None:
                harmonica.disable(flux.transformer)

    expected = torch.mean((deployed(CacheSchedule(table, "t")) - deployed(None)) ** 2).item()
    with engine_attached(flux.transformer) as engine:
        rollouts = Rollouts(task, engine, latents, flux.conditions(labels), steps, clip=(-1, 1))
        rollouts.set_base(CacheSchedule.fora(steps, units, 2).table)
        assert rollouts.loss(table) == pytest.approx(expected, rel=1e-5) and expected > 1e-6  # from step 2 on
        assert rollouts.loss(table) == pytest.approx(rollouts.error(table), rel=1e-5)
