"""`harmonica sample` as a new user runs it, and the original DiT DDIM sampler."""

import numpy as np
import pytest
import torch
from PIL import Image

from harmonica.cli import main
from harmonica.models import build_pipeline
from harmonica.samplers import dit_alphas_cumprod, dit_ddim_sample
from harmonica.schedule import parse_schedule


def test_sample_with_fora_reports_cur_and_speedup(tmp_path, capsys):
    out = tmp_path / "fora.png"
    args = ["sample", "--model", "tiny-pixart", "--random-weights", "--schedule", "fora:2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # MACs counted at the forward's own size and its 8 text tokens (tiny-pixart's prompt length)
    assert ("fora:2 (DPMSolverMultistepScheduler): 20 steps x 6 units, CUR 50.0%, theoretical speedup 1.75x at "
            "64x64") in printed
    assert "sampler dpm-solver++" in printed and "measured" in printed
    assert Image.open(out).size == (64, 64)


def test_no_cache_image_is_the_plain_diffusers_image(tmp_path):
    out = tmp_path / "plain.png"
    assert main(["sample", "--model", "tiny-pixart", "--random-weights", "--no-cache", "--out", str(out)]) == 0
    pipe = build_pipeline("tiny-pixart", random_weights=True)
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 8, 32, generator=generator)  # tiny-pixart: 8 tokens of 32 channels
    mask = torch.ones(embeds.shape[:2])
    image = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                 negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=mask,
                 num_inference_steps=20, guidance_scale=4.5, generator=generator, height=64, width=64,
                 use_resolution_binning=False).images[0]
    # the DPM-Solver++ table equals the scheduler's step within fp32 rounding: at most one level of 255
    assert np.abs(np.asarray(Image.open(out)).astype(int) - np.asarray(image)).max() <= 1
    cached = tmp_path / "cached.png"
    main(["sample", "--model", "tiny-pixart", "--random-weights", "--schedule", "fora:3", "--out", str(cached)])
    assert not np.array_equal(np.asarray(Image.open(cached)), np.asarray(image))


def test_cuda_graphs_and_compile_flags_on_cpu(tmp_path, monkeypatch):
    from harmonica import graphs

    monkeypatch.setattr(graphs, "_WARNED_CPU", False)
    base = ["sample", "--model", "tiny-dit", "--random-weights", "--schedule", "fora:2", "--steps", "4"]
    assert main(base + ["--out", str(tmp_path / "eager.png")]) == 0
    with pytest.warns(UserWarning, match="no CUDA graphs"):
        assert main(base + ["--cuda-graphs", "--out", str(tmp_path / "graphs.png")]) == 0
    eager, graphed = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("eager", "graphs"))
    assert np.array_equal(eager, graphed)


def test_scheduler_in_graph_flag_runs_the_table_loop(tmp_path, monkeypatch, capsys):
    from harmonica import graphs, samplers

    monkeypatch.setattr(graphs, "_WARNED_CPU", True)
    calls, original = [], samplers.SolverLoop.advance

    def advance(loop, output):
        calls.append(loop.runner is not None)
        original(loop, output)

    monkeypatch.setattr(samplers.SolverLoop, "advance", advance)
    base = ["sample", "--model", "tiny-pixart", "--random-weights", "--schedule", "fora:2", "--steps", "4"]
    assert main(base + ["--out", str(tmp_path / "eager.png")]) == 0
    assert calls == [False] * 4  # each step after the forward
    calls.clear()
    assert main(base + ["--cuda-graphs", "--scheduler-in-graph", "--out", str(tmp_path / "table.png")]) == 0
    assert calls == [True] * 4  # every step through the runner's epilogue
    eager, table = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("eager", "table"))
    assert np.array_equal(eager, table)
    assert main(base + ["--scheduler-in-graph", "--out", str(tmp_path / "x.png")]) == 2
    assert main(base + ["--cuda-graphs", "--scheduler-in-graph", "--sampler", "sa-solver"]) == 2
    errors = capsys.readouterr().err
    assert "scheduler_in_graph: expected together with cuda_graphs=True" in errors
    assert ("--scheduler-in-graph: expected a sampler whose step can run inside the graphs (dit-ddim, dpm-solver++), "
            "got sa-solver") in errors


