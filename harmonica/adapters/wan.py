"""Wan 2.x's `WanTransformerBlock` (diffusers transformer_wan.py), in the transformer's `blocks`.

One residual stream h (B, L, D) of video tokens; units, in execution order: self-attention `attn1`
(gate msa), cross-attention `attn2` to the text (and I2V image) tokens (no gate) and feed-forward
`ffn` (gate c_gate_msa). The modulation `scale_shift_table + temb` is fp32, so the gated units'
residual is added in fp32 and cast back, `(h.float() + out * gate).type_as(h)`: the fused ops do the
same when given the fp32 gate over a low-precision h (kernels/gated_residual.py).
Per-token modulation (Wan 2.2 TI2V's timestep (B, L), temb (B, L, 6, D)) is not supported: the fused
ops take one gate per batch row.
"""

from . import Adapter, register


def _modulated(norm, h, shift, scale):
    """norm(h) in fp32, modulated by shift and scale (B, 1, D, fp32), in h's dtype; h (B, L, D)."""
    return (norm(h.float()) * (1 + scale) + shift).type_as(h)


def self_attention(block, h, shift, scale, rotary_emb):
    """Unit attn1: self-attention over the modulated norm1 of h (B, L, D) with the rotary embedding.
    Returns (B, L, D)."""
    return block.attn1(_modulated(block.norm1, h, shift, scale), None, None, rotary_emb)


def cross_attention(block, h, encoder_hidden_states):
    """Unit attn2: norm2 of h (B, L, D) attending to encoder_hidden_states (B, M, D). Returns (B, L, D)."""
    return block.attn2(block.norm2(h.float()).type_as(h), encoder_hidden_states, None, None)


def feed_forward(block, h, shift, scale):
    """Unit ffn: the MLP of the modulated norm3 of h (B, L, D). Returns (B, L, D)."""
    return block.ffn(_modulated(block.norm3, h, shift, scale))


class WanBlockAdapter(Adapter):
    block_class = "WanTransformerBlock"
    kinds = ("attn1", "attn2", "ffn")
    bodies = {"attn1": self_attention, "attn2": cross_attention, "ffn": feed_forward}

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states, temb, rotary_emb):
        """diffusers' `WanTransformerBlock.forward` unit by unit. temb: (B, 6, D)."""
        if temb.ndim != 3:
            raise ValueError(f"temb: expected shape (B, 6, D) (one timestep per sample), got {tuple(temb.shape)} "
                             "(Wan 2.2 TI2V's per-token timesteps are not supported by harmonica)")
        shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        bodies = engine.bodies[self.block_class]
        h = hidden_states
        h = engine.run_unit(index["attn1"], lambda: bodies["attn1"](block, h, shift, scale, rotary_emb), gate, h)
        h = engine.run_unit(index["attn2"], lambda: bodies["attn2"](block, h, encoder_hidden_states), None, h)
        return engine.run_unit(index["ffn"], lambda: bodies["ffn"](block, h, c_shift, c_scale), c_gate, h)


register(WanBlockAdapter())
