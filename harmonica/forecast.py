"""Learned linear forecasting of reused units (issue 23, item 7; the idea of L2P's learned linear predictor).

A reused unit adds its cache slot, its latest computed output c1: `h + g * c1`. With a forecast it adds a
static combination of its last two computed outputs, `h + g * (a[t, k] * c1 + b[t, k] * c2)`, one (a, b) per
(step, unit), known before sampling starts like the schedule itself.

- `Forecast`: the coefficients a, b (T, K) and the compute table (T, K) they were fitted along (they apply to
  that schedule only: another one reuses other outputs).
- `ForecastPlan`: where each unit's outputs live. Every unit gets two slots (positions k and K + k of the
  engine's slot list); the computed outputs that a later step reads go to them in turn, so a reuse finds c1
  and c2 in the two slots, the newest one known on the host from the schedule: no copy. A unit reused before
  it has two computed outputs (at least at the first step after step 0) falls back to pure reuse, a = 1, b = 0,
  as does a cell whose coefficients are exactly (1, 0): the reuse kernel runs there, bitwise today's result, and
  only the outputs a forecast reads take a second slot (`Forecast.identity`: none).
- `fit_forecast`: the coefficients in closed form, along the cached trajectory deployment runs: one cached
  pass over a calibration batch in which every reused unit is also computed (its fresh output, the target y,
  is not used) and, unit after unit, (a, b) = argmin |a c1 + b c2 - y|^2 + lam |(a, b) - (1, 0)|^2 over the
  whole batch (a 2x2 system in fp64; lam = RIDGE x the mean of c1.c1 and c2.c2: a small ridge towards pure
  reuse), then applied at once. So each cell is fitted on the states that the coefficients before it produce,
  exactly those of sampling with the result. The batch runs as one forward per step (chunks would see
  different coefficients).
- `choose_forecast`: which of several schedules of one cost to deploy with its forecast: each fitted, the
  lowest error wins, measured on noises nothing was fitted on where a judge batch is given (a searched
  schedule's best cells for pure reuse are not always the best to forecast: at T = 20 on digits-dit, FORA:2
  with its forecast beat the searched schedule with its own; and the calibration error favours what was fitted
  and searched on its own noises).
"""

from dataclasses import dataclass, field

import torch

from .schedule import CacheSchedule

RIDGE = 1e-3


