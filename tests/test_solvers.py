"""Sampler steps as coefficient tables (harmonica/solvers.py) and the loops that use them, against the
samplers they replace."""

import diffusers
import pytest
import torch

import harmonica
from harmonica import CacheSchedule
from harmonica.kernels import solver_step
from harmonica.models import TINY_PIXART, build_pipeline, random_prompt_embeds
from harmonica.samplers import dit_alphas_cumprod, dit_ddim_table, pixart_sample, use_pixart_sampler
from harmonica.solvers import dpm_solver_table
from harmonica.units import cached_units

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
    x0_prev = torch.zeros_like(x)

    def step(i, x, eps):  # eps as a transformer output without guidance
        prev = x0_prev if table.multistep else None
        return solver_step(x, eps, coefficients[i], x0_prev=prev, x0_out=x0_prev)[0]

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
    actual = trajectory(lambda i, x, eps: solver_step(x, eps, coefficients[i])[0], x.float(), steps, 4)
    torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=1e-5)
    assert not table.multistep and table.rows[-1][2:4] == (0.0, 1.0)


def pixart_prompt(batch: int = 1) -> dict:
    embeds = random_prompt_embeds("tiny-pixart", batch, torch.Generator().manual_seed(0))
    mask = torch.ones(embeds.shape[:2])
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask,
            "negative_prompt_embeds": torch.zeros_like(embeds), "negative_prompt_attention_mask": mask}


def assert_close_relative(actual, expected, rtol=1e-5):
    error = (actual - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item(), f"max error {error:.3g}"


@pytest.mark.parametrize("guidance", [4.5, 1.0])
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "fora-2"])
def test_pixart_sample_follows_the_pipeline(cached, guidance):
    pipe = build_pipeline("tiny-pixart", random_weights=True)
    if cached:
        harmonica.enable(pipe, CacheSchedule.fora(8, len(cached_units(pipe.transformer)), 2))
    options = {"guidance_scale": guidance, "height": 64, "width": 64}
    expected = pipe(**pixart_prompt(2), negative_prompt=None, num_inference_steps=8, use_resolution_binning=False,
                    generator=torch.Generator().manual_seed(1), output_type="latent", **options).images
    actual = pixart_sample(pipe, **pixart_prompt(2), num_steps=8, generator=torch.Generator().manual_seed(1),
                           **options)
    assert actual.shape == (2, 4, 8, 8)
    assert_close_relative(actual, expected)


def test_pixart_sample_passes_the_1024_micro_conditions():
    """PixArt-alpha 1024 (sample_size 128) reads resolution and aspect ratio (a tiny model of that size)."""
    pipe = build_pipeline("tiny-pixart", random_weights=True)
    # width 24: the size embedding needs a multiple of 3
    config = {**TINY_PIXART, "sample_size": 128, "attention_head_dim": 12, "cross_attention_dim": 24}
    pipe.transformer = diffusers.PixArtTransformer2DModel(**config).eval()
    size = 128 * pipe.vae_scale_factor
    options = {"guidance_scale": 4.5, "height": size, "width": size}
    expected = pipe(**pixart_prompt(), negative_prompt=None, num_inference_steps=2, use_resolution_binning=False,
                    generator=torch.Generator().manual_seed(1), output_type="latent", **options).images
    actual = pixart_sample(pipe, **pixart_prompt(), num_steps=2, generator=torch.Generator().manual_seed(1), **options)
    assert_close_relative(actual, expected)


def test_pixart_sample_errors():
    pipe = build_pipeline("tiny-pixart", random_weights=True)
    prompt = pixart_prompt()
    with pytest.raises(ValueError, match="negative_prompt_embeds: expected the unconditional embeddings"):
        pixart_sample(pipe, prompt["prompt_embeds"], prompt["prompt_attention_mask"], num_steps=2)
    use_pixart_sampler(pipe, "sa-solver")
    with pytest.raises(ValueError, match="expected a DPMSolverMultistepScheduler, got SASolverScheduler"):
        pixart_sample(pipe, **prompt, num_steps=2)
