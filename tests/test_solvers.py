"""Sampler steps as coefficient tables (harmonica/solvers.py) and the loops that use them, against the
samplers they replace."""

import math

import diffusers
import pytest
import torch

import harmonica
from harmonica import CacheSchedule
from harmonica.api import begin_generation
from harmonica.families import FAMILIES
from harmonica.families.dit import DiTTask
from harmonica.families.pixart import TINY_PIXART, PixArtTask
from harmonica.flow import flow_task
from harmonica.kernels import solver_step
from harmonica.models import FLOW_PRESETS, build_pipeline, build_transformer
from harmonica.prompts import random_embeddings
from harmonica.samplers import (
    dit_alphas_cumprod,
    dit_ddim_table,
    pixart_sample,
    sample,
    sampler_scheduler,
)
from harmonica.solvers import (
    FlowMatchSchedule,
    dpm_solver_table,
    flow_match_euler_table,
    scheduler_table,
    set_flow_match_timesteps,
)
from harmonica.units import cached_units

DPM_SETTINGS = {"pixart": {}, "heun": {"solver_type": "heun"}, "order-1": {"solver_order": 1},
                "no-lowering": {"lower_order_final": False, "final_sigmas_type": "sigma_min"}}


def table_rounding(steps: int, largest: float, carry: float = 1.0) -> float:
    """How far a table's fp32 steps may drift from their reference: per step at most ~12 roundings of size u x the
    largest term formed (the coefficients to fp32, each product and sum, the CFG mix), carried over later steps by at
    most `carry`."""
    return carry * steps * 12 * 2.0 ** -24 * largest


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
    largest = 0.0

    def ddim(i, x, eps):  # eta 0, through x0 and the eps it implies
        nonlocal largest
        alpha = alphas[timesteps[i]]
        alpha_next = alphas[timesteps[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        largest = max(largest, ((x.abs() + (1 - alpha).sqrt() * eps.abs()) / alpha.sqrt()).max().item())  # p x, q eps
        x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        return alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * (x - alpha.sqrt() * x0) / (1 - alpha).sqrt()

    expected = trajectory(lambda i, x, eps: ddim(i, x, eps.double()), x, steps, 4)
    coefficients = table.tensor("cpu")
    actual = trajectory(lambda i, x, eps: solver_step(x, eps, coefficients[i])[0], x.float(), steps, 4)
    # carry 1: an error of x0 reaches the next x0 scaled by p' b = 1 - a sqrt(alpha / alpha') <= 1; one atol for every
    # element, since x0 = p x + q eps cancels terms up to ~160 |x| at the first step
    torch.testing.assert_close(actual, expected.float(), rtol=0, atol=table_rounding(steps, largest))
    assert not table.multistep and table.rows[-1][2:4] == (0.0, 1.0)


def pixart_prompt(batch: int = 1) -> dict:
    embeds = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(0))  # tiny-pixart: 8 tokens x 32
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


def mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str:
    return f"{(actual != expected).sum().item()} of {actual.numel()} differ, max {(actual - expected).abs().max():.3g}"


@pytest.mark.parametrize("sampler", ["sa-solver", "iddpm"])
def test_pixart_sample_with_a_stepping_scheduler_is_the_pipeline_bitwise(sampler):
    """SA-Solver and IDDPM have no coefficient table: `sample` steps the scheduler after each forward with the
    generator's noise, as the pipeline does; another generator gives other latents (the steps are stochastic)."""
    pipe = build_pipeline("tiny-pixart", random_weights=True)
    pipe.scheduler = sampler_scheduler(pipe.scheduler, sampler)
    harmonica.enable(pipe.transformer, CacheSchedule.fora(5, len(cached_units(pipe.transformer)), 2))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    options = {"num_steps": 5, "guidance_scale": 4.5, "latents": noise}

    def ours(seed):
        return pixart_sample(pipe, **pixart_prompt(2), generator=torch.Generator().manual_seed(seed), **options)

    expected = pipe(**pixart_prompt(2), negative_prompt=None, num_inference_steps=5, guidance_scale=4.5,
                    use_resolution_binning=False, latents=noise, generator=torch.Generator().manual_seed(1),
                    output_type="latent").images
    actual = ours(1)
    assert torch.equal(actual, expected), mismatch(actual, expected)
    assert (ours(2) != actual).float().mean() > 0.5  # (IDDPM clips to [-1, 1]: some elements are 1 in both)


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_dits_pipeline_sampler_is_dit_pipeline_bitwise(guidance, monkeypatch):
    """DiT's "pipeline" sampler: `DiTTask` with DiTPipeline's DDIM scheduler through `sample` (guidance on every eps
    channel) equals DiTPipeline's loop (the latents it decodes), under FORA:2."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    from harmonica.samplers import initial_noise

    pipe = build_pipeline("tiny-dit", random_weights=True)
    harmonica.enable(pipe.transformer, CacheSchedule.fora(5, len(cached_units(pipe.transformer)), 2))
    task = DiTTask(pipe.transformer, 5, guidance, pipe.scheduler)
    assert (task.sampler, task.table, task.step_in_graph) == ("DDIMScheduler", None, False)
    noise = initial_noise(task, 2, torch.Generator().manual_seed(1))
    actual = 1 / pipe.vae.config.scaling_factor * sample(task, {"class_labels": torch.tensor([5, 9])}, noise)
    decoded = []
    monkeypatch.setattr(pipe.vae, "decode", lambda z: decoded.append(z) or DecoderOutput(torch.zeros(2, 3, 64, 64)))
    pipe(class_labels=[5, 9], num_inference_steps=5, guidance_scale=guidance,
         generator=torch.Generator().manual_seed(1), output_type="np")
    assert torch.equal(actual, decoded[0]), mismatch(actual, decoded[0])


def eager_loop(transformer, sampler: str, timesteps: list, table, guidance: dict, noise, forward):
    """A table-driven generation spelled out, as the per-family loops before `samplers.sample` ran it: begin the
    generation, then per step the output `forward(x, i)` (4-D) and an out-of-place `solver_step`."""
    begin_generation(transformer, sampler, timesteps)
    coefficients, x = table.tensor("cpu"), noise.clone()
    x0_prev = torch.zeros_like(x) if table.multistep else None
    for i in range(len(timesteps)):
        x = solver_step(x, forward(x, i), coefficients[i], x0_prev=x0_prev, x0_out=x0_prev, **guidance)[0]
    return x


def dit_case(guidance: float):
    """tiny-dit's task, its conditions and its reference: the classes then the null class, guidance on 3 eps
    channels, conditional half first."""
    transformer = build_pipeline("tiny-dit", random_weights=True).transformer
    task, labels = DiTTask(transformer, 6, guidance), torch.tensor([3, 7])
    null = torch.full_like(labels, transformer.config.num_embeds_ada_norm)

    def forward(x, i):
        t = torch.full((4,), task.timesteps[i], dtype=torch.long)
        return transformer(torch.cat([x, x]), timestep=t, class_labels=torch.cat([labels, null])).sample

    options = {"guidance_scale": guidance, "guided_channels": 3}
    return task, {"class_labels": labels}, lambda noise: eager_loop(
        transformer, "dit-ddim", task.timesteps, dit_ddim_table(6), options, noise, forward)


def pixart_case(guidance: float):
    """tiny-pixart's DPM-Solver++ task, its conditions and its reference: the negative prompt's half first, guidance
    on every eps channel."""
    pipe = build_pipeline("tiny-pixart", random_weights=True)
    prompt = pixart_prompt(2)
    bank = {"prompt_embeds": prompt["prompt_embeds"], "prompt_attention_mask": prompt["prompt_attention_mask"],
            "negative_embeds": prompt["negative_prompt_embeds"][:1],
            "negative_attention_mask": prompt["negative_prompt_attention_mask"][:1]}
    task = PixArtTask(pipe.transformer, pipe.scheduler, bank, 6, guidance)
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(6)
    embeds = torch.cat([prompt["negative_prompt_embeds"], prompt["prompt_embeds"]])
    mask = torch.cat([prompt["negative_prompt_attention_mask"], prompt["prompt_attention_mask"]])

    def forward(x, i):
        return pipe.transformer(torch.cat([x, x]), encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                timestep=scheduler.timesteps[i:i + 1].expand(4),
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    options = {"guidance_scale": guidance, "cond_first": False}
    return task, {"prompt_index": torch.arange(2)}, lambda noise: eager_loop(
        pipe.transformer, "DPMSolverMultistepScheduler", task.timesteps, dpm_solver_table(scheduler), options, noise,
        forward)


def flux_case(guidance: float):
    """tiny-flux's task, its conditions and its reference: the task's model inputs (the pipeline's, test_flow.py),
    FLUX's distilled guidance (no CFG batch), the packed velocity (B, L, C) as (B, 1, L, C)."""
    spec = FLOW_PRESETS["tiny-flux"]
    transformer = build_transformer("tiny-flux")
    bank = random_embeddings(transformer, 2, spec.text_tokens, torch.Generator().manual_seed(0))
    task, cond = flow_task(transformer, bank, 6, guidance, **spec.size), {"prompt_index": torch.tensor([1, 0])}
    table, inputs = flow_match_euler_table(task.scheduler), task.prepare(cond, "cpu")

    def forward(x, i):
        return transformer(**task.model_kwargs(x.squeeze(1), inputs, i))[0].unsqueeze(1)

    return task, cond, lambda noise: eager_loop(
        transformer, task.sampler, task.timesteps, table, {}, noise.unsqueeze(1), forward).squeeze(1)


LOOP_CASES = {"tiny-dit": (dit_case, 4.0), "tiny-pixart": (pixart_case, 4.5), "tiny-flux": (flux_case, 3.5)}


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "fora-2"])
@pytest.mark.parametrize("name", LOOP_CASES)
def test_the_one_loop_is_each_familys_loop_bitwise(name, cached):
    """`samplers.sample` on DiT's, PixArt's and FLUX's task equals that family's generation spelled out (its own
    CFG batch, guidance and table), bitwise, uncached and under FORA:2."""
    case, guidance = LOOP_CASES[name]
    task, cond, reference = case(guidance)
    if cached:
        harmonica.enable(task.transformer, CacheSchedule.fora(6, len(cached_units(task.transformer)), 2))
    noise = torch.randn(2, *task.latent_shape, generator=torch.Generator().manual_seed(1))
    ours = sample(task, cond, noise)
    expected = reference(noise)
    assert ours.shape == noise.shape
    mismatched = (ours != expected).sum().item()
    assert mismatched == 0, f"{mismatched} of {ours.numel()} elements differ, max {(ours - expected).abs().max():.3g}"


