"""Schedule search: the default router objective, the final-image error of the deployed hard schedule.

IEPO trains soft gates on a per-step proxy whose weights rank schedules unlike the final image
(method.md 5b). This objective measures what users deploy instead: a static compute table S (T, K) is
scored by `mse(x_0(S), x_0(no cache))`, the final samples of a fixed calibration batch sampled with S
(the engine's inference mode, units really skipped) against the same noises sampled uncached. The cost is
a hard constraint, never a penalty: every table holds exactly `budget` computed (step, unit) cells, row 0
included (CUR = 1 - budget / (T K)), and `search_router` also holds its MACs to at most the start's (units
differ in cost), so there is no beta to tune and nothing to wind up.

The search starts from the best equal-cost static schedule (`spread`: FORA's evenly spaced full rows at
the budget) and improves it by swaps, one computed cell against one reused cell, so the cost never
moves. Each round measures the sensitivity of every free cell (the loss change of flipping it alone, one
rollout each), ranks the swaps by the sum of their two flips' sensitivities, and measures the best-ranked
swaps in turn, keeping each one that lowers the measured loss (cells already moved this round are left
for the next one). It stops after a round without improvement, after `rounds` rounds or at `max_rollouts`.
The calibration loss therefore never rises above the starting schedule's. The result is written as a
`Router` whose logits are +-LOGIT_BOUND, so its schedule at any tau in (0.007, 0.993) is the table.
"""

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .parallel import EVAL_CHUNK, sharded
from .router import LOGIT_BOUND, Router, RouterInfo
from .schedule import CacheSchedule
from .task import Task


def budget_for_cur(cur: float, num_steps: int, num_units: int) -> int:
    """Computed cells of a (T, K) table at `cur` (nearest count; row 0 computes: at least K, at most T K)."""
    if not 0 <= cur < 1:
        raise ValueError(f"cur: expected a value in [0, 1), got {cur}")
    cells = num_steps * num_units
    return min(cells, max(num_units, round((1 - cur) * cells)))


