"""Router training follows the official code: one AdamW parameter per step's row (untrained rows do not
move, their Adam state untouched) and the MSE of the guidance-combined output the sampler uses."""

import math

import pytest
import torch
from test_training import FAST, trainer

from harmonica import CacheSchedule, Router
from harmonica.families.pixart import PixArtTask
from harmonica.search import budget_for_cur
from harmonica.training import (
    BETA_GAIN,
    BETA_RANGE,
    RouterTrainer,
    TrainConfig,
    calibrated_tau,
    initial_logits,
    soft_cur,
)


def logits_per_iteration(run, iterations: int) -> list:
    """router.logits before and after each of `iterations` iterations (the first trains step 1)."""
    history = [run.router.logits.detach().clone()]
    with run.attached():
        for _ in range(iterations):
            run.train_step()
            history.append(run.router.logits.detach().clone())
    return history


def moved_rows(before, after) -> list:
    return [i for i in range(before.shape[0]) if not torch.equal(before[i], after[i])]


def test_per_step_rows_move_only_when_trained_and_shared_rows_keep_moving(tmp_path):
    run = trainer(tmp_path / "per-step", beta=1e-2)  # 4 steps: iterations 1, 2, 3 train rows 1, 2, 3
    history = logits_per_iteration(run, 3)
    assert [moved_rows(a, b) for a, b in zip(history, history[1:])] == [[1], [2], [3]]
    assert [run.optimizer.state[row]["step"].item() for row in run.rows] == [1, 1, 1]
    with run.attached():
        run.train_step()  # a new trajectory: step 1 again
    assert [run.optimizer.state[row]["step"].item() for row in run.rows] == [2, 1, 1]

    shared = trainer(tmp_path / "shared", beta=1e-2, optimizer="shared")
    history = logits_per_iteration(shared, 3)
    assert [moved_rows(a, b) for a, b in zip(history, history[1:])] == [[1], [1, 2], [1, 2, 3]]
    assert shared.optimizer.state[shared.router.logits]["step"].item() == 3
    # both start alike: the first iteration is the same step
    torch.testing.assert_close(logits_per_iteration(trainer(tmp_path / "a", beta=1e-2), 1)[1],
                               logits_per_iteration(trainer(tmp_path / "b", beta=1e-2, optimizer="shared"), 1)[1])


def pixart_trainer(out_dir, **overrides):
    from _helpers import make_model
    from diffusers import DPMSolverMultistepScheduler

    config = TrainConfig(**{**FAST, "guidance": 4.5, **overrides})
    gen = torch.Generator().manual_seed(0)
    embeddings = {"prompt_embeds": torch.randn(3, 5, 32, generator=gen), "prompt_attention_mask": torch.ones(3, 5),
                  "negative_embeds": torch.randn(1, 5, 32, generator=gen), "negative_attention_mask": torch.ones(1, 5)}
    task = PixArtTask(make_model("tiny-pixart"), DPMSolverMultistepScheduler(), embeddings, config.num_steps,
                      config.guidance)
    return RouterTrainer(task, config, out_dir)


def official_output(out, guidance, guided, cond_first):
    """The official forward_with_cfg's result: the first `guided` channels combined, for both halves."""
    first, second = out.chunk(2)
    cond, uncond = (first, second) if cond_first else (second, first)
    eps = uncond[:, :guided] + guidance * (cond[:, :guided] - uncond[:, :guided])
    return torch.cat([torch.cat([eps, first[:, guided:]], 1), torch.cat([eps, second[:, guided:]], 1)])


def trained_once(run) -> tuple:
    """One iteration: its record and the teacher's and student's outputs (2B, C_out, H, W)."""
    outputs, forward = [], run._forward
    run._forward = lambda *args: outputs.append(forward(*args)) or outputs[-1]
    with run.attached():
        record = run.train_step()
    return record, outputs[-2].detach(), outputs[-1].detach()


@pytest.mark.parametrize("model", ["dit", "pixart"])
def test_the_loss_is_the_mse_of_the_guidance_combined_output(tmp_path, model):
    make, guided, cond_first = {"dit": (trainer, 3, True), "pixart": (pixart_trainer, 4, False)}[model]
    run = make(tmp_path / "combined")
    record, teacher, student = trained_once(run)
    assert teacher.shape[1] == 8  # 4 eps channels and 4 learned-variance channels
    g = run.config.guidance
    expected = torch.mean((official_output(teacher, g, guided, cond_first)
                           - official_output(student, g, guided, cond_first)) ** 2)
    # fp32 sums of 2 * 8 * 64 squares: relative error well below 1e-5
    torch.testing.assert_close(torch.tensor(record["mse"]), expected, rtol=1e-5, atol=0)
    separate = torch.mean((teacher - student) ** 2).item()
    assert abs(record["mse"] - separate) > 0.05 * separate  # the two forms differ here
    torch.testing.assert_close(torch.tensor(record["loss"]), torch.tensor(record["lambda"] * record["mse"]
                                                                          + run.beta * record["l1"]))

    record, teacher, student = trained_once(make(tmp_path / "separate", loss="separate"))
    torch.testing.assert_close(torch.tensor(record["mse"]), torch.mean((teacher - student) ** 2), rtol=1e-5, atol=0)