# (scheduler config: the family of its transformer class, image tokens at the native size, CFG scale): FLUX.1-dev
# 1024^2 runs distilled guidance (no CFG batch); Qwen-Image's true CFG rescales norms, which is no linear combination
FLOW_MATCH_CASES = {"flux.1-dev": ("FluxTransformer2DModel", 4096, None),
                    "sd3.5-large": ("SD3Transformer2DModel", 4096, 7.0), "wan2.1": ("WanTransformer3DModel", None, 5.0),
                    "qwen-image": ("QwenImageTransformer2DModel", 6889, None)}
LIPSCHITZ = 0.5  # of the test velocity in x


def flow_match_scheduler(name: str, steps: int):
    transformer, tokens, _ = FLOW_MATCH_CASES[name]
    schedule = FAMILIES[transformer].scheduler
    assert schedule.name == name
    scheduler = schedule.scheduler()
    set_flow_match_timesteps(scheduler, schedule, steps, tokens)
    return scheduler


def velocity_trajectories(scheduler, table, scale, steps: int):
    """(diffusers' step loop as the pipelines run it, the table through `solver_step`, the largest
    |x| + max(1, scale) |model output| seen) over a whole generation. The velocity v(x) = 0.5 flip(x) + n_i
    depends on x (n_i fresh N(0, 1) each step); with CFG the model output is the halves
    (uncond, cond) = (v + n_i s / (s - 1), v + n_i), whose mix uncond + s (cond - uncond) is v."""
    x = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    noises = [torch.randn(x.shape, generator=gen) for _ in range(steps)]
    coefficients = table.tensor("cpu")
    guidance = {} if scale is None else {"guidance_scale": scale, "cond_first": False}

    def model(i, x):  # (B or 2B, C, H, W)
        v = LIPSCHITZ * x.flip(-1) + noises[i]
        return v if scale is None else torch.cat([v + noises[i] * scale / (scale - 1), v + noises[i]])

    scheduler.set_begin_index(0)
    expected, actual, largest = x, x, 0.0
    for i, t in enumerate(scheduler.timesteps):
        out = model(i, expected)
        largest = max(largest, expected.abs().max().item() + max(1, scale or 1) * out.abs().max().item())
        if scale is not None:
            uncond, cond = out.chunk(2)
            out = uncond + scale * (cond - uncond)  # the pipelines' CFG
        expected = scheduler.step(out, t, expected).prev_sample
        actual = solver_step(actual, model(i, actual), coefficients[i], **guidance)[0]
    return expected, actual, largest


