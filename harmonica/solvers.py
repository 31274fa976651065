"""Deterministic samplers as per-step coefficient tables (method.md section 7), so that a sampler step
is a few tensor operations on fixed buffers: no host state, no device read, capturable in a CUDA graph
together with the transformer forward (`graphs.py`, `scheduler_in_graph`).

Every supported step is linear in the sample x (B, C, H, W), the noise prediction eps and the
previous step's data prediction x0_prev:

    x0     = p * x + q * eps
    x_next = a * x + b * x0 + c * x0_prev

Row i of a table is (p, q, a, b, c) of step i, computed in float64 on the host; the update itself,
guidance included, is the fused op `harmonica.kernels.solver_step` (torch reference on the CPU).
- DDIM with eta 0 (the original DiT sampler): c = 0.
- diffusers' `DPMSolverMultistepScheduler` as PixArt uses it (DPM-Solver++, order <= 2, epsilon
  prediction): first order at step 0 and where diffusers lowers the final step, second order elsewhere.
- diffusers' `FlowMatchEulerDiscreteScheduler` (FLUX.1, FLUX.2, SD3/SD3.5, Wan 2.x, Qwen-Image, Z-Image), deterministic:
  the model predicts the velocity v (in the slot of eps), x0 = x - sigma v and
  x_next = x + (sigma_next - sigma) v = (sigma_next / sigma) x + (1 - sigma_next / sigma) x0, c = 0.
  `set_flow_match_timesteps` sets the sigmas on the host once per generation as each pipeline does
  (shift, or dynamic shifting with mu from the image sequence length, FLUX.2's from the step count too), from the
  family's `FlowMatchSchedule` (harmonica/families). The step is elementwise:
  packed latents (B, L, C) (FLUX, Qwen-Image) and video latents (B, C, F, H, W) (Wan) step as 4-D views.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class StepTable:
    """T rows (p, q, a, b, c), one per step of the sampler `name`."""

    name: str
    rows: tuple

    @property
    def multistep(self) -> bool:
        """Whether any step reads the previous step's data prediction."""
        return any(row[4] != 0 for row in self.rows)

    def tensor(self, device) -> torch.Tensor:
        """(T, 5) float32 on `device`, uploaded asynchronously (pageable memory is staged before the
        call returns), so that a sampler loop reads nothing back from the device."""
        return torch.tensor(self.rows, dtype=torch.float64).float().to(device, non_blocking=True)


def ddim_table(name: str, alphas: list) -> StepTable:
    """DDIM (eta 0) from [(alpha_bar at step i, alpha_bar at step i + 1)], the last pair may end at 1."""
    rows = []
    for alpha, alpha_next in alphas:
        a = math.sqrt(1 - alpha_next) / math.sqrt(1 - alpha)
        rows.append((1 / math.sqrt(alpha), -math.sqrt(1 - alpha) / math.sqrt(alpha), a,
                     math.sqrt(alpha_next) - a * math.sqrt(alpha), 0.0))
    return StepTable(name, tuple(rows))


DPM_SOLVER_CONFIG = {"algorithm_type": "dpmsolver++", "prediction_type": "epsilon", "thresholding": False,
                     "use_flow_sigmas": False}


def dpm_solver_table(scheduler) -> StepTable:
    """The steps a diffusers `DPMSolverMultistepScheduler` will take after its `set_timesteps`, as a table.
    Other settings of the scheduler raise a ValueError naming the setting."""
    if type(scheduler).__name__ != "DPMSolverMultistepScheduler":
        raise ValueError(f"scheduler: expected a DPMSolverMultistepScheduler, got {type(scheduler).__name__}")
    config = scheduler.config
    for key, expected in DPM_SOLVER_CONFIG.items():
        if config.get(key, False) != expected:
            raise ValueError(f"scheduler.config.{key}: expected {expected!r} for a coefficient table, "
                             f"got {config.get(key)!r}")
    if config.solver_order not in (1, 2) or config.solver_type not in ("midpoint", "heun"):
        raise ValueError(f"scheduler.config: expected solver_order 1 or 2 with solver_type midpoint or heun, got "
                         f"{config.solver_order} and {config.solver_type!r}")
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler: call set_timesteps before building its table")
    sigmas = scheduler.sigmas.tolist()
    steps = len(scheduler.timesteps)
    lowered_final = config.euler_at_final or (config.lower_order_final and steps < 15) or \
        config.final_sigmas_type == "zero"
    rows = []
    for i in range(steps):
        first_order = config.solver_order == 1 or i == 0 or (i == steps - 1 and lowered_final)
        rows.append(_dpm_solver_row(sigmas, i, first_order, config.solver_type))
    return StepTable("dpm-solver++", tuple(rows))


