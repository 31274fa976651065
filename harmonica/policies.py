"""What the cache engine does with each unit at each step: one policy object at a time, `engine.policy`.

- `Off`: caching off, every unit computes and no slot is written (the teacher's and the reference's forwards).
- `Inference(schedule, forecast)`: the schedule's rows; a computed unit writes its slot where a later step reads
  it, a reused unit adds its slot, or with a linear forecast a combination of its two slots (forecast.py).
- `Training(gates, tau)`: soft gating with the router values (T, K): every unit computes; step 0 fills the slots,
  later steps blend the output into the slot where r > tau (`kernels.gated_residual`).

The engine calls `at(step)` whenever its step changes (the policy readies that step's rows, host tuples, so the
per-unit decision is a lookup) and `run` for each stream of each cached unit; a policy reads the step, the
residual ops and the slots from the engine it is given, and owns no tensor of its own but the router values.
"""

from .forecast import Forecast, ForecastFit, ForecastPlan


class Policy:
    """What the engine asks its policy; the defaults are those of a policy whose units all compute."""

    schedule = None  # the `CacheSchedule` followed, if any
    forecast_plan = None  # its linear forecast's `ForecastPlan`, if any
    key = ()  # the current step's part of the engine's graph key (equal for steps with equal rows)
    caches = True  # whether a unit's output depends on earlier steps (False: a forward may skip blocks)
    # whether a sampler runs the steps in order: the engine checks its timesteps, DiT precomputes its modulations
    # and graphs.py captures the steps
    sampling = False
    slots_per_unit = 1

    @property
    def num_steps(self) -> int | None:
        """The steps of a generation, None where any count goes."""
        return None

    def at(self, step: int) -> None:
        """Ready step `step` (the engine's step changed)."""

    def computes(self, k: int) -> bool:
        """Whether unit k computes its output at the current step."""
        return True

    def check_start(self, start: int, units: list) -> None:
        """A ValueError unless a generation may begin at step `start` (units: the engine's (name, module) list)."""

    def run(self, engine, k, compute, gate, h, part):
        """Unit k's residual update of h (B, N, D) with gate (B, D), (B, 1, D) or None; compute: () -> fresh output
        (B, N, D); part: the stream's index in a several-stream unit's slot, else None."""
        raise NotImplementedError


class Off(Policy):
    """Caching off: every unit computes and no slot is written."""

    caches = False

    def run(self, engine, k, compute, gate, h, part):
        return engine._compute(h, compute(), gate)


class Training(Policy):
    """Soft gating with router values `gates` (T, K) at threshold `tau` (the training issue)."""

    def __init__(self, gates, tau: float):
        self.gates, self.tau = gates, tau

    @property
    def num_steps(self) -> int:
        return self.gates.shape[0]

    def run(self, engine, k, compute, gate, h, part):
        fresh, clock = compute(), engine.clock
        if clock.step == 0:
            return engine._compute(h, fresh, gate, cache=clock.slots.write(k, fresh, part))
        cache = clock.slots.read(k, h, part, clock.step)
        return engine._soft(h, fresh, cache, self.gates[clock.step, k], gate, tau=self.tau)


class Inference(Policy):
    """Cached inference along `schedule`; forecast: a `Forecast` fitted along it (reused units forecast from their
    last two computed outputs, two slots per unit: k and K + k), a `ForecastFit` (the fitting pass), or None (pure
    reuse)."""

    sampling = True

    def __init__(self, schedule, forecast=None):
        fit = forecast if isinstance(forecast, ForecastFit) else None
        if forecast is not None and fit is None and not isinstance(forecast, Forecast):
            raise ValueError(f"forecast: expected a Forecast or None, got {type(forecast).__name__}")
        self.schedule = schedule
        self.forecast_plan = None if forecast is None else ForecastPlan(
            schedule, forecast if fit is None else fit.forecast, fit=fit is not None)
        self.forecast_fit = fit  # while `forecast.fit_forecast` runs: its `ForecastFit`
        # the current step's rows, as tuples: which units compute, which computed ones write their slot, and the
        # forecast plan's row (slots and coefficients; None without a forecast)
        self.row = self.write_row = self.forecast_row = None

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def slots_per_unit(self) -> int:
        return 1 if self.forecast_plan is None else 2

    @property
    def key(self) -> tuple:
        return self.row, self.write_row, self.forecast_row

    def at(self, step: int) -> None:
        """Steps reach the units only through the rows: what a captured forward is specialised on (steps with equal
        rows share it)."""
        self.row, self.write_row = self.schedule.step_keys[step]
        self.forecast_row = None if self.forecast_plan is None else self.forecast_plan.rows[step]

    def computes(self, k: int) -> bool:
        return self.row[k]

    def check_start(self, start: int, units: list) -> None:
        """Row `start` must compute every unit (no slot of this transformer holds an earlier step's output there)."""
        if not start:
            return
        if not 0 < start < self.num_steps:
            raise ValueError(f"start: expected 0 <= start < {self.num_steps}, got {start}")
        reused = [units[k][0] for k, computes in enumerate(self.schedule.table[start].tolist()) if not computes]
        if reused:
            raise ValueError(f"schedule: expected every unit computed at step {start} (this transformer's first step "
                             f"of the generation), got {len(reused)} of {len(units)} reused ({reused[0]}, ...)")

    def reused_outputs(self, engine, k, compute, hs):
        """A reused several-stream unit's fresh outputs: None, except while fitting a forecast that applies to it
        (the targets of every stream, solved together)."""
        if self.forecast_fit is None or self.forecast_row[k][1] is None:
            return None
        fresh, slots, step = compute(), engine.clock.slots, engine.clock.step
        newest, older = self.forecast_row[k][:2]
        self.forecast_fit.solve(step, k, [(fresh[i], slots.read(newest, h, i, step), slots.read(older, h, i, step))
                                          for i, h in enumerate(hs)])
        return fresh

    def run(self, engine, k, compute, gate, h, part):
        if self.forecast_row is not None:
            return self._run_forecast(engine, k, compute, gate, h, part)
        clock = engine.clock
        if self.row[k]:
            fresh = compute()
            slot = clock.slots.write(k, fresh, part) if self.write_row[k] else None
            return engine._compute(h, fresh, gate, cache=slot)
        return engine._reuse(h, clock.slots.read(k, h, part, clock.step), gate)

    def _run_forecast(self, engine, k, compute, gate, h, part):
        """`run` under a linear forecast: the plan's row says which slot a computed unit writes and which slots and
        coefficients a reused one reads (forecast.py)."""
        entry, clock = self.forecast_row[k], engine.clock
        slots, step = clock.slots, clock.step
        if self.row[k]:
            fresh = compute()
            return engine._compute(h, fresh, gate, cache=None if entry is None else slots.write(entry, fresh, part))
        newest, older, a, b = entry
        newest = slots.read(newest, h, part, step)
        if older is None:  # fewer than two computed outputs so far, or a = 1, b = 0
            return engine._reuse(h, newest, gate)
        older = slots.read(older, h, part, step)
        if self.forecast_fit is not None:
            if part is None:  # a several-stream unit was solved by `reused_outputs`
                self.forecast_fit.solve(step, k, [(compute(), newest, older)])
            a, b = self.forecast_fit.coefficients(step, k)
        return engine._forecast(h, newest, older, a, b, gate)
