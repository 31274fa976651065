"""Prompt embeddings written once by a pipeline's own text encoders, so that training and sampling never load
one: `encode_prompts` runs the pipeline's `encode_prompt` on a list of prompts and the negative prompt and names
the outputs as the tasks read them (`families.pixart.load_prompt_embeddings` for PixArt, `flow.load_flow_embeddings`
for the flow-matching families); `save_prompt_embeddings` writes them to a safetensors file
(`harmonica embed` on the command line). Each family's encoder and names are in its module (harmonica/families,
`Family.encode`).
"""

from pathlib import Path

import torch

from .families import FAMILIES

POOLED_DIM = "pooled_projection_dim"  # config key of the pooled text embedding's width (FLUX.1, SD3)


def encoders() -> dict:
    """{pipeline class name: encoder (pipe, prompts, negative prompt or None, extra kwargs) -> {name: tensor}}:
    each text-conditional family's (`Family.encode`), for its pipeline and its presets' (PixArt-Σ's)."""
    return {pipeline: family.encode for family in FAMILIES.values() if family.text_conditional
            for pipeline in (family.pipeline, *(spec.pipeline for spec in family.presets.values()))}


@torch.no_grad()
def encode_prompts(pipe, prompts: list, negative_prompt: str | None = None,
                   max_sequence_length: int | None = None) -> dict:
    """{name: CPU tensor} of the pipeline's text-encoder outputs for `prompts` (P strings) and `negative_prompt`
    (the unconditional prompt; default "", none for FLUX.1), named as the family's module
    lists.
    `max_sequence_length`: the pipeline's default when None."""
    known = encoders()
    encoder = next((known[c.__name__] for c in type(pipe).__mro__ if c.__name__ in known), None)
    if encoder is None:
        raise ValueError(f"pipe: expected one of {sorted(known)}, got {type(pipe).__name__}")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    tensors = encoder(pipe, list(prompts), negative_prompt, extra)
    return {name: value.cpu().contiguous() for name, value in tensors.items()}


def random_embeddings(transformer, count: int, tokens: int, generator: torch.Generator) -> dict:
    """A bank of `count` N(0, 1) prompts of `tokens` tokens for a random-weights transformer (which has no text
    encoder), in the keys of its family's task (`prompt_keys`, `negative_keys`): the negative prompt zeros, masks
    ones."""
    from .families import family_of

    task = family_of(transformer).task
    cfg = transformer.config
    bank = {}
    for keys, rows, random in ((task.prompt_keys, count, True), (task.negative_keys, 1, False)):
        for key in keys:
            if "mask" in key:
                bank[key] = torch.ones(rows, tokens, dtype=torch.long)
                continue
            width = cfg[task.text_dims.get(key.removeprefix("negative_"), task.text_dim)]
            shape = (rows, cfg[POOLED_DIM]) if "pooled" in key else (rows, tokens, width)
            bank[key] = torch.randn(shape, generator=generator) if random else torch.zeros(shape)
    return bank


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

