"""Router training follows the official code: one AdamW parameter per step's row (untrained rows do not
move, their Adam state untouched) and the MSE of the guidance-combined output the sampler uses."""

import pytest
import torch
from test_training import FAST, trainer

from harmonica.training import HOLD_GAIN, PixArtTask, RouterTrainer, TrainConfig


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
    assert torch.equal(run.trajectory.down[-1], run.rows[2].grad > 0)  # what the target-CUR controller reads
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


@pytest.mark.parametrize("logit, down, error", [
    (0.0, 4, 0.5 * HOLD_GAIN),  # CUR 0 < 0.5, but the gradients push every unit down (CUR 0.75 ahead): hold
    (0.0, 2, 0.5),  # CUR 0, half of each row pushed down (CUR 0.375 ahead): raise beta
    (0.0, 0, 0.5),  # CUR 0, every unit pushed up: raise beta
    (-5.0, 4, -0.25),  # CUR 0.75 > 0.5, every unit pushed down: lower beta
    (-5.0, 0, -0.25 * HOLD_GAIN),  # CUR 0.75, every unit pushed up (CUR 0 ahead): hold
], ids=["heading-down", "half-down", "up", "staying-down", "heading-up"])
def test_target_cur_holds_beta_while_the_rows_head_across_the_target(tmp_path, logit, down, error):
    from harmonica.training import Trajectory

    run = trainer(tmp_path, target_cur=0.5)  # 4 steps x 4 units; row 0 always computes; tau 0.1
    pushed = torch.arange(4) < down
    traj = Trajectory(None, {}, [torch.sigmoid(torch.full((4,), logit))] * 3, [pushed] * 3)
    with torch.no_grad():
        run.router.logits[1:] = logit
    assert run._beta_error(traj) == pytest.approx(error, abs=1e-12)
