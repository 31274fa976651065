"""The committed digits models as users drive them: digits-flux draws digits through the FLUX task, `harmonica
sample` writes the grid of uncached and cached digits, `harmonica train` runs on both models."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from harmonica import CacheSchedule, disable, enable
from harmonica.cli import main
from harmonica.digits import (
    DIGITS_MODELS,
    GRID_GAP,
    GRID_SCALE,
    NUM_CLASSES,
    SIZE,
    DigitsFlux,
    comparison_grid,
    eval_batch,
    psnr,
    quality,
)
from harmonica.router import RouterInfo
from harmonica.search import router_from_table, spread
from harmonica.units import cached_units


@pytest.fixture(scope="module")
def flux():
    return DigitsFlux()


def test_digits_flux_draws_the_requested_digits(flux):
    noise, labels = eval_batch(100)
    with torch.no_grad():
        samples = flux.sample(noise, labels, flux.steps)
    result = quality(samples, labels)
    assert result["accuracy"] > 0.8
    assert quality(samples, labels.roll(1))["accuracy"] < 0.3  # the accuracy is about the classes asked for


def test_digits_flux_latents_are_the_packed_images(flux):
    images = torch.randn(3, 1, SIZE, SIZE)
    latents = flux.latents(images)
    assert latents.shape == (3, 16, 4)
    assert torch.equal(latents[0, 0], images[0, 0, :2, :2].flatten())  # token 0: the top-left 2 x 2 patch
    assert torch.equal(flux.images(latents), images)
    task = flux.task(flux.steps, 1.0)
    assert task.latent_shape == (16, 4) and torch.equal(task.unpack(latents), images)


def test_digits_flux_refuses_guidance(flux):
    with pytest.raises(ValueError, match="--guidance: expected 1 for digits-flux"):
        flux.task(20, 2.0)


def test_a_flow_task_with_other_steps_is_the_task_built_for_them(flux):
    task = flux.task(20, 1.0)
    short = task.with_steps(7)
    fresh = flux.task(7, 1.0)
    assert type(short) is type(task) and short.num_steps == 7
    assert short.timesteps == fresh.timesteps and torch.equal(short.table.tensor("cpu"), fresh.table.tensor("cpu"))


def test_the_grid_shows_the_digits_it_was_given():
    gen = torch.Generator().manual_seed(3)
    top, bottom = (torch.rand(4, 1, SIZE, SIZE, generator=gen) * 2 - 1 for _ in range(2))
    grid = np.asarray(comparison_grid(top, bottom, ["a"] * 4, "caption"))
    cell = SIZE * GRID_SCALE
    for row, digits in enumerate((top, bottom)):
        for i in range(4):
            y, x = GRID_GAP + row * (cell + GRID_GAP), GRID_GAP + i * (cell + GRID_GAP)
            tile = grid[y:y + cell:GRID_SCALE, x:x + cell:GRID_SCALE]  # one value per digit pixel
            expected = ((digits[i, 0] + 1) * 127.5).round().numpy()
            assert np.array_equal(tile, expected), (row, i)


@pytest.mark.parametrize("name", sorted(DIGITS_MODELS))
def test_sample_writes_the_grid_and_its_psnr_is_the_cached_samples(name, tmp_path, capsys):
    out = tmp_path / "grid.png"
    steps = "6"
    assert main(["sample", "--model", name, "--schedule", "fora:2", "--steps", steps, "--seed", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    shown = float(re.search(r"PSNR ([0-9.]+) dB", printed).group(1))
    model = DIGITS_MODELS[name]()
    noise, labels = eval_batch(NUM_CLASSES, seed=4)
    with torch.no_grad():
        reference = model.sample(noise, labels, 6, model.guidance)
        enable(model.transformer, CacheSchedule.fora(6, len(cached_units(model.transformer)), 2))
        try:
            cached = model.sample(noise, labels, 6, model.guidance)
        finally:
            disable(model.transformer)
    assert shown == pytest.approx(psnr(cached, reference), abs=0.006)
    assert 10 < shown < 60  # FORA:2 changes the samples, a little
    grid = np.asarray(Image.open(out))
    cell = SIZE * GRID_SCALE
    first = grid[GRID_GAP:GRID_GAP + cell:GRID_SCALE, GRID_GAP:GRID_GAP + cell:GRID_SCALE]
    assert np.array_equal(first, ((reference[0, 0].clamp(-1, 1) + 1) * 127.5).round().numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # nothing else left behind


@pytest.mark.parametrize("option", [["--weights", "x"], ["--random-weights"], ["--class-label", "3"],
                                    ["--prompt-embeddings", "e.safetensors"], ["--sampler", "dit-ddim"]])
def test_sample_refuses_what_a_digits_model_does_not_take(option, tmp_path, capsys):
    assert main(["sample", "--model", "digits-dit", *option, "--out", str(tmp_path / "g.png")]) == 2
    assert f"{option[0]}: expected only with " in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_sample_refuses_a_router_of_the_other_digits_model(tmp_path, capsys):
    dit = DIGITS_MODELS["digits-dit"]()
    task = dit.task(4, dit.guidance)
    info = RouterInfo.for_model(dit.transformer, sampler=task.sampler, timesteps=list(task.timesteps))
    router = router_from_table(spread(4, len(info.units), 2 * len(info.units)), info)
    router.save_pretrained(tmp_path / "router")
    assert main(["sample", "--model", "digits-flux", "--router", str(tmp_path / "router"), "--out",
                 str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "--router:" in err and "model_class: router has DiTTransformer2DModel, got FluxTransformer2DModel" in err
    assert main(["sample", "--model", "digits-dit", "--router", str(tmp_path / "router"), "--out",
                 str(tmp_path / "g.png")]) == 0
    assert "CUR 50.0%" in capsys.readouterr().out  # rows 0 and 2 of 4 compute


def test_train_searches_digits_flux_and_closes_with_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("harmonica.cli.train.DIGITS_REPORT_SAMPLES", 20)
    assert main(["train", "--model", "digits-flux", "--steps", "6", "--batch", "4", "--rounds", "1", "--candidates",
                 "2", "--eval-batch", "4", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "router searched" in printed and "sampler FlowMatchEulerDiscreteScheduler, 6 steps" in printed
    assert "quality on 20 samples: uncached FD" in printed
    assert "held-out comparison on 4 calibration noises" in printed and "3 steps" in printed
