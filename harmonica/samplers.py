"""Samplers (method.md section 7). Every result names the one it used.

- "dit-ddim": the original DiT sampler, which diffusers' DiT pipeline does not reproduce: DDIM with
  eta 0 on timesteps `round(linspace(0, 999, T))` (the respaced alphas, the last step to alpha_bar 1),
  classifier-free guidance on the first 3 of the 4 eps channels, learned sigma ignored.
- PixArt, as scheduler swaps on the pipeline: "dpm-solver++" (20 steps), "sa-solver" (25),
  "iddpm" (100 DDPM steps; the pipeline drops PixArt's learned variance, so the variance is the
  scheduler's fixed one).

`sample` is the one loop of every `task.Task`. A table-driven task (DiT's "dit-ddim", PixArt's "dpm-solver++", the
flow-matching Euler of `flow.FlowTask`) steps its coefficient table (`solvers.py`) held by `SolverLoop`, no host
state and no device read in the loop; with `enable(..., cuda_graphs=True, scheduler_in_graph=True)` the step runs
inside the captured graphs where the task allows it (`step_in_graph`). A task with no table (PixArt's SA-Solver and
IDDPM, DiT's "pipeline": its pipeline's DDIM) steps with its diffusers scheduler after each forward
(`SchedulerSteps`), as its pipeline does. `dit_ddim_sample`, `pixart_sample` and `flow.flow_sample` build their task
and noise and call it.
"""

import bisect
import inspect

import torch
from tqdm.auto import tqdm

from .kernels import solver_step
from .router import dit_ddim_timesteps
from .solvers import StepTable, as_4d, ddim_table

PIXART_SAMPLERS = {"dpm-solver++": ("DPMSolverMultistepScheduler", 20), "sa-solver": ("SASolverScheduler", 25),
                   "iddpm": ("DDPMScheduler", 100)}
DIT_SAMPLERS = {"dit-ddim": ("dit-ddim", 20)}
TABLE_SAMPLERS = ("dit-ddim", "dpm-solver++")  # run by SolverLoop: their step can be inside a CUDA graph
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


def sampler_scheduler(scheduler, sampler: str):
    """A new scheduler of PixArt's `sampler` (a key of `PIXART_SAMPLERS`) at `scheduler`'s config."""
    import diffusers

    if sampler not in PIXART_SAMPLERS:
        raise ValueError(f"sampler: expected one of {sorted(PIXART_SAMPLERS)} for PixArt, got {sampler!r}")
    return getattr(diffusers, PIXART_SAMPLERS[sampler][0]).from_config(scheduler.config)


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
    guidance options (empty without guidance), constants of a captured step; output: the tensor the solver
    steps, (B, C_out, H, W) or its CFG batch (2B, C_out, H, W), of the transformer's return value.
    """

    def __init__(self, transformer, table: StepTable, latents: torch.Tensor, guidance: dict, output):
        from .api import step_runner  # (the api imports the families, whose modules import this one)

        self.runner = step_runner(transformer)
        self.guidance, self.key = guidance, (table.name, tuple(sorted(guidance.items())))
        self.output = output
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
        """x <- x_next and x0_prev <- x0, in place, from the transformer's return value (one fused op)."""
        solver_step(self.x, self.output(output), self.step_coefficients, x0_prev=self.x0_prev, x_out=self.x,
                    x0_out=self.x0_prev, **self.guidance)

    def result(self) -> torch.Tensor:
        """The final sample (a copy when it lives in the runner's buffer, which the next generation reuses)."""
        return self.x.clone() if self.runner is not None else self.x


def _new_buffer(name, shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class SchedulerSteps:
    """A diffusers scheduler's own steps through one generation: a fresh copy of `scheduler` (its class and config)
    set to `num_steps`, and the generator of a stochastic step's noise (SA-Solver's, DDPM's), which the pipelines
    pass to `scheduler.step` as these do."""

    def __init__(self, scheduler, num_steps: int, generator: torch.Generator | None = None):
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.scheduler.set_timesteps(num_steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps.tolist()]
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        self.noise = {"generator": generator} if takes_generator else {}

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) after step i from the model output eps (B, ...)."""
        return self.scheduler.step(eps, self.scheduler.timesteps[i], x, **self.noise).prev_sample


def initial_noise(task, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, 1) latents (batch, *task.latent_shape) drawn in fp32 on the CPU from `generator` (the same numbers on
    every device), on the task's transformer's device in its dtype."""
    transformer = task.transformer
    noise = torch.randn((batch, *task.latent_shape), generator=generator, dtype=torch.float32)
    return noise.to(transformer.device, transformer.dtype)