def spread(num_steps: int, num_units: int, budget: int, computing: tuple = (0,)) -> torch.Tensor:
    """(T, K) bool: `budget // K` full rows evenly spaced from row 0 (FORA:n where T / rows is n), the
    `budget % K` cells left over at the front of the first row after the last full row that is free. computing: rows
    that must be full (row 0 and each later expert's first step, `Task.experts`), in place of the evenly spaced rows
    nearest them."""
    rows = budget // num_units
    if not len(computing) <= rows <= num_steps:
        raise ValueError(f"budget: expected {len(computing) * num_units} to {num_steps * num_units} cells, "
                         f"got {budget}")
    table = torch.zeros(num_steps, num_units, dtype=torch.bool)
    full = {(j * num_steps) // rows for j in range(rows)}
    for row in computing[1:]:
        if row not in full:
            full.remove(min(full - set(computing), key=lambda t: abs(t - row)))
            full.add(row)
    full = sorted(full)
    table[full] = True
    extra = budget - rows * num_units
    if extra:
        free = next(t for t in range(num_steps) if t not in full)
        table[free, :extra] = True
    return table


@dataclass
class SearchResult:
    table: torch.Tensor  # (T, K) bool, the best schedule found
    loss: float  # its calibration loss
    start_loss: float  # the starting schedule's
    rollouts: int  # schedules measured
    history: list  # calibration loss after each round


def search_schedule(loss, start: torch.Tensor, *, unit_cost=None, cost_budget: float | None = None,
                    rounds: int = 8, candidates: int = 24, max_rollouts: int | None = None, log=None,
                    on_accept=None, stopped=None, computing: tuple = (0,)) -> SearchResult:
    """Minimise `loss(table) -> float` over (T, K) bool tables with as many computed cells as `start`,
    the rows `computing` (row 0; each later expert's first step) always computing, by sensitivity-ranked swaps
    (module docstring). `unit_cost` (K,): each unit's
    cost (MACs); a swap is then only taken when the table's cost stays at most `cost_budget` (default:
    `start`'s), so the result costs at most that in MACs as well as `start` in cells. `candidates`: swaps measured
    per round; `max_rollouts`: stop once this many tables were measured; `log(str)`: progress lines;
    `on_accept(table)`: called with the start and each accepted table (`Rollouts.set_base`);
    `stopped()`: true ends the search before the next measurement (the best table so far is returned)."""
    table = start.clone()
    if not bool(table[list(computing)].all()):
        raise ValueError(f"start: expected rows {list(computing)} to compute every unit")
    if on_accept is not None:
        on_accept(table)
    best = loss(table)
    start_loss, rollouts, history = best, 1, []
    free = [(t, k) for t in range(table.shape[0]) if t not in computing for k in range(table.shape[1])]
    cost = torch.ones(table.shape[1], dtype=torch.float64) if unit_cost is None else \
        torch.as_tensor(unit_cost, dtype=torch.float64)
    budget = (table.double() @ cost).sum().item() if cost_budget is None else cost_budget
    budget *= 1 + 1e-9

    def affordable(a, r):
        return (table.double() @ cost).sum().item() + cost[a[1]].item() - cost[r[1]].item() <= budget

    def spent():
        return (max_rollouts is not None and rollouts >= max_rollouts) or (stopped is not None and stopped())

    for round_ in range(rounds):
        if spent():
            break
        delta = {}
        for cell in free:
            if spent():
                break
            flipped = table.clone()
            flipped[cell] = ~flipped[cell]
            delta[cell] = loss(flipped) - best
            rollouts += 1
        adds = sorted((c for c in delta if not table[c]), key=delta.get)
        removes = sorted((c for c in delta if table[c]), key=delta.get)
        pairs = sorted(((a, r) for a in adds[:candidates] for r in removes[:candidates]),
                       key=lambda p: delta[p[0]] + delta[p[1]])
        moved, tried, improved = set(), 0, False
        for a, r in pairs:
            if tried >= candidates or spent():
                break
            if a in moved or r in moved or not affordable(a, r):
                continue
            trial = table.clone()
            trial[a], trial[r] = True, False
            value = loss(trial)
            rollouts += 1
            tried += 1
            if value < best:
                table, best, improved = trial, value, True
                moved.update((a, r))
                if on_accept is not None:
                    on_accept(table)
        history.append(best)
        if log is not None:
            log(f"round {round_ + 1}: calibration loss {best:.4g} ({rollouts} schedules measured)")
        if not improved:
            break
    return SearchResult(table, best, start_loss, rollouts, history)


def router_from_table(table: torch.Tensor, info) -> Router:
    """A `Router` whose schedule at its tau is `table` (logits +-LOGIT_BOUND)."""
    router = Router(table.shape[0], table.shape[1], info=info)
    with torch.no_grad():
        router.logits.copy_(torch.where(table, LOGIT_BOUND, -LOGIT_BOUND))
    return router


def copied_slots(slots: list) -> list:
    """A copy of an engine's slots: None, a tensor, or a tuple of tensors (a unit feeding two streams)."""
    return [tuple(t.clone() for t in slot) if isinstance(slot, tuple) else None if slot is None else slot.clone()
            for slot in slots]


class ExpertEngines:
    """The engines of a task's experts (`task.experts()`: transformers that take turns by step, Wan 2.2 A14B's two),
    driven as the one engine `Rollouts` drives: `seek(i)` readies the engine of step i's transformer, which
    `transformer` then is, each begins at its first step (whose row must compute), their slots side by side."""

    def __init__(self, engines: list, firsts: list):
        self.engines, self.firsts = engines, firsts
        self.units, self.transformer = engines[0].units, engines[0].transformer

    @property
    def slots(self) -> list:
        return [slot for engine in self.engines for slot in engine.slots]

    def swap_slots(self, slots: list) -> list:
        if len(slots) != len(self.slots):
            raise ValueError(f"slots: expected {len(self.slots)} slots, got {len(slots)}")
        previous, at = [], 0
        for engine in self.engines:
            previous += engine.swap_slots(slots[at:at + len(engine.slots)])
            at += len(engine.slots)
        return previous

    def set_off(self) -> None:
        for engine in self.engines:
            engine.set_off()

    def set_schedule(self, schedule, forecast=None) -> None:
        if forecast is not None:
            raise ValueError("forecast: expected None for a task of several transformers, got one")
        for engine in self.engines:
            engine.set_schedule(schedule)

    def begin(self) -> None:
        for engine, first in zip(self.engines, self.firsts):
            engine.begin(start=first)

    def seek(self, step: int) -> None:
        engine = self.engines[sum(first <= step for first in self.firsts) - 1]
        engine.seek(step)
        self.transformer = engine.transformer


@contextlib.contextmanager
def task_engine(task: Task):
    """A training `CacheEngine` on the task's transformer (`training.engine_attached`), or `ExpertEngines` of one on
    each of its experts (`task.experts()`, where it has several)."""
    from .training import engine_attached

    experts = task.experts()
    with contextlib.ExitStack() as stack:
        engines = [stack.enter_context(engine_attached(transformer)) for transformer, _ in experts]
        yield engines[0] if len(engines) == 1 else ExpertEngines(engines, [first for _, first in experts])


class Rollouts:
    """Final samples of a fixed batch under static schedules, on a transformer attached to `engine`
    (a training `CacheEngine`, which runs them in its inference mode: reused units are skipped).

    task: a training `Task` (DiTTask, PixArtTask, the flow tasks).
    noise (B, *latent) and cond: the batch (its forward inputs prepared once, `Task.prepare`). clip: (low, high)
    the samples are clipped to before they are compared (a pixel-space model's image range), or None (latents).
    The states before every step of a base schedule are kept, so a table that first differs from it at
    row d samples steps d .. T-1 only (`loss`). Slots of the base run are written at every computed unit,
    so any row d can start from them."""

    def __init__(self, task: Task, engine, noise, cond, num_steps: int, *, clip=None, average=None):
        self.task, self.engine, self.num_steps, self.clip = task, engine, num_steps, clip
        self.average = average or (lambda value: value)  # across ranks (DDP)
        self.device = next(task.transformer.parameters()).device
        self.inputs = task.prepare(cond, self.device)
        self.noise = noise.to(self.device, task.transformer.dtype)
        self.reference = self._clipped(self.sample(None))
        self.base, self.states = None, None

    def _clipped(self, x):
        x = x.float()
        return x if self.clip is None else x.clamp(*self.clip)

    @torch.no_grad()
    def sample(self, table, *, start: int = 0, keep: bool = False, forecast=None) -> torch.Tensor:
        """The final x of the batch under `table` (None: caching off), from the kept state before step
        `start`; keep: record the state before every step (slots written at every computed unit); forecast:
        a `Forecast` of `table` (or the `ForecastFit` that fits one; forecast.py), not with start or keep."""
        engine, T = self.engine, self.num_steps
        if forecast is not None and (start or keep):
            raise ValueError("forecast: expected a sampling from step 0 that keeps no states, got start or keep")
        if table is None:
            engine.set_off()
        else:
            schedule = CacheSchedule(table.clone(), "search")
            if keep:  # every computed unit refreshes its slot, whatever the next row reuses
                schedule.step_keys = [(row, row) for row, _ in schedule.step_keys]
            engine.set_schedule(schedule, forecast)
        if start:
            x, slots, state = self.states[start]
            engine.swap_slots(copied_slots(slots))
            x, state = x.clone(), copy.deepcopy(state)
        else:
            x, state = self.noise, self.task.begin()
        states = [None] * T
        engine.begin()
        for i in range(start, T):
            if keep:
                states[i] = (x.clone(), copied_slots(engine.slots), copy.deepcopy(state))
            engine.seek(i)
            out = self.task.output(engine.transformer(**self.task.model_kwargs(x, self.inputs, i)))
            x = self.task.update(state, x, out, i)
        if keep:
            self.states = states
        return x

    def error(self, table, forecast=None) -> float:
        """Mean squared error of the batch's final samples under `table` (with `forecast`, a `Forecast` of it)
        against the uncached ones (averaged over ranks), sampled from the start."""
        x = self.sample(table, forecast=forecast)
        return self.average(torch.mean((self._clipped(x) - self.reference) ** 2).item())

    def set_base(self, table) -> None:
        self.sample(table, keep=True)
        self.base = table.clone()

    def loss(self, table) -> float:
        """`error(table)`, sampling only the steps from the first row where `table` differs from the base."""
        if self.base is None:
            self.set_base(table)
        differs = (table != self.base).any(1).nonzero()
        start = int(differs[0]) if len(differs) else self.num_steps - 1
        x = self.sample(table, start=start)
        return self.average(torch.mean((self._clipped(x) - self.reference) ** 2).item())


# ---- the `harmonica train` objective ----


@dataclass
class SearchConfig:
    """`harmonica train --objective search`."""

    num_steps: int = 10
    target_cur: float = 0.5  # the cost: computed cells = (1 - CUR) T K, held exactly
    target_speedup: float | None = None  # also hold the MACs to at most those of this theoretical speedup
    batch: int = 64  # calibration noises per rank (classifier-free guidance doubles the model batch)
    seed: int = 0
    rounds: int = 8
    candidates: int = 24  # swaps measured per round
    # rounds of `forecast_search` after the forecast is kept: 0 (none), as one round measured no held-out gain on
    # digits-dit (docs/training.md)
    forecast_rounds: int = 0
    tau: float = 0.1  # recorded in the router (its logits are +-5: the table at any tau in (0.007, 0.993))
    clip: tuple | None = None  # (low, high) of a pixel-space model's images (digits-dit: (-1, 1)); None: latents


def calibration_batch(task: Task, count: int, seed: int, rank: int = 0) -> tuple:
    """(noise (count, *latent), conditions) drawn from a generator of `seed` and `rank`."""
    generator = torch.Generator().manual_seed(seed * 7919 + 1 + rank)
    noise = torch.randn(count, *task.latent_shape, generator=generator)
    return noise, task.conditions(count, generator)


def search_router(task: Task, config: SearchConfig, out_dir, macs, *, stopped=None, log=None):
    """Search the schedule of `config.target_cur` for `task` on a calibration batch and save it as a router
    to `out_dir/router` (marked partial when `stopped()` ended the search early). Returns (router, result).
    macs: the task's `MacCount`. The cost is equal, in cells and in MACs: the cells are those of
    `config.target_cur`, the MACs at most the equal-cost FORA schedule's (the start), or with
    `config.target_speedup` at most that theoretical speedup's; so the searched schedule never buys its quality
    with costlier units.
    Under torchrun each rank draws its own calibration noises and the losses are averaged over ranks, so
    every rank takes the same steps."""
    from .training import ROUTER_DIR, _average, _rank_world

    rank, _ = _rank_world()
    transformer = task.transformer
    device = next(transformer.parameters()).device
    info = RouterInfo.for_model(transformer, sampler=task.sampler, timesteps=list(task.timesteps), tau=config.tau)
    noise, cond = calibration_batch(task, config.batch, config.seed, rank)
    # row 0 and each later expert's first step compute every unit (no slot holds that transformer's outputs yet)
    computing = tuple(first for _, first in task.experts())
    with task_engine(task) as engine:
        num_units = len(engine.units)
        budget = budget_for_cur(config.target_cur, config.num_steps, num_units)
        calibration = Rollouts(task, engine, noise, cond, config.num_steps, clip=config.clip,
                               average=lambda v: _average(torch.tensor(v, device=device)).item())
        cost_budget = None  # the start's MACs
        if config.target_speedup is not None:
            cost_budget = config.num_steps * (macs.total / config.target_speedup - macs.always_macs)
        start = spread(config.num_steps, num_units, budget, computing)
        result = search_schedule(calibration.loss, start, unit_cost=macs.unit_macs, cost_budget=cost_budget,
                                 rounds=config.rounds, candidates=config.candidates, on_accept=calibration.set_base,
                                 stopped=stopped, log=log, computing=computing)
    if not (math.isfinite(result.loss) and math.isfinite(result.start_loss)):
        raise RuntimeError(f"search: expected a finite calibration error, got {result.start_loss} (equal-cost start) "
                           f"and {result.loss}: the model's outputs or the prompt embeddings are not finite; no router "
                           "saved")
    info.complete = not (stopped is not None and stopped())
    router = router_from_table(result.table, info)
    if rank == 0:
        router.save_pretrained(Path(out_dir) / ROUTER_DIR)
    return router, result


def forecast_search(rollouts, start: torch.Tensor, *, unit_cost=None, rounds: int = 1, candidates: int = 24,
                    max_rollouts: int | None = None, stopped=None, log=None, average=None) -> tuple:
    """`search_schedule` from `start` (T, K) on the calibration error of each table with its own linear forecast,
    fitted along it on the batch of `rollouts` (one fitting pass measures it: its final samples are those of
    sampling with the result; `forecast.fit_forecast`). A schedule's best cells for pure reuse are not those it
    forecasts best from, so this search moves cells that the pure-reuse one would not. The cells and (with
    `unit_cost`) the MACs are held at most `start`'s. Returns (`SearchResult`, the `Forecast` of its table);
    average: as `fit_forecast`'s."""
    from .forecast import ForecastFit, fit_forecast

    def loss(table):
        return rollouts.error(table, ForecastFit(CacheSchedule(table.clone(), "forecast-fit"), average=average))

    result = search_schedule(loss, start, unit_cost=unit_cost, rounds=rounds, candidates=candidates,
                             max_rollouts=max_rollouts, stopped=stopped, log=log)
    return result, fit_forecast(rollouts, result.table, average=average)


def deployment(rollouts, schedules: dict, *, judge=None, unit_cost=None, rounds: int = 0, candidates: int = 24,
               log=None, stopped=None, average=None) -> tuple:
    """(choice, refined, kept): what to deploy among `schedules` (name -> (T, K) table, one cost), each with its
    linear forecast fitted on the batch of `rollouts` or without: `choice`, `forecast.choose_forecast`'s (by
    `judge`'s error where given); then, with `rounds` and a forecast chosen, `refined` ((`SearchResult`, its
    `Forecast`), else None), `rounds` rounds of `forecast_search` from the chosen table (MACs held with
    `unit_cost`), kept where it lowers the calibration error and (with a judge) the judge's. kept: (label, table,
    forecast or None)."""
    from .forecast import choose_forecast

    choice = choose_forecast(rollouts, schedules, average=average, judge=judge)
    kept, refined = (choice.label, choice.table, choice.forecast), None
    if rounds and choice.with_forecast:
        refined = forecast_search(rollouts, choice.table, unit_cost=unit_cost, rounds=rounds, candidates=candidates,
                                  log=log, stopped=stopped, average=average)
        result, forecast = refined
        if result.loss < result.start_loss and (judge is None or judge.error(result.table, forecast) < choice.error):
            kept = ("refined+forecast", result.table, forecast)
    return choice, refined, kept


SELECTION_RANK = 2_000_003  # + rank: the generator of `keep_forecast`'s selection noises (no training rank's)


def keep_forecast(task: Task, router, batch: int, seed: int, clip=None, *, macs=None, rounds: int = 0,
                  candidates: int = 24, selection: int | None = None, log=None, stopped=None) -> tuple:
    """(router, `forecast.ForecastChoice`, refined, kept label): the router's schedule and its equal-cost start,
    each fitted with a linear forecast on the calibration batch (`batch` noises of `seed`, this rank's), kept with
    it or without, whichever has the lowest error on `selection` other noises of `seed` (None: `batch`; 0: the
    calibration error; `deployment`); with `rounds`, `forecast_search` from it (its MACs held by `macs`, the
    task's `MacCount`). The router returned holds what was kept (a new router when it is not the router's table).
    Under torchrun the fit and the errors are those of every rank's batch together, so every rank keeps the same."""
    from .training import _average, _rank_world, engine_attached

    table = router.schedule().table
    start = equal_cost_start(table.shape[0], table.shape[1], int(table.sum()))
    schedules = {"learned": table, **({} if torch.equal(start.table, table) else {start.name: start.table})}
    rank = _rank_world()[0]
    noise, cond = calibration_batch(task, batch, seed, rank)
    selection = batch if selection is None else selection
    device = next(task.transformer.parameters()).device

    def average(tensor):
        return _average(tensor.to(device)).cpu()

    def rollouts(noise, cond):
        return Rollouts(task, engine, noise, cond, table.shape[0], clip=clip,
                        average=lambda value: _average(torch.tensor(value, device=device)).item())

    with engine_attached(task.transformer) as engine:
        judge = rollouts(*calibration_batch(task, selection, seed, SELECTION_RANK + rank)) if selection else None
        choice, refined, (label, kept, forecast) = deployment(
            rollouts(noise, cond), schedules, judge=judge, unit_cost=None if macs is None else macs.unit_macs,
            rounds=rounds, candidates=candidates, log=log, stopped=stopped, average=average)
    if not torch.equal(kept, table):
        router = router_from_table(kept, router.info)
    router.set_forecast(forecast)
    return router, choice, None if refined is None else refined[0], label


# ---- the closing comparison ----


def equal_cost_start(num_steps: int, num_units: int, cells: int, computing: tuple = (0,)) -> CacheSchedule:
    """The static schedule of `cells` computed cells the search starts from (`spread`, rows `computing` computed),
    named as the FORA:n schedule it equals where the cells are whole evenly spaced rows, else "spread"."""
    schedule = CacheSchedule(spread(num_steps, num_units, cells, computing), "spread")
    fora = [CacheSchedule.fora(num_steps, num_units, n) for n in range(2, num_steps)]
    schedule.name = next((f.name for f in fora if f == schedule), "spread")
    return schedule


def static_rivals(num_steps: int, unit_names: list, table: torch.Tensor, computing: tuple = (0,)) -> list:
    """The static schedules a learned `table` is held against: the equal-cost start (FORA:n where the budget
    is whole rows), FORA:2 .. FORA:4, Δ-DiT (b = T/2, n = 2). Every rival computes the rows `computing` (each
    expert's first step, `Task.experts`): one that would reuse in row r has it computed, at its cost, and is
    named `<name>+row<r>`. Names unique, no duplicates."""
    num_units = len(unit_names)
    rivals = [equal_cost_start(num_steps, num_units, int(table.sum()), computing)]
    rivals += [CacheSchedule.fora(num_steps, num_units, n) for n in range(2, 5) if n < num_steps]
    rivals.append(CacheSchedule.delta_dit(unit_names, num_steps, num_steps // 2, 2))
    unique = []
    for schedule in (rival.computing(computing) for rival in rivals):
        if not any(kept == schedule for kept in unique):
            unique.append(schedule)
    return unique


@dataclass
class Row:
    name: str
    cur: float
    speedup: float  # theoretical (MACs)
    mse: float  # final samples against the uncached ones
    psnr: float  # dB, peak: the uncached samples' range (clip: its width)
    learned: bool = False


def compare(task: Task, engine, table: torch.Tensor, macs, noise, cond, *, clip=None, fewer_steps=True,
            name: str = "learned", chunk: int = EVAL_CHUNK, forecasts: dict | None = None) -> list:
    """Rows (`Row`) of the learned `table` and its static rivals of about its cost, each sampled on the
    held-out batch (noise (B, *latent), cond {key: (B,)}) and measured against the uncached samples of the same
    noises; with `fewer_steps`, the uncached sampler with the fewer steps of
    about the same cost (n = round(T (1 - CUR)), T / n theoretical speedup) too. forecasts: schedule name (`name`
    for the learned table, a rival's name) -> its `forecast.Forecast`: the learned row samples with its own,
    and each rival that has one gets a second row `<rival>+forecast`. The batch is sampled `chunk` noises at a
    time, shared out over the ranks under torchrun (`parallel.sharded`: every rank calls this and gets the
    one-process rows). A task of several experts (`Task.experts`): the rivals compute each expert's first row, and
    there is no fewer-steps row (`engine` switches experts at the steps of `task`'s, not of the fewer steps')."""
    num_steps, forecasts = table.shape[0], forecasts or {}
    learned = CacheSchedule(table.clone(), name)
    computing = tuple(first for _, first in task.experts())
    rivals = static_rivals(num_steps, [n for n, _ in engine.units], table, computing)
    runs = [(name, learned, forecasts.get(name))] + [(s.name, s, None) for s in rivals]
    runs += [(f"{s.name}+forecast", s, forecasts[s.name]) for s in rivals if s.name in forecasts]
    fewer = max(1, round(num_steps * (1 - learned.cur)))
    fewer = fewer if fewer_steps and fewer < num_steps and computing == (0,) else None

    def samples(start, stop):
        """(stop - start, S, *latent): the uncached samples, each run's, and the fewer steps' final samples."""
        part = {key: value[start:stop] for key, value in cond.items()}
        rollouts = Rollouts(task, engine, noise[start:stop], part, num_steps, clip=clip)
        every = [rollouts.reference] + [rollouts._clipped(rollouts.sample(s.table, forecast=f)) for _, s, f in runs]
        if fewer is not None:
            every.append(Rollouts(task.with_steps(fewer), engine, noise[start:stop], part, fewer, clip=clip).reference)
        return torch.stack(every, 1)

    finals = sharded(samples, noise.shape[0], chunk).unbind(1)  # S tensors (B, *latent)
    reference = finals[0]
    peak = (clip[1] - clip[0]) if clip is not None else (reference.max() - reference.min()).item()

    def row(label, x, cur, speedup, learned=False):
        mse = torch.mean((x - reference) ** 2).item()
        psnr = float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)
        return Row(label, cur, speedup, mse, psnr, learned)

    rows = [row(label + ("+forecast" if i == 0 and f is not None else ""), x, s.cur, s.theoretical_speedup(macs),
                i == 0) for i, ((label, s, f), x) in enumerate(zip(runs, finals[1:]))]
    if fewer is not None:
        rows.append(row(f"{fewer} steps", finals[-1], 1 - fewer / num_steps, num_steps / fewer))
    return rows


SAME_COST = 0.99  # a static schedule counts as costing at most the learned one's at >= 99% of its speedup


def verdict(rows: list) -> str:
    """One line: whether a static row that costs at most the learned row's (theoretical speedup at least
    SAME_COST of it) has a lower error, naming the best such row."""
    learned = next(r for r in rows if r.learned)
    rivals = [r for r in rows if not r.learned and r.speedup >= SAME_COST * learned.speedup]
    better = sorted((r for r in rivals if r.mse < learned.mse), key=lambda r: r.mse)
    if better:
        best = better[0]
        return (f"a static schedule is better: {best.name} ({best.speedup:.2f}x, CUR {best.cur:.1%}) has "
                f"{best.psnr - learned.psnr:+.2f} dB over {learned.name} ({learned.speedup:.2f}x); deploy it instead")
    if not rivals:
        return f"no static schedule here costs at most {learned.name}'s ({learned.speedup:.2f}x)"
    best = min(rivals, key=lambda r: r.mse)
    return (f"{learned.name} beats every static schedule of at most its cost: {learned.psnr - best.psnr:+.2f} dB "
            f"over the best, {best.name}")


def table_text(rows: list, count: int) -> str:
    lines = [f"held-out comparison on {count} calibration noises, against the uncached samples:",
             f"{'schedule':<24} {'CUR':>6} {'speedup':>8} {'MSE':>10} {'PSNR':>8}"]
    for r in rows:
        lines.append(f"{r.name + (' *' if r.learned else ''):<24} {r.cur:>6.1%} {r.speedup:>7.2f}x {r.mse:>10.3g} "
                     f"{r.psnr:>6.2f} dB")
    return "\n".join(lines + [verdict(rows)])
