"""Block adapters: how the cache engine runs each diffusers block class unit by unit.

A diffusers transformer holds its blocks in ModuleLists (`transformer_blocks`, Flux's
`single_transformer_blocks`, Wan's `blocks`, Z-Image's `layers`). Each block class has one `Adapter` subclass,
registered by class name, that says
- which units a block has, in execution order, and which modules each one skips when reused (`units`);
- how the block runs unit by unit (`forward`): each unit's residual update goes through
  `engine.run_unit(k, compute, gate, h)`; a unit that feeds several residual streams (Flux's joint
  attention) passes tuples `gate`, `h` and a `compute` that returns one output per stream;
- its per-model state: each `CacheEngine` makes its own instance of the adapter of every block class it runs,
  whose `setup` keeps the family's state for that model on the instance and whose `teardown` undoes it, as
  diffusers makes hook instances per `apply_*` call (`units`, `check`, `kinds` and `bodies` are the class's);
- each unit kind's computation as a function of the block (`bodies`), which `CacheEngine.compile`
  torch.compiles (the block is an argument: all blocks of a shape share one graph per kind).
DiT's and PixArt's `BasicTransformerBlock` is `basic.py`; the flow-matching families' blocks are in their family's
module (harmonica/families), which calls `register`; both are imported below.
"""

from typing import NamedTuple

import torch


class Adapter:
    """One diffusers block class. Subclasses set `block_class`, `kinds`, `bodies` and write `forward`; an instance
    belongs to one engine and holds its per-model state (`setup`)."""

    block_class = ""  # the diffusers class name, e.g. "BasicTransformerBlock"
    kinds = ()  # every unit kind the class can have, in execution order
    bodies = {}  # kind -> compute function (block, ...) -> fresh output (B, N, D), or one per stream; no instance
    # state reaches them (`CacheEngine.compile` compiles one per block class and kind)

    @classmethod
    def units(cls, block, *, cross_attention: bool = True) -> list:
        """[(kind, module names)] of `block`'s units in execution order. The module names (attributes of
        the block) are the work a reused unit skips, for MAC accounting; the first is the unit's module.
        Default: each kind is the module of that name, where the block has one."""
        return [(kind, (kind,)) for kind in cls.kinds if getattr(block, kind, None) is not None]

    @classmethod
    def check(cls, name: str, block) -> None:
        """Raise a ValueError naming `name` when this block's configuration is not supported."""

    def setup(self, engine, blocks: list) -> None:
        """Once, when `engine` (this instance's) attaches: keep the model-level state of `blocks` (this class's
        blocks, in execution order) on the instance."""

    def teardown(self, engine, blocks: list) -> None:
        """Once, when `engine` is removed: undo what `setup` did, and drop the state it kept."""

    def precompute(self, engine, blocks: list, hidden, args, kwargs) -> bool:
        """At step 0 of an inference generation whose timesteps are known (`engine.timesteps`): fill
        `engine.modulation` from the transformer's forward arguments; return whether the blocks read it."""
        return False

    def forward(self, engine, block, index: dict, position: int, *args, **kwargs):
        """The block's forward unit by unit. index: kind -> unit number k (None: not a cached unit, it
        always computes); position: the block's index in its ModuleList."""
        raise NotImplementedError


ADAPTERS = {}  # block class name -> Adapter subclass


def register(adapter: type) -> type:
    """Register the Adapter subclass `adapter` for its block class (one adapter per class)."""
    if adapter.block_class in ADAPTERS:
        raise ValueError(f"adapter: expected one per block class, got a second for {adapter.block_class}")
    ADAPTERS[adapter.block_class] = adapter
    return adapter


def supported() -> list:
    """The block class names that have an adapter."""
    return sorted(ADAPTERS)


def adapter_for(block, name: str) -> type:
    """The Adapter subclass of `block` (at qualified name `name`), or a ValueError naming its class."""
    adapter = ADAPTERS.get(type(block).__name__)
    if adapter is None:
        raise ValueError(f"{name}: expected a block of a supported class ({', '.join(supported())}), "
                         f"got {type(block).__name__}")
    return adapter


def block_lists(transformer) -> list:
    """[(attribute name, ModuleList)] of the transformer's block lists, in registration order (diffusers
    registers them in execution order): the ModuleList children its family names (`Family.blocks`, e.g. Z-Image's
    `layers` and not its refiners), else those named `*blocks`."""
    from ..families import FAMILIES

    family = FAMILIES.get(type(transformer).__name__)
    names = family.blocks if family is not None else ()
    return [(name, child) for name, child in transformer.named_children()
            if isinstance(child, torch.nn.ModuleList) and (name in names if names else name.endswith("blocks"))]


class Block(NamedTuple):
    name: str  # qualified module name, e.g. "transformer_blocks.3"
    label: str  # for messages, e.g. "transformer_blocks[3]"
    position: int  # index in its ModuleList
    module: torch.nn.Module
    adapter_class: type  # its Adapter subclass (an engine makes its own instance)


def blocks_of(transformer) -> list:
    """[Block] of every block in execution order; a ValueError for a transformer without block lists or
    a block of an unsupported class."""
    lists = block_lists(transformer)
    if not lists:
        raise ValueError(f"transformer: expected a diffusers transformer with blocks (ModuleLists `*blocks`), "
                         f"got {type(transformer).__name__}")
    blocks = []
    for list_name, modules in lists:
        for i, block in enumerate(modules):
            label = f"{list_name}[{i}]"
            blocks.append(Block(f"{list_name}.{i}", label, i, block, adapter_for(block, label)))
    return blocks


from . import basic  # noqa: E402,F401,I001  (registers its adapter, DiT's and PixArt's, which their families use)
from .. import families  # noqa: E402,F401  (each family registers its blocks' adapters)
