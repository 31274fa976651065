"""The DiT family: `DiTTransformer2DModel` (class-conditional, ImageNet) in `DiTPipeline`, its VAE `AutoencoderKL`.

Its blocks are diffusers' `BasicTransformerBlock` (`ada_norm_zero`), whose adapter, shared with PixArt, is
`harmonica.adapters.basic`. Samplers: "dit-ddim", the original DiT sampler (`DiTTask`'s coefficient table; guidance
on the first 3 of the eps channels), or "pipeline", `DiTPipeline`'s own DDIM scheduler (guidance on every eps
channel), both through `samplers.sample`. Task: latents (B, C, h, w), class labels (B,), the timestep.
"""

import torch

from ..kernels import solver_step
from ..router import dit_ddim_timesteps
from ..samplers import DIT_SAMPLERS, SchedulerSteps, dit_ddim_table, dit_guidance, dit_null_labels
from ..solvers import first_output, guidance_combined
from . import SD_VAE, TINY_VAE, Family, Preset, register

TRANSFORMER, PIPELINE = "DiTTransformer2DModel", "DiTPipeline"
PIPELINE_SAMPLER = "pipeline"  # DiTPipeline with its own scheduler
# {--sampler: (the name a router records, default steps, default guidance)}
SAMPLERS = {name: (recorded, steps, 1.5) for name, (recorded, steps) in DIT_SAMPLERS.items()}
SAMPLERS[PIPELINE_SAMPLER] = ("DDIMScheduler", 20, 4.0)
TRAIN_GUIDANCE = 1.5  # L2C's, for DiT and PixArt (not their samplers' defaults)
CLASS_LABEL = 207  # the default ImageNet class (golden retriever)
TINY_DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "sample_size": 8, "out_channels": 8}


