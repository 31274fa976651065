"""`harmonica embed`: the prompt embeddings that training and flow-model sampling read."""

from pathlib import Path

import torch

from ..files import check_out_file
from ..models import (
    FLOW_PRESETS,
    PRESETS,
    load_text_encoders,
    preset,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def embed(args) -> int:
    """`harmonica embed`: the pipeline's text encoders (no transformer, no VAE) encode the prompts of a text
    file (one per line) and the negative prompt into a safetensors file (see harmonica/prompts.py)."""
    from ..prompts import save_prompt_embeddings

    out = check_out_file(args.out, "--out", {".safetensors"}, "a .safetensors file name (the prompt embeddings)")
    try:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"--prompts: expected a text file of prompts, one per line, got {args.prompts} "
                         f"({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts: expected a UTF-8 text file, got {args.prompts} (byte "
                         f"0x{error.object[error.start]:02x} at offset {error.start} is not UTF-8)") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: expected at least one non-empty line in {args.prompts}, got none")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    pipe = load_text_encoders(args.model, weights=args.weights, dtype=dtype).to(device)
    tensors = save_prompt_embeddings(pipe, prompts, out, args.negative_prompt, args.max_sequence_length)
    shapes = ", ".join(f"{name} {tuple(value.shape)}" for name, value in tensors.items())
    print(f"{len(prompts)} prompts of {args.prompts} encoded by {type(pipe).__name__} "
          f"({args.weights or preset(args.model).hub_id}): {shapes}\nsaved {out}")
    return 0


def add_parser(commands) -> None:
    e = commands.add_parser("embed", help="prompt embeddings from the pipeline's text encoders, for train --embeds "
                            "and sample --prompt-embeddings")
    e.add_argument("--model", required=True, choices=sorted(name for name in PRESETS
                                                            if preset(name).family.text_conditional)
                   + sorted(FLOW_PRESETS))
    e.add_argument("--weights", help="hub id or local path of the pipeline (default: the preset's hub id)")
    e.add_argument("--prompts", required=True, help="text file, one prompt per line")
    e.add_argument("--negative-prompt", help='the unconditional prompt (default ""; FLUX.1, FLUX.2: none)')
    e.add_argument("--max-sequence-length", type=int, help="text tokens (default: the pipeline's)")
    e.add_argument("--device", help="default cuda when available")
    e.add_argument("--dtype", choices=sorted(DTYPES), help="text encoders' dtype (default bf16 on CUDA, else fp32)")
    e.add_argument("--out", required=True, help=".safetensors file")
