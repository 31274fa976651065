"""One image from a DiT/PixArt preset's pipeline, as `harmonica sample` and the profiled workload make it: the
family's generation (`Family.generate`) at the sampler's default guidance, the decode and the check that every
pixel is finite."""

import numpy as np
import torch


def generate(pipe, args, spec, sampler: str, steps: int, generator: torch.Generator):
    """One PIL image of the preset's native resolution; RuntimeError when a pixel is not finite.
    args: model, random_weights, prompt, class_label, guidance (None: the sampler's default)."""
    guidance = default_guidance(spec, sampler) if args.guidance is None else args.guidance
    return spec.family.generate(pipe, args, spec, sampler, steps, guidance, generator)


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
