"""Router training: Step-wise Denoising Training with the Image-Error-Proxy Objective (method.md 4-5).

One iteration is one denoising step i >= 1 of the student's own trajectory: the frozen backbone
without caching (teacher, no_grad) and with soft gating (student) see the same x_i; the loss is
`lambda_i * mse(eps_T, eps_S) + beta * sum_k r[i, k]`, eps being the output the sampler uses (the
guidance-combined eps for both CFG halves, the unguided and variance channels raw; `loss="separate"`:
the raw conditional and unconditional outputs); AdamW updates the router only, then the logits are
clamped; x_{i+1} follows from the student's output. As in the official code, each step's row is its own
parameter, so only row i moves at step i (`optimizer="shared"`: one (T, K) parameter whose zeroed
gradients let Adam's momentum keep moving the other rows). lambda (IEPO) is refreshed every `refresh`
iterations on a fixed noise batch drawn from its own generator.

The trainer patches the transformer (a `CacheEngine`, frozen parameters, eval mode) only inside
`run()` (or `attached()`), and restores it however that ends.

Checkpoints (one file per rank, written atomically, every `checkpoint_every` iterations, every
`checkpoint_minutes` and on SIGINT/SIGTERM) hold the router, optimizer, lambda, beta, the noise
generator, the current trajectory as its noise, conditions and the gate rows it used, and what they
were trained for (model, units, sampler, timesteps, world size, settings: resuming anything else is
an error). Resuming prepares the trajectory's forward inputs from its conditions and replays the rows to rebuild
x_i and the cache slots exactly, so no slot is saved.
Under torchrun, router gradients and lambda are averaged over ranks; each rank has its own noise, and
the ranks agree after every iteration on whether to checkpoint or stop.
"""

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .engine import CacheEngine
from .files import append_line, file_bytes, write_file
from .router import LOGIT_BOUND, Router, RouterInfo, describe_differences, load_tensors
from .schedule import CacheSchedule
from .task import Task
from .units import cached_units

OBJECTIVES = ("cumulative", "leave-one-out", "l2c")
OPTIMIZERS = ("per-step", "shared")  # the official one parameter per row, or one (T, K) parameter
LOSSES = ("combined", "separate")  # the official MSE of the guidance-combined output, or of the raw halves
BETA_GAIN = 2.0  # --target-cur: after each trajectory, beta *= exp(gain * (target CUR - `soft_cur`))
BETA_RANGE = 100.0  # --target-cur: beta stays within [beta / BETA_RANGE, beta * BETA_RANGE] of its start
SOFT_CUR_TEMPERATURE = 1.0  # `soft_cur`: logits this far from logit(tau) count 27% / 73% reused
CHECKPOINT_VERSION = 4  # 2 added the run record (model, units, sampler, timesteps, world size); 3 the optimizer
# and loss settings (per-step rows: the optimizer state of a version 2 checkpoint is for one (T, K) parameter);
# 4 the start (init) and the soft-CUR controller (a version 3 beta was steered by the hard CUR)
CHECKPOINT_KEYS = ("iteration", "logits", "optimizer", "lambda", "beta", "noise_gen", "config", "trajectory", "run")
RESUMABLE = ("iterations", "checkpoint_every", "checkpoint_minutes", "log_every")  # may change on --resume
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOG_FILE, ROUTER_DIR = "train_log.jsonl", "router"