@pytest.mark.parametrize("steps", [8, 28])
@pytest.mark.parametrize("name", FLOW_MATCH_CASES)
def test_flow_match_table_follows_diffusers_over_a_whole_generation(name, steps):
    scheduler = flow_match_scheduler(name, steps)
    table = flow_match_euler_table(scheduler)
    assert len(table.rows) == steps and not table.multistep
    expected, actual, largest = velocity_trajectories(scheduler, table, FLOW_MATCH_CASES[name][2], steps)
    # fp32 rounding: per step at most ~12 roundings of size u (|x| + s |out|) (diffusers: dt, dt v, the add, the CFG
    # mix; the table: q, a, b to fp32, sigma v, x0, a x, b x0, the sum, the CFG mix), carried over later steps
    # by at most prod(1 + 0.5 |dt|) <= exp(0.5 sum |dt|) = exp(0.5) (sigmas fall from <= 1 to 0)
    bound = table_rounding(steps, largest, math.exp(LIPSCHITZ))
    error = (actual - expected).abs().max().item()
    assert error <= bound, f"max error {error:.3g} > {bound:.3g}"


def test_flow_match_table_at_a_zero_sigma_keeps_x():
    """A schedule that reaches sigma 0 before its last step: dt = 0 there, x_next = x exactly."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=[1.0, 0.5, 0.0])
    table = flow_match_euler_table(scheduler)
    assert table.rows == ((1.0, -1.0, 0.5, 0.5, 0.0), (1.0, -0.5, 0.0, 1.0, 0.0), (1.0, 0.0, 1.0, 0.0, 0.0))
    expected, actual, largest = velocity_trajectories(scheduler, table, None, 3)
    torch.testing.assert_close(actual, expected, rtol=0, atol=table_rounding(3, largest, math.exp(LIPSCHITZ)))


def test_flow_match_sigmas_are_the_pipelines():
    """set_flow_match_timesteps against the pipelines' schedules written out in float64."""
    steps = 28
    t = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)

    def dynamic(mu):  # exponential time shift of the custom sigmas linspace(1, 1/T, T)
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))

    def shifted(shift):  # SD3 / Wan: the shift applied to the training sigmas, then again to the linspace
        def apply(s):
            return shift * s / (1 + (shift - 1) * s)
        lowest = apply(torch.tensor(1 / 1000, dtype=torch.float64))
        return apply(torch.linspace(1, 0, steps, dtype=torch.float64) * (1 - lowest) + lowest)

    qwen = dynamic(0.5 + 0.4 * (6889 - 256) / (8192 - 256))
    qwen = 1 - (1 - qwen) * (1 - 0.02) / (1 - qwen[-1])  # stretched to end at shift_terminal 0.02
    expected = {"flux.1-dev": dynamic(1.15), "sd3.5-large": shifted(3.0), "wan2.1": shifted(5.0), "qwen-image": qwen}
    for name, sigmas in expected.items():
        actual = flow_match_scheduler(name, steps).sigmas.double()
        torch.testing.assert_close(actual, torch.cat([sigmas, sigmas.new_zeros(1)]), rtol=0, atol=1e-6, msg=name)
    assert float(flow_match_scheduler("qwen-image", steps).sigmas[-2]) == pytest.approx(0.02, abs=1e-7)


