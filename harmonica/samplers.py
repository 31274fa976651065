"""Samplers (method.md section 7). Every result names the one it used.

- "dit-ddim": the original DiT sampler, which diffusers' `DiTPipeline` does not reproduce: DDIM with
  eta 0 on timesteps `round(linspace(0, 999, T))` (the respaced alphas, the last step to alpha_bar 1),
  classifier-free guidance on the first 3 of the 4 eps channels, learned sigma ignored.
- PixArt, as scheduler swaps on the pipeline: "dpm-solver++" (20 steps), "sa-solver" (25),
  "iddpm" (100 DDPM steps; the pipeline drops PixArt's learned variance, so the variance is the
  scheduler's fixed one).
"""

import torch
from tqdm.auto import tqdm

from .api import begin_generation
from .router import dit_ddim_timesteps

PIXART_SAMPLERS = {"dpm-solver++": ("DPMSolverMultistepScheduler", 20), "sa-solver": ("SASolverScheduler", 25),
                   "iddpm": ("DDPMScheduler", 100)}
DIT_SAMPLERS = {"dit-ddim": ("dit-ddim", 20)}
DIT_GUIDED_CHANNELS = 3
DIT_TRAIN_STEPS = 1000


def default_steps(sampler: str) -> int:
    return {**PIXART_SAMPLERS, **DIT_SAMPLERS}[sampler][1]


def use_pixart_sampler(pipe, sampler: str):
    """Swap the pipeline's scheduler for `sampler` (keeping its config); returns the new scheduler."""
    import diffusers

    if sampler not in PIXART_SAMPLERS:
        raise ValueError(f"sampler: expected one of {sorted(PIXART_SAMPLERS)} for PixArt, got {sampler!r}")
    scheduler_class = getattr(diffusers, PIXART_SAMPLERS[sampler][0])
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe.scheduler


def dit_alphas_cumprod() -> torch.Tensor:
    """alpha_bar of DiT's linear beta schedule (1e-4 to 0.02 over 1000 steps), float64."""
    betas = torch.linspace(1e-4, 0.02, DIT_TRAIN_STEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def dit_guided_eps(out: torch.Tensor, batch: int, guidance_scale: float, channels: int) -> torch.Tensor:
    """eps (B, C) from a DiT output (2B or B, >= C channels): with guidance, the conditional half's eps
    with its first 3 channels guided, `uncond + s * (cond - uncond)` (the original DiT's choice)."""
    eps = out[:batch, :channels]
    if out.shape[0] == batch:
        return eps
    guided = min(DIT_GUIDED_CHANNELS, channels)
    cond, uncond = out[:batch, :guided], out[batch:, :guided]
    return torch.cat([uncond + guidance_scale * (cond - uncond), eps[:, guided:]], dim=1)


def ddim_update(x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_prev: float) -> torch.Tensor:
    """One eta = 0 DDIM step from alpha_bar `alpha` to `alpha_prev` (x0 not clipped)."""
    x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
    eps = (x - alpha ** 0.5 * x0) / (1 - alpha) ** 0.5
    return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


def dit_ddim_alphas(num_steps: int) -> list:
    """[(alpha_bar at step i, alpha_bar at step i + 1)] of the original DiT DDIM, the last to 1."""
    alphas = dit_alphas_cumprod().tolist()  # host floats: no device read in the loop
    timesteps = dit_ddim_timesteps(num_steps)
    return [(alphas[t], alphas[timesteps[i + 1]] if i + 1 < num_steps else 1.0) for i, t in enumerate(timesteps)]


def dit_null_labels(class_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(2B,) labels of the CFG batch: the classes, then the null class."""
    return torch.cat([class_labels, torch.full_like(class_labels, num_classes)])


@torch.no_grad()
def dit_ddim_sample(transformer, class_labels: torch.Tensor, *, num_steps: int = 20, guidance_scale: float = 1.5,
                    generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                    progress: bool = False) -> torch.Tensor:
    """The original DiT DDIM loop; returns latents (B, C, H, W) (decode with `vae.decode(x / 0.18215)`).

    class_labels: (B,) classes on the transformer's device. With guidance_scale > 1 the model runs the
    conditional and the null-class halves as one batch of 2B.
    """
    cfg = transformer.config
    device, dtype = class_labels.device, transformer.dtype
    batch = class_labels.shape[0]
    if latents is None:
        shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    guided = guidance_scale > 1
    labels = dit_null_labels(class_labels, cfg.num_embeds_ada_norm) if guided else class_labels
    timesteps = dit_ddim_timesteps(num_steps)
    begin_generation(transformer, "dit-ddim", timesteps)
    x = latents
    for t, (alpha, alpha_prev) in zip(tqdm(timesteps, disable=not progress, desc="dit-ddim"),
                                      dit_ddim_alphas(num_steps)):
        model_in = torch.cat([x, x]) if guided else x
        t_batch = torch.full((model_in.shape[0],), t, device=device, dtype=torch.long)
        out = transformer(model_in, timestep=t_batch, class_labels=labels).sample
        x = ddim_update(x, dit_guided_eps(out, batch, guidance_scale, cfg.in_channels), alpha, alpha_prev)
    return x
