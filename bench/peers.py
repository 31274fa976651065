"""The peers, through their public APIs, on the same model and seed, and a count of the units that ran.

- `fbcache[:threshold]`: diffusers' First Block Cache (`apply_first_block_cache`, threshold default
  0.2 as in diffusers' and ParaAttention's examples): block 0 always runs; when its residual changed
  less than the threshold (relative L1, one `.item()` per step) the other blocks are skipped.
- `taylorseer[:interval]`: diffusers' TaylorSeer (`apply_taylorseer_cache`, first order) on our units
  (`attn1`, `attn2`, `ff`; its default patterns match no DiT/PixArt module): full steps 0..2, then every
  `interval`-th step (default 2), Taylor-extrapolated outputs in between.
- `dbcache[:threshold]`: cache-dit's DBCache (`cache_dit.enable_cache(adapter,
  cache_config=DBCacheConfig(...))`, the optional `peers` extra) through cache-dit's own BlockAdapter for the
  transformer alone (FLUX, FLUX.2, Wan, Qwen-Image, Z-Image, HunyuanVideo 1.5, ...): its defaults (F8B0, 8 warm-up
  steps, threshold 0.08). Each of cache-dit's block lists (FLUX.2: joint and single) computes its first Fn blocks:
  Fn is capped at the longest list's length minus one and at the shortest's length (cache-dit asserts it), and a
  model with no block past Fn (tiny FLUX.2's 1 + 1 layers) is a skip. Separate CFG forwards are off (cache-dit's
  adapters turn them on for HunyuanVideo 1.5, Wan, Qwen-Image; the loop makes one forward a step, CFG as one batch).
  SD3/SD3.5, which cache-dit serves only through its StableDiffusion3 pipeline adapter, take that adapter's blocks
  and forward pattern (`Family.cache_dit`); a family cache-dit cannot run states why (`Family.cache_dit_skip`:
  LTX-2, whose cache-dit 1.5.3 forward predates diffusers 0.42's).

- `magcache[:threshold]`: diffusers' MagCache (threshold default 0.06, its default), only through
  `enable_cache`. Its magnitude ratios are checkpoint-dependent: one untimed generation in its calibration
  mode (nothing skipped) measures them on this model, seed and step count, then the cache runs with them.

Transformers that mix in diffusers' `CacheMixin` (FLUX, Wan, Qwen-Image) take the diffusers hooks through
`transformer.enable_cache(config)` and drop them with `disable_cache()`; the others (DiT, PixArt, SD3) through
the public `apply_*` functions, their hooks removed from the registries after the row. Each generation runs
inside `CacheMixin.cache_context("cond")` (CFG is one batch), after `HookRegistry.reset_stateful_hooks()`.
Each peer runs on a copy of the transformer (same weights); `Peer.close` removes its hooks and raises when
a hook or patched forward is left (`leftovers`).
"""

import ast
import copy
import importlib.util
import io
import os
import re
from contextlib import contextmanager, redirect_stdout

import torch

from harmonica.adapters import block_lists
from harmonica.families import FAMILIES
from harmonica.units import cached_units

from .configs import Config

FBCACHE_THRESHOLD = 0.2
TAYLORSEER_INTERVAL = 2
TAYLORSEER_WARMUP = 3
MAGCACHE_THRESHOLD = 0.06


class PeerUnavailable(Exception):
    """The peer cannot run here; the message is the reason the row is skipped."""


class Peer:
    """A peer's cache on a copy of a transformer: `apply` once, `generation` around each generation."""

    description = ""

    def __init__(self, transformer):
        self.source, self.transformer = transformer, copy.deepcopy(transformer)
        self.apply()

    def apply(self) -> None:
        raise NotImplementedError

    @contextmanager
    def generation(self, num_steps: int):
        yield

    def calibrate(self, generate) -> None:
        """Runs before the timed generations; `generate()` makes one generation on `self.transformer`."""

    def remove(self) -> None:
        raise NotImplementedError

    clean_removal = True  # whether `remove` leaves the copy without hooks

    def close(self) -> None:
        """Removes the peer's hooks; RuntimeError naming what is left on the original transformer (or, where
        removal is clean, on the copy)."""
        self.remove()
        left = leftovers(self.source) + (leftovers(self.transformer) if self.clean_removal else [])
        if left:
            raise RuntimeError(f"{type(self).__name__}: hooks left after removal on {left[:3]}")


def leftovers(model) -> list:
    """Names of the modules that still carry a diffusers hook, a torch hook or an instance-level forward other
    than the class's own (diffusers' registries restore the original as an instance attribute)."""
    names = []
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        patched = getattr(vars(module).get("forward", module.forward), "__func__", None) is not type(module).forward
        if (registry is not None and registry.hooks) or patched or module._forward_hooks or module._forward_pre_hooks:
            names.append(name or type(module).__name__)
    return names


