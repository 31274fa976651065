"""One image from a DiT/PixArt preset's pipeline, as `harmonica sample` and the profiled workload make it: the
sampler, guidance and prompt defaults, the decode and the check that every pixel is finite."""

import numpy as np
import torch

from .api import step_runner
from .models import random_prompt_embeds
from .samplers import PIXART_PROMPT_KEYS, dit_ddim_sample, pixart_sample

DIT_PIPELINE_SAMPLER = "pipeline"  # DiTPipeline with its own scheduler
DIT_CLASS = 207
DEFAULT_PROMPT = "A small cactus with a happy face in the Sahara desert."
GUIDANCE = {"dit-ddim": 1.5, DIT_PIPELINE_SAMPLER: 4.0, "pixart": 4.5}


def generate(pipe, args, spec, sampler: str, steps: int, generator: torch.Generator):
    """One PIL image of the preset's native resolution; RuntimeError when a pixel is not finite. With the
    sampler step inside the CUDA graphs (`enable(..., scheduler_in_graph=True)`), PixArt runs
    `pixart_sample` instead of the pipeline. args: prompt, class_label, guidance (None: the defaults)."""
    device = pipe.transformer.device
    guidance = default_guidance(spec, sampler) if args.guidance is None else args.guidance
    if spec.is_pixart:
        prompt = {"prompt": args.prompt or DEFAULT_PROMPT}
        if args.random_weights:  # no text encoder: embeddings of a random prompt
            embeds = random_prompt_embeds(args.model, 1, generator).to(device, pipe.transformer.dtype)
            mask = torch.ones(embeds.shape[:2], device=device)
            prompt = {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt": None,
                      "negative_prompt_embeds": torch.zeros_like(embeds), "negative_prompt_attention_mask": mask}
        if step_runner(pipe.transformer) is not None:
            if "prompt" in prompt:
                prompt = dict(zip(PIXART_PROMPT_KEYS, pipe.encode_prompt(prompt["prompt"], device=device)))
            prompt = {key: prompt[key] for key in PIXART_PROMPT_KEYS}
            latents = pixart_sample(pipe, **prompt, num_steps=steps, guidance_scale=guidance,
                                    generator=generator, height=spec.resolution, width=spec.resolution, progress=True)
            return _decode(pipe, latents)
        return to_pil(pipe(**prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                            height=spec.resolution, width=spec.resolution,
                            use_resolution_binning=not args.random_weights, output_type="np").images[0])
    label = DIT_CLASS if args.class_label is None else args.class_label
    if sampler == DIT_PIPELINE_SAMPLER:
        return to_pil(pipe(class_labels=[label], num_inference_steps=steps, guidance_scale=guidance,
                            generator=generator, output_type="np").images[0])
    latents = dit_ddim_sample(pipe.transformer, torch.tensor([label], device=device), num_steps=steps,
                              guidance_scale=guidance, generator=generator, progress=True)
    return _decode(pipe, latents)


def default_guidance(spec, sampler: str) -> float:
    return GUIDANCE["pixart" if spec.is_pixart else sampler]


def _decode(pipe, latents: torch.Tensor):
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