@dataclass
class TrainConfig:
    """Defaults: the official DiT-XL/2 256, T = 10 recipe (method.md section 4)."""

    num_steps: int = 10
    iterations: int = 20000
    batch: int = 32  # noises per rank; classifier-free guidance doubles the model batch
    lr: float = 1e-2
    beta: float = 7e-8
    tau: float = 0.1
    refresh: int = 500  # C: iterations between lambda refreshes
    guidance: float = 1.5
    objective: str = "cumulative"  # or "leave-one-out", or "l2c" (lambda = 1: the L2C objective)
    lambda_batch: int = 8
    seed: int = 0
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 5.0  # also checkpoint when this much time passed since the last one
    target_cur: float | None = None  # adjust beta towards this CUR at tau
    log_every: int = 1
    optimizer: str = "per-step"  # or "shared" (see OPTIMIZERS)
    loss: str = "combined"  # or "separate" (see LOSSES)
    init: str = "random"  # the router's start (see `initial_logits`): "random", "compute" or "fora:N"

    def __post_init__(self):
        for name, choices in (("objective", OBJECTIVES), ("optimizer", OPTIMIZERS), ("loss", LOSSES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {getattr(self, name)!r}")
        if self.num_steps < 2:
            raise ValueError(f"num_steps: expected >= 2 (step 0 only fills the cache), got {self.num_steps}")
        if self.target_cur is not None and not 0 < self.target_cur < 1:
            raise ValueError(f"target_cur: expected a value in (0, 1), got {self.target_cur}")
        if not self.checkpoint_minutes > 0:
            raise ValueError(f"checkpoint_minutes: expected > 0, got {self.checkpoint_minutes}")
        initial_logits(self.init, self.num_steps, 1)  # the name checked


def soft_cur(logits: torch.Tensor, tau: float) -> float:
    """The CUR at `tau` of logits (T, K) (the share of cells whose gate is at most tau; row 0 computes) as a
    smooth function: each cell of rows 1 .. T-1 counts sigmoid((logit(tau) - logit) / SOFT_CUR_TEMPERATURE).
    It moves as soon as a logit does, long before one crosses logit(tau): a controller steering beta by the
    hard CUR sees nothing until then and winds up (beta x400 from an all-compute start, then CUR 0.78)."""
    threshold = math.log(tau / (1 - tau))
    reused = torch.sigmoid((threshold - logits[1:].double()) / SOFT_CUR_TEMPERATURE)
    return reused.sum().item() / logits.numel()


def calibrated_tau(gates: torch.Tensor, target_cur: float) -> float:
    """The threshold whose schedule of gates (T, K) computes the cells nearest to (1 - target_cur) T K (the
    largest gates of rows 1 .. T-1 besides row 0): midway between the last gate kept and the first left out.
    Equal gates at the cut are left out together, so the CUR may then exceed the target."""
    from .search import budget_for_cur

    num_steps, num_units = gates.shape
    free = gates[1:].flatten().double().sort(descending=True).values
    kept = budget_for_cur(target_cur, num_steps, num_units) - num_units
    above = free[kept - 1].item() if kept > 0 else 1.0
    below = free[kept].item() if kept < len(free) else 0.0
    return (above + below) / 2


def initial_logits(init: str, num_steps: int, num_units: int, generator: torch.Generator | None = None):
    """(T, K) starting logits of a router: "random" N(0, 1) (the official start), "compute" every gate open
    (+LOGIT_BOUND) or "fora:N" FORA's table (+-LOGIT_BOUND); row 0 always +LOGIT_BOUND."""
    if init == "random":
        logits = torch.randn(num_steps, num_units, generator=generator)
    elif init == "compute":
        logits = torch.full((num_steps, num_units), LOGIT_BOUND)
    elif init.startswith("fora:") and init[5:].isdigit() and int(init[5:]) >= 1:
        table = CacheSchedule.fora(num_steps, num_units, int(init[5:])).table
        logits = torch.where(table, LOGIT_BOUND, -LOGIT_BOUND)
    else:
        raise ValueError(f"init: expected random, compute or fora:N (N >= 1), got {init!r}")
    logits[0] = LOGIT_BOUND
    return logits


@contextlib.contextmanager
def engine_attached(transformer):
    """A training `CacheEngine` on `transformer`, frozen and in eval mode; on exit, however it comes, the
    engine is removed and every parameter's requires_grad and module's mode restored."""
    modules = list(transformer.modules())
    modes, grads = [m.training for m in modules], [p.requires_grad for p in transformer.parameters()]
    transformer.eval().requires_grad_(False)
    engine = None
    try:
        engine = CacheEngine(transformer)
        yield engine
    finally:
        if engine is not None:
            engine.remove()
        for module, mode in zip(modules, modes):
            module.training = mode
        for parameter, grad in zip(transformer.parameters(), grads):
            parameter.requires_grad_(grad)


_ALONE = [False]  # set within `alone()`


def _rank_world():
    if not _ALONE[0] and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def alone():
    """Within: training (`RouterTrainer`, `search.search_router`) runs as in one process even under torchrun,
    with no collective, so every rank trains the one-process router of its seed (the digits protocol's ranks
    train so, then share out the evaluation)."""
    before, _ALONE[0] = _ALONE[0], True
    try:
        yield
    finally:
        _ALONE[0] = before


def _average(tensor: torch.Tensor) -> torch.Tensor:
    rank, world = _rank_world()
    if world > 1:
        dist.all_reduce(tensor)
        tensor /= world
    return tensor


def _any_rank(flags: list, device) -> list:
    """Each flag, true if it is true on any rank."""
    if _rank_world()[1] == 1:
        return flags
    tensor = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.bool().tolist()


class _Stopped(Exception):
    """A stop signal interrupted the lambda refresh."""


@contextlib.contextmanager
def stop_signals(handler):
    """Within: SIGINT and SIGTERM call `handler(signum, frame)` instead of their usual handlers (in the main
    thread; elsewhere nothing changes)."""
    handlers = ({s: signal.signal(s, handler) for s in STOP_SIGNALS}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        yield
    finally:
        for signum, previous in handlers.items():
            signal.signal(signum, previous)


@dataclass
class Trajectory:
    noise: torch.Tensor  # x at step 0
    cond: dict  # what a checkpoint saves; `inputs` are prepared from it when the trajectory (re)starts
    rows: list  # gate rows (K,) used at steps 1 .. step-1
    x: torch.Tensor = None
    state: object = None  # the sampler's state
    step: int = 0
    inputs: dict = None  # the forward inputs of cond (`Task.prepare`)


def check_run_dir(out_dir, *, resume: bool, overwrite: bool) -> list:
    """The names of the training run's files in `out_dir` (checkpoints, router, log); an error when there
    are some and neither `resume` nor `overwrite` says what to do with them."""
    if resume and overwrite:
        raise ValueError("--resume, --overwrite: expected at most one of them, got both")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out: expected a directory for the run, got {out_dir} (a file)")
    found = [path.name for path in sorted(out_dir.glob("checkpoint-rank*.pt")) + [out_dir / ROUTER_DIR,
                                                                                  out_dir / LOG_FILE]
             if path.exists()]
    if found and not resume and not overwrite:
        raise ValueError(f"--out: expected a directory without a training run, got {out_dir} holding "
                         f"{', '.join(found)}; pass --resume to continue it or --overwrite to start afresh")
    return found


def read_checkpoint(path) -> dict:
    """The state a checkpoint holds, checked to be one: loadable (`load_tensors`), of CHECKPOINT_VERSION, with
    every key and dicts of settings. One ValueError line naming --resume and the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--resume: expected a checkpoint at {path}, found none")
    state = load_tensors(path, "--resume")
    version = state.get("version") if isinstance(state, dict) else None
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"--resume: expected a checkpoint of version {CHECKPOINT_VERSION} at {path}, "
                         f"got version {version}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"--resume: expected a checkpoint with the keys {list(CHECKPOINT_KEYS)} at {path}, "
                         f"missing {missing}")
    if not (isinstance(state["run"], dict) and isinstance(state["config"], dict)):
        raise ValueError(f"--resume: expected dicts of run settings in {path}, got "
                         f"{type(state['run']).__name__}, {type(state['config']).__name__}")
    return state


def check_resumable(out_dir) -> None:
    """Before any model is built: rank 0's checkpoint in `out_dir` reads (`read_checkpoint`) and so does its
    log (`read_log`)."""
    read_checkpoint(Path(out_dir) / "checkpoint-rank0.pt")
    read_log(Path(out_dir) / LOG_FILE)


def read_log(path) -> list:
    """[(iteration, line bytes)] of a train_log.jsonl ([] when there is none); ValueError naming it for a line
    that is not a JSON record with an integer iteration."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            iteration = json.loads(line)["iteration"]
        except (ValueError, TypeError, KeyError):
            iteration = None
        if not isinstance(iteration, int):
            raise ValueError(f"--resume: expected a JSON record with an iteration on each line of {path}, "
                             f"got line {number}: {line[:40]!r}")
        records.append((iteration, line))
    return records


class RouterTrainer:
    """SDT + IEPO for one transformer and task; `run()` trains, checkpoints and saves the router."""

    def __init__(self, task: Task, config: TrainConfig, out_dir, *, router: Router | None = None):
        self.task, self.config = task, config
        self.out_dir = Path(out_dir)
        self.rank, self.world = _rank_world()
        self.transformer = task.transformer
        self.device = next(self.transformer.parameters()).device
        self.engine = None  # a CacheEngine while attached (`attached()`)
        num_units = len(cached_units(self.transformer))
        self.info = RouterInfo.for_model(self.transformer, sampler=task.sampler, timesteps=list(task.timesteps),
                                         tau=config.tau)
        if router is None:
            router = Router(config.num_steps, num_units, info=self.info)
            with torch.no_grad():  # identical on every rank
                router.logits.copy_(initial_logits(config.init, config.num_steps, num_units,
                                                   torch.Generator().manual_seed(config.seed)))
        self.router = router
        self.router.to(self.device)
        # per-step: rows 1 .. T-1 as their own parameters (`_trained_gates`, `_store_row`)
        self.rows = None
        if config.optimizer == "per-step":
            self.rows = [torch.nn.Parameter(row.detach().clone()) for row in self.router.logits[1:]]
        params = self.rows if self.rows is not None else [self.router.logits]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        self.noise_gen = torch.Generator().manual_seed(config.seed * 7919 + 1 + self.rank)
        lambda_gen = torch.Generator().manual_seed(config.seed * 7919 + 100003 + self.rank)
        self.lambda_noise = torch.randn(config.lambda_batch, *task.latent_shape, generator=lambda_gen)
        self.lambda_inputs = task.prepare(task.conditions(config.lambda_batch, lambda_gen), self.device)
        self.lam = torch.ones(config.num_steps)
        self.beta = config.beta
        self.iteration = 0
        self.trajectory = None
        self.stop_signal = None  # the SIGINT/SIGTERM that stopped the latest run()
        self.progress = False  # progress bars (rank 0 of a run() with progress)
        self.macs = task.macs()

    # ---- the patched transformer ----

    @contextlib.contextmanager
    def attached(self):
        """The transformer frozen, in eval mode and run by this trainer's CacheEngine; on exit, however it
        comes, the engine is removed and every parameter's requires_grad and module's mode restored.
        A trajectory in progress is replayed on entry (its cache slots went with the previous engine)."""
        with engine_attached(self.transformer) as self.engine:
            try:
                if self.trajectory is not None:
                    self._start(self.trajectory)
                yield self
            finally:
                self.engine = None

    # ---- forwards ----

    def _forward(self, x, inputs, i, gates=None):
        """Model output at step i: caching off (gates None) or soft gating with `gates` (T, K); a per-sample list of
        outputs (Z-Image's) stacked into one tensor."""
        if gates is None:
            self.engine.set_off()
        else:
            self.engine.set_training(gates, self.config.tau)
        self.engine.seek(i)
        out = self.task.output(self.transformer(**self.task.model_kwargs(x, inputs, i)))
        return torch.stack(out) if isinstance(out, list) else out

    @torch.no_grad()
    def rollout(self, noise, inputs, gates=None) -> torch.Tensor:
        """A whole trajectory from `noise` and the forward `inputs` (`Task.prepare`): caching off, or soft gating
        with `gates` (T, K)."""
        state, x = self.task.begin(), noise.to(self.device, self.transformer.dtype)
        for i in range(self.config.num_steps):
            x = self.task.update(state, x, self._forward(x, inputs, i, gates), i)
        return x

    # ---- IEPO ----

    @torch.no_grad()
    def refresh_lambda(self) -> bool:
        """IEPO's lambda from T rollouts of the lambda batch, one progress-bar tick each. A stop signal (on any
        rank) ends it before the next rollout: False, and lambda stays as it was."""
        cfg, T = self.config, self.config.num_steps
        lam = torch.ones(T)
        trajectory_slots = self.engine.swap_slots([None] * len(self.engine.slots))
        bar = tqdm(total=T, desc="lambda refresh", leave=False, disable=not self.progress or cfg.objective == "l2c")

        def rollout(gates=None):
            if _any_rank([self.stop_signal is not None], self.device)[0]:
                raise _Stopped
            x = self.rollout(self.lambda_noise, self.lambda_inputs, gates)
            bar.update(1)
            return x

        try:
            if cfg.objective != "l2c":
                gates = self.router.gates().detach()
                ones = torch.ones_like(gates)
                if cfg.objective == "cumulative":
                    previous = rollout()
                    for i in range(1, T):
                        partial = ones.clone()
                        partial[1:i + 1] = gates[1:i + 1]
                        current = rollout(partial)
                        lam[i] = torch.mean((current.float() - previous.float()) ** 2).cpu()
                        previous = current
                else:
                    routed = rollout(gates)
                    for i in range(1, T):
                        forced = gates.clone()
                        forced[i] = 1.0
                        lam[i] = torch.mean((routed.float() - rollout(forced).float()) ** 2).cpu()
        except _Stopped:
            return False
        finally:
            bar.close()
            self.engine.swap_slots(trajectory_slots)  # the rollouts had their own
        self.lam = _average(lam.to(self.device)).cpu()
        return True

    # ---- trajectories ----

    def _gate_table(self, rows) -> torch.Tensor:
        table = torch.ones(self.config.num_steps, self.router.num_units, device=self.device)
        for i, row in enumerate(rows, start=1):
            table[i] = row.to(self.device)
        return table

    @torch.no_grad()
    def _start(self, trajectory: Trajectory) -> Trajectory:
        """The forward inputs of its cond, step 0 (full compute, slots filled), then replay the recorded rows of steps
        1 .. len(rows)."""
        trajectory.state = self.task.begin()
        trajectory.inputs = self.task.prepare(trajectory.cond, self.device)
        x = trajectory.noise.to(self.device, self.transformer.dtype)
        table = self._gate_table(trajectory.rows)
        for i in range(len(trajectory.rows) + 1):
            x = self.task.update(trajectory.state, x, self._forward(x, trajectory.inputs, i, table), i)
        trajectory.x, trajectory.step = x, len(trajectory.rows) + 1
        return trajectory

    def _new_trajectory(self) -> Trajectory:
        noise = torch.randn(self.config.batch, *self.task.latent_shape, generator=self.noise_gen)
        return self._start(Trajectory(noise, self.task.conditions(self.config.batch, self.noise_gen), []))

    # ---- one iteration ----

    def _trained_gates(self, i: int) -> tuple:
        """The gate table (T, K) of step i and the parameter it trains: per-step, only row i is in the graph
        (the other rows get no gradient, not a zero one); shared, the whole logits."""
        if self.rows is None:
            return self.router.gates(), self.router.logits
        row, fixed = self.rows[i - 1], self.router.gates().detach()
        with torch.no_grad():
            row.copy_(self.router.logits[i])  # router.logits is the truth; the row is the optimizer's handle
        return torch.cat([fixed[:i], torch.sigmoid(row)[None], fixed[i + 1:]]), row

    @torch.no_grad()
    def _store_row(self, i: int) -> None:
        """After the optimizer step: per-step, row i into router.logits; then the clamp."""
        if self.rows is not None:
            self.router.logits[i] = self.rows[i - 1]
        self.router.clamp_()

    def _loss_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model output the loss compares (fp32): as the sampler uses it ("combined"), or raw."""
        out = out.float()
        return self.task.combined(out, x.shape[1]) if self.config.loss == "combined" else out

    def train_step(self) -> dict | None:
        """One iteration; None when a stop signal interrupted its lambda refresh (nothing changed)."""
        cfg = self.config
        if self.iteration % cfg.refresh == 0 and not self.refresh_lambda():
            return None
        if self.trajectory is None or self.trajectory.step == cfg.num_steps:
            self.trajectory = self._new_trajectory()
        traj, i = self.trajectory, self.trajectory.step
        with torch.no_grad():
            teacher = self._forward(traj.x, traj.inputs, i)
        gates, param = self._trained_gates(i)
        student = self._forward(traj.x, traj.inputs, i, gates)
        mse = torch.mean((self._loss_output(teacher, traj.x) - self._loss_output(student, traj.x)) ** 2)
        l1 = gates[i].sum()
        loss = self.lam[i].item() * mse + self.beta * l1
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"training: expected a finite loss, got {loss.item()} at iteration {self.iteration + 1} "
                               f"(mse {mse.item()}, lambda {self.lam[i].item()}, beta {self.beta}): the model's "
                               "outputs, the prompt embeddings or the settings diverge; stopped, nothing more saved")
        self.optimizer.zero_grad(set_to_none=self.rows is not None)  # per-step: AdamW skips the other rows
        loss.backward()
        _average(param.grad)
        self.optimizer.step()
        self._store_row(i)
        traj.rows.append(gates[i].detach().cpu())
        with torch.no_grad():
            traj.x = self.task.update(traj.state, traj.x, student.detach(), i)
        traj.step += 1
        self.iteration += 1
        if cfg.target_cur is not None and traj.step == cfg.num_steps:
            error = cfg.target_cur - soft_cur(self.router.logits.detach(), cfg.tau)
            self.beta = min(max(self.beta * math.exp(BETA_GAIN * error), cfg.beta / BETA_RANGE), cfg.beta * BETA_RANGE)
        return {"iteration": self.iteration, "step": i, "loss": loss.item(), "mse": mse.item(), "l1": l1.item(),
                "lambda": self.lam[i].item(), "beta": self.beta}

    # ---- checkpoints ----

    def checkpoint_path(self) -> Path:
        return self.out_dir / f"checkpoint-rank{self.rank}.pt"

    def save_checkpoint(self) -> None:
        traj = self.trajectory
        state = {
            "iteration": self.iteration, "logits": self.router.logits.detach().cpu(),
            "optimizer": self.optimizer.state_dict(), "lambda": self.lam, "beta": self.beta,
            "noise_gen": self.noise_gen.get_state(), "config": asdict(self.config),
            "trajectory": None if traj is None else {"noise": traj.noise, "cond": traj.cond, "rows": traj.rows},
            "version": CHECKPOINT_VERSION, "run": self._run_record(),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_file(self.checkpoint_path(), file_bytes(lambda f: torch.save(state, f)))  # whole, or the previous stays

    def _run_record(self) -> dict:
        """What a checkpoint must be resumed with besides the settings."""
        return {**self.info.identity(), "world_size": self.world}

    def load_checkpoint(self) -> None:
        """Restore the state of `checkpoint_path()`; the trajectory is replayed when attached."""
        path = self.checkpoint_path()
        state = read_checkpoint(path)
        saved = {k: v for k, v in {**state["run"], **state["config"]}.items() if k not in RESUMABLE}
        diffs = describe_differences(saved, {**self._run_record(), **asdict(self.config)}, "checkpoint")
        if diffs:
            raise ValueError(f"--resume: {path} was trained with other settings: " + "; ".join(diffs))
        try:
            self._restore(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"--resume: expected a checkpoint of this run's state at {path}, got one that does not "
                             f"load ({type(error).__name__}: {detail})") from None

    def _restore(self, state: dict) -> None:
        with torch.no_grad():
            self.router.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration, self.lam, self.beta = int(state["iteration"]), state["lambda"], float(state["beta"])
        self.noise_gen.set_state(state["noise_gen"])
        saved_traj = state["trajectory"]
        self.trajectory = None if saved_traj is None else Trajectory(**saved_traj)
        if self.trajectory is not None and len(self.trajectory.rows) >= self.config.num_steps:
            raise ValueError(f"trajectory of {len(self.trajectory.rows)} rows for {self.config.num_steps} steps")

    # ---- the loop ----

    def run(self, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Router:
        """Train to `config.iterations`; returns the router, also saved to `out_dir/router`.

        resume: continue from the checkpoint in `out_dir`. overwrite: start afresh in an `out_dir` that
        holds a run (its checkpoints, router and log removed); without either, such an `out_dir` is an
        error. SIGINT/SIGTERM stop after the current iteration or lambda-refresh rollout; the router is then
        saved as partial."""
        cfg = self.config
        self._prepare_out_dir(resume, overwrite)
        if resume:
            self.load_checkpoint()
        self._trim_log()
        self.stop_signal, self.progress = None, progress and self.rank == 0
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not self.progress, desc="train router")
        with stop_signals(self.request_stop):
            try:
                with self.attached():
                    saved_at = time.monotonic()
                    while self.iteration < cfg.iterations:
                        record = self.train_step()
                        if record is not None:
                            self._log(record, bar)
                        stop, due = _any_rank([self.stop_signal is not None,
                                               time.monotonic() - saved_at >= 60 * cfg.checkpoint_minutes],
                                              self.device)
                        if stop:
                            break
                        if due or self.iteration % cfg.checkpoint_every == 0:
                            self.save_checkpoint()
                            saved_at = time.monotonic()
            finally:
                bar.close()
            self.save_checkpoint()
            info = self.router.info  # on every rank (their routers are equal): the same schedule everywhere
            info.complete, info.iterations, info.planned_iterations = (
                self.iteration >= cfg.iterations, self.iteration, cfg.iterations)
            if cfg.target_cur is not None:
                info.tau = calibrated_tau(self.router.gates().detach(), cfg.target_cur)
            if self.rank == 0:
                self.router.save_pretrained(self.out_dir / ROUTER_DIR)
        return self.router

    def _log(self, record: dict, bar) -> None:
        cfg = self.config
        if self.iteration % cfg.log_every == 0 or self.iteration == cfg.iterations:
            schedule = self.router.schedule(cfg.tau)
            record.update(cur=schedule.cur, speedup=schedule.theoretical_speedup(self.macs))
            bar.set_postfix(loss=f"{record['loss']:.3g}", mse=f"{record['mse']:.3g}",
                            cur=f"{record['cur']:.1%}", speedup=f"{record['speedup']:.2f}x")
            if self.rank == 0:
                append_line(self.out_dir / LOG_FILE, json.dumps(record))
        bar.update(1)

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> None:
        """Refuse to mix a new run into `out_dir`'s existing one, or (overwrite) remove that one."""
        found = check_run_dir(self.out_dir, resume=resume, overwrite=overwrite)
        if overwrite and self.rank == 0:
            for name in found:
                if name == ROUTER_DIR:
                    shutil.rmtree(self.out_dir / name)
                else:
                    (self.out_dir / name).unlink()
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _trim_log(self) -> None:
        """Rank 0: drop the log records after the current iteration (all of them on a fresh start)."""
        path = self.out_dir / LOG_FILE
        if self.rank == 0 and path.is_file():
            kept = [line + b"\n" for iteration, line in read_log(path) if iteration <= self.iteration]
            write_file(path, b"".join(kept))

    def request_stop(self, signum, frame) -> None:
        """The SIGINT/SIGTERM handler: run() ends after the current iteration or lambda-refresh rollout and
        writes a checkpoint."""
        self.stop_signal = signum