class DiffusersHooks(Peer):
    """A diffusers cache hook (First Block Cache, TaylorSeer, MagCache): `transformer.enable_cache(config)` when
    the transformer is a `CacheMixin`, else the hook's public `apply_*` function."""

    def __init__(self, transformer, apply_fn, cache_config):
        self.apply_fn, self.cache_config = apply_fn, cache_config
        self.description = repr(cache_config)
        super().__init__(transformer)

    @property
    def mixin(self) -> bool:
        return hasattr(self.transformer, "enable_cache")

    def apply(self) -> None:
        if self.mixin:
            self.transformer.enable_cache(self.cache_config)
        else:
            self.apply_fn(self.transformer, self.cache_config)

    def remove(self) -> None:
        if self.mixin:
            self.transformer.disable_cache()
            return
        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for name in list(registry.hooks) if registry is not None else ():
                registry.remove_hook(name, recurse=False)

    @contextmanager
    def generation(self, num_steps: int):
        from diffusers.hooks import HookRegistry
        from diffusers.models.cache_utils import CacheMixin

        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks()
        with CacheMixin.cache_context(self.transformer, "cond"):
            yield


class MagCache(DiffusersHooks):
    """diffusers' MagCache through `enable_cache`, its magnitude ratios calibrated on this model first."""

    def __init__(self, transformer, threshold: float, num_steps: int):
        from diffusers.hooks import MagCacheConfig

        self.make_config = lambda **kw: MagCacheConfig(num_inference_steps=num_steps, **kw)
        self.threshold = threshold
        super().__init__(transformer, None, self.make_config(calibrate=True))

    def calibrate(self, generate) -> None:
        """One generation in calibration mode (its printout captured), then the cache with the ratios it measured."""
        printed = io.StringIO()
        with redirect_stdout(printed), self.generation(None):
            generate()
        lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
        if not lists:
            raise RuntimeError("MagCache: the calibration generation printed no magnitude ratios")
        self.transformer.disable_cache()
        self.cache_config = self.make_config(threshold=self.threshold, mag_ratios=ast.literal_eval(lists[-1]))
        self.description = repr(self.cache_config).split(", mag_ratios")[0] + ", mag_ratios calibrated)"
        self.apply()


class CacheDiT(Peer):
    """cache-dit's DBCache on the transformer alone, through cache-dit's own adapter for it (or the family's block
    list and pattern, `Family.cache_dit`); each generation refreshes its context. cache-dit 1.5.3's `disable_cache`
    leaves its patched forward on the copy (which is dropped after the row)."""

    clean_removal = False

    def __init__(self, transformer, threshold: float | None):
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
        self.threshold = threshold
        super().__init__(transformer)

    def make_config(self, num_steps: int | None):
        from cache_dit import DBCacheConfig

        return DBCacheConfig(**self.fields, num_inference_steps=num_steps)

    def apply(self) -> None:
        import cache_dit

        adapter = self.block_adapter()
        lengths = [len(blocks) for blocks in (adapter.blocks if isinstance(adapter.blocks, list) else [adapter.blocks])]
        # the first Fn blocks run in each of cache-dit's block lists (at most its length, cache-dit asserts): capped
        # so that the longest list has blocks to skip; the loop makes one forward per step (CFG in one batch),
        # never cache-dit's separate CFG forwards
        fn = max(1, min(8, max(lengths) - 1, min(lengths)))
        if fn >= max(lengths):
            raise PeerUnavailable(f"dbcache: cache-dit's DBCache skips no block of {type(self.transformer).__name__} "
                                  f"(its block lists of {lengths} blocks each compute their first Fn >= 1)")
        self.fields = {"Fn_compute_blocks": fn, "enable_separate_cfg": False}
        if self.threshold is not None:
            self.fields["residual_diff_threshold"] = self.threshold
        self.description = (f"DBCacheConfig({', '.join(f'{k}={v}' for k, v in self.fields.items())}, other fields "
                            "default)")
        cache_dit.enable_cache(adapter, cache_config=self.make_config(None))

    def block_adapter(self):
        """cache-dit's BlockAdapter of the copy: the family's block list and pattern, else cache-dit's own."""
        import cache_dit

        target = self.transformer
        family = FAMILIES.get(type(target).__name__)
        if family is not None and family.cache_dit is not None:
            blocks, pattern = family.cache_dit
            return cache_dit.BlockAdapter(transformer=target, blocks=getattr(target, blocks),
                                          forward_pattern=getattr(cache_dit.ForwardPattern, pattern),
                                          check_forward_pattern=True)
        adapter = cache_dit.BlockAdapterRegister.get_adapter(target)
        if adapter is None:
            raise PeerUnavailable(f"dbcache: cache-dit has no adapter for {type(target).__name__}")
        return adapter

    @contextmanager
    def generation(self, num_steps: int):
        import cache_dit

        cache_dit.refresh_context(self.transformer, cache_config=self.make_config(num_steps))
        yield

    def remove(self) -> None:
        import cache_dit

        cache_dit.disable_cache(self.transformer)


