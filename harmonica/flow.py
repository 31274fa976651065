"""Flow-matching transformers (FLUX.1, SD3/SD3.5, Wan 2.x, Qwen-Image, FLUX.2, Z-Image) as sampling and training tasks.

A `FlowTask` is one model family's denoising loop as its diffusers 0.42 pipeline runs it, with the
pipeline's `FlowMatchEulerDiscreteScheduler` as a coefficient table (`solvers.py`), so that the step
is the fused `solver_step`: the latent shape for a size, the prompt conditions, each step's transformer
arguments, classifier-free guidance on the velocity and the step. It is a `task.Task` (what `RouterTrainer`
and the search drive), and `flow_sample` runs it through `samplers.sample`, the loop
of every table-driven task, for inference.

Each family's task (its model inputs per step, packing, guidance and decode) lives in its module of
`harmonica/families`; CFG batches are [unconditional, conditional], guidance on every channel of the velocity,
`v_u + s (v_c - v_u)` with s the task's `cfg_scale` of its guidance value, unless the task says otherwise.

Prompt conditions come from a bank of embeddings: a file of the pipeline's `encode_prompt` outputs
(`load_flow_embeddings`) or `random_embeddings` for random weights. The solver steps latents of any
rank as 4-D views: (B, L, C) as (B, 1, L, C), (B, C, F, h, w) as (B, C, F h, w).
"""

import math

import torch

from . import samplers  # its solver_step, looked up at each step (the profiler's ranges wrap it there)
from .solvers import as_4d, first_output, flow_match_euler_table, set_flow_match_timesteps

VAE_FACTOR = 8  # pixels per latent pixel: DiT, PixArt, and `Family.vae_factor` by default
SAMPLER = "FlowMatchEulerDiscreteScheduler"


