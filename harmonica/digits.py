"""digits-dit: a small class-conditional DiT that really learned something, for proving routers on CPU.

The model is diffusers' `DiTTransformer2DModel` (6 blocks, hidden 64, 12 units) trained as a
pixel-space diffusion model (DiT's linear beta schedule, eps prediction, 10% label dropout for
guidance) on scikit-learn's 1797 handwritten 8x8 digits, scaled to [-1, 1] (16 tokens). A small CNN
trained on the same digits gives class accuracy and 64-d features for a Fréchet distance against
the real digits' feature statistics. The real digits themselves are committed too
(`digits_images.safetensors`: scikit-learn's `load_digits` data, uint8 pixel values 0..16, and the
labels), for Learning-to-Cache's training, which needs real images. The model, classifier and statistics
files are made by `python -m harmonica.digits`; everything runs from the committed files.
"""

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from .files import write_file
from .samplers import dit_alphas_cumprod, dit_ddim_sample

DATA = Path(__file__).resolve().parent / "data"
MODEL_FILE, CLASSIFIER_FILE, STATS_FILE = "digits_dit.safetensors", "digits_classifier.safetensors", \
    "digits_stats.safetensors"
IMAGES_FILE = "digits_images.safetensors"
SIZE = 8
NUM_CLASSES = 10
DIT_CONFIG = {"num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 1, "out_channels": 1,
              "num_layers": 6, "sample_size": SIZE, "patch_size": 2, "num_embeds_ada_norm": NUM_CLASSES}


def build_digits_dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DIT_CONFIG)


def load_digits_dit():
    """The committed digits DiT (fp32, eval mode)."""
    model = build_digits_dit()
    model.load_state_dict(load_file(str(DATA / MODEL_FILE)))
    return model.eval()


class DigitClassifier(torch.nn.Module):
    """(N, 1, 8, 8) in [-1, 1] -> logits (N, 10); `features` gives the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU())
        self.features_layer = torch.nn.Linear(64 * 2 * 2, 64)
        self.head = torch.nn.Linear(64, NUM_CLASSES)

    def features(self, x):
        return F.relu(self.features_layer(self.convs(x).flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def load_classifier() -> DigitClassifier:
    model = DigitClassifier()
    model.load_state_dict(load_file(str(DATA / CLASSIFIER_FILE)))
    return model.eval()


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """||m1 - m2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), in float64 through eigendecompositions."""
    def sqrt_psd(matrix):
        values, vectors = torch.linalg.eigh(matrix)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    root = sqrt_psd(cov1)
    cross = torch.linalg.eigvalsh(root @ cov2 @ root).clamp(min=0).sqrt().sum()
    return ((mean1 - mean2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def feature_stats(features: torch.Tensor):
    features = features.double()
    return features.mean(0), torch.cov(features.T)


@torch.no_grad()
def quality(samples: torch.Tensor, labels: torch.Tensor, classifier=None) -> dict:
    """Fréchet distance to the real digits in the classifier's feature space, and class accuracy."""
    classifier = classifier or load_classifier()
    x = samples.float().clamp(-1, 1)
    stats = load_file(str(DATA / STATS_FILE))
    return {"fd": frechet_distance(*feature_stats(classifier.features(x)), stats["mean"], stats["cov"]),
            "accuracy": (classifier(x).argmax(1) == labels).float().mean().item()}


def psnr(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] against the uncached images of the same seeds (peak-to-peak 2)."""
    mse = torch.mean((samples.float().clamp(-1, 1) - reference.float().clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def eval_batch(count: int, seed: int = 0):
    """(noise (N, 1, 8, 8), labels (N,)) of a fixed seed, the classes in turn."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, SIZE, SIZE, generator=gen), torch.arange(count) % NUM_CLASSES


def sample(model, noise, labels, num_steps: int, guidance: float = 1.5) -> torch.Tensor:
    return dit_ddim_sample(model, labels, num_steps=num_steps, guidance_scale=guidance, latents=noise)


def real_digits() -> tuple:
    """(images (1797, 1, 8, 8) float32 in [-1, 1], labels (1797,) int64): scikit-learn's digits, committed."""
    data = load_file(str(DATA / IMAGES_FILE))
    images = data["images"].float()[:, None] / 16.0  # pixel values 0 .. 16
    return images * 2 - 1, data["labels"].long()


# ---- fitting the committed model, classifier and statistics ----


def _shifted(images, gen):
    """Random shifts of up to 1 pixel, for augmentation."""
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def fit_classifier(images, labels, *, epochs: int = 40, seed: int = 0) -> DigitClassifier:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    train, held_out = order[:1500], order[1500:]
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in train[torch.randperm(len(train), generator=gen)].split(128):
            loss = F.cross_entropy(model(_shifted(images[batch], gen)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    print(f"classifier: held-out accuracy {accuracy:.1%} on {len(held_out)} digits")
    return model.eval()


def fit_dit(images, labels, *, iterations: int = 4000, batch: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_digits_dit().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    alphas = dit_alphas_cumprod().float()
    start = time.perf_counter()
    for it in range(iterations):
        index = torch.randint(0, len(images), (batch,), generator=gen)
        x0 = _shifted(images[index], gen)
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(xt, timestep=t, class_labels=labels[index]).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if it % 500 == 0 or it == iterations - 1:
            print(f"dit: iteration {it}, loss {loss.item():.4f}, {time.perf_counter() - start:.0f} s")
    return model.eval()


def fit(out_dir=DATA) -> None:
    """Train the classifier and the DiT on the real digits and write the three files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = real_digits()
    classifier = fit_classifier(images, labels)
    with torch.no_grad():
        mean, cov = feature_stats(classifier.features(images))
    write_file(out_dir / CLASSIFIER_FILE, save({k: v.contiguous() for k, v in classifier.state_dict().items()}))
    write_file(out_dir / STATS_FILE, save({"mean": mean, "cov": cov}))
    model = fit_dit(images, labels)
    write_file(out_dir / MODEL_FILE, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    noise, eval_labels = eval_batch(500)
    result = quality(sample(model, noise, eval_labels, 20), eval_labels, classifier)
    print(f"dit: DDIM-20 samples: FD {result['fd']:.2f}, accuracy {result['accuracy']:.1%}")


if __name__ == "__main__":
    fit()