def make_peer(config: Config, transformer, num_steps: int | None = None) -> Peer:
    """The peer of `config` on a copy of `transformer` for `num_steps`-step generations (needed by magcache);
    PeerUnavailable with the reason when it cannot run."""
    if config.kind == "dbcache":
        if importlib.util.find_spec("cache_dit") is None:
            raise PeerUnavailable("cache-dit not installed (pip install -e '.[peers]')")
        stated_skip(transformer, "cache_dit_skip", "dbcache: cache-dit's DBCache")
        return CacheDiT(transformer, float(config.param) if config.param else None)
    try:
        from diffusers.hooks import (
            FirstBlockCacheConfig,
            TaylorSeerCacheConfig,
            apply_first_block_cache,
            apply_taylorseer_cache,
        )
    except ImportError as error:
        raise PeerUnavailable(f"this diffusers has no {config.kind} hook ({error})") from error
    if num_blocks(transformer) < 2:
        raise PeerUnavailable(f"{config.kind} needs at least 2 transformer blocks")
    if config.kind == "magcache":
        if not hasattr(transformer, "enable_cache"):
            raise PeerUnavailable(f"magcache runs through enable_cache; {type(transformer).__name__} is not a "
                                  "diffusers CacheMixin")
        if num_steps is None:
            raise ValueError("num_steps: expected the step count for magcache, got None")
        unregistered = sorted(unregistered_block_classes(transformer))
        if unregistered:
            raise PeerUnavailable(f"magcache: diffusers' MagCache does not run {type(transformer).__name__} (its "
                                  f"block class {', '.join(unregistered)} is not in diffusers' "
                                  "TransformerBlockRegistry)")
        return MagCache(transformer, float(config.param) if config.param else MAGCACHE_THRESHOLD, num_steps)
    if config.kind == "fbcache":
        stated_skip(transformer, "first_block_cache", "fbcache: diffusers' First Block Cache")
        threshold = float(config.param) if config.param else FBCACHE_THRESHOLD
        return DiffusersHooks(transformer, apply_first_block_cache, FirstBlockCacheConfig(threshold=threshold))
    interval = int(config.param) if config.param else TAYLORSEER_INTERVAL
    return DiffusersHooks(transformer, apply_taylorseer_cache, TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=TAYLORSEER_WARMUP, max_order=1,
        taylor_factors_dtype=transformer.dtype, cache_identifiers=[unit_pattern(transformer)]))


def stated_skip(transformer, reason: str, peer: str) -> None:
    """PeerUnavailable naming `peer` when the transformer's family states why it cannot run it (`Family.<reason>`)."""
    family = FAMILIES.get(type(transformer).__name__)
    if family is not None and getattr(family, reason) is not None:
        raise PeerUnavailable(f"{peer} does not run {family.transformer} ({getattr(family, reason)})")


def unregistered_block_classes(transformer) -> set:
    """Names of the transformer's block classes that diffusers' cache hooks cannot read (not in its
    TransformerBlockRegistry); empty when this diffusers has no such registry to ask."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:
        return set()
    names = set()
    for _, blocks in block_lists(transformer):
        for block in blocks:
            try:
                TransformerBlockRegistry.get(type(block))
            except ValueError:
                names.add(type(block).__name__)
    return names


def num_blocks(transformer) -> int:
    """Transformer blocks in the model's cached block lists (FLUX: its joint and single blocks together)."""
    return sum(len(child) for _, child in block_lists(transformer))


def unit_pattern(transformer) -> str:
    """A `re.fullmatch` pattern of the transformer's cached units (TaylorSeer's default patterns match none of
    DiT/PixArt's modules)."""
    return "|".join(re.escape(name) for name, _ in cached_units(transformer))


class UnitCounter:
    """Which units really ran at each step of the forwards it saw: `table()` -> (T, K) bool.

    A unit counts as run when its first `nn.Linear` runs (a skipped or predicted unit never calls
    it); the transformer's forward pre-hook starts a step. Use as a context manager.
    """

    def __init__(self, transformer):
        self.transformer = transformer
        self.rows = []

    def __enter__(self):
        units = cached_units(self.transformer)
        self.num_units = len(units)

        def start_step(*_):
            self.rows.append([False] * self.num_units)

        def mark(k):
            def hook(*_):
                self.rows[-1][k] = True
            return hook

        self.handles = [self.transformer.register_forward_pre_hook(start_step)]
        for k, (_, unit) in enumerate(units):
            first_linear = next(m for m in unit.modules() if isinstance(m, torch.nn.Linear))
            self.handles.append(first_linear.register_forward_hook(mark(k)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def table(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.bool).view(len(self.rows), self.num_units)