def _dpm_solver_row(sigmas: list, i: int, first_order: bool, solver_type: str) -> tuple:
    """With alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma * alpha_t, lambda = -log(sigma), so
    exp(-h) = sigma_next / sigma_i (0 at a final sigma of 0)."""
    def alpha_of(sigma):
        return 1 / math.sqrt(sigma * sigma + 1)

    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    alpha, alpha_next = alpha_of(sigma), alpha_of(sigma_next)
    p, q = 1 / alpha, -sigma  # x0 = (x - sigma * alpha * eps) / alpha
    a = sigma_next * alpha_next / (sigma * alpha)
    e = alpha_next * (sigma_next / sigma - 1)  # alpha_t (exp(-h) - 1)
    if first_order:
        return p, q, a, -e, 0.0
    h = math.log(sigma / sigma_next)
    r0 = math.log(sigmas[i - 1] / sigma) / h
    if solver_type == "midpoint":  # x_next = a x - e D0 - e/2 D1, D1 = (x0 - x0_prev) / r0
        return p, q, a, -e * (1 + 0.5 / r0), 0.5 * e / r0
    f = alpha_next * ((sigma_next / sigma - 1) / h + 1)  # heun: x_next = a x - e D0 + f D1
    return p, q, a, -e + f / r0, -f / r0


FLOW_MATCH_CONFIG = {"stochastic_sampling": False, "invert_sigmas": False}
MU_WHEN = ("always", "dynamic", "never")


@dataclass(frozen=True)
class FlowMatchSchedule:
    """A `FlowMatchEulerDiscreteScheduler` as one pipeline configures it and sets its timesteps (diffusers 0.42).

    name: where `config` comes from (e.g. "flux.1-dev"); config: the scheduler's kwargs, its hub repository's
    scheduler_config.json transcribed (keys left out keep diffusers' defaults); custom_sigmas: the pipeline passes
    sigmas linspace(1, 1/T, T), numpy's in float64 or, with torch_linspace, torch's in float32 (their float32
    values differ in the last place for most T); mu: when the pipeline computes the shift mu from the image tokens
    ("always", "dynamic": only under use_dynamic_shifting, "never"); max_shift: the pipeline's default where the
    config has none; mu_of: (image tokens, steps) -> mu where the pipeline has a formula of its own (FLUX.2), else
    None: mu linear in the image tokens (`shift_mu`); to_zero: with custom_sigmas, the pipeline's sigmas are numpy's
    linspace(1, 0, T + 1) without its last (HunyuanVideo 1.5), in the last place not always linspace(1, 1/T, T)'s."""

    name: str
    config: dict
    custom_sigmas: bool = False
    mu: str = "never"
    max_shift: float = 1.15
    mu_of: Callable | None = None
    torch_linspace: bool = False
    to_zero: bool = False

    def __post_init__(self):
        if self.mu not in MU_WHEN:
            raise ValueError(f"mu: expected one of {list(MU_WHEN)}, got {self.mu!r}")

    def scheduler(self):
        """A fresh diffusers `FlowMatchEulerDiscreteScheduler` of this config."""
        import diffusers

        return diffusers.FlowMatchEulerDiscreteScheduler(**self.config)


def shift_mu(image_seq_len: int, config) -> float:
    """The pipelines' `calculate_shift`: mu linear in the image tokens, base_shift at base_image_seq_len and
    max_shift at max_image_seq_len (same operation order as diffusers, so the same float)."""
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return image_seq_len * slope + (config["base_shift"] - slope * config["base_image_seq_len"])