@dataclass
class Forecast:
    """a, b: (T, K) float32 coefficients of each (step, unit); table: (T, K) bool, the compute table they were
    fitted along (row 0 computes). Computed cells and fallback cells are ignored (stored as 1, 0)."""

    a: torch.Tensor
    b: torch.Tensor
    table: torch.Tensor

    def __post_init__(self):
        table = self.table
        if not isinstance(table, torch.Tensor) or table.dtype != torch.bool or table.dim() != 2:
            got = f"{table.dtype} of shape {tuple(table.shape)}" if isinstance(table, torch.Tensor) else type(table)
            raise ValueError(f"forecast.table: expected a 2-D bool tensor (steps, units), got {got}")
        for name in ("a", "b"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape != table.shape:
                got = (f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise ValueError(f"forecast.{name}: expected a float tensor of shape {tuple(table.shape)} (from "
                                 f"forecast.table), got {got}")
            if not torch.isfinite(value).all():
                raise ValueError(f"forecast.{name}: expected finite coefficients, got "
                                 f"{int((~torch.isfinite(value)).sum())} NaN/inf values")
        self.a, self.b = self.a.detach().float().cpu(), self.b.detach().float().cpu()
        self.table = table.cpu()

    @classmethod
    def identity(cls, table: torch.Tensor) -> "Forecast":
        """Pure reuse everywhere (a = 1, b = 0) along `table`."""
        return cls(torch.ones(table.shape), torch.zeros(table.shape), table)

    def check(self, schedule, name: str = "forecast") -> None:
        """ValueError naming `name` when `schedule` is not the one the coefficients were fitted along."""
        if self.table.shape != schedule.table.shape or not torch.equal(self.table, schedule.table):
            got = (f"shape {tuple(schedule.table.shape)}" if self.table.shape != schedule.table.shape else
                   f"{int((self.table != schedule.table).sum())} cells that differ")
            raise ValueError(f"{name}: expected the schedule it was fitted along ({self.table.shape[0]} steps x "
                             f"{self.table.shape[1]} units, CUR {1 - self.table.float().mean().item():.1%}), got "
                             f"{schedule.name!r} with {got}")


class ForecastPlan:
    """What each step of `schedule` does with each unit's two slots under `forecast` (checked to match it).

    rows[t][k]: for a computed unit, the slot position (k or K + k) its output is written to, or None when no
    later step reads it; for a reused unit, (newest position, older position or None, a, b): older None is pure
    reuse (fewer than two computed outputs so far, or a = 1, b = 0; fit: only the former). Tuples of host values:
    the key of a step's captured graph with the schedule's rows."""

    def __init__(self, schedule, forecast: Forecast, *, fit: bool = False):
        forecast.check(schedule)
        T, K = schedule.num_steps, schedule.num_units
        table = schedule.rows
        rows = [[None] * K for _ in range(T)]
        for k in range(K):
            computed, reads = [], {}
            for t in range(T):
                if table[t][k]:
                    computed.append(t)
                else:
                    pure = len(computed) < 2 or (not fit and forecast.a[t, k] == 1 and forecast.b[t, k] == 0)
                    reads[t] = (computed[-1], None if pure else computed[-2])
            # an output read later goes to the slot the output read before it does not hold where a forecast still
            # reads that one as its older output (c1 and c2 of a reuse are consecutive among the outputs read, and
            # only c1 is computed between them), else to the first slot: no second slot without a forecast
            olders = {older for _, older in reads.values() if older is not None}
            position, previous = {}, None
            for s in sorted({newest for newest, _ in reads.values()} | olders):
                position[s] = 2 * k + K - position[previous] if previous in olders else k
                previous = s
            for t in computed:
                rows[t][k] = position.get(t)
            for t, (newest, older) in reads.items():
                a, b = (1.0, 0.0) if older is None else (float(forecast.a[t, k]), float(forecast.b[t, k]))
                rows[t][k] = (position[newest], None if older is None else position[older], a, b)
        self.rows = [tuple(row) for row in rows]


class ForecastFit:
    """The coefficients of `schedule` being fitted during one cached pass (`fit_forecast`): the engine calls
    `solve` at each reused unit with two computed outputs, then applies `coefficients`. average: the mean of
    a tensor over the ranks (torchrun: every rank solves the system of all ranks' batches, so all fit alike), or
    None (this process)."""

    def __init__(self, schedule, ridge: float = RIDGE, average=None):
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < float("inf"):
            raise ValueError(f"ridge: expected a finite number >= 0, got {ridge!r}")
        self.forecast = Forecast.identity(schedule.table)
        self.ridge = float(ridge)
        self.average = average or (lambda tensor: tensor)

    def solve(self, step: int, k: int, triples) -> None:
        """Fit (a, b) of (step, k) from (target y, newest c1, older c2) tensors of equal shapes, one triple per
        residual stream of the unit: the ridge-regularised 2x2 least squares, in fp64."""
        sums = torch.zeros(5, dtype=torch.float64)
        for y, c1, c2 in triples:
            y, c1, c2 = (t.detach().reshape(-1).double() for t in (y, c1, c2))
            sums += torch.stack([c1 @ c1, c1 @ c2, c2 @ c2, c1 @ y, c2 @ y]).cpu()
        sums = self.average(sums)  # the mean over ranks: the same solution as their sum
        lam = self.ridge * (sums[0] + sums[2]) / 2
        gram = torch.stack([torch.stack([sums[0] + lam, sums[1]]), torch.stack([sums[1], sums[2] + lam])])
        rhs = torch.stack([sums[3] + lam, sums[4]])
        solution = torch.linalg.lstsq(gram, rhs[:, None]).solution[:, 0]  # a singular gram (c1 = c2) too
        self.forecast.a[step, k], self.forecast.b[step, k] = solution.float()

    def coefficients(self, step: int, k: int) -> tuple:
        return float(self.forecast.a[step, k]), float(self.forecast.b[step, k])


@torch.no_grad()
def fit_forecast(rollouts, table: torch.Tensor, ridge: float = RIDGE, average=None) -> Forecast:
    """The `Forecast` of compute table `table` (T, K) fitted on the batch of `rollouts` (a `search.Rollouts`:
    task, engine, noises and conditions) along its cached trajectory (module docstring); average: as
    `ForecastFit`'s (torchrun: the batches of every rank)."""

    schedule = CacheSchedule(table.clone(), "forecast-fit")
    fit = ForecastFit(schedule, ridge, average)
    rollouts.sample(table, forecast=fit)
    return fit.forecast


@dataclass
class ForecastChoice:
    """What `choose_forecast` kept: the schedule's name and (T, K) table, whether with its forecast or pure
    reuse (`forecast`: None), and per candidate name the fitted forecast, the calibration errors (pure reuse,
    with its forecast) and, when a judge chose, the judge's errors (the same pair; else empty)."""

    name: str
    table: torch.Tensor
    with_forecast: bool
    forecasts: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    judged: dict = field(default_factory=dict)

    @property
    def forecast(self) -> Forecast | None:
        """The kept schedule's forecast, or None when pure reuse had the lower error."""
        return self.forecasts[self.name] if self.with_forecast else None

    @property
    def label(self) -> str:
        return self.name + ("+forecast" if self.with_forecast else "")

    @property
    def error(self) -> float:
        """The kept option's error, the judge's where one chose."""
        return (self.judged or self.errors)[self.name][self.with_forecast]


@torch.no_grad()
def choose_forecast(rollouts, candidates: dict, ridge: float = RIDGE, average=None, judge=None) -> ForecastChoice:
    """Fit the forecast of each candidate table (name -> (T, K) bool, all of one cost) on the batch of `rollouts`
    and keep the candidate, with its forecast or without, of the lowest error (ties: the first candidate, pure
    reuse before its forecast; a forecast fitted cell by cell can raise the final error). The error is the
    calibration one, or with `judge` (`Rollouts` of other noises, which nothing was fitted or searched on) the
    judge's: on digits-dit and digits-flux at T = 20 the calibration error preferred a searched schedule with its
    forecast that lost to FORA:2 with its own on held-out noises (docs/training.md). average: as `fit_forecast`'s
    (the errors are averaged by the rollouts)."""
    if not candidates:
        raise ValueError("candidates: expected at least one schedule, got none")
    forecasts, errors, judged = {}, {}, {}
    for name, table in candidates.items():
        fit = ForecastFit(CacheSchedule(table.clone(), "forecast-fit"), ridge, average)
        # the fitting pass's final samples are those of sampling with its result: its error is the forecast's
        errors[name] = (rollouts.error(table), rollouts.error(table, fit))
        forecasts[name] = fit.forecast
        if judge is not None:
            judged[name] = (judge.error(table), judge.error(table, fit.forecast))
    scores = judged if judge is not None else errors
    options = [(name, with_forecast) for name in candidates for with_forecast in (False, True)]
    name, with_forecast = min(options, key=lambda option: scores[option[0]][option[1]])
    return ForecastChoice(name, candidates[name], with_forecast, forecasts, errors, judged)
