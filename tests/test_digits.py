"""The committed digits DiT really generates digits; the quality metrics are right."""

import pytest
import torch
from safetensors.torch import load_file

from harmonica.cli import main
from harmonica.digits import (
    DATA,
    STATS_FILE,
    eval_batch,
    feature_stats,
    frechet_distance,
    load_classifier,
    load_digits_dit,
    psnr,
    quality,
    real_digits,
    sample,
)


def test_frechet_distance_of_known_gaussians():
    mean, cov = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0, abs=1e-9)
    # 1-D: (0 - 1)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2
    assert frechet_distance(torch.zeros(1), torch.eye(1), torch.ones(1), 4 * torch.eye(1)) == pytest.approx(2)


def test_psnr():
    a = torch.zeros(2, 1, 8, 8)
    assert psnr(a + 0.2, a) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item())
    assert psnr(a, a) == float("inf")


def test_the_committed_model_draws_the_requested_digits():
    noise, labels = eval_batch(100)
    samples = sample(load_digits_dit(), noise, labels, 10)
    result = quality(samples, labels)
    assert result["accuracy"] > 0.8
    shuffled = quality(samples, labels.roll(1))
    assert shuffled["accuracy"] < 0.3  # the accuracy is about the classes asked for


def test_train_on_digits_prints_cur_and_quality(tmp_path, capsys):
    args = ["train", "--model", "digits-dit", "--objective", "iepo", "--steps", "4", "--iterations", "6",
            "--batch", "4", "--lambda-batch", "4", "--refresh", "3", "--lr", "0.3", "--beta", "1e-3",
            "--out", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "router after 6 iterations" in printed and "CUR" in printed
    assert "quality on 500 samples: uncached FD" in printed and "PSNR vs uncached" in printed


def test_the_quality_report_stops_before_the_next_batch():
    from harmonica import CacheSchedule
    from harmonica.cli.train import digits_report
    from harmonica.digits import DigitsDiT

    model, asked = DigitsDiT(), []
    schedule = CacheSchedule.fora(4, 12, 2)
    assert digits_report(model, schedule, 4, count=6, batch=2, stopped=lambda: asked.append(1) or len(asked) > 4) \
        is None
    assert len(asked) == 5 and not hasattr(model.transformer, "_harmonica")  # 3 uncached batches, 1 cached, stopped
    assert digits_report(model, schedule, 4, count=6, batch=2).startswith("quality on 6 samples: uncached FD ")


def test_the_committed_digits_are_the_ones_the_statistics_came_from():
    images, labels = real_digits()
    assert images.shape == (1797, 1, 8, 8) and images.min() == -1 and images.max() == 1
    assert labels.bincount().tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    classifier = load_classifier()
    with torch.no_grad():
        features = classifier.features(images)
    mean, cov = feature_stats(features)
    stats = load_file(str(DATA / STATS_FILE))
    # The file holds float64 statistics of float32 features computed on another machine, whose BLAS
    # sums in another order: each feature may differ by float32 rounding over every layer's reduction
    # (eps x reductions x scale), the mean by as much, a covariance entry by twice that times the
    # largest centred feature.
    feature_layers = [*classifier.convs, classifier.features_layer]
    reductions = sum(layer.weight[0].numel() for layer in feature_layers if hasattr(layer, "weight"))
    scale = features.abs().max().item()
    feature_error = torch.finfo(torch.float32).eps * reductions * scale
    assert torch.allclose(mean, stats["mean"], rtol=0, atol=feature_error)
    assert torch.allclose(cov, stats["cov"], rtol=0, atol=2 * feature_error * 2 * scale + feature_error**2)
    # and a far smaller change than a different data set or classifier would make: not a vacuous bound
    assert feature_error < 1e-2 * mean.abs().max().item()
