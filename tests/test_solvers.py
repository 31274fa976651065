"""Sampler steps as coefficient tables (harmonica/solvers.py) against the samplers they replace."""

import diffusers
import pytest
import torch

from harmonica.samplers import dit_alphas_cumprod, dit_ddim_table
from harmonica.solvers import dpm_solver_table, solver_step

DPM_SETTINGS = {"pixart": {}, "heun": {"solver_type": "heun"}, "order-1": {"solver_order": 1},
                "no-lowering": {"lower_order_final": False, "final_sigmas_type": "sigma_min"}}


def trajectory(step, x, steps: int, seed: int):
    """Apply `step(i, x, eps)` over `steps` steps with fresh N(0, 1) eps (B, C, H, W) each step."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = step(i, x, torch.randn(x.shape, generator=gen))
    return x


@pytest.mark.parametrize("steps", [5, 20])
@pytest.mark.parametrize("setting", DPM_SETTINGS)
def test_dpm_solver_table_follows_diffusers_over_a_whole_generation(setting, steps):
    scheduler = diffusers.DPMSolverMultistepScheduler(**DPM_SETTINGS[setting])
    scheduler.set_timesteps(steps)
    table = dpm_solver_table(scheduler)
    coefficients = table.tensor("cpu")
    x = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(1))
    expected = trajectory(lambda i, x, eps: scheduler.step(eps, scheduler.timesteps[i], x).prev_sample, x, steps, 2)
    x0_prev = torch.full_like(x, float("nan")) if not table.multistep else torch.zeros_like(x)

    def step(i, x, eps):
        nonlocal x0_prev
        x, x0_prev = solver_step(x, eps, x0_prev if table.multistep else None, coefficients[i])
        return x

    actual = trajectory(step, x, steps, 2)
    assert table.multistep == (setting != "order-1")
    error = (actual - expected).abs().max().item()
    assert error <= 1e-5 * expected.abs().max().item(), f"max error {error:.3g}"


def test_dpm_solver_table_steps_to_the_data_prediction_at_a_final_sigma_of_zero():
    scheduler = diffusers.DPMSolverMultistepScheduler()
    scheduler.set_timesteps(20)
    rows = dpm_solver_table(scheduler).rows
    assert rows[0][4] == 0 and rows[-1][2:] == (0.0, 1.0, 0.0)  # first order at both ends: x_next = x0
    assert all(row[4] != 0 for row in rows[1:-1])


@pytest.mark.parametrize("change, message", [
    ({"algorithm_type": "sde-dpmsolver++"}, r"algorithm_type: expected 'dpmsolver\+\+'"),
    ({"prediction_type": "v_prediction"}, "prediction_type: expected 'epsilon'"),
    ({"thresholding": True}, "thresholding: expected False"),
    ({"solver_order": 3}, "expected solver_order 1 or 2"),
])
def test_dpm_solver_table_rejects_other_settings(change, message):
    scheduler = diffusers.DPMSolverMultistepScheduler(**change)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=message):
        dpm_solver_table(scheduler)


def test_dpm_solver_table_needs_timesteps_and_the_right_scheduler():
    with pytest.raises(ValueError, match="call set_timesteps"):
        dpm_solver_table(diffusers.DPMSolverMultistepScheduler())
    with pytest.raises(ValueError, match="expected a DPMSolverMultistepScheduler, got DDPMScheduler"):
        dpm_solver_table(diffusers.DDPMScheduler())


def test_dit_ddim_table_is_the_original_ddim_update():
    steps = 4
    table = dit_ddim_table(steps)
    alphas = dit_alphas_cumprod()
    timesteps = [999, 666, 333, 0]
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def ddim(i, x, eps):  # eta 0, through x0 and the eps it implies
        alpha = alphas[timesteps[i]]
        alpha_next = alphas[timesteps[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        return alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * (x - alpha.sqrt() * x0) / (1 - alpha).sqrt()

    expected = trajectory(lambda i, x, eps: ddim(i, x, eps.double()), x, steps, 4)
    coefficients = table.tensor("cpu")
    actual = trajectory(lambda i, x, eps: solver_step(x, eps, None, coefficients[i])[0], x.float(), steps, 4)
    torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=1e-5)
    assert not table.multistep and table.rows[-1][2:4] == (0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_solver_step_computes_in_float32_and_casts_the_sample_only(dtype):
    gen = torch.Generator().manual_seed(5)
    x, eps, x0_prev = (torch.randn(2, 3, 4, 5, generator=gen) for _ in range(3))
    coefficients = torch.tensor([1.3, -0.7, 0.4, 0.5, -0.2])
    x_next, x0 = solver_step(x.to(dtype), eps.to(dtype), x0_prev, coefficients)
    xl, el = x.to(dtype).float(), eps.to(dtype).float()
    expected_x0 = 1.3 * xl - 0.7 * el
    assert x_next.dtype == dtype and x0.dtype == torch.float32
    torch.testing.assert_close(x0, expected_x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_next, (0.4 * xl + 0.5 * expected_x0 - 0.2 * x0_prev).to(dtype), rtol=0, atol=0)
