"""Flux's blocks (diffusers transformer_flux.py).

`FluxTransformerBlock` (`transformer_blocks`): image stream x (B, N, D) and text stream c (B, M, D).
Units, in execution order: the joint attention `attn` (one unit feeding both streams, each with its
adaLN gate; its slot holds both outputs), the image MLP `ff` and the text MLP `ff_context`.
`FluxSingleTransformerBlock` (`single_transformer_blocks`): one stream, the text and image tokens
concatenated (B, M + N, D); one unit `attn_mlp`, the parallel attention and MLP through `proj_out`.
The adaLN linears (temb -> shift, scale, gate) always run; a unit's body is its norm, modulation and
attention/MLP.
"""

import torch

from . import Adapter, register


def _modulate(norm, x, shift, scale):
    """norm(x) * (1 + scale) + shift, with shift and scale (B, D) over the tokens of x (B, N, D)."""
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def joint_attention(block, x, c, image_mod, text_mod, image_rotary_emb, kwargs):
    """Unit attn: attention over the modulated image x (B, N, D) and text c (B, M, D) tokens together.
    image_mod, text_mod: (shift, scale) each (B, D). Returns ((B, N, D), (B, M, D))."""
    outputs = block.attn(hidden_states=_modulate(block.norm1.norm, x, *image_mod),
                         encoder_hidden_states=_modulate(block.norm1_context.norm, c, *text_mod),
                         image_rotary_emb=image_rotary_emb, **kwargs)
    if len(outputs) != 2:
        raise ValueError(f"joint_attention_kwargs: expected no IP-Adapter inputs, got {len(outputs)} attention outputs")
    return outputs


def image_mlp(block, x, shift, scale):
    """Unit ff: the MLP of the modulated LayerNorm of x (B, N, D); shift, scale (B, D). Returns (B, N, D)."""
    return block.ff(_modulate(block.norm2, x, shift, scale))


def text_mlp(block, c, shift, scale):
    """Unit ff_context: the text MLP of c (B, M, D); shift, scale (B, D). Returns (B, M, D)."""
    return block.ff_context(_modulate(block.norm2_context, c, shift, scale))


def _clip_fp16(x):
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxBlockAdapter(Adapter):
    block_class = "FluxTransformerBlock"
    kinds = ("attn", "ff", "ff_context")
    bodies = {"attn": joint_attention, "ff": image_mlp, "ff_context": text_mlp}

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb,
                image_rotary_emb=None, joint_attention_kwargs=None):
        """diffusers' `FluxTransformerBlock.forward` unit by unit. Returns (text, image) as diffusers does."""
        kwargs = joint_attention_kwargs or {}
        x, c = hidden_states, encoder_hidden_states
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1.linear(block.norm1.silu(temb)).chunk(6, dim=1)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context.linear(
            block.norm1_context.silu(temb)).chunk(6, dim=1)
        bodies = engine.bodies[self.block_class]
        x, c = engine.run_unit(index["attn"], lambda: bodies["attn"](block, x, c, (shift, scale), (c_shift, c_scale),
                                                                     image_rotary_emb, kwargs), (gate, c_gate), (x, c))
        x = engine.run_unit(index["ff"], lambda: bodies["ff"](block, x, shift_mlp, scale_mlp), gate_mlp, x)
        c = engine.run_unit(index["ff_context"], lambda: bodies["ff_context"](block, c, c_shift_mlp, c_scale_mlp),
                            c_gate_mlp, c)
        return _clip_fp16(c), x


def parallel_attention_mlp(block, h, shift, scale, image_rotary_emb, kwargs):
    """Unit attn_mlp: proj_out of the attention and the MLP of the modulated LayerNorm of h (B, L, D)
    side by side; shift, scale (B, D). Returns (B, L, D)."""
    normed = _modulate(block.norm.norm, h, shift, scale)
    mlp = block.act_mlp(block.proj_mlp(normed))
    attention = block.attn(hidden_states=normed, image_rotary_emb=image_rotary_emb, **kwargs)
    return block.proj_out(torch.cat([attention, mlp], dim=2))


class FluxSingleBlockAdapter(Adapter):
    block_class = "FluxSingleTransformerBlock"
    kinds = ("attn_mlp",)
    bodies = {"attn_mlp": parallel_attention_mlp}

    def units(self, block, *, cross_attention: bool = True) -> list:
        return [("attn_mlp", ("attn", "proj_mlp", "proj_out"))]

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb,
                image_rotary_emb=None, joint_attention_kwargs=None):
        """diffusers' `FluxSingleTransformerBlock.forward` as one unit. Returns (text, image)."""
        kwargs = joint_attention_kwargs or {}
        text_tokens = encoder_hidden_states.shape[1]
        h = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        shift, scale, gate = block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)
        body = engine.bodies[self.block_class]["attn_mlp"]
        h = _clip_fp16(engine.run_unit(index["attn_mlp"], lambda: body(block, h, shift, scale, image_rotary_emb,
                                                                        kwargs), gate, h))
        return h[:, :text_tokens], h[:, text_tokens:]


register(FluxBlockAdapter())
register(FluxSingleBlockAdapter())
