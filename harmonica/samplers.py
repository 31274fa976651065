"""Samplers (method.md section 7). Every result names the one it used.

- "dit-ddim": the original DiT sampler, which diffusers' DiT pipeline does not reproduce: DDIM with
  eta 0 on timesteps `round(linspace(0, 999, T))` (the respaced alphas, the last step to alpha_bar 1),
  classifier-free guidance on the first 3 of the 4 eps channels, learned sigma ignored.
- PixArt, as scheduler swaps on the pipeline: "dpm-solver++" (20 steps), "sa-solver" (25),
  "iddpm" (100 DDPM steps; the pipeline drops PixArt's learned variance, so the variance is the
  scheduler's fixed one).

`dit_ddim_sample` and `pixart_sample` (the PixArt pipeline's denoising loop for DPM-Solver++) step
through a coefficient table (`solvers.py`) held by `SolverLoop`: no host state and no device read in
the loop; with `enable(..., cuda_graphs=True, scheduler_in_graph=True)` the step runs inside the
captured graphs.
"""

import torch
from tqdm.auto import tqdm

from .kernels import solver_step
from .router import dit_ddim_timesteps
from .solvers import StepTable, ddim_table, dpm_solver_table

PIXART_SAMPLERS = {"dpm-solver++": ("DPMSolverMultistepScheduler", 20), "sa-solver": ("SASolverScheduler", 25),
                   "iddpm": ("DDPMScheduler", 100)}
DIT_SAMPLERS = {"dit-ddim": ("dit-ddim", 20)}
TABLE_SAMPLERS = ("dit-ddim", "dpm-solver++")  # run by SolverLoop: their step can be inside a CUDA graph
# what `pixart_sample` takes, in the order of the pipeline's `encode_prompt` results
PIXART_PROMPT_KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                      "negative_prompt_attention_mask")
DIT_GUIDED_CHANNELS = 3
DIT_TRAIN_STEPS = 1000
# each sampler's step range: from its fewest (DPM-Solver++ and SA-Solver are multistep: their first update
# reads a second timestep) to the 1000 training timesteps; samplers not listed take 1
MIN_STEPS = {"dpm-solver++": 2, "sa-solver": 2}


def step_range(sampler: str) -> tuple:
    """(fewest, most) denoising steps `sampler` can take."""
    return MIN_STEPS.get(sampler, 1), DIT_TRAIN_STEPS


def step_ranges_text() -> str:
    """The step ranges for --help: '1 to 1000; dpm-solver++, sa-solver: 2 to 1000'."""
    return f"1 to {DIT_TRAIN_STEPS}; " + ", ".join(MIN_STEPS) + f": {min(MIN_STEPS.values())} to {DIT_TRAIN_STEPS}"


def check_steps(sampler: str, steps: int, option: str = "--steps") -> None:
    """ValueError naming `option` when `sampler` cannot take `steps` steps."""
    low, high = step_range(sampler)
    if not low <= steps <= high:
        raise ValueError(f"{option}: expected {low} to {high} for the sampler {sampler}, got {steps}")


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


def dit_guidance(guidance_scale: float, channels: int) -> dict:
    """`solver_step` guidance options of the original DiT: above 1, the first 3 eps channels guided,
    `uncond + s * (cond - uncond)`, conditional half first; else none."""
    if guidance_scale <= 1:
        return {}
    return {"guidance_scale": guidance_scale, "guided_channels": min(DIT_GUIDED_CHANNELS, channels)}


def dit_ddim_alphas(num_steps: int) -> list:
    """[(alpha_bar at step i, alpha_bar at step i + 1)] of the original DiT DDIM, the last to 1."""
    alphas = dit_alphas_cumprod().tolist()  # host floats: no device read in the loop
    timesteps = dit_ddim_timesteps(num_steps)
    return [(alphas[t], alphas[timesteps[i + 1]] if i + 1 < num_steps else 1.0) for i, t in enumerate(timesteps)]


def dit_ddim_table(num_steps: int) -> StepTable:
    """The original DiT DDIM over `num_steps` as a coefficient table."""
    return ddim_table("dit-ddim", dit_ddim_alphas(num_steps))