def set_flow_match_timesteps(scheduler, schedule: FlowMatchSchedule, num_steps: int,
                             image_seq_len: int | None = None) -> None:
    """`scheduler.set_timesteps` as the pipeline of `schedule` calls it for `num_steps` steps, on the host;
    image_seq_len: the image tokens (FLUX and Qwen-Image: packed latent length; SD3: latent patches)."""
    _check_flow_match(scheduler)
    config = scheduler.config
    kwargs = {}
    if schedule.mu == "always" or (schedule.mu == "dynamic" and config.use_dynamic_shifting):
        if image_seq_len is None:
            raise ValueError(f"image_seq_len: expected the image tokens (the pipeline of {schedule.name} computes mu "
                             f"from them), got None")
        defaults = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
                    "max_shift": schedule.max_shift}
        kwargs["mu"] = (schedule.mu_of(image_seq_len, num_steps) if schedule.mu_of is not None else
                        shift_mu(image_seq_len, {key: config.get(key, value) for key, value in defaults.items()}))
    if schedule.custom_sigmas:
        if schedule.torch_linspace:
            sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()
        else:
            sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1] if schedule.to_zero else np.linspace(1.0, 1 / num_steps,
                                                                                                    num_steps)
        scheduler.set_timesteps(sigmas=sigmas, **kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)


def _check_flow_match(scheduler) -> None:
    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"scheduler: expected a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
    for key, expected in FLOW_MATCH_CONFIG.items():
        if scheduler.config.get(key, False) != expected:
            raise ValueError(f"scheduler.config.{key}: expected {expected!r} for a coefficient table, "
                             f"got {scheduler.config.get(key)!r}")


def flow_match_euler_table(scheduler) -> StepTable:
    """The steps a diffusers `FlowMatchEulerDiscreteScheduler` will take after its `set_timesteps` (from
    step 0), as a table; the model output is the velocity. Stochastic sampling and inverted sigmas raise
    a ValueError naming the setting."""
    _check_flow_match(scheduler)
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler: call set_timesteps before building its table")
    sigmas = scheduler.sigmas.tolist()  # the float32 values diffusers steps with
    rows = []
    for i in range(len(scheduler.timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if not 0 <= sigma_next <= sigma:
            raise ValueError(f"scheduler.sigmas: expected a non-increasing schedule >= 0, got {sigma} then "
                             f"{sigma_next} at step {i}")
        a = sigma_next / sigma if sigma > 0 else 1.0  # sigma 0: dt = 0, x_next = x
        rows.append((1.0, -sigma, a, 1.0 - a, 0.0))
    return StepTable("flow-match-euler", tuple(rows))


def scheduler_table(scheduler) -> StepTable:
    """The table of a diffusers scheduler instance after its `set_timesteps`: DPM-Solver++ or flow-matching
    Euler; any other scheduler raises a ValueError naming its class."""
    builders = {"DPMSolverMultistepScheduler": dpm_solver_table,
                "FlowMatchEulerDiscreteScheduler": flow_match_euler_table}
    name = type(scheduler).__name__
    if name not in builders:
        raise ValueError(f"scheduler: expected one of {sorted(builders)} for a coefficient table, got {name}")
    return builders[name](scheduler)


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """A view of latents or a transformer output that `solver_step` steps: (B, L, C) -> (B, 1, L, C),
    (B, C, H, W) as it is, (B, C, F, H, W) -> (B, C, F H, W)."""
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t if t.dim() == 4 else t.flatten(2, 3)


def first_output(result) -> torch.Tensor:
    """The model output a solver steps, from a transformer forward's return (a tuple or a diffusers output): its
    first element (the tasks' `output`; LTX-2's task joins both of its streams instead)."""
    return result[0]


def guidance_combined(out: torch.Tensor, channels: int, scale: float, *, cond_first: bool) -> torch.Tensor:
    """A CFG batch's output (2B, C_out, H, W) as the sampler uses it, in the same shape (the official
    `forward_with_cfg`): the first `channels` channels `uncond + scale * (cond - uncond)` for both halves,
    the other channels (unguided eps, learned variance) as they came."""
    first, second = out[:, :channels].chunk(2)
    cond, uncond = (first, second) if cond_first else (second, first)
    eps = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([eps, eps]), out[:, channels:]], dim=1)
