"""digits-dit and digits-flux: small class-conditional transformers that really learned something, for
proving routers on CPU.

The model is diffusers' DiT transformer (`families.dit`; 6 blocks, hidden 64, 12 units) trained as a
pixel-space diffusion model (DiT's linear beta schedule, eps prediction, 10% label dropout for
guidance) on scikit-learn's 1797 handwritten 8x8 digits, scaled to [-1, 1] (16 tokens). A small CNN
trained on the same digits gives class accuracy and 64-d features for a Fréchet distance against
the real digits' feature statistics. The real digits themselves are committed too
(`digits_images.safetensors`: scikit-learn's `load_digits` data, uint8 pixel values 0..16, and the
labels), for Learning-to-Cache's training, which needs real images.

digits-flux is the flow-matching path FLUX/SD3/Wan/Qwen-Image users run: FLUX.1's
diffusers transformer (2 double-stream and 4 single-stream blocks, hidden 64, 10 units) trained with
rectified flow (x_s = (1 - s) x0 + s noise, velocity target noise - x0, s logit-normal) on the same
digits, packed as FLUX packs latents (2 x 2 pixels per token: 16 tokens of 4 channels). It has no VAE:
its latents are the images. The class is its prompt: a learned bank of 10 prompts (2 tokens of width 32
and a pooled vector of 32 each), committed as a prompt-embeddings file in FLUX.1's pipeline's keys, so it
runs through harmonica's FLUX task (`families.flux.FluxTask`) and its FlowMatchEuler sampler (FLUX.1-dev's
scheduler config, 20 steps) like any FLUX model, without classifier-free guidance.

The files are made by `python -m harmonica.digits [dit|flux]` (both by default; scikit-learn only
refits the real digits file); everything runs from the committed files.
"""

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from .families import dit, flux
from .files import write_file
from .samplers import dit_alphas_cumprod, dit_ddim_sample

PIXEL_RANGE = (-1.0, 1.0)  # the digits models sample pixels: their images are compared clipped to this range

DATA = Path(__file__).resolve().parent / "data"
MODEL_FILE, CLASSIFIER_FILE, STATS_FILE = "digits_dit.safetensors", "digits_classifier.safetensors", \
    "digits_stats.safetensors"
IMAGES_FILE = "digits_images.safetensors"
SIZE = 8
NUM_CLASSES = 10
FLUX_MODEL_FILE, FLUX_CLASSES_FILE = "digits_flux.safetensors", "digits_flux_classes.safetensors"
DIT_CONFIG = {"num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 1, "out_channels": 1,
              "num_layers": 6, "sample_size": SIZE, "patch_size": 2, "num_embeds_ada_norm": NUM_CLASSES}


FLUX_CONFIG = {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 16,
               "num_attention_heads": 4, "joint_attention_dim": 32, "pooled_projection_dim": 32,
               "guidance_embeds": False, "axes_dims_rope": (4, 6, 6)}
FLUX_CLASS_TOKENS = 2  # tokens of each class's prompt
FLUX_STEPS = 20  # its default sampling steps
FLUX_PIXELS = SIZE * 8  # the size the FLUX task is given: its latents are 8x smaller, the 8x8 digit


def build_digits_dit():
    import diffusers

    return getattr(diffusers, dit.TRANSFORMER)(**DIT_CONFIG)


def load_digits_dit():
    """The committed digits DiT (fp32, eval mode)."""
    model = build_digits_dit()
    model.load_state_dict(load_file(str(DATA / MODEL_FILE)))
    return model.eval()


def build_digits_flux():
    import diffusers

    return getattr(diffusers, flux.TRANSFORMER)(**FLUX_CONFIG)


def load_digits_flux() -> tuple:
    """(the committed digits-flux transformer (fp32, eval mode), its class prompts: {"prompt_embeds" (10, 2, 32),
    "pooled_prompt_embeds" (10, 32)}, prompt i the class i)."""
    model = build_digits_flux()
    model.load_state_dict(load_file(str(DATA / FLUX_MODEL_FILE)))
    return model.eval(), load_file(str(DATA / FLUX_CLASSES_FILE))


def flux_task(model, classes: dict, num_steps: int = FLUX_STEPS):
    """digits-flux's `families.flux.FluxTask` (FlowMatchEuler, FLUX.1-dev's scheduler): latents (B, 16, 4), prompt i
    the class i."""
    return flux.FluxTask(model, classes, num_steps, 1.0, height=FLUX_PIXELS, width=FLUX_PIXELS)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) -> (N, 16, 4): FLUX's packing of 2 x 2 patches (`families.flux.unpack` inverts it)."""
    return flux.pack(images)