@pytest.mark.parametrize("change, message", [
    ({"stochastic_sampling": True}, "scheduler.config.stochastic_sampling: expected False"),
    ({"invert_sigmas": True}, "scheduler.config.invert_sigmas: expected False"),
])
def test_flow_match_table_rejects_other_settings(change, message):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**change)
    scheduler.set_timesteps(8)
    with pytest.raises(ValueError, match=message):
        flow_match_euler_table(scheduler)
    with pytest.raises(ValueError, match=message):
        set_flow_match_timesteps(scheduler, FAMILIES["WanTransformer3DModel"].scheduler, 8)


def test_flow_match_errors_and_dispatch():
    flux = FAMILIES["FluxTransformer2DModel"].scheduler
    scheduler = flux.scheduler()
    with pytest.raises(ValueError, match="call set_timesteps"):
        flow_match_euler_table(scheduler)
    with pytest.raises(ValueError, match=r"mu: expected one of \['always', 'dynamic', 'never'\], got 'sometimes'"):
        FlowMatchSchedule("x", {}, mu="sometimes")
    with pytest.raises(ValueError, match=r"image_seq_len: expected the image tokens \(the pipeline of flux.1-dev"):
        set_flow_match_timesteps(scheduler, flux, 8)
    with pytest.raises(ValueError, match="expected a FlowMatchEulerDiscreteScheduler, got DDIMScheduler"):
        flow_match_euler_table(diffusers.DDIMScheduler())
    set_flow_match_timesteps(scheduler, flux, 8, 4096)
    assert scheduler_table(scheduler) == flow_match_euler_table(scheduler)
    dpm = diffusers.DPMSolverMultistepScheduler()
    dpm.set_timesteps(8)
    assert scheduler_table(dpm) == dpm_solver_table(dpm)
    with pytest.raises(ValueError, match=r"scheduler: expected one of .* for a coefficient table, got DDPMScheduler"):
        scheduler_table(diffusers.DDPMScheduler())
