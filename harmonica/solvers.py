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
"""

import math
from dataclasses import dataclass

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