def dit_null_labels(class_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(2B,) labels of the CFG batch: the classes, then the null class."""
    return torch.cat([class_labels, torch.full_like(class_labels, num_classes)])


@torch.no_grad()
def sample(task, cond: dict, latents: torch.Tensor, *, generator: torch.Generator | None = None,
           progress: bool = False) -> torch.Tensor:
    """One generation of a `task.Task` (caching as enabled on its transformer); returns the final latents
    (B, *latent_shape). A table-driven task steps through `SolverLoop`; a task with no table (`task.table` None)
    steps with its scheduler after each forward (`task.begin(generator)`, `task.update`), and so does a task of
    transformers that take turns by step (Wan 2.2 A14B's experts), each step on its own. The forward inputs of
    `cond` are built once (`task.prepare`), each step's from them.

    cond: the task's conditions ({name: (B, ...)}, as `task.conditions` makes them); latents: the initial noise
    (B, *latent_shape) on the transformer's device, in its dtype; generator: the noise of a stochastic scheduler's
    steps."""
    from .api import begin_generation, step_runner

    transformer, experts = task.transformer, task.experts()
    if len(experts) > 1:
        return _sample_experts(task, experts, cond, latents, generator, progress)
    if not task.step_in_graph and step_runner(transformer) is not None:
        raise ValueError(f"scheduler_in_graph: expected off for the sampler {task.sampler} (its step runs after the "
                         "graph), got on")
    table, inputs = task.table, task.prepare(cond, latents.device)
    begin_generation(transformer, task.sampler, task.timesteps)
    steps = tqdm(range(len(task.timesteps)), disable=not progress, desc=task.sampler)
    if table is None:
        state, x = task.begin(generator), latents
        for i in steps:
            x = task.update(state, x, task.output(transformer(**task.model_kwargs(x, inputs, i))), i)
        return x
    with SolverLoop(transformer, table, as_4d(latents), task.solver_guidance, task.solver_output) as loop:
        for i in steps:
            loop.begin_step(i)
            loop.end_step(transformer(**task.model_kwargs(loop.x.view(latents.shape), inputs, i)))
    return loop.result().view(latents.shape)


def _sample_experts(task, experts: list, cond: dict, latents: torch.Tensor, generator, progress: bool):
    """`sample` of a task whose transformers take turns by step (`task.experts()`: [(transformer, first step)], Wan
    2.2 A14B's two): each step on its transformer (each begins its generation at its first step, whose row must
    compute: `CacheEngine.begin`), the sampler's update after each forward with that step's guidance
    (`task.update`)."""
    from .api import begin_generation, step_runner

    if any(step_runner(expert) is not None for expert, _ in experts):
        raise ValueError(f"scheduler_in_graph: expected off for a task of {len(experts)} transformers that take turns "
                         "by step (the sampler steps after each forward), got on")
    inputs = task.prepare(cond, latents.device)
    for expert, first in experts:
        begin_generation(expert, task.sampler, task.timesteps, first)
    firsts = [first for _, first in experts]
    state, x = task.begin(generator), latents
    for i in tqdm(range(len(task.timesteps)), disable=not progress, desc=task.sampler):
        expert = experts[bisect.bisect_right(firsts, i) - 1][0]
        x = task.update(state, x, task.output(expert(**task.model_kwargs(x, inputs, i))), i)
    return x


def dit_ddim_sample(transformer, class_labels: torch.Tensor, *, num_steps: int = 20, guidance_scale: float = 1.5,
                    generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                    progress: bool = False) -> torch.Tensor:
    """The original DiT DDIM (`families.dit.DiTTask` through `sample`); returns latents (B, C, H, W) (decode with
    `vae.decode(x / 0.18215)`).

    class_labels: (B,) classes on the transformer's device. With guidance_scale > 1 the model runs the
    conditional and the null-class halves as one batch of 2B. latents: the initial noise, else N(0, 1) from
    `generator`.
    """
    from .families.dit import DiTTask

    task = DiTTask(transformer, num_steps, guidance_scale)
    if latents is None:
        latents = initial_noise(task, class_labels.shape[0], generator)
    return sample(task, {"class_labels": class_labels}, latents, progress=progress)


def pixart_sample(pipe, prompt_embeds: torch.Tensor, prompt_attention_mask: torch.Tensor,
                  negative_prompt_embeds: torch.Tensor | None = None,
                  negative_prompt_attention_mask: torch.Tensor | None = None, *, num_steps: int = 20,
                  guidance_scale: float = 4.5, height: int | None = None, width: int | None = None,
                  generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                  progress: bool = False) -> torch.Tensor:
    """The denoising loop of diffusers' PixArt pipeline with its scheduler (`families.pixart.PixArtTask` through
    `sample`: DPM-Solver++ as a coefficient table, the others stepping themselves); returns latents (B, C, h, w)
    (decode with `vae.decode(x / vae.config.scaling_factor)`).

    prompt_embeds (B, L, C) and prompt_attention_mask (B, L): the prompt; with guidance_scale > 1 the
    negative pair (B, L, C), (B, L) too (the empty prompt's embeddings for PixArt's unconditional half).
    generator: the initial noise (the pipeline's `prepare_latents`) and a stochastic scheduler's step noise.
    """
    from .families.pixart import PixArtTask

    transformer = pipe.transformer
    guided = guidance_scale > 1
    if guided and (negative_prompt_embeds is None or negative_prompt_attention_mask is None):
        raise ValueError("negative_prompt_embeds: expected the unconditional embeddings and mask with "
                         f"guidance_scale {guidance_scale} > 1, got None")
    bank = {"prompt_embeds": prompt_embeds, "prompt_attention_mask": prompt_attention_mask}
    if guided:
        bank.update(negative_embeds=negative_prompt_embeds, negative_attention_mask=negative_prompt_attention_mask)
    batch, size = prompt_embeds.shape[0], transformer.config.sample_size * pipe.vae_scale_factor
    latents = pipe.prepare_latents(batch, transformer.config.in_channels, height or size, width or size,
                                   transformer.dtype, transformer.device, generator, latents)
    task = PixArtTask(transformer, pipe.scheduler, bank, num_steps, guidance_scale,
                      latent_size=tuple(latents.shape[-2:]))
    return sample(task, {"prompt_index": torch.arange(batch)}, latents, generator=generator, progress=progress)
