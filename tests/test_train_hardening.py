"""Router training leaves the model as it found it, checkpoints by time, refuses to mix runs, loads no
pickled code and resumes only what it was trained for."""

import json
import os
import signal

import pytest
import torch
from _helpers import step_inputs
from test_training import trainer

import harmonica
from harmonica import Router
from harmonica.cli import main
from harmonica.samplers import dit_ddim_sample


def model_state(model) -> dict:
    """Per module: its attribute names (an instance `forward`, `_harmonica`), the ids in every hook dict
    and its mode; per parameter: requires_grad."""
    modules = {name: (sorted(vars(m)), {k: list(v) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)},
                      m.training) for name, m in model.named_modules()}
    return {"modules": modules, "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()}}


def plain_forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**step_inputs(model, 1)).sample


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [None, 2], ids=["mid-trajectory", "exception"])
def test_training_leaves_no_state_on_the_model(tmp_path, stop_at):
    run = trainer(tmp_path, iterations=5)  # 3 iterations per trajectory: ends inside the second one
    model = run.transformer
    model.train()  # a mode and requires_grad the trainer changes while it runs
    before, output = model_state(model), plain_forward(model)
    if stop_at is not None:
        step = run.train_step

        def failing_step():
            if run.iteration == stop_at:
                raise Stop
            return step()

        run.train_step = failing_step
        with pytest.raises(Stop):
            run.run(progress=False)
    else:
        run.run(progress=False)
    assert run.engine is None and model_state(model) == before
    assert torch.equal(plain_forward(model), output)
    labels = torch.tensor([3, 7])
    fresh = trainer(tmp_path / "fresh").transformer  # the same weights, never trained on
    latents = []
    for m in (model, fresh):
        harmonica.enable(m, run.router)
        latents.append(dit_ddim_sample(m, labels, num_steps=4, generator=torch.Generator().manual_seed(0)))
        harmonica.disable(m)
    assert torch.equal(latents[0], latents[1]) and torch.isfinite(latents[0]).all()


def checkpoint_iterations(out_dir, minutes: float) -> list:
    """The iterations at which a 3-iteration run saves checkpoints."""
    run = trainer(out_dir, iterations=3, checkpoint_every=100, checkpoint_minutes=minutes)
    save, saved = run.save_checkpoint, []
    run.save_checkpoint = lambda: (saved.append(run.iteration), save())
    run.run(progress=False)
    return saved


def test_checkpoints_by_time_as_well_as_by_count(tmp_path):
    assert checkpoint_iterations(tmp_path / "default", 5.0) == [3]  # at the end of run() only
    assert checkpoint_iterations(tmp_path / "often", 1e-9) == [1, 2, 3, 3]


def train_args(out, *extra):
    return ["train", "--model", "tiny-dit", "--random-weights", "--objective", "iepo", "--steps", "3", "--iterations",
            "2", "--batch", "1", "--lambda-batch", "1", "--refresh", "2", "--out", str(out), *extra]


def test_an_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    assert main(train_args(tmp_path)) == 0
    log = tmp_path / "train_log.jsonl"
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2]
    capsys.readouterr()
    assert main(train_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err == (f"harmonica: error: --out: expected a directory without a training run, got {tmp_path} holding "
                   f"checkpoint-rank0.pt, router, train_log.jsonl; pass --resume to continue it or --overwrite to "
                   f"start afresh\n")
    (tmp_path / "router" / "stale").write_text("")
    assert main(train_args(tmp_path, "--overwrite")) == 0
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "router" / "stale").exists()
    with pytest.raises(SystemExit) as error:
        main(train_args(tmp_path, "--resume", "--overwrite"))
    assert error.value.code == 2 and "not allowed with argument --resume" in capsys.readouterr().err


class WritesAFile:
    """A pickle that, loaded with weights_only=False, creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickled_code_is_refused_by_both_loaders(tmp_path):
    from harmonica.models import build_transformer

    marker = tmp_path / "marker"
    official = tmp_path / "router.pt"
    torch.save({"routers": {"0.prob": torch.zeros(4)}, "args": WritesAFile(marker)}, official)
    message = r"expected a file of tensors and plain containers, got .* holding other objects \(Unsupported global"
    with pytest.raises(ValueError, match="^path: " + message):
        Router.from_official(official, build_transformer("tiny-dit"))
    run = trainer(tmp_path / "run", iterations=1)
    run.run(progress=False)
    torch.save({"iteration": 1, "payload": WritesAFile(marker)}, run.checkpoint_path())
    with pytest.raises(ValueError, match="^--resume: " + message):
        trainer(tmp_path / "run", iterations=2).run(resume=True, progress=False)
    assert not marker.exists()
    torch.load(official, weights_only=False)  # the files really are malicious
    assert marker.exists()


def test_resume_names_every_difference_of_model_steps_and_world(tmp_path):
    trainer(tmp_path, iterations=2).run(progress=False)
    path = tmp_path / "checkpoint-rank0.pt"
    state = torch.load(path, weights_only=True)
    state["run"]["world_size"] = 2  # as if written under torchrun with two ranks
    torch.save(state, path)
    other = trainer(tmp_path, iterations=4, num_steps=5)
    other.transformer.register_to_config(sample_size=16)
    other.info.config_hash = harmonica.router.config_fingerprint(other.transformer)
    with pytest.raises(ValueError) as error:
        other.run(resume=True, progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--resume: {path} was trained with other settings: ")
    diffs = message.split("settings: ")[1].split("; ")
    assert [d.split(":")[0] for d in diffs] == ["config_hash", "timesteps", "world_size", "num_steps"]
    assert diffs[1:] == ["timesteps: checkpoint has [999, 666, 333, 0], got [999, 749, 500, 250, 0]",
                         "world_size: checkpoint has 2, got 1", "num_steps: checkpoint has 4, got 5"]


def test_a_partial_router_warns_when_loaded(tmp_path):
    run = trainer(tmp_path, iterations=3)
    step = run.train_step

    def stopping_step():
        record = step()
        run.stop_signal = signal.SIGTERM  # what the signal handler does
        return record

    run.train_step = stopping_step
    run.run(progress=False)
    with pytest.warns(UserWarning, match=r"router: .* is partial, saved by an interrupted training run after 1 of 3 "
                                         r"iterations"):
        Router.from_pretrained(tmp_path / "router")


@pytest.mark.parametrize("objective", ["cumulative", "leave-one-out"])
def test_a_signal_during_the_lambda_refresh_stops_it_after_one_rollout(tmp_path, objective, capsys):
    run = trainer(tmp_path / "a", iterations=8, objective=objective)  # refreshes at iterations 0 and 5
    rollout, calls = run.rollout, []

    def interrupted_rollout(*args):
        calls.append(run.iteration)
        if calls.count(5) == 1 and run.iteration == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return rollout(*args)

    run.rollout = interrupted_rollout
    run.run()  # with its progress bars
    assert calls.count(5) == 1 and run.iteration == 5 and run.stop_signal == signal.SIGINT
    assert "lambda refresh:   0%|          | 0/4" in capsys.readouterr().err
    saved = torch.load(tmp_path / "a" / "checkpoint-rank0.pt", weights_only=True)
    assert saved["iteration"] == 5 and len(saved["trajectory"]["rows"]) == 2
    finished = trainer(tmp_path / "a", iterations=8, objective=objective).run(resume=True, progress=False)
    straight = trainer(tmp_path / "b", iterations=8, objective=objective).run(progress=False)
    assert torch.equal(finished.logits, straight.logits)
