"""Static cache schedules: which unit computes at which denoising step (method.md sections 3 and 6).

A schedule is a boolean table `(T, K)`: True = the unit computes (and refreshes its slot when a
later step reuses it), False = the unit adds its cached output. Row 0 (the first, noisiest step)
computes every unit: it fills the cache. The table is known before sampling starts, so the step
loop decides on the host with no device synchronisation.
"""

import torch

COMPUTE_MARK, REUSE_MARK = "█", "·"


class CacheSchedule:
    """A boolean (T, K) compute table with its name.

    table: (T, K) bool, T denoising steps (row 0 first), K units in `cached_units` order.
    name: how results report it (e.g. "fora:3", "harmonica:tau=0.1").
    """

    def __init__(self, table: torch.Tensor, name: str):
        if not isinstance(table, torch.Tensor) or table.dtype != torch.bool or table.dim() != 2:
            got = f"{table.dtype} of shape {tuple(table.shape)}" if isinstance(table, torch.Tensor) else type(table)
            raise ValueError(f"table: expected a 2-D bool tensor (steps, units), got {got}")
        if table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError(f"table: expected at least one step and one unit, got shape {tuple(table.shape)}")
        if not bool(table[0].all()):
            raise ValueError(f"table: expected row 0 (the first denoising step) to compute every unit, to fill the "
                             f"cache; got {int((~table[0]).sum())} reused units")
        self.table = table.cpu()
        self.name = name
        self.rows = self.table.tolist()  # host-side lookups in the step loop
        # a slot is written at step t only if step t+1 reads it
        nxt = torch.zeros_like(self.table)
        nxt[:-1] = ~self.table[1:]
        self.writes = (self.table & nxt).tolist()
        # what the forward of each step depends on, (compute row, slot-write row): the key of its
        # captured graph
        self.step_keys = [(tuple(r), tuple(w)) for r, w in zip(self.rows, self.writes)]

    @property
    def num_steps(self) -> int:
        return self.table.shape[0]

    @property
    def num_units(self) -> int:
        return self.table.shape[1]

    @property
    def cur(self) -> float:
        """Cache usage ratio: the share of (step, unit) pairs that reuse, first step included."""
        return 1.0 - self.table.sum().item() / self.table.numel()

    def computed_per_step(self) -> list:
        return self.table.sum(1).tolist()

    def written_units(self) -> list:
        """Indices of the units whose slot is ever written (those need cache memory)."""
        return [k for k in range(self.num_units) if any(row[k] for row in self.writes)]

    def computing(self, rows) -> "CacheSchedule":
        """This schedule with every unit computed at `rows` (each later expert's first step, `Task.experts`): itself
        where it already does, else a copy named `<name>+row<r>` for each row it reused in."""
        reusing = [row for row in rows if not self.table[row].all()]
        if not reusing:
            return self
        forced = self.table.clone()
        forced[reusing] = True
        return CacheSchedule(forced, self.name + "".join(f"+row{row}" for row in reusing))

    def theoretical_speedup(self, macs) -> float:
        """MACs of the full trajectory over MACs of this one, from a `MacCount` of the same units."""
        if len(macs.unit_macs) != self.num_units:
            raise ValueError(f"macs: expected {self.num_units} units (from the schedule), got {len(macs.unit_macs)}")
        unit = torch.tensor(macs.unit_macs, dtype=torch.float64)
        cached = self.num_steps * macs.always_macs + (self.table.double() @ unit).sum().item()
        return self.num_steps * macs.total / cached

    def __eq__(self, other) -> bool:
        return isinstance(other, CacheSchedule) and torch.equal(self.table, other.table)

    def __repr__(self) -> str:
        return f"CacheSchedule({self.name!r}, steps={self.num_steps}, units={self.num_units}, cur={self.cur:.1%})"

    def __str__(self) -> str:
        """Terminal heat map: one line per step, one mark per unit."""
        lines = [f"{self.name}: {self.num_steps} steps x {self.num_units} units, CUR {self.cur:.1%} "
                 f"({COMPUTE_MARK} compute, {REUSE_MARK} reuse)"]
        for t, row in enumerate(self.rows):
            marks = "".join(COMPUTE_MARK if c else REUSE_MARK for c in row)
            lines.append(f"{t:4d} {marks} {sum(row):4d}")
        return "\n".join(lines)

    # ---- constructors ----

    @classmethod
    def no_cache(cls, num_steps: int, num_units: int) -> "CacheSchedule":
        """Every unit computes at every step (also the all-compute schedule): no slot is ever written."""
        return cls(torch.ones(num_steps, num_units, dtype=torch.bool), "no-cache")

    @classmethod
    def fora(cls, num_steps: int, num_units: int, interval: int) -> "CacheSchedule":
        """FORA: step t computes every unit iff t % interval == 0, else reuses them all."""
        if interval < 1:
            raise ValueError(f"interval: expected an integer >= 1, got {interval}")
        steps = torch.arange(num_steps) % interval == 0
        return cls(steps[:, None].expand(num_steps, num_units).clone(), f"fora:{interval}")

    @classmethod
    def delta_dit(cls, unit_names, num_steps: int, boundary: int, interval: int,
                  cached_blocks: int | None = None) -> "CacheSchedule":
        """Δ-DiT: at steps t % interval != 0, steps before `boundary` reuse the rear `cached_blocks`
        blocks (the outline is settled by the front), later steps reuse the front ones (the details
        come from the rear). Other units and steps compute. Default: half of the blocks. `unit_names`
        (`<list>.<i>.<kind>`) in execution order: front and rear count blocks in that order across
        block lists (FLUX: its dual-stream blocks, then its single-stream ones).
        """
        block_names = [name.rsplit(".", 1)[0] for name in unit_names]
        position = {name: n for n, name in enumerate(dict.fromkeys(block_names))}
        blocks = [position[name] for name in block_names]
        depth = len(position)
        cached = depth // 2 if cached_blocks is None else cached_blocks
        if not 0 <= boundary <= num_steps or interval < 1 or not 0 <= cached <= depth:
            raise ValueError(f"boundary, interval, cached_blocks: expected 0 <= boundary <= {num_steps}, "
                             f"interval >= 1, 0 <= cached_blocks <= {depth}; got {boundary}, {interval}, {cached}")
        block = torch.tensor(blocks)
        rear, front = block >= depth - cached, block < cached
        table = torch.ones(num_steps, len(blocks), dtype=torch.bool)
        for t in range(1, num_steps):
            if t % interval:
                table[t] = ~(rear if t < boundary else front)
        return cls(table, f"delta-dit:b={boundary},n={interval}")

    @classmethod
    def from_gates(cls, gates: torch.Tensor, tau: float, rule: str = "harmonica") -> "CacheSchedule":
        """From router gate values `(T, K)` in [0, 1]: unit k computes at step t iff gates[t, k] > tau.

        rule "harmonica": that is all (row 0 always computes).
        rule "l2c-alternating": Learning-to-Cache's inference, which counts its router rows by
        ascending timestep (row T-1-t at step t) and computes every unit where that row is odd.
        """
        if rule not in ROUTER_RULES:
            raise ValueError(f"rule: expected one of {ROUTER_RULES}, got {rule!r}")
        table = gates.detach().cpu() > tau
        table[0] = True
        if rule == "l2c-alternating":
            num_steps = table.shape[0]
            table[(num_steps - 1 - torch.arange(num_steps)) % 2 == 1] = True
        return cls(table, f"{'l2c' if rule == 'l2c-alternating' else 'harmonica'}:tau={tau:g}")

    @classmethod
    def l2c_alternating(cls, router, tau: float | None = None) -> "CacheSchedule":
        """Learning-to-Cache's rule applied to any router (see `from_gates`)."""
        return cls.from_gates(router.gates(), router.info.tau if tau is None else tau, "l2c-alternating")

    @classmethod
    def from_router(cls, router, tau: float | None = None) -> "CacheSchedule":
        """The schedule of a `Router` at `tau` (default: its training tau), with its inference rule."""
        return router.schedule(tau)


