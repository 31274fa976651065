"""The cached units of a diffusers transformer (method.md section 1).

Each `BasicTransformerBlock` has up to three units, in execution order: self-attention (`attn1`),
cross-attention (`attn2`, PixArt) and feed-forward (`ff`). A unit's cache slot holds its raw
output before the adaLN gate.
"""

UNIT_KINDS = ("attn1", "attn2", "ff")


def cached_units(transformer, *, cross_attention: bool = True) -> list:
    """[(qualified module name, module)] of every unit, block by block in execution order.

    transformer: a diffusers model with `transformer_blocks` of `BasicTransformerBlock`.
    cross_attention: whether `attn2` counts as a unit (PixArt: 28 x 3 = 84 units, else 56).
    """
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"transformer: expected a diffusers transformer with `transformer_blocks`, "
                         f"got {type(transformer).__name__}")
    kinds = UNIT_KINDS if cross_attention else ("attn1", "ff")
    units = []
    for i, block in enumerate(blocks):
        if type(block).__name__ != "BasicTransformerBlock":
            raise ValueError(f"transformer_blocks[{i}]: expected BasicTransformerBlock, got {type(block).__name__}")
        for kind in kinds:
            module = getattr(block, kind, None)
            if module is not None:
                units.append((f"transformer_blocks.{i}.{kind}", module))
    return units
