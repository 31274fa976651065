"""Prompt embeddings written once by a pipeline's own text encoders, so that training and sampling never load
one: `encode_prompts` runs the pipeline's `encode_prompt` on a list of prompts and the negative prompt and names
the outputs as the tasks read them (`training.load_prompt_embeddings` for PixArt, `flow.load_flow_embeddings`
for the flow-matching families); `save_prompt_embeddings` writes them to a safetensors file
(`harmonica embed` on the command line).

Per pipeline (P prompts, L tokens):
- PixArt-α/Σ: prompt_embeds (P, L, 4096), prompt_attention_mask (P, L), negative_embeds (1, L, 4096),
  negative_attention_mask (1, L).
- FLUX.1: prompt_embeds (P, L, D), pooled_prompt_embeds (P, D'); its guidance is distilled: no negative.
- SD3/SD3.5: prompt_embeds, pooled_prompt_embeds and the negative pair (1, ...).
- Wan 2.x: prompt_embeds and negative_prompt_embeds (1, L, D).
- Qwen-Image: prompt_embeds, prompt_embeds_mask (P, L) and the negative pair (the pipeline trims a batch to
  its longest prompt and returns no mask when every token counts: the mask is then all ones).
"""

from pathlib import Path

import torch


def _pixart(pipe, prompts, negative, extra):
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True, negative_prompt=negative, num_images_per_prompt=1, **extra)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_embeds": negative_embeds[:1],
            "negative_attention_mask": negative_mask[:1]}


def _flux(pipe, prompts, negative, extra):
    if negative is not None:
        raise ValueError(f"negative_prompt: expected none for {type(pipe).__name__} (its guidance is distilled into "
                         f"the model: no unconditional pass), got {negative!r}")
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, **extra)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _sd3(pipe, prompts, negative, extra):
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=True, negative_prompt=negative, **extra)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative_embeds[:1],
            "negative_pooled_prompt_embeds": negative_pooled[:1]}


def _wan(pipe, prompts, negative, extra):
    embeds, negative_embeds = pipe.encode_prompt(prompts, negative_prompt=negative, do_classifier_free_guidance=True,
                                                 **extra)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds[:1]}


def _qwen_image(pipe, prompts, negative, extra):
    def encode(texts):
        embeds, mask = pipe.encode_prompt(texts, **extra)
        if mask is None:  # every token of every prompt counts
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    embeds, mask = encode(prompts)
    negative_embeds, negative_mask = encode([negative])
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "negative_prompt_embeds": negative_embeds,
            "negative_prompt_embeds_mask": negative_mask}


ENCODERS = {"PixArtAlphaPipeline": _pixart, "PixArtSigmaPipeline": _pixart, "FluxPipeline": _flux,
            "StableDiffusion3Pipeline": _sd3, "WanPipeline": _wan, "QwenImagePipeline": _qwen_image}


@torch.no_grad()
def encode_prompts(pipe, prompts: list, negative_prompt: str | None = None,
                   max_sequence_length: int | None = None) -> dict:
    """{name: CPU tensor} of the pipeline's text-encoder outputs for `prompts` (P strings) and `negative_prompt`
    (the unconditional prompt; default "", none for FLUX.1), as listed in the module docstring.
    `max_sequence_length`: the pipeline's default when None."""
    encoder = next((ENCODERS[c.__name__] for c in type(pipe).__mro__ if c.__name__ in ENCODERS), None)
    if encoder is None:
        raise ValueError(f"pipe: expected one of {sorted(ENCODERS)}, got {type(pipe).__name__}")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    if negative_prompt is None and encoder is not _flux:
        negative_prompt = ""
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    tensors = encoder(pipe, list(prompts), negative_prompt, extra)
    return {name: value.cpu().contiguous() for name, value in tensors.items()}


def save_prompt_embeddings(pipe, prompts: list, path, negative_prompt: str | None = None,
                           max_sequence_length: int | None = None) -> dict:
    """`encode_prompts` written whole to the safetensors file `path`; returns the tensors."""
    from safetensors.torch import save

    from .files import write_file

    tensors = encode_prompts(pipe, prompts, negative_prompt, max_sequence_length)
    write_file(path, save(tensors))
    return tensors


def read_embeddings(path, option: str) -> dict:
    """{name: tensor} of a safetensors file of prompt embeddings, checked: every tensor holds at least one
    prompt, embeddings (every name without "mask") are floating point and finite. One ValueError line naming
    `option` and the file otherwise (missing, unreadable, empty, wrong dtype, NaN/inf)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = f"{option}: expected a safetensors file of prompt embeddings, got {path}"
    if not Path(path).is_file():
        raise ValueError(f"{expected} ({'a directory' if Path(path).is_dir() else 'no such file'})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{expected} ({getattr(error, 'strerror', None) or error})") from None
    for name, value in tensors.items():
        if value.dim() == 0 or value.shape[0] == 0:
            raise ValueError(f"{option}: expected at least one prompt in {name} of {path}, got shape "
                             f"{tuple(value.shape)}")
        if "mask" in name:
            continue
        if not value.is_floating_point():
            raise ValueError(f"{option}: expected floating-point {name} in {path}, got {value.dtype}")
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"{option}: expected finite {name} in {path}, got {bad} NaN/inf values")
    return tensors