ROUTER_RULES = ("harmonica", "l2c-alternating")
SCHEDULE_FORMS = "'no-cache', 'fora:N' or 'delta-dit[:b=B,n=N[,blocks=C]]'"
DELTA_DIT_FORM = "b=B,n=N[,blocks=C]"


def read_schedule_spec(spec: str, option: str = "--schedule") -> tuple:
    """(kind, parameters) of a schedule name, its syntax checked without a model: ("no-cache", {}),
    ("fora", {"interval": N}) or ("delta-dit", {} or {"b": B, "n": N[, "blocks": C]}). ValueError naming
    `option` (`harmonica sample --schedule`, `harmonica bench --configs`) for anything else."""
    kind, colon, text = spec.partition(":")
    if kind not in ("no-cache", "fora", "delta-dit"):
        raise ValueError(f"{option}: expected {SCHEDULE_FORMS}, got {spec!r}")
    try:
        if kind == "no-cache":
            if colon:
                raise ValueError("no-cache takes no parameter")
            return kind, {}
        if kind == "fora":
            if not text.isdigit() or int(text) < 1:
                raise ValueError("expected an integer >= 1")
            return kind, {"interval": int(text)}
        if not colon:
            return kind, {}
        items = [item.partition("=") for item in text.split(",")]
        values = {key: value for key, _, value in items}
        if (len(values) != len(items) or not {"b", "n"} <= set(values) <= {"b", "n", "blocks"}
                or not all(value.isdigit() for value in values.values())):
            raise ValueError(f"expected {DELTA_DIT_FORM}")
        return kind, {key: int(value) for key, value in values.items()}
    except ValueError as error:
        raise ValueError(f"{option}: could not read {spec!r} ({error})") from error


def parse_schedule(spec: str, num_steps: int, unit_names: list, option: str = "--schedule") -> CacheSchedule:
    """The `CacheSchedule` of a schedule name (`read_schedule_spec`) over `num_steps` steps of the units
    `unit_names` (`cached_units` order). Δ-DiT without parameters: b = num_steps // 2, n = 2."""
    kind, params = read_schedule_spec(spec, option)
    try:
        if kind == "no-cache":
            return CacheSchedule.no_cache(num_steps, len(unit_names))
        if kind == "fora":
            return CacheSchedule.fora(num_steps, len(unit_names), params["interval"])
        return CacheSchedule.delta_dit(unit_names, num_steps, params.get("b", num_steps // 2), params.get("n", 2),
                                       params.get("blocks"))
    except ValueError as error:
        raise ValueError(f"{option}: {spec!r} does not fit {num_steps} steps ({error})") from error
