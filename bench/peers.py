"""The peers, through their public APIs, on the same model and seed, and a count of the units that ran.

- `fbcache[:threshold]`: diffusers' First Block Cache (`apply_first_block_cache`, threshold default
  0.2 as in diffusers' and ParaAttention's examples): block 0 always runs; when its residual changed
  less than the threshold (relative L1, one `.item()` per step) the other blocks are skipped.
- `taylorseer[:interval]`: diffusers' TaylorSeer (`apply_taylorseer_cache`, first order) on our units
  (`attn1`, `attn2`, `ff`; its default patterns match no DiT/PixArt module): full steps 0..2, then every
  `interval`-th step (default 2), Taylor-extrapolated outputs in between.
- `dbcache[:threshold]`: cache-dit's DBCache (`cache_dit.enable_cache(transformer,
  cache_config=DBCacheConfig(...))`, the optional `peers` extra): its defaults (F8B0, 8 warm-up
  steps, threshold 0.08) with Fn capped at the block count minus one.

DiT and PixArt transformers do not mix in diffusers' `CacheMixin`, so there is no
`transformer.enable_cache`; the hooks are applied by the public `apply_*` functions and each
generation runs inside `CacheMixin.cache_context("cond")` (CFG is one batch), after
`HookRegistry.reset_stateful_hooks()`. Each peer runs on a copy of the transformer (same weights),
dropped after its row, so no hook or state leaks into later rows.
"""

import copy
import importlib.util
import os
from contextlib import contextmanager

import torch

from harmonica.units import cached_units

from .configs import Config

FBCACHE_THRESHOLD = 0.2
TAYLORSEER_INTERVAL = 2
TAYLORSEER_WARMUP = 3
UNIT_PATTERN = r"transformer_blocks\.\d+\.(attn1|attn2|ff)"


class PeerUnavailable(Exception):
    """The peer cannot run here; the message is the reason the row is skipped."""


class Peer:
    """A peer's cache on a copy of a transformer: `apply` once, `generation` around each generation."""

    description = ""

    def __init__(self, transformer):
        self.transformer = copy.deepcopy(transformer)
        self.apply()

    def apply(self) -> None:
        raise NotImplementedError

    @contextmanager
    def generation(self, num_steps: int):
        yield


class DiffusersHooks(Peer):
    """A diffusers cache hook (First Block Cache, TaylorSeer) applied by its public `apply_*` function."""

    def __init__(self, transformer, apply_fn, cache_config):
        self.apply_fn, self.cache_config = apply_fn, cache_config
        self.description = repr(cache_config)
        super().__init__(transformer)

    def apply(self) -> None:
        self.apply_fn(self.transformer, self.cache_config)

    @contextmanager
    def generation(self, num_steps: int):
        from diffusers.hooks import HookRegistry
        from diffusers.models.cache_utils import CacheMixin

        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks()
        with CacheMixin.cache_context(self.transformer, "cond"):
            yield


class CacheDiT(Peer):
    """cache-dit's DBCache on the transformer alone; each generation refreshes its context."""

    def __init__(self, transformer, threshold: float | None):
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
        from cache_dit import DBCacheConfig

        fields = {"Fn_compute_blocks": min(8, len(transformer.transformer_blocks) - 1)}
        if threshold is not None:
            fields["residual_diff_threshold"] = threshold
        self.make_config = lambda steps: DBCacheConfig(**fields, num_inference_steps=steps)
        self.description = f"DBCacheConfig({', '.join(f'{k}={v}' for k, v in fields.items())}, other fields default)"
        super().__init__(transformer)

    def apply(self) -> None:
        import cache_dit

        cache_dit.enable_cache(self.transformer, cache_config=self.make_config(None))

    @contextmanager
    def generation(self, num_steps: int):
        import cache_dit

        cache_dit.refresh_context(self.transformer, cache_config=self.make_config(num_steps))
        yield


def make_peer(config: Config, transformer) -> Peer:
    """The peer of `config` on a copy of `transformer`; PeerUnavailable with the reason when it cannot run."""
    if config.kind == "dbcache":
        if importlib.util.find_spec("cache_dit") is None:
            raise PeerUnavailable("cache-dit not installed (pip install -e '.[peers]')")
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
    if len(transformer.transformer_blocks) < 2:
        raise PeerUnavailable(f"{config.kind} needs at least 2 transformer blocks")
    if config.kind == "fbcache":
        threshold = float(config.param) if config.param else FBCACHE_THRESHOLD
        return DiffusersHooks(transformer, apply_first_block_cache, FirstBlockCacheConfig(threshold=threshold))
    interval = int(config.param) if config.param else TAYLORSEER_INTERVAL
    return DiffusersHooks(transformer, apply_taylorseer_cache, TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=TAYLORSEER_WARMUP, max_order=1,
        taylor_factors_dtype=transformer.dtype, cache_identifiers=[UNIT_PATTERN]))


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