def sample_flux(task, noise, labels) -> torch.Tensor:
    """digits-flux's samples (N, 1, 8, 8) under its `flux_task` of `noise` (N, 1, 8, 8) and `labels` (N,), caching
    as enabled on the transformer."""
    from .flow import flow_sample

    return task.unpack(flow_sample(task, labels, latents=pack(noise)))  # = DigitsFlux.images


class DigitsDiT:
    """digits-dit as the CLI, the search and the protocols drive it: its transformer, its training task (the
    original DiT DDIM) and its samples. Images and latents are the same (N, 1, 8, 8) pixels."""

    name, steps, guidance = "digits-dit", 10, 1.5

    def __init__(self):
        self.transformer = load_digits_dit()

    def task(self, num_steps: int, guidance: float):
        return dit.DiTTask(self.transformer, num_steps, guidance)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def conditions(self, labels: torch.Tensor) -> dict:
        """The task's conditions (its `model_kwargs`' cond) of the classes `labels` (N,)."""
        return {"class_labels": labels}

    def sample(self, noise, labels, num_steps: int, guidance: float) -> torch.Tensor:
        """Images (N, 1, 8, 8) of noise (N, 1, 8, 8) and labels (N,), caching as enabled on the transformer."""
        return sample(self.transformer, noise, labels, num_steps, guidance)