class SolverLoop:
    """One generation of a table-driven sampler: the sample `x`, the previous data prediction and the
    step's coefficients. When the transformer's graph runner takes the sampler step (`step_runner`),
    these live in its fixed buffers and `advance` is the graphs' epilogue; else `end_step` advances
    eagerly. Use as a context manager around the step loop.

    table: the sampler's `StepTable`; latents: (B, C, H, W) initial sample; guidance: the `solver_step`
    guidance options (empty without guidance), constants of a captured step.
    """

    def __init__(self, transformer, table: StepTable, latents: torch.Tensor, guidance: dict):
        from .api import step_runner  # (the api imports the families, whose modules import this one)

        self.runner = step_runner(transformer)
        self.guidance, self.key = guidance, (table.name, tuple(sorted(guidance.items())))
        device = latents.device
        self.coefficients = table.tensor(device)
        make = self.runner.buffer if self.runner is not None else _new_buffer
        self.x = make("x", tuple(latents.shape), latents.dtype, device)
        self.x.copy_(latents)
        self.x0_prev = make("x0_prev", tuple(latents.shape), torch.float32, device) if table.multistep else None
        if self.x0_prev is not None:
            self.x0_prev.zero_()  # read with coefficient 0 at step 0: must not hold NaN
        self.step_coefficients = make("coefficients", (5,), torch.float32, device) if self.runner else None

    def __enter__(self):
        if self.runner is not None:
            self.runner.set_epilogue(self.key, self.advance)
        return self

    def __exit__(self, *exc):
        if self.runner is not None:
            self.runner.set_epilogue(None, None)

    def begin_step(self, i: int) -> None:
        if self.runner is not None:
            self.step_coefficients.copy_(self.coefficients[i])  # outside the graph: a graph input
        else:
            self.step_coefficients = self.coefficients[i]

    def end_step(self, output) -> None:
        if self.runner is None:
            self.advance(output)

    def advance(self, output) -> None:
        """x <- x_next and x0_prev <- x0, in place, from the transformer output (one fused op)."""
        solver_step(self.x, output.sample, self.step_coefficients, x0_prev=self.x0_prev, x_out=self.x,
                    x0_out=self.x0_prev, **self.guidance)

    def result(self) -> torch.Tensor:
        """The final sample (a copy when it lives in the runner's buffer, which the next generation reuses)."""
        return self.x.clone() if self.runner is not None else self.x


def _new_buffer(name, shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


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
    from .api import begin_generation

    timesteps = dit_ddim_timesteps(num_steps)
    begin_generation(transformer, "dit-ddim", timesteps)

    guidance = dit_guidance(guidance_scale, cfg.in_channels)
    with SolverLoop(transformer, dit_ddim_table(num_steps), latents, guidance) as loop:
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="dit-ddim")):
            loop.begin_step(i)
            model_in = torch.cat([loop.x, loop.x]) if guided else loop.x
            t_batch = torch.full((model_in.shape[0],), t, device=device, dtype=torch.long)
            loop.end_step(transformer(model_in, timestep=t_batch, class_labels=labels))
    return loop.result()


@torch.no_grad()
def pixart_sample(pipe, prompt_embeds: torch.Tensor, prompt_attention_mask: torch.Tensor,
                  negative_prompt_embeds: torch.Tensor | None = None,
                  negative_prompt_attention_mask: torch.Tensor | None = None, *, num_steps: int = 20,
                  guidance_scale: float = 4.5, height: int | None = None, width: int | None = None,
                  generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                  progress: bool = False) -> torch.Tensor:
    """The denoising loop of diffusers' PixArt pipeline with its DPM-Solver++ scheduler as a coefficient
    table; returns latents (B, C, h, w) (decode with `vae.decode(x / vae.config.scaling_factor)`).

    prompt_embeds (B, L, C) and prompt_attention_mask (B, L): the prompt; with guidance_scale > 1 the
    negative pair (B, L, C), (B, L) too (the empty prompt's embeddings for PixArt's unconditional half).
    `pipe.scheduler` must be a DPMSolverMultistepScheduler (`use_pixart_sampler(pipe, "dpm-solver++")`).
    """
    transformer, scheduler = pipe.transformer, pipe.scheduler
    cfg = transformer.config
    device, dtype = transformer.device, transformer.dtype
    guided = guidance_scale > 1
    if guided and (negative_prompt_embeds is None or negative_prompt_attention_mask is None):
        raise ValueError("negative_prompt_embeds: expected the unconditional embeddings and mask with "
                         f"guidance_scale {guidance_scale} > 1, got None")
    batch = prompt_embeds.shape[0]
    height = height or cfg.sample_size * pipe.vae_scale_factor
    width = width or cfg.sample_size * pipe.vae_scale_factor
    embeds, mask = prompt_embeds.to(device, dtype), prompt_attention_mask.to(device)
    if guided:
        embeds = torch.cat([negative_prompt_embeds.to(device, dtype), embeds])
        mask = torch.cat([negative_prompt_attention_mask.to(device), mask])
    conditions = {"resolution": None, "aspect_ratio": None}
    if cfg.sample_size == 128:  # PixArt-alpha 1024's micro-conditions, as the pipeline sets them
        rows = 2 * batch if guided else batch
        conditions = {name: torch.tensor([value], dtype=dtype).repeat(rows, 1).to(device, non_blocking=True)
                      for name, value in (("resolution", [height, width]), ("aspect_ratio", [height / width]))}
    scheduler.set_timesteps(num_steps)  # on the host; starts the generation when harmonica is enabled
    table = dpm_solver_table(scheduler)
    timesteps = scheduler.timesteps.to(device, non_blocking=True)
    latents = pipe.prepare_latents(batch, cfg.in_channels, height, width, dtype, device, generator, latents)
    guidance = {"guidance_scale": guidance_scale, "cond_first": False} if guided else {}  # learned sigma: ignored
    with SolverLoop(transformer, table, latents, guidance) as loop:
        for i in tqdm(range(num_steps), disable=not progress, desc="dpm-solver++"):
            loop.begin_step(i)
            model_in = torch.cat([loop.x, loop.x]) if guided else loop.x
            loop.end_step(transformer(model_in, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                      timestep=timesteps[i:i + 1].expand(model_in.shape[0]),
                                      added_cond_kwargs=conditions))
    return loop.result()
