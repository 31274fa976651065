"""`BasicTransformerBlock` (diffusers models/attention.py) of DiT (`ada_norm_zero`) and PixArt
(`ada_norm_single`): units self-attention `attn1`, cross-attention `attn2` (PixArt, ungated) and
feed-forward `ff`, each feeding the one residual stream.

DiT: every block recomputes the same timestep/class embedding; when every block holds the same
embedder, block 0 computes it once per step (`embedding`, state of the engine's adapter instance), or
the per-generation modulation table (modulation.py) replaces it and each block's adaLN linear.
"""

import warnings

import torch

from . import Adapter, register

SUPPORTED_NORMS = ("ada_norm_zero", "ada_norm_single")


def self_attention(block, h, shift, scale, attention_mask, kwargs):
    """Unit attn1 of `block`: self-attention over the LayerNorm of h (B, N, D) modulated by shift and
    scale (B, 1, D). Returns (B, N, D)."""
    norm = block.norm1.norm if block.norm_type == "ada_norm_zero" else block.norm1
    return block.attn1(norm(h) * (1 + scale) + shift, encoder_hidden_states=None, attention_mask=attention_mask,
                       **kwargs)


def cross_attention(block, h, encoder_hidden_states, encoder_attention_mask, kwargs):
    """Unit attn2 of `block`: h (B, N, D) (PixArt: as is, else its LayerNorm) attending to
    encoder_hidden_states (B, M, D). Returns (B, N, D)."""
    query = h if block.norm_type == "ada_norm_single" else block.norm2(h)
    return block.attn2(query, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                       **kwargs)


def feed_forward(block, h, shift, scale):
    """Unit ff of `block`: the MLP of the LayerNorm of h (B, N, D) modulated by shift and scale (B, 1, D).
    Returns (B, N, D)."""
    norm = block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2
    return block.ff(norm(h) * (1 + scale) + shift)


def _shares_embedding(blocks) -> bool:
    """Whether every DiT block holds the same timestep/class embedder (diffusers copies the original
    DiT's single embedder into each block): then one embedding per step serves all blocks. Checked once,
    at enable."""
    embedders = [block.norm1.emb for block in blocks if block.norm_type == "ada_norm_zero"]
    if len(embedders) != len(blocks) or any(e is None for e in embedders):
        return False
    reference = dict(embedders[0].named_parameters())
    return all(torch.equal(p, reference[name]) for e in embedders[1:] for name, p in e.named_parameters())


class BasicBlockAdapter(Adapter):
    block_class = "BasicTransformerBlock"
    kinds = ("attn1", "attn2", "ff")
    bodies = {"attn1": self_attention, "attn2": cross_attention, "ff": feed_forward}

    @classmethod
    def units(cls, block, *, cross_attention: bool = True) -> list:
        """attn1, attn2 (where the block has one and `cross_attention`), ff: DiT 2 per block, PixArt 3."""
        return [unit for unit in super().units(block) if cross_attention or unit[0] != "attn2"]

    @classmethod
    def check(cls, name: str, block) -> None:
        problems = []
        if block.norm_type not in SUPPORTED_NORMS:
            problems.append(f"norm_type {block.norm_type!r} (supported: {SUPPORTED_NORMS})")
        if block.pos_embed is not None:
            problems.append("a positional embedding inside the block")
        if block.only_cross_attention:
            problems.append("only_cross_attention")
        if block._chunk_size is not None:
            problems.append("feed-forward chunking")
        if getattr(block, "fuser", None) is not None:
            problems.append("GLIGEN")
        if problems:
            raise ValueError(f"{name}: expected a DiT or PixArt block, got one with " + ", ".join(problems))

    def __init__(self):
        self.shared_embedding = False  # whether block 0's embedding serves every block (`_shares_embedding`)
        self.embedding = None  # the step's timestep/class embedding (B, D), block 0's when shared

    def setup(self, engine, blocks: list) -> None:
        self.shared_embedding = _shares_embedding(blocks)

    def teardown(self, engine, blocks: list) -> None:
        self.embedding = None

    def precompute(self, engine, blocks: list, hidden, args, kwargs) -> bool:
        """DiT: every step's modulations (modulation.py), when every block shares the embedder and the
        forward passes class labels (the transformer's third argument)."""
        labels = args[2] if len(args) > 2 else kwargs.get("class_labels")
        if not (self.shared_embedding and isinstance(labels, torch.Tensor)):
            return False
        engine.modulation.compute(blocks, engine.timesteps, labels, hidden.dtype)
        return True

    def forward(self, engine, block, index: dict, position: int, hidden_states, attention_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                class_labels=None, added_cond_kwargs=None):
        """diffusers' `BasicTransformerBlock.forward` for ada_norm_zero / ada_norm_single, unit by unit.
        DiT: the step's modulations come from the per-generation table when it is active; else block 0
        computes the step's shared embedding (blocks run in order in every forward, captured graphs
        included, so no embedding outlives its step)."""
        kwargs = dict(cross_attention_kwargs or {})
        if kwargs.get("scale") is not None:
            warnings.warn("Passing `scale` to `cross_attention_kwargs` is deprecated. `scale` will be ignored.",
                          stacklevel=3)
        # the first block's input is PatchEmbed's transposed view (token stride 1): diffusers' first residual add
        # (`attn_output + hidden_states`) leaves it, and so does this copy, else the fused residual ops, whose result
        # is laid out like h, carry it through every block (a copy in each LayerNorm, an unfused bias in the
        # cross-attention query projection). Later blocks' inputs are contiguous: no copy.
        h = hidden_states.contiguous()
        if block.norm_type == "ada_norm_zero":
            norm1 = block.norm1
            if engine.modulation_active:
                emb = engine.modulation.step_buffer[position]
            else:
                if not self.shared_embedding:
                    emb = norm1.emb(timestep, class_labels, hidden_dtype=h.dtype) if norm1.emb is not None else None
                elif position == 0:
                    emb = self.embedding = norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
                else:
                    emb = self.embedding
                emb = norm1.linear(norm1.silu(emb))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
            shift_msa, scale_msa, shift_mlp, scale_mlp = (t[:, None] for t in (shift_msa, scale_msa, shift_mlp,
                                                                                scale_mlp))
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                block.scale_shift_table[None] + timestep.reshape(h.shape[0], 6, -1)).chunk(6, dim=1)

        bodies = engine.bodies[self.block_class]
        h = engine.run_unit(index["attn1"], lambda: bodies["attn1"](block, h, shift_msa, scale_msa, attention_mask,
                                                                   kwargs), gate_msa, h)
        if block.attn2 is not None:
            h = engine.run_unit(index["attn2"], lambda: bodies["attn2"](block, h, encoder_hidden_states,
                                                                       encoder_attention_mask, kwargs), None, h)
        return engine.run_unit(index["ff"], lambda: bodies["ff"](block, h, shift_mlp, scale_mlp), gate_mlp, h)


register(BasicBlockAdapter)
