"""The training task: one family's denoising loop as `RouterTrainer`, the schedule search (`search.Rollouts`,
`search_router`, `compare`), the forecast fit and `harmonica train` drive it. `DiTTask`, `PixArtTask` and the
`flow.FlowTask` subclasses (harmonica/families) provide it; digits-dit's and digits-flux's tasks are DiT's and
FLUX's; every family makes its own (`Family.make_task`). `samplers.sample`, the one inference loop, runs every task:
through its coefficient table (`table`), or, without one, stepping its scheduler (`begin`, `update`).

A generation calls `prepare` once, on the transformer's device, and `model_kwargs` at every step with its result (named
"inputs"): what does not change by step (the CFG batch of prompts or labels, masks, position ids, guidance inputs,
micro-conditions, the timesteps as the forward takes them) is built and uploaded once, so a step launches no host
copy and no factory op, only what depends on the latents or the step (the CFG batch of the latents, views).

Shapes: B the batch, `latent_shape` one sample's latents (DiT/PixArt (C, h, w); packed flow latents (L, C); video
(C, F, h, w)), T the steps.
"""

from typing import Protocol

import torch

from .solvers import StepTable


class Task(Protocol):
    transformer: torch.nn.Module
    """The diffusers transformer of step 0 (of every step unless `experts` says otherwise)."""
    sampler: str
    """The sampler name a router records (the scheduler class, or "dit-ddim")."""
    timesteps: list
    """The T timesteps (ints) of the generation, in order, as a router records them."""
    latent_shape: tuple
    """One sample's latent shape: noise is (B, *latent_shape)."""
    table: StepTable | None
    """The sampler's coefficient table that `samplers.sample` steps; None where the scheduler steps itself
    (PixArt's SA-Solver and IDDPM, DiT's "pipeline" DDIM: `samplers.SchedulerSteps`)."""
    solver_guidance: dict
    """`kernels.solver_step`'s guidance options of `samplers.sample` (empty without guidance)."""
    step_in_graph: bool
    """Whether the sampler step may run inside the transformer's CUDA graphs (`scheduler_in_graph`)."""

    def conditions(self, batch: int, generator: torch.Generator) -> dict:
        """A batch of random conditions, {name: tensor (B, ...)} (class labels, prompt indices)."""

    def begin(self, generator: torch.Generator | None = None):
        """A new generation's sampler state (None for a stateless one), which `update` advances; `generator`: the
        noise of a stochastic scheduler's steps."""

    def prepare(self, cond: dict, device) -> dict:
        """A generation's forward inputs that do not change by step, of `cond` (as `conditions` makes them), built
        once on `device` (floating point in the transformer's dtype): {"timesteps": (T,) the forward's timestep
        argument of every step, "kwargs": the forward's other fixed keyword arguments (the CFG batch (2B, ...) of the
        prompts or labels when guided), and what a family's step reads besides}."""

    def model_kwargs(self, x: torch.Tensor, inputs: dict, i: int) -> dict:
        """The transformer's forward kwargs at step i for latents x (B, *latent_shape) and the generation's `inputs`
        (`prepare`): the CFG batch of x, the step's timestep (a view of inputs["timesteps"]), inputs["kwargs"]."""

    def output(self, model_output):
        """The model output the sampler steps, (B, ...) or its CFG batch (2B, ...), of the transformer's return
        value: a tensor, or per sample a list of them where the transformer returns one (Z-Image)."""

    def solver_output(self, model_output) -> torch.Tensor:
        """The 4-D tensor `samplers.sample` steps ((B, ...) or the CFG batch (2B, ...)) of the transformer's return
        value."""

    def update(self, state, x: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        """Latents (B, *latent_shape) after step i from x and the step's `output`."""

    def combined(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        """`out` as the sampler uses it, guidance applied (the training loss compares it): (B, ...), or DiT's and
        PixArt's in out's shape (2B, ...), both CFG halves the combined eps; `channels`: x's latent channels."""

    def with_steps(self, num_steps: int) -> "Task":
        """The same task sampled with `num_steps` steps."""

    def experts(self) -> list:
        """[(transformer, first step)]: the transformers that take turns by step, in order (one for most)."""

    def macs(self):
        """The `macs.MacCount` of one forward of `transformer` at the task's size."""
