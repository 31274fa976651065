"""The configurations the suite runs, by name, and the schedules behind them.

Names (`--configs`), parameters after the colon optional:
- `no-cache`: every unit at every step (the baseline; its eager row is the plain pipeline).
- `fewer-steps[:T']`: no cache at T' steps; default T' = round(T / S), S the theoretical speedup of
  the run's first `harmonica` configuration (the default synthetic one if the run has none).
- `fora:N`, `delta-dit[:b=B,n=N]` (default b = T // 2, n = 2): the baselines of method.md section 6.
- `harmonica[:cur=C]`, `l2c[:cur=C]`: the router's schedule with the HarmoniCa or the L2C rule
  (`--router`); without a router a *synthetic* one at CUR C (default 0.5 and 0.35), see
  `synthetic_schedule`.
- `fbcache[:threshold]`, `taylorseer[:interval]`, `magcache[:threshold]`, `dbcache[:threshold]`: the peers
  (`peers.py`).
- `skeleton` (added by the suite, not requested): step 0 computes, every later step reuses every
  unit; its time per step is the floor the gap attribution needs.
"""

from dataclasses import dataclass

import torch

from harmonica.router import Router, RouterInfo
from harmonica.schedule import CacheSchedule, parse_schedule, read_schedule_spec
from harmonica.units import cached_units

# execution modes, as `harmonica.enable` options (bench/suite.py describes them)
MODE_OPTIONS = {"eager": {"fused": False}, "fused": {}, "graphs": {"cuda_graphs": True},
                "graphs-step": {"cuda_graphs": True, "scheduler_in_graph": True},
                "compile": {"cuda_graphs": True, "compile": True}}
MODES = tuple(MODE_OPTIONS)
PEERS = ("fbcache", "taylorseer", "magcache", "dbcache")
LEARNED_RULES = {"harmonica": "harmonica", "l2c": "l2c-alternating"}
DEFAULT_CUR = {"harmonica": 0.5, "l2c": 0.35}
KINDS = ("no-cache", "fewer-steps", "fora", "delta-dit", *LEARNED_RULES, *PEERS)
DEFAULT_CONFIGS = ("no-cache", "fewer-steps", "fora:2", "fora:3", "delta-dit", "l2c", "harmonica", *PEERS)
SKELETON = "skeleton"
SYNTHETIC_SEED = 0


@dataclass(frozen=True)
class Config:
    """A configuration by name: `kind` is the part before the colon, `param` the part after it."""

    name: str
    kind: str
    param: str = ""

    @property
    def is_peer(self) -> bool:
        return self.kind in PEERS

    @property
    def cur(self) -> float:
        """Requested CUR of a learned configuration."""
        return float(self.param.removeprefix("cur=")) if self.param else DEFAULT_CUR[self.kind]


def parse_config(spec: str) -> Config:
    """A `Config` from its name; ValueError naming --configs for an unknown name or a bad parameter."""
    kind, _, param = spec.partition(":")
    if kind not in KINDS and spec != SKELETON:
        raise ValueError(f"--configs: expected names from {list(KINDS)} (parameters after ':'), got {spec!r}")
    config = Config(spec, kind, param)
    if kind in ("no-cache", "fora", "delta-dit"):
        read_schedule_spec(spec, "--configs")  # the parser of `harmonica sample --schedule`
        return config
    try:
        if kind in ("fewer-steps", "taylorseer") and param and int(param) < 1:
            raise ValueError("expected an integer >= 1")
        if kind in ("fbcache", "magcache", "dbcache") and param and float(param) < 0:
            raise ValueError("expected a threshold >= 0")
        if kind in LEARNED_RULES and param and not param.startswith("cur="):
            raise ValueError("expected cur=C")
        if kind in LEARNED_RULES and not 0 <= config.cur < 1:
            raise ValueError("expected 0 <= cur < 1")
    except ValueError as error:
        raise ValueError(f"--configs: could not read {spec!r} ({error})") from error
    return config


def synthetic_schedule(num_steps: int, num_units: int, cur: float, rule: str = "harmonica",
                       seed: int = SYNTHETIC_SEED) -> CacheSchedule:
    """A deterministic stand-in for a learned schedule at CUR `cur` (to 1 / (T K)).

    The rows the rule always computes (row 0; for "l2c-alternating" also every other row, see
    `CacheSchedule.from_gates`) compute. Every other (step, unit) gets the score
    `1 - t / T + 0.5 u`, u ~ U(0, 1) from `torch.Generator().manual_seed(seed)`, and the
    round(cur T K) lowest scores reuse: early steps mostly compute, late steps mostly reuse, with
    unit-to-unit variation, the structure trained routers show (method.md).
    """
    forced = CacheSchedule.from_gates(torch.zeros(num_steps, num_units), 0.5, rule).table
    reuse = round(cur * num_steps * num_units)
    free = int((~forced).sum())
    if reuse > free:
        raise ValueError(f"cur: the {rule} rule reuses at most {free / forced.numel():.3f} of {num_steps} steps x "
                         f"{num_units} units, got {cur}")
    scores = 1 - torch.arange(num_steps, dtype=torch.float64)[:, None] / num_steps + 0.5 * torch.rand(
        num_steps, num_units, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scores[forced] = float("inf")
    table = torch.ones(num_steps * num_units, dtype=torch.bool)
    table[scores.flatten().argsort(stable=True)[:reuse]] = False
    name = "harmonica" if rule == "harmonica" else "l2c"
    return CacheSchedule(table.view(num_steps, num_units), f"{name}:synthetic,cur={cur:g}")


def engine_schedule(config: Config, transformer, num_steps: int, router: Router | None = None):
    """(a `CacheSchedule` or `Router` for `harmonica.enable`, synthetic?) of a non-peer configuration at
    `num_steps` steps (for fewer-steps: its own step count). ValueError when it cannot apply here."""
    names = [name for name, _ in cached_units(transformer)]
    if config.kind in ("no-cache", "fewer-steps"):
        return CacheSchedule.no_cache(num_steps, len(names)), False
    if config.name == SKELETON:
        return CacheSchedule(CacheSchedule.fora(num_steps, len(names), num_steps).table, SKELETON), False
    if config.kind in ("fora", "delta-dit"):
        return parse_schedule(config.name, num_steps, names, "--configs"), False
    if router is None:
        return synthetic_schedule(num_steps, len(names), config.cur, LEARNED_RULES[config.kind]), True
    router.check(RouterInfo.for_model(transformer))
    if router.num_steps != num_steps:
        raise ValueError(f"router: trained for {router.num_steps} steps, this row runs {num_steps}")
    return (router if config.kind == "harmonica" else CacheSchedule.l2c_alternating(router)), False


def fewer_steps(config: Config, num_steps: int, matched_speedup: float) -> int:
    """T' of a fewer-steps configuration: its parameter, else round(T / matched_speedup), at least 1."""
    return int(config.param) if config.param else max(1, round(num_steps / matched_speedup))