def test_defaults_are_the_official_semantics_and_bad_options_are_named():
    config = TrainConfig()
    assert (config.optimizer, config.loss) == ("per-step", "combined")
    with pytest.raises(ValueError, match=r"^optimizer: expected one of \('per-step', 'shared'\), got 'adam'$"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match=r"^loss: expected one of \('combined', 'separate'\), got 'mse'$"):
        TrainConfig(loss="mse")


def test_soft_cur_is_the_hard_cur_made_smooth():
    T, K, tau = 4, 3, 0.1
    at = torch.full((T, K), math.log(tau / (1 - tau)))  # every gate at tau: half reused each
    assert soft_cur(at, tau) == pytest.approx(0.5 * (T - 1) / T)
    far_below, far_above = at - 40, at + 40
    assert soft_cur(far_below, tau) == pytest.approx((T - 1) / T)  # = the hard CUR of every gate below tau
    assert CacheSchedule.from_gates(torch.sigmoid(far_below), tau).cur == pytest.approx((T - 1) / T)
    assert soft_cur(far_above, tau) == pytest.approx(0.0, abs=1e-12)
    nudged = at.clone()
    nudged[2, 1] -= 0.5  # a logit moves, none crosses: the hard CUR stays, the soft one rises
    assert soft_cur(nudged, tau) > soft_cur(at, tau)


@pytest.mark.parametrize("logit, target", [(-5.0, 0.5), (5.0, 0.5), (-2.2, 0.3)], ids=["reused", "computed", "near"])
def test_target_cur_steers_beta_by_the_soft_cur_within_its_range(tmp_path, logit, target):
    run = trainer(tmp_path, target_cur=target, lr=0.0, beta=1e-4)  # lr 0: the logits stay; 4 steps x 4 units
    with torch.no_grad():
        run.router.logits[1:] = logit
    expected = 1e-4 * math.exp(BETA_GAIN * (target - soft_cur(run.router.logits.detach(), 0.1)))
    with run.attached():
        for _ in range(4):  # one trajectory: beta changes once, at its end
            run.train_step()
        assert run.beta == pytest.approx(expected, rel=1e-9)
        for _ in range(4 * 40):
            run.train_step()
    bound = 1e-4 * BETA_RANGE if expected > 1e-4 else 1e-4 / BETA_RANGE
    assert run.beta == pytest.approx(bound, rel=1e-9)  # 41 trajectories of the same error: at the bound, not past it


def test_the_calibrated_tau_computes_the_target_cells():
    gates = torch.rand(6, 5, generator=torch.Generator().manual_seed(0))
    gates[0] = 1.0
    for target in (0.1, 0.5, 0.7):
        schedule = CacheSchedule.from_gates(gates, calibrated_tau(gates, target))
        assert int(schedule.table.sum()) == budget_for_cur(target, 6, 5)
        assert schedule.cur == pytest.approx(target, abs=0.5 / 30)  # the nearest cell count
    tied = torch.full((3, 2), 0.5)
    assert CacheSchedule.from_gates(tied, calibrated_tau(tied, 0.5)).cur == pytest.approx(4 / 6)  # left out together


@pytest.mark.parametrize("init", ["random", "compute", "fora:2", "fora:3"])
def test_target_cur_is_met_from_any_start(tmp_path, init):
    run = trainer(tmp_path, target_cur=0.5, init=init, iterations=8)  # two trajectories: far from converged
    start = run.router.logits.detach().clone()
    assert torch.equal(start, initial_logits(init, 4, start.shape[1], torch.Generator().manual_seed(0)))
    if init != "random":
        table = (torch.ones_like(start, dtype=torch.bool) if init == "compute" else
                 CacheSchedule.fora(4, start.shape[1], int(init[5:])).table)
        assert CacheSchedule.from_gates(torch.sigmoid(start), 0.1).table.equal(table)
    router = run.run(progress=False)
    assert router.schedule().cur == pytest.approx(0.5)  # at the router's own (calibrated) tau
    saved = Router.from_pretrained(tmp_path / "router")
    assert saved.info.tau == router.info.tau and saved.schedule().cur == pytest.approx(0.5)
    assert 1e-4 / BETA_RANGE <= run.beta <= 1e-4 * BETA_RANGE


def test_a_bad_start_is_named():
    with pytest.raises(ValueError, match=r"^init: expected random, compute or fora:N \(N >= 1\), got 'fora:0'$"):
        TrainConfig(init="fora:0")
