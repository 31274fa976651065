"""One generation of a preset, as `harmonica sample` and the profiled workload make it: preset -> transformers and
scheduler (`models.load_experts`, `models.load_scheduler`) -> prompt bank and conditions -> task
(`models.preset_task`) -> `harmonica.enable` -> `samplers.sample` -> decode (`task.decode`). Every family goes
through the same steps; what differs is in its module (harmonica/families).

A text-conditional model samples the first prompt of a bank: an embeddings file (`read_bank`; `harmonica embed`
writes one), a random prompt for random weights (`prompts.random_embeddings`), or a prompt through its pipeline's
text encoders (`encoded_bank`). A class-conditional one (DiT) samples a class (`first_conditions`).
"""

import numpy as np
import torch

DEFAULT_PROMPT = "A small cactus with a happy face in the Sahara desert."


def default_guidance(spec, sampler: str) -> float:
    """The guidance a preset samples at by default: its sampler's (`Family.samplers`), else the preset's."""
    samplers = spec.family.samplers
    return samplers[sampler][2] if samplers else spec.guidance


def read_bank(spec, path, config, option: str) -> dict:
    """The prompt bank of the embeddings file `path` for preset `spec` (transformer `config`): PixArt's checked
    here (`Family.read_embeddings`), a flow family's by its task. Errors name `option` and the file."""
    from .flow import load_flow_embeddings

    reader = spec.family.read_embeddings
    return reader(path, config, option) if reader is not None else load_flow_embeddings(path, option)


def given_bank(spec, transformer, *, path=None, random_weights: bool = False,
               generator: torch.Generator | None = None, option: str = "--prompt-embeddings",
               count: int = 1) -> dict | None:
    """The prompt bank known before any weights load: the embeddings file `path` (`read_bank`; errors name
    `option`), else with random weights `count` random prompts (`prompts.random_embeddings`, from `generator`). None
    for a class-conditional model, or where the text encoders will encode the prompt (`encoded_bank`). transformer:
    the preset's, its config is all that is read (a meta one will do)."""
    from .prompts import random_embeddings

    if path:
        return read_bank(spec, path, transformer.config, option)
    if spec.family.text_conditional and random_weights:
        return random_embeddings(transformer, count, spec.text_tokens, generator)
    return None


def encoded_bank(name: str, prompt: str, *, weights: str | None = None, device="cpu",
                 dtype: torch.dtype = torch.float32) -> dict:
    """A bank of one prompt, `prompt` through the preset's pipeline's text encoders (`prompts.encode_prompts`; loaded
    from `weights` on `device` in `dtype`, and released after)."""
    from .models import load_text_encoders, move_pipeline
    from .prompts import encode_prompts

    encoders = load_text_encoders(name, weights=weights, dtype=dtype)
    move_pipeline(encoders, device, dtype)
    return encode_prompts(encoders, [prompt])


def generation_task(name: str, transformers: list, scheduler, bank: dict | None, steps: int, guidance: float,
                    sampler: str, *, prompt: str | None = None, weights: str | None = None, device="cpu",
                    dtype: torch.dtype = torch.float32):
    """The task of one generation on the preset's transformers (`models.load_experts`; `models.preset_task`) on
    `bank`, else, for a text-conditional model without one, on `prompt` (default `DEFAULT_PROMPT`) through the text
    encoders of `weights` (`encoded_bank`)."""
    from .models import preset, preset_task

    if bank is None and preset(name).family.text_conditional:
        bank = encoded_bank(name, prompt or DEFAULT_PROMPT, weights=weights, device=device, dtype=dtype)
    return preset_task(name, transformers, scheduler, bank, steps, guidance, sampler)


def first_conditions(spec, class_label: int | None = None) -> dict:
    """The (1,) conditions of one generation: the bank's first prompt, or a class-conditional model's class
    `class_label` (default DiT's `CLASS_LABEL`)."""
    from .families.dit import CLASS_LABEL

    if spec.family.text_conditional:
        return {"prompt_index": torch.zeros(1, dtype=torch.long)}
    return {"class_labels": torch.tensor([CLASS_LABEL if class_label is None else class_label])}


def to_pil(image: np.ndarray):
    """The PIL image of (H, W, C) values in [0, 1]; RuntimeError when any is NaN/inf (PIL would save black)."""
    from diffusers.image_processor import VaeImageProcessor

    bad = int((~np.isfinite(image)).sum())
    if bad:
        raise RuntimeError(f"image: expected finite pixel values, got {bad} of {image.size} NaN/inf (the sampling "
                           "diverged; nothing was written)")
    return VaeImageProcessor.numpy_to_pil(image[None])[0]