def test_dit_ddim_with_delta_dit(tmp_path, capsys):
    out = tmp_path / "dit.png"
    args = ["sample", "--model", "tiny-dit", "--random-weights", "--schedule", "delta-dit:b=5,n=2", "--steps", "10"]
    assert main(args + ["--out", str(out)]) == 0
    assert "delta-dit:b=5,n=2 (dit-ddim): 10 steps x 4 units" in capsys.readouterr().out


def test_missing_weights_suggest_random_weights(capsys):
    assert main(["sample", "--model", "tiny-dit", "--weights", "/nonexistent/pipeline"]) == 2
    assert "--random-weights" in capsys.readouterr().err


@pytest.mark.parametrize("spec,message", [
    ("fora:x", r"--schedule: could not read 'fora:x'"),
    ("taylor:2", r"--schedule: expected 'no-cache', 'fora:N' or 'delta-dit\[:b=B,n=N\[,blocks=C\]\]', got 'taylor:2'"),
    ("delta-dit:b=3", r"--schedule: could not read 'delta-dit:b=3'"),
    ("delta-dit:b=3,n=2,x=1", r"--schedule: could not read 'delta-dit:b=3,n=2,x=1' \(expected b=B,n=N\[,blocks=C\]\)"),
    ("delta-dit:b=11,n=2", r"--schedule: 'delta-dit:b=11,n=2' does not fit 10 steps"),
])
def test_bad_schedule_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(spec, 10, ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"])


def test_bare_delta_dit_is_the_bench_default():
    units = [f"transformer_blocks.{b}.{u}" for b in range(2) for u in ("attn1", "ff")]
    assert parse_schedule("delta-dit", 10, units) == parse_schedule("delta-dit:b=5,n=2", 10, units)
    assert parse_schedule("delta-dit", 10, units).name == "delta-dit:b=5,n=2"


class ConstantEps(torch.nn.Module):
    """A stand-in DiT whose output is eps = 1 for the conditional half and 0 for the null class."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"in_channels": 4, "sample_size": 2, "num_embeds_ada_norm": 1000})()
        self.dtype = torch.float32
        self.timesteps = []

    def forward(self, hidden_states, timestep, class_labels):
        self.timesteps.append(timestep.tolist())
        return ((class_labels != 1000).float()[:, None, None, None].expand(-1, 8, 2, 2),)


def test_dit_ddim_guides_three_channels():
    model, x = ConstantEps(), torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    result = dit_ddim_sample(model, torch.tensor([5]), num_steps=2, guidance_scale=4.0, latents=x)
    assert model.timesteps == [[999, 999], [0, 0]]
    alphas = dit_alphas_cumprod()
    eps = torch.tensor([4.0, 4.0, 4.0, 1.0])[None, :, None, None]  # guided: 0 + 4 * (1 - 0); channel 3 unguided
    expected, largest = x, 0.0
    for t, prev in ((999, alphas[0].item()), (0, 1.0)):
        a = alphas[t].item()
        largest = max(largest, ((expected.abs() + (1 - a) ** 0.5 * eps) / a ** 0.5).max().item())
        x0 = (expected - (1 - a) ** 0.5 * eps) / a ** 0.5
        expected = prev ** 0.5 * x0 + (1 - prev) ** 0.5 * eps
    # fp32 on both sides: per step ~20 roundings of u x the largest term (4 coefficients and 6 operations here, the
    # table's p, q, a, b and 6 operations), none grown by the next step (test_solvers' DDIM); one atol for every
    # element, since x0 cancels terms of ~160 |x| at t = 999
    torch.testing.assert_close(result, expected, rtol=0, atol=2 * 20 * 2.0 ** -24 * largest)


def test_moving_a_pipeline_prints_no_float32_warning():
    """diffusers warns at every dtype cast ("should be kept in float32: []") even for models that keep
    nothing in float32; move_pipeline casts without it."""
    import logging

    from harmonica.models import move_pipeline

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever verbosity an earlier test left
    try:
        pipe = build_pipeline("tiny-pixart", random_weights=True)
        pipe.to("cpu", torch.float32)
        assert any("should be kept in float32" in r.getMessage() for r in records)
        records.clear()
        move_pipeline(pipe, "cpu", torch.float32)
        assert not any("should be kept in float32" in r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
