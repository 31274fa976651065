"""Router training (SDT + IEPO) on a tiny DiT: resume, interruption, DDP, lambda, target CUR."""

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harmonica.families.dit import DiTTask
from harmonica.models import build_transformer
from harmonica.training import RouterTrainer, TrainConfig

FAST = dict(num_steps=4, batch=2, lambda_batch=2, refresh=5, beta=1e-4, lr=0.05, checkpoint_every=100)


def trainer(out_dir, **overrides):
    config = TrainConfig(**{**FAST, **overrides})
    transformer = build_transformer("tiny-dit")
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return RouterTrainer(DiTTask(transformer, config.num_steps, config.guidance), config, out_dir)


def test_resume_continues_exactly(tmp_path):
    straight = trainer(tmp_path / "straight", iterations=12).run(progress=False)
    trainer(tmp_path / "split", iterations=7).run(progress=False)  # stops mid-trajectory (3 iterations each)
    resumed = trainer(tmp_path / "split", iterations=12)
    router = resumed.run(resume=True, progress=False)
    assert resumed.iteration == 12
    assert torch.equal(router.logits, straight.logits)
    lines = (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 12


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_writes_a_checkpoint_and_a_partial_router_and_resume_finishes(tmp_path, signum):
    import json

    run = trainer(tmp_path / "a", iterations=10)
    step = run.train_step

    def interrupted_step():
        record = step()
        if run.iteration == 4:
            os.kill(os.getpid(), signum)
        return record

    run.train_step = interrupted_step
    handler = signal.getsignal(signum)
    run.run(progress=False)
    assert run.iteration == 4 and signal.getsignal(signum) is handler
    saved = torch.load(tmp_path / "a" / "checkpoint-rank0.pt", weights_only=True)
    assert saved["iteration"] == 4 and len(saved["trajectory"]["rows"]) == 1  # 3 steps, then step 1 of the next
    info = json.loads((tmp_path / "a" / "router" / "router.json").read_text())
    assert (info["complete"], info["iterations"], info["planned_iterations"]) == (False, 4, 10)
    log = tmp_path / "a" / "train_log.jsonl"
    with log.open("a") as f:
        f.write(json.dumps({"iteration": 5}) + "\n")  # logged after the checkpoint by a killed run
    finished = trainer(tmp_path / "a", iterations=10).run(resume=True, progress=False)
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == list(range(1, 11))
    assert torch.equal(finished.logits, trainer(tmp_path / "b", iterations=10).run(progress=False).logits)
    info = json.loads((tmp_path / "a" / "router" / "router.json").read_text())
    assert (info["complete"], info["iterations"], info["planned_iterations"]) == (True, 10, 10)


def test_resume_refuses_other_settings(tmp_path):
    trainer(tmp_path, iterations=2).run(progress=False)
    with pytest.raises(ValueError, match=r"--resume: .*checkpoint-rank0.pt was trained with other settings: "
                                         r"beta: checkpoint has 0.0001, got 0.001$"):
        trainer(tmp_path, iterations=4, beta=1e-3).run(resume=True, progress=False)


def refreshed(run):
    with run.attached():
        run.refresh_lambda()
    return run.lam.clone()


def test_lambda_objectives(tmp_path):
    run = trainer(tmp_path, objective="cumulative")
    cumulative = refreshed(run)
    assert cumulative[1:].min() > 0 and torch.isfinite(cumulative).all()
    with torch.no_grad():
        run.router.logits.fill_(5.0)  # every unit (almost) computes: caching changes (almost) nothing
    assert refreshed(run)[1:].max() < 1e-3 * cumulative[1:].max()
    loo = refreshed(trainer(tmp_path, objective="leave-one-out"))
    assert loo[1:].min() > 0 and not torch.equal(loo, cumulative)
    assert torch.equal(refreshed(trainer(tmp_path, objective="l2c")), torch.ones(4))


def test_refresh_keeps_the_trajectory_slots(tmp_path):
    run = trainer(tmp_path, iterations=2)
    run.run(progress=False)
    with run.attached():  # replays the trajectory in progress: its slots are back
        slots = [s.clone() for s in run.engine.slots]
        run.refresh_lambda()
        assert all(torch.equal(a, b) for a, b in zip(slots, run.engine.slots))


def test_target_cur_raises_beta_until_units_are_reused(tmp_path):
    run = trainer(tmp_path, iterations=30, beta=1e-6, target_cur=0.5, lr=0.5)
    run.run(progress=False)
    assert run.beta > 1e-6
    assert run.router.schedule(0.1).cur > 0


def test_router_file_records_the_training(tmp_path):
    from harmonica import Router

    trainer(tmp_path, iterations=3).run(progress=False)
    router = Router.from_pretrained(tmp_path / "router")
    assert router.info.sampler == "dit-ddim" and router.info.timesteps == [999, 666, 333, 0]
    assert router.info.tau == 0.1 and len(router.info.units) == 4


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        router = trainer(out_dir, iterations=6).run(progress=False)
        torch.save(router.logits.detach(), f"{out_dir}/logits-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_end_with_identical_routers(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"logits-{r}.pt") for r in range(2))
    assert torch.equal(a, b)
    single = trainer(tmp_path / "single", iterations=6).run(progress=False)
    assert not torch.equal(a, single.logits.detach()), "the ranks' gradients were not combined"


def test_cumulative_lambda_switches_steps_on_one_by_one(tmp_path):
    run = trainer(tmp_path)
    gates = run.router.gates().detach()

    def routed_through(i):
        table = torch.ones_like(gates)
        table[1:i + 1] = gates[1:i + 1]
        return run.rollout(run.lambda_noise, run.lambda_inputs, table)

    with run.attached():
        run.refresh_lambda()
        off = run.rollout(run.lambda_noise, run.lambda_inputs)
        torch.testing.assert_close(run.lam[1], torch.mean((routed_through(1) - off) ** 2))
        torch.testing.assert_close(run.lam[2], torch.mean((routed_through(2) - routed_through(1)) ** 2))


def test_logits_stay_clamped(tmp_path):
    run = trainer(tmp_path, iterations=3, beta=10.0, lr=1.0)
    with torch.no_grad():
        run.router.logits[1:] = -4.9  # the L1 term pushes every trained row further down
    run.run(progress=False)
    assert run.router.logits[1:].min() == -5.0 and torch.all(run.router.logits[0] == 5.0)


def test_pixart_router_trains_on_embeddings_and_runs_in_the_pipeline(tmp_path):
    """Train on a file of prompt embeddings, then sample with the router in the PixArt pipeline."""
    from safetensors.torch import save_file

    import harmonica
    from harmonica import Router
    from harmonica.cli import main
    from harmonica.models import build_pipeline

    gen = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(3, 8, 32, generator=gen), "prompt_attention_mask": torch.ones(3, 8),
               "negative_embeds": torch.randn(1, 8, 32, generator=gen), "negative_attention_mask": torch.ones(1, 8)},
              str(tmp_path / "embeds.safetensors"))
    args = ["train", "--model", "tiny-pixart", "--random-weights", "--objective", "iepo",
            "--embeds", str(tmp_path / "embeds.safetensors"),
            "--steps", "5", "--iterations", "6", "--batch", "2", "--lambda-batch", "2", "--refresh", "4",
            "--guidance", "4.5", "--beta", "1e-3", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    router = Router.from_pretrained(tmp_path / "run" / "router")
    assert router.info.sampler == "DPMSolverMultistepScheduler" and len(router.info.units) == 6
    pipe = build_pipeline("tiny-pixart", random_weights=True)
    harmonica.enable(pipe, router)
    embeds = torch.randn(1, 8, 32, generator=gen)
    mask = torch.ones(1, 8)
    pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
         negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=mask, num_inference_steps=5,
         height=64, width=64, use_resolution_binning=False, output_type="latent")
    assert harmonica.summary(pipe).sampler == "DPMSolverMultistepScheduler"
    with pytest.raises(ValueError, match=r"timesteps: router has"):
        pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
             negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=mask,
             num_inference_steps=6, height=64, width=64, use_resolution_binning=False, output_type="latent")


def test_pixart_training_on_weights_needs_embeddings(tmp_path, capsys):
    """Weights train on the prompts of a --embeds file (random weights may take random prompts)."""
    from harmonica.cli import main

    assert main(["train", "--model", "tiny-pixart", "--out", str(tmp_path / "run")]) == 2
    assert "--embeds: the weights of tiny-pixart train on precomputed prompt embeddings" in capsys.readouterr().err
