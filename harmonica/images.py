"""One image from a DiT/PixArt preset's pipeline, as `harmonica sample` and the profiled workload make it: the
family's task (`Family.make_task`) on one generation's conditions (`Family.conditions`) through `samplers.sample`, at
the sampler's default guidance, the decode and the check that every pixel is finite."""

import numpy as np
import torch


def generate(pipe, args, spec, sampler: str, steps: int, generator: torch.Generator, progress: bool = True):
    """One PIL image of the preset's native resolution; RuntimeError when a pixel is not finite.
    args: random_weights, prompt, class_label, guidance (None: the sampler's default). generator: the conditions'
    random draws, the noise, then a stochastic scheduler's steps."""
    from .samplers import initial_noise, sample

    family = spec.family
    guidance = default_guidance(spec, sampler) if args.guidance is None else args.guidance
    bank, cond = family.conditions(pipe, spec, args, generator)
    task = family.make_task(pipe.transformer, pipe.scheduler, sampler, bank, steps, guidance)
    latents = sample(task, cond, initial_noise(task, 1, generator), generator=generator, progress=progress)
    return decode(pipe, latents)


def default_guidance(spec, sampler: str) -> float:
    return spec.family.samplers[sampler][2]


def decode(pipe, latents: torch.Tensor):
    """The PIL image of latents (1, C, h, w)."""
    from diffusers.image_processor import VaeImageProcessor

    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return to_pil(VaeImageProcessor().postprocess(images, output_type="np")[0])


def to_pil(image: np.ndarray):
    """The PIL image of (H, W, C) values in [0, 1]; RuntimeError when any is NaN/inf (PIL would save black)."""
    from diffusers.image_processor import VaeImageProcessor

    bad = int((~np.isfinite(image)).sum())
    if bad:
        raise RuntimeError(f"image: expected finite pixel values, got {bad} of {image.size} NaN/inf (the sampling "
                           "diverged; nothing was written)")
    return VaeImageProcessor.numpy_to_pil(image[None])[0]
