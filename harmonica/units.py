"""The cached units of a diffusers transformer (method.md section 1), as its block adapters define them.

Each block's adapter (harmonica/adapters) lists its units in execution order; a unit is named after its
block and kind (`transformer_blocks.3.attn1`). DiT/PixArt's `BasicTransformerBlock` has self-attention
`attn1`, cross-attention `attn2` (PixArt) and feed-forward `ff`. A unit's cache slot holds its raw
output before the gate (one tensor per residual stream it feeds).
"""

from typing import NamedTuple

from .adapters import ADAPTERS, Block, blocks_of

UNIT_KINDS = ADAPTERS["BasicTransformerBlock"].kinds  # DiT/PixArt's, in execution order


class Unit(NamedTuple):
    name: str  # qualified, e.g. "transformer_blocks.3.attn1"
    kind: str
    block: Block
    modules: tuple  # qualified names of the modules a reused unit skips; the first is the unit's module


def units_of(transformer, *, cross_attention: bool = True) -> list:
    """[Unit] of every block, block by block in execution order.

    transformer: a diffusers model whose block classes have adapters (a ValueError names any other).
    cross_attention: whether cross-attention is a unit (PixArt: 28 x 3 = 84 units, else 56).
    """
    return [Unit(f"{block.name}.{kind}", kind, block, tuple(f"{block.name}.{m}" for m in modules))
            for block in blocks_of(transformer)
            for kind, modules in block.adapter_class.units(block.module, cross_attention=cross_attention)]


def cached_units(transformer, *, cross_attention: bool = True) -> list:
    """[(qualified unit name, the unit's module)] in execution order (see `units_of`)."""
    return [(unit.name, transformer.get_submodule(unit.modules[0]))
            for unit in units_of(transformer, cross_attention=cross_attention)]