class DigitsFlux(DigitsDiT):
    """digits-flux as the CLI, the search and the protocols drive it: its task is FLUX's (`flux_task`, no
    guidance), its latents the images packed (N, 16, 4)."""

    name, steps, guidance = "digits-flux", FLUX_STEPS, 1.0

    def __init__(self):
        self.transformer, self.classes = load_digits_flux()

    def task(self, num_steps: int, guidance: float):
        if guidance != 1.0:
            raise ValueError(f"--guidance: expected 1 for digits-flux (it samples without guidance), got {guidance}")
        return flux_task(self.transformer, self.classes, num_steps)

    def latents(self, images):
        return pack(images)

    def conditions(self, labels):
        return {"prompt_index": labels}

    def images(self, latents):
        return flux.unpack(latents, FLUX_PIXELS, FLUX_PIXELS, FLUX_PIXELS // SIZE)

    def sample(self, noise, labels, num_steps: int, guidance: float = 1.0) -> torch.Tensor:
        device = self.transformer.device
        return sample_flux(self.task(num_steps, guidance), noise.to(device), labels.to(device))


DIGITS_MODELS = {model.name: model for model in (DigitsDiT, DigitsFlux)}


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


GRID_SCALE, GRID_GAP, GRID_TEXT = 8, 4, 14  # pixels per digit pixel, between columns, per line of text


def comparison_grid(top: torch.Tensor, bottom: torch.Tensor, notes: list, caption: str):
    """A PIL image: the digits of `top` (N, 1, 8, 8) above those of `bottom` (same shape), values in [-1, 1]
    (clipped), each pixel a GRID_SCALE square, `notes[i]` under column i and `caption` wrapped below."""
    import textwrap

    from PIL import Image, ImageDraw

    count = top.shape[0]
    cell = SIZE * GRID_SCALE
    width = count * (cell + GRID_GAP) + GRID_GAP
    lines = textwrap.wrap(caption, max(20, width // 6))
    height = 2 * cell + 3 * GRID_GAP + GRID_TEXT * (1 + len(lines)) + GRID_GAP
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    for row, digits in enumerate((top, bottom)):
        pixels = ((digits.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # white digit on black
        for i in range(count):
            tile = Image.fromarray(pixels[i, 0].numpy()).resize((cell, cell), Image.NEAREST)
            image.paste(tile, (GRID_GAP + i * (cell + GRID_GAP), GRID_GAP + row * (cell + GRID_GAP)))
    text_top = 2 * cell + 3 * GRID_GAP
    for i, note in enumerate(notes):
        draw.text((GRID_GAP + i * (cell + GRID_GAP), text_top), note, fill=0)
    for j, line in enumerate(lines):
        draw.text((GRID_GAP, text_top + GRID_TEXT * (j + 1)), line, fill=0)
    return image


def class_comparison(model, cache, num_steps: int, guidance: float, seed: int = 0, **enable_options) -> tuple:
    """(the `comparison_grid` PIL image, its caption) of a digits model (`DIGITS_MODELS`): one noise per class
    (`eval_batch(10, seed)`) sampled uncached and with `cache` (a Router or CacheSchedule; `enable_options`
    go to `harmonica.enable`), on the transformer's device."""
    from .api import disable, enable

    device = model.transformer.device
    noise, labels = eval_batch(NUM_CLASSES, seed=seed)
    noise, labels = noise.to(device), labels.to(device)
    with torch.inference_mode():
        reference = model.sample(noise, labels, num_steps, guidance).cpu()
        engine = enable(model.transformer, cache, **enable_options)
        try:
            cached = model.sample(noise, labels, num_steps, guidance).cpu()
        finally:
            disable(model.transformer)
    schedule, task = engine.policy.schedule, model.task(num_steps, guidance)
    caption = (f"{model.name}, {task.sampler} {num_steps} steps, seed {seed}: top uncached, bottom {schedule.name}; "
               f"CUR {schedule.cur:.1%}, {schedule.theoretical_speedup(task.macs()):.2f}x (MACs), PSNR "
               f"{psnr(cached, reference):.2f} dB (under each class: its pair's)")
    notes = [f"{label}: {psnr(c[None], r[None]):.1f}" for label, c, r in zip(labels.tolist(), cached, reference)]
    return comparison_grid(reference, cached, notes, caption), caption


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


def fit_flux(images, labels, *, iterations: int = 4000, batch: int = 128, seed: int = 0) -> tuple:
    """digits-flux and its class prompts (`load_digits_flux`), trained with rectified flow."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_digits_flux().train()
    text, pooled = FLUX_CONFIG["joint_attention_dim"], FLUX_CONFIG["pooled_projection_dim"]
    classes = {"prompt_embeds": torch.nn.Parameter(torch.randn(NUM_CLASSES, FLUX_CLASS_TOKENS, text)),
               "pooled_prompt_embeds": torch.nn.Parameter(torch.randn(NUM_CLASSES, pooled))}
    task = flux_task(model, classes)
    optimizer = torch.optim.AdamW([*model.parameters(), *classes.values()], lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    start = time.perf_counter()
    for it in range(iterations):
        index = torch.randint(0, len(images), (batch,), generator=gen)
        x0 = pack(_shifted(images[index], gen))
        noise = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal, as SD3 and FLUX train
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        inputs = task.prepare({"prompt_index": labels[index]}, xs.device)  # the class prompts, differentiable
        velocity = model(hidden_states=xs, timestep=task._timestep_input(s * 1000), **inputs["kwargs"])[0]
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if it % 500 == 0 or it == iterations - 1:
            print(f"flux: iteration {it}, loss {loss.item():.4f}, {time.perf_counter() - start:.0f} s")
    return model.eval(), {key: value.detach().contiguous() for key, value in classes.items()}


def _save(tensors: dict, path: Path) -> None:
    """A safetensors file written whole (`files.write_file`)."""
    write_file(path, save({k: v.contiguous() for k, v in tensors.items()}))


def fit(models=("dit", "flux"), out_dir=DATA) -> None:
    """Train the classifier (with "dit") and the models on the real digits and write their files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = real_digits()
    noise, eval_labels = eval_batch(500)
    if "dit" in models:
        classifier = fit_classifier(images, labels)
        with torch.no_grad():
            mean, cov = feature_stats(classifier.features(images))
        _save(classifier.state_dict(), out_dir / CLASSIFIER_FILE)
        _save({"mean": mean, "cov": cov}, out_dir / STATS_FILE)
        model = fit_dit(images, labels)
        _save(model.state_dict(), out_dir / MODEL_FILE)
        result = quality(sample(model, noise, eval_labels, 20), eval_labels, classifier)
        print(f"dit: DDIM-20 samples: FD {result['fd']:.2f}, accuracy {result['accuracy']:.1%}")
    if "flux" in models:
        model, classes = fit_flux(images, labels)
        _save(model.state_dict(), out_dir / FLUX_MODEL_FILE)
        _save(classes, out_dir / FLUX_CLASSES_FILE)
        with torch.no_grad():
            result = quality(sample_flux(flux_task(model, classes), noise, eval_labels), eval_labels)
        print(f"flux: FlowMatchEuler-{FLUX_STEPS} samples: FD {result['fd']:.2f}, accuracy {result['accuracy']:.1%}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m harmonica.digits",
                                     description="Refit the committed digits models.")
    parser.add_argument("models", nargs="*", choices=("dit", "flux"), default=["dit", "flux"])
    fit(parser.parse_args().models)