class DiTTask:
    """Class-conditional DiT: by the original DiT DDIM (guidance on 3 eps channels, a coefficient table whose step
    may run inside the CUDA graphs), or with `scheduler` as `DiTPipeline` samples (its DDIM: guidance on every eps
    channel, the scheduler stepping itself, `samplers.SchedulerSteps`)."""

    output = solver_output = staticmethod(first_output)  # the model output the solver steps (B, C, H, W)
    text_dim = None  # no text

    @staticmethod
    def patch(cfg) -> int:
        """Latent pixels per token side."""
        return cfg.patch_size

    def __init__(self, transformer, num_steps: int, guidance: float, scheduler=None):
        self.transformer, self.guidance, self.num_steps, self.scheduler = transformer, guidance, num_steps, scheduler
        self.guided = guidance > 1
        cfg = transformer.config
        if scheduler is None:
            self.sampler, self.timesteps = "dit-ddim", dit_ddim_timesteps(num_steps)
            self.table, self.solver_guidance = dit_ddim_table(num_steps), dit_guidance(guidance, cfg.in_channels)
        else:
            self.sampler, self.timesteps = type(scheduler).__name__, SchedulerSteps(scheduler, num_steps).timesteps
            self.table = None
            self.solver_guidance = {"guidance_scale": guidance, "guided_channels": cfg.in_channels} if self.guided \
                else {}
        self.step_in_graph = self.table is not None
        self.coefficients = None  # (T, 5) on the device of the first update
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.num_classes = cfg.num_embeds_ada_norm

    def conditions(self, batch: int, generator: torch.Generator) -> dict:
        return {"class_labels": torch.randint(0, self.num_classes, (batch,), generator=generator)}

    def with_steps(self, num_steps: int) -> "DiTTask":
        """The same task sampled with another step count."""
        return DiTTask(self.transformer, num_steps, self.guidance, self.scheduler)

    def experts(self) -> list:
        """[(transformer, first step)]: its one transformer runs every step."""
        return [(self.transformer, 0)]

    def macs(self):
        """The `macs.MacCount` of one forward at the latents' size."""
        from ..macs import VAE_FACTOR, count_macs

        size = self.latent_shape[-1] * VAE_FACTOR
        return count_macs(self.transformer, size, size)

    def begin(self, generator: torch.Generator | None = None) -> SchedulerSteps | None:
        """None for the original DDIM (the table holds every step)."""
        return None if self.scheduler is None else SchedulerSteps(self.scheduler, self.num_steps, generator)

    def prepare(self, cond, device) -> dict:
        """The timesteps (T,) and the class labels cond["class_labels"] (B,) on `device`, with guidance the CFG
        batch's (2B,): the classes, then the null class."""
        labels = cond["class_labels"].to(device)
        return {"timesteps": torch.tensor(self.timesteps, dtype=torch.long, device=device),
                "kwargs": {"class_labels": dit_null_labels(labels, self.num_classes) if self.guided else labels}}

    def model_kwargs(self, x, inputs, i: int) -> dict:
        """The forward's kwargs for latents x (B, C, h, w) and `prepare`'s inputs: with guidance the CFG batch of
        2B."""
        model_in = torch.cat([x, x]) if self.guided else x
        return {**inputs["kwargs"], "hidden_states": model_in, "timestep": inputs["timesteps"][i].expand(len(model_in))}

    def update(self, state, x, out, i: int):
        if state is not None:
            return state.step(self.combined(out, x.shape[1])[:x.shape[0], :x.shape[1]], i, x)
        if self.coefficients is None or self.coefficients.device != x.device:
            self.coefficients = self.table.tensor(x.device)
        return solver_step(x, out, self.coefficients[i], **self.solver_guidance)[0]

    @staticmethod
    def unpack(latents: torch.Tensor) -> torch.Tensor:
        """The latents as the VAE takes them: as they are."""
        return latents

    @staticmethod
    def decode(vae, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's decode of final latents (B, C, h, w): images (B, 3, H, W) in [-1, 1], in the VAE's dtype."""
        return vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample

    def combined(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        """`out` as the sampler uses it: guidance on the guided eps channels (none at guidance <= 1)."""
        if not self.solver_guidance:
            return out
        return guidance_combined(out, self.solver_guidance["guided_channels"], self.guidance, cond_first=True)


def example_inputs(cfg, batch: int, h: int, w: int, text, frames) -> dict:
    """The forward kwargs of `batch` class-conditional latents (B, C, h, w) on the meta device (no text)."""
    meta = dict(device="meta")
    return {"hidden_states": torch.empty(batch, cfg.in_channels, h, w, **meta),
            "timestep": torch.zeros(batch, dtype=torch.long, **meta),
            "class_labels": torch.zeros(batch, dtype=torch.long, **meta)}


def random_pipeline(pipeline_class, transformer, vae, scheduler):
    return pipeline_class(transformer=transformer, vae=vae, scheduler=scheduler)


def make_task(spec, transformers: list, scheduler, sampler: str, embeddings, steps: int, guidance: float) -> DiTTask:
    """"dit-ddim": the original DiT DDIM; "pipeline": `scheduler` (the pipeline's DDIM) as DiTPipeline samples."""
    return DiTTask(transformers[0], steps, guidance, None if sampler == "dit-ddim" else scheduler)


def _dit(sample_size: int, hub_id: str) -> Preset:
    return Preset.square(TRANSFORMER, {"sample_size": sample_size, "out_channels": 8}, sample_size * 8, SAMPLERS,
                         "dit-ddim", hub_id=hub_id, vae=SD_VAE)


PRESETS = {"dit-xl-2-256": _dit(32, "facebook/DiT-XL-2-256"), "dit-xl-2-512": _dit(64, "facebook/DiT-XL-2-512"),
           "tiny-dit": Preset.square(TRANSFORMER, TINY_DIT, 64, SAMPLERS, "dit-ddim", vae=TINY_VAE)}

FAMILY = register(Family(
    "dit", TRANSFORMER, PIPELINE, "AutoencoderKL", DiTTask, None, None, example_inputs, presets=PRESETS,
    kind="dit", make_task=make_task, samplers=SAMPLERS, pipeline_scheduler="DDIMScheduler",
    random_pipeline=random_pipeline, half=torch.float16, train_guidance=TRAIN_GUIDANCE))