class FlowTask:
    """One family's generation at one size and step count. Subclasses (one per family, harmonica/families) set the
    class attributes and `_inputs` (and where theirs differ, `_timestep_input` and `_step_inputs`); `embeddings` is a
    bank of prompts (the family's `prompt_keys` and `negative_keys`, see `load_flow_embeddings`), `guidance` the
    scale (FLUX: the distilled guidance input). The scheduler is the family's (`Family.scheduler`)."""

    packed = False  # FLUX and Qwen-Image: 2 x 2 latent patches packed into tokens of 4C channels
    cfg = True  # whether guidance > 1 runs an unconditional half
    text_dim = "joint_attention_dim"  # config key of the text embeddings' width
    text_dims = {}  # prompt key -> config key of its width, where not text_dim (HunyuanVideo 1.5's ByT5 prompt)
    prompt_keys = ("prompt_embeds",)  # (P, L, D) first; the others (P, ...) per prompt
    negative_keys = ("negative_prompt_embeds",)  # (1, ...) each, the unconditional prompt

    def __init__(self, transformer, embeddings: dict, num_steps: int, guidance: float, *, height: int, width: int,
                 frames: int | None = None):
        from .families import family_of

        self.family = family_of(transformer)
        self.class_name = self.family.transformer
        self.transformer, self.guidance, self.num_steps = transformer, guidance, num_steps
        self.height, self.width, self.frames = height, width, frames
        self.latent_shape = self._latent_shape(transformer.config)
        self.guided = self.cfg and self.cfg_scale(guidance) > 1
        self.embeddings = self._check_embeddings(embeddings)
        self.scheduler = self.family.scheduler.scheduler()
        set_flow_match_timesteps(self.scheduler, self.family.scheduler, num_steps, self.image_seq_len)
        self.table = flow_match_euler_table(self.scheduler)
        self.sampler = SAMPLER
        self.timesteps = [int(t) for t in self.scheduler.timesteps.tolist()]  # what a router records
        self.solver_guidance = {"guidance_scale": self.cfg_scale(guidance), "cond_first": False} if self.guided else {}
        self._device_tensors = {}

    def with_steps(self, num_steps: int) -> "FlowTask":
        """The same task sampled with another step count."""
        return type(self)(self.transformer, self.embeddings, num_steps, self.guidance, height=self.height,
                          width=self.width, frames=self.frames)

    @staticmethod
    def cfg_scale(guidance: float) -> float:
        """The scale s of `v_u + s (v_c - v_u)` that the pipeline's guidance value means (CFG runs where s > 1)."""
        return guidance

    # ---- shapes ----

    @classmethod
    def patch(cls, cfg) -> int:
        """Latent pixels per token side: 2 for packed latents (2 x 2 patches in one token), else the config's."""
        return 2 if cls.packed else _patch(cfg)

    def _latent_shape(self, cfg) -> tuple:
        factor = self.family.vae_factor
        multiple = factor * self.patch(cfg)
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height, width: expected multiples of {multiple} for {self.class_name}, got "
                             f"{self.height}x{self.width}")
        h, w = self.height // factor, self.width // factor
        if self.packed:
            return ((h // 2) * (w // 2), cfg.in_channels)
        return (cfg.in_channels, h, w)

    @property
    def image_seq_len(self) -> int:
        """The image tokens the pipeline computes its shift mu from."""
        if self.packed:
            return self.latent_shape[0]
        patch = self.patch(self.transformer.config)
        return (self.latent_shape[-2] // patch) * (self.latent_shape[-1] // patch)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the pipeline hands them to its VAE (before scaling): packed ones unpacked."""
        return latents

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's decode of final latents (B, *latent_shape): images (B, 3, H, W) in [-1, 1] (Wan: videos
        (B, 3, F, H, W)), in the VAE's dtype."""
        return vae.decode(self._vae_latents(vae, self.unpack(latents).to(vae.device, vae.dtype)), return_dict=False)[0]

    def _vae_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """FLUX and SD3: the pipelines' scaling and shift (a VAE without a shift: none)."""
        return latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)

    def macs(self):
        """The `macs.MacCount` of one forward at this size and prompt length."""
        from .macs import count_macs

        tokens = self.embeddings[self.prompt_keys[0]].shape[1]
        return count_macs(self.transformer, self.height, self.width, text_tokens=tokens, frames=self.frames)

    # ---- conditions ----

    def _check_embeddings(self, embeddings: dict) -> dict:
        keys = self.prompt_keys + (self.negative_keys if self.guided else ())
        missing = [key for key in keys if key not in embeddings]
        if missing:
            raise ValueError(f"embeddings: expected the keys {list(keys)} for {self.class_name}, missing {missing}")
        width = self.transformer.config[self.text_dim]
        for key in (self.prompt_keys[0],) + ((self.negative_keys[0],) if self.guided else ()):
            shape = tuple(embeddings[key].shape)
            if len(shape) != 3 or shape[2] != width:
                raise ValueError(f"embeddings: expected {key} of shape (prompts, tokens, {width}) for "
                                 f"{self.class_name}, got {shape}")
        return {key: embeddings[key] for key in keys}

    @property
    def num_prompts(self) -> int:
        return self.embeddings[self.prompt_keys[0]].shape[0]

    def conditions(self, batch: int, generator: torch.Generator) -> dict:
        """A random prompt of the bank per sample: {"prompt_index": (batch,)}."""
        return {"prompt_index": torch.randint(0, self.num_prompts, (batch,), generator=generator)}

    def _prompts(self, cond, device) -> dict:
        """The bank's tensors of the batch's prompts (key -> (B, ...)), with the negative prompt's first when
        guided (key -> (2B, ...)), on `device` (prompt tensors in the transformer's dtype)."""
        index = cond["prompt_index"]
        negatives = dict(zip(self.prompt_keys, self.negative_keys)) if self.guided else {}
        prompts = {}
        for key in self.prompt_keys:
            value = self.embeddings[key][index]
            if key in negatives:
                value = torch.cat([self.embeddings[negatives[key]].expand(len(index), *value.shape[1:]), value])
            prompts[key] = value.to(device=device, dtype=self.transformer.dtype if value.is_floating_point() else None)
        return prompts

    def experts(self) -> list:
        """[(transformer, first step)] of the transformers that take turns by step, in order (Wan 2.2 A14B's two:
        the low-noise expert from the boundary step on); here the task's transformer runs every step."""
        return [(self.transformer, 0)]

    # ---- one step ----

    def guidance_at(self, i: int) -> dict:
        """`solver_step`'s guidance options at step i: `solver_guidance` (Wan 2.2's low-noise steps: guidance_2)."""
        return self.solver_guidance

    def begin(self, generator: torch.Generator | None = None):
        return None  # the table holds every step: no sampler state

    def _on(self, name: str, device) -> torch.Tensor:
        """The forward's timesteps (`_timestep_input` of the scheduler's, at the transformer's dtype) or the table's
        coefficients on `device` (made once)."""
        key = (name, device, self.transformer.dtype)
        if key not in self._device_tensors:
            self._device_tensors[key] = (
                self._timestep_input(self.scheduler.timesteps.to(device)) if name == "timesteps"
                else self.table.tensor(device))
        return self._device_tensors[key]

    def prepare(self, cond, device) -> dict:
        """The generation's fixed forward inputs on `device` (`task.Task.prepare`): the prompts of
        cond["prompt_index"] (B,), the CFG batch (2B, ...) when guided, and the family's `_inputs`."""
        prompts = self._prompts(cond, device)
        return {"timesteps": self._on("timesteps", device),
                "kwargs": {"return_dict": False, **self._inputs(prompts, device)}}

    def model_kwargs(self, x, inputs, i: int) -> dict:
        """The transformer's keyword arguments at step i for the sample x (B, *latent_shape) and `prepare`'s
        inputs."""
        model_in = torch.cat([x, x]) if self.guided else x
        t = inputs["timesteps"][i].expand(model_in.shape[0])
        # return_dict False (in inputs): a tuple, as the pipelines ask; diffusers' context-parallel hooks pass only
        # tensors through
        return {**inputs["kwargs"], **self._step_inputs(model_in, t, inputs)}

    def _timestep_input(self, t: torch.Tensor) -> torch.Tensor:
        """The forward's timestep argument of scheduler timesteps t (any shape, elementwise): t itself."""
        return t

    def _inputs(self, prompts: dict, device) -> dict:
        """The family's forward kwargs that do not change by step, of the batch's `_prompts` (R rows: B, or 2B
        under CFG) on `device`."""
        raise NotImplementedError

    def _step_inputs(self, model_in: torch.Tensor, t: torch.Tensor, inputs: dict) -> dict:
        """The forward kwargs of step i: the latents argument for the batch model_in (R, *latent_shape) and the
        timestep t (R,) (views and concatenations only)."""
        arguments = self.family.arguments
        return {arguments[0]: model_in, arguments[1]: t}

    output = staticmethod(first_output)  # the model output the solver steps (B, *latent_shape)
    step_in_graph = False  # the velocity step runs after the graph: scheduler_in_graph is refused

    def solver_output(self, model_output) -> torch.Tensor:
        """The 4-D velocity `samplers.sample` steps, of the transformer's return value."""
        return self.velocity(self.output(model_output))

    def velocity(self, out: torch.Tensor) -> torch.Tensor:
        """The model output as the solver steps it (4-D): the raw output, guided by `solver_step` when
        `solver_guidance` says so."""
        return as_4d(out)

    def update(self, state, x, out, i: int) -> torch.Tensor:
        """x at step i + 1 from x (B, *latent_shape) and the transformer output `out` at step i."""
        step = samplers.solver_step(as_4d(x), self.velocity(out), self._on("coefficients", x.device)[i],
                                    **self.guidance_at(i))
        return step[0].view(x.shape)

    def combined(self, out: torch.Tensor, channels=None) -> torch.Tensor:
        """The velocity the sampler steps with (B, ...): guidance applied (the training loss compares it)."""
        v = self.velocity(out)
        if not self.solver_guidance:
            return v
        uncond, cond = v.chunk(2)
        return uncond + self.solver_guidance["guidance_scale"] * (cond - uncond)


def denormalized(vae, latents: torch.Tensor) -> torch.Tensor:
    """Wan's and Qwen-Image's pipelines: latents (B, z, F, h, w) back from the VAE's per-channel normalisation."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents * std + mean


def make_flow_task(spec, transformers: list, scheduler, sampler: str, embeddings: dict, num_steps: int,
                   guidance: float) -> FlowTask:
    """A flow family's `Family.make_task`: the task of preset `spec` on its transformers (`models.load_experts`) at
    the preset's size; of two experts (Wan 2.2 A14B), the second at the preset's boundary (`pipeline_config`) and
    `guidance_2`. Its scheduler is the family's (`Family.scheduler`): `scheduler` is None, `sampler` `SAMPLER`."""
    second = ({} if len(transformers) == 1 else
              {"transformer_2": transformers[1], "guidance_2": spec.guidance_2, **spec.pipeline_config})
    return spec.family.task(transformers[0], embeddings, num_steps, guidance, **second, **spec.size)


def flow_task(transformer, embeddings: dict, num_steps: int, guidance: float, **size) -> FlowTask:
    """The task of the transformer's family; size: height, width (pixels), frames (video)."""
    from .families import family_of

    return family_of(transformer).task(transformer, embeddings, num_steps, guidance, **size)


def load_flow_embeddings(path, option: str = "--prompt-embeddings") -> dict:
    """A safetensors file of a pipeline's `encode_prompt` outputs, under the names it returns them: FLUX
    prompt_embeds (P, L, D), pooled_prompt_embeds (P, D'); SD3 the same plus negative_prompt_embeds (1, L, D)
    and negative_pooled_prompt_embeds (1, D'); Wan prompt_embeds and negative_prompt_embeds; Qwen-Image
    prompt_embeds, prompt_embeds_mask (P, L) and the negative pair; FLUX.2 prompt_embeds. Values checked as
    `prompts.read_embeddings` does (errors name `option` and the file); the task checks the keys and widths it
    needs."""
    from .prompts import read_embeddings

    return read_embeddings(path, option)


def flow_sample(task: FlowTask, prompt_index: torch.Tensor, *, latents: torch.Tensor | None = None,
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """One generation of `task` through `samplers.sample` (the fused solver step; caching as enabled on the
    transformer); returns the final latents (B, *latent_shape), packed as the transformer sees them.

    prompt_index: (B,) prompts of the task's bank; latents: the initial noise, else N(0, 1) from `generator`."""
    from .samplers import sample

    if latents is None:
        latents = torch.randn((len(prompt_index), *task.latent_shape), generator=generator, dtype=torch.float32)
    transformer = task.transformer
    return sample(task, {"prompt_index": prompt_index}, latents.to(transformer.device, transformer.dtype),
                  progress=progress)


def cur_for_speedup(macs, speedup: float, num_steps: int) -> float:
    """The CUR whose reused units, at the average unit's MACs, give the theoretical `speedup`:
    total / (total - CUR x units) = speedup (per step), so CUR = (1 - 1 / speedup) total / units.
    macs: a `MacCount` of the model. ValueError when step 0 (never reused) leaves it out of reach."""
    units = sum(macs.unit_macs)
    cur = (1 - 1 / speedup) * macs.total / units
    most = (num_steps - 1) / num_steps
    if not speedup > 1 or cur >= most:
        reach = macs.total / (macs.total - most * units)
        raise ValueError(f"--target-speedup: expected a speedup in (1, {math.floor(reach * 100) / 100}) for "
                         f"{num_steps} steps of this model, got {speedup}")
    return cur


def _patch(cfg) -> int:
    return cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[-1]
