"""Qwen-Image's `QwenImageTransformerBlock` (diffusers transformer_qwenimage.py).

Image stream x (B, N, D) and text stream c (B, M, D). Units, in execution order: the joint attention
`attn` (one unit feeding both streams, each with its adaLN gate; its slot holds both outputs), the image
MLP `img_mlp` and the text MLP `txt_mlp`. The modulations `img_mod`, `txt_mod` (temb -> shift, scale,
gate for each unit) always run; a unit's body is its LayerNorm, modulation and attention/MLP. Blocks
built with `zero_cond_t` (per-token image modulations, `modulate_index`) are not supported: their
gates are (B, N, D), which the fused residual ops do not take.

The transformer's forward (diffusers') derives per-prompt text lengths from the text mask with a fallback it
copies from the host (`torch.as_tensor(length, device=...)`: a synchronous host-to-device copy, which a CUDA
graph capture refuses); while an engine is enabled on a Qwen-Image transformer (from `setup` to `teardown`),
the transformer's module holds a `compute_text_seq_len_from_mask` that makes it on the device instead, with the
same results; the last engine's `teardown` puts diffusers' back.
"""

import sys

import torch

from . import Adapter, register
from .flux import _clip_fp16, _modulate


def joint_attention(block, x, c, image_mod, text_mod, text_mask, image_rotary_emb, kwargs):
    """Unit attn: attention over the modulated image x (B, N, D) and text c (B, M, D) tokens together.
    image_mod, text_mod: (shift, scale) each (B, D); text_mask: (B, M) bool or None (no padding).
    Returns ((B, N, D), (B, M, D))."""
    return block.attn(hidden_states=_modulate(block.img_norm1, x, *image_mod),
                      encoder_hidden_states=_modulate(block.txt_norm1, c, *text_mod),
                      encoder_hidden_states_mask=text_mask, image_rotary_emb=image_rotary_emb, **kwargs)


def image_mlp(block, x, shift, scale):
    """Unit img_mlp: the MLP of the modulated LayerNorm of x (B, N, D); shift, scale (B, D). Returns (B, N, D)."""
    return block.img_mlp(_modulate(block.img_norm2, x, shift, scale))


def text_mlp(block, c, shift, scale):
    """Unit txt_mlp: the text MLP of c (B, M, D); shift, scale (B, D). Returns (B, M, D)."""
    return block.txt_mlp(_modulate(block.txt_norm2, c, shift, scale))


REPLACED = {}  # module name -> [diffusers' compute_text_seq_len_from_mask there, engines enabled]


def text_lengths(encoder_hidden_states, encoder_hidden_states_mask):
    """(M, per-prompt lengths (B,) long, mask (B, M) bool) of text tokens (B, M, D) and their mask (B, M) or
    None: a prompt's length is its last unmasked token's position + 1, M for a prompt with none. As diffusers'
    `compute_text_seq_len_from_mask`, without a host-to-device copy (CUDA-graph safe)."""
    batch, length = encoder_hidden_states.shape[:2]
    mask = encoder_hidden_states_mask
    if mask is None:
        return length, None, None
    if tuple(mask.shape[:2]) != (batch, length):
        raise ValueError(f"encoder_hidden_states_mask: expected shape ({batch}, {length}), got {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    last = (mask * torch.arange(1, length + 1, device=mask.device)).amax(dim=1)
    return length, torch.where(last > 0, last, torch.full_like(last, length)), mask


def _modulations(mod, temb):
    """The two units' (shift, scale, gate) of one stream, each (B, D), from temb (B, D)."""
    first, second = mod(temb).chunk(2, dim=-1)
    return first.chunk(3, dim=-1), second.chunk(3, dim=-1)


class QwenImageBlockAdapter(Adapter):
    block_class = "QwenImageTransformerBlock"
    kinds = ("attn", "img_mlp", "txt_mlp")
    bodies = {"attn": joint_attention, "img_mlp": image_mlp, "txt_mlp": text_mlp}

    def setup(self, engine, blocks: list) -> None:
        module = sys.modules[type(engine.transformer).__module__]
        if hasattr(module, "compute_text_seq_len_from_mask"):  # the forward looks it up there at each call
            replaced = REPLACED.setdefault(module.__name__, [module.compute_text_seq_len_from_mask, 0])
            replaced[1] += 1
            module.compute_text_seq_len_from_mask = text_lengths

    def teardown(self, engine, blocks: list) -> None:
        module = sys.modules[type(engine.transformer).__module__]
        replaced = REPLACED.get(module.__name__)
        if replaced is not None:
            replaced[1] -= 1
            if replaced[1] == 0:
                module.compute_text_seq_len_from_mask = REPLACED.pop(module.__name__)[0]

    def check(self, name: str, block) -> None:
        if block.zero_cond_t:
            raise ValueError(f"{name}: expected a Qwen-Image block without zero_cond_t (per-token image "
                             f"modulations), got zero_cond_t=True")

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states,
                encoder_hidden_states_mask, temb, image_rotary_emb=None, joint_attention_kwargs=None,
                modulate_index=None):
        """diffusers' `QwenImageTransformerBlock.forward` unit by unit. Returns (text, image) as diffusers does."""
        if modulate_index is not None:
            raise ValueError("modulate_index: expected None (per-token modulations are not supported), got a tensor")
        kwargs = joint_attention_kwargs or {}
        x, c = hidden_states, encoder_hidden_states
        (shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp) = _modulations(block.img_mod, temb)
        (c_shift, c_scale, c_gate), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = _modulations(block.txt_mod, temb)
        bodies = engine.bodies[self.block_class]
        x, c = engine.run_unit(index["attn"], lambda: bodies["attn"](block, x, c, (shift, scale), (c_shift, c_scale),
                                                                     encoder_hidden_states_mask, image_rotary_emb,
                                                                     kwargs), (gate, c_gate), (x, c))
        x = engine.run_unit(index["img_mlp"], lambda: bodies["img_mlp"](block, x, shift_mlp, scale_mlp),
                            gate_mlp, x)
        c = engine.run_unit(index["txt_mlp"], lambda: bodies["txt_mlp"](block, c, c_shift_mlp, c_scale_mlp),
                            c_gate_mlp, c)
        return _clip_fp16(c), _clip_fp16(x)


register(QwenImageBlockAdapter())
