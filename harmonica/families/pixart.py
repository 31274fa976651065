"""The PixArt family: `PixArtTransformer2DModel` (text-conditional, T5 prompts) in `PixArtAlphaPipeline` and
`PixArtSigmaPipeline`, their VAE `AutoencoderKL`.

Its blocks are diffusers' `BasicTransformerBlock` (`ada_norm_single`), whose adapter, shared with DiT, is
`harmonica.adapters.basic`. Samplers (`samplers.PIXART_SAMPLERS`, each at its pipeline scheduler's config):
"dpm-solver++" as a coefficient table (its step may run inside the CUDA graphs), "sa-solver" and "iddpm" stepping
their scheduler, all through `samplers.sample`. Task: latents (B, C, h, w), a prompt bank (P prompts, L tokens; a
`harmonica embed` file or random ones): prompt_embeds (P, L, 4096), prompt_attention_mask (P, L), negative_embeds
(1, L, 4096), negative_attention_mask (1, L).
"""

import torch

from ..flow import VAE_FACTOR
from ..samplers import PIXART_SAMPLERS, SchedulerSteps, sampler_scheduler
from ..solvers import dpm_solver_table, first_output, guidance_combined
from . import SD_VAE, TINY_VAE, Family, Preset, register
from .dit import TRAIN_GUIDANCE, DiTTask

TRANSFORMER, PIPELINE, SIGMA_PIPELINE = "PixArtTransformer2DModel", "PixArtAlphaPipeline", "PixArtSigmaPipeline"
DPM_SOLVER = PIXART_SAMPLERS["dpm-solver++"][0]  # the scheduler sampled by a coefficient table
GUIDANCE = 4.5  # every sampler's default
# {--sampler: (the name a router records: the scheduler class, default steps, default guidance)}
SAMPLERS = {name: (scheduler, steps, GUIDANCE) for name, (scheduler, steps) in PIXART_SAMPLERS.items()}
TINY_PIXART = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "sample_size": 8,
               "cross_attention_dim": 16, "caption_channels": 32}


def encode(pipe, prompts, negative, extra) -> dict:
    """The pipeline's T5 `encode_prompt` outputs, named as the module docstring says."""
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True, negative_prompt="" if negative is None else negative,
        num_images_per_prompt=1, **extra)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_embeds": negative_embeds[:1],
            "negative_attention_mask": negative_mask[:1]}


EMBEDDING_KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_embeds", "negative_attention_mask")


def load_prompt_embeddings(path, caption_channels: int | None = None, option: str = "--embeds") -> dict:
    """A safetensors file of precomputed T5 prompt embeddings for PixArt training:
    prompt_embeds (P, L, C), prompt_attention_mask (P, L), negative_embeds (1, L, C) and
    negative_attention_mask (1, L) (the empty prompt, PixArt's unconditional input); C the transformer's
    `caption_channels` when given. One ValueError line naming `option` and the file for any defect."""
    from ..prompts import read_embeddings

    tensors = read_embeddings(path, option)
    missing = [k for k in EMBEDDING_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{option}: expected the keys {EMBEDDING_KEYS} in {path}, missing {missing}")
    embeds = tensors["prompt_embeds"]
    width = caption_channels or embeds.shape[-1]
    prompts, tokens = embeds.shape[:2] if embeds.dim() == 3 else (-1, -1)  # -1: no shape matches
    shapes = {"prompt_embeds": ((prompts, tokens, width), f"(prompts, tokens, {width})"),
              "prompt_attention_mask": ((prompts, tokens), "(prompts, tokens)"),
              "negative_embeds": ((1, tokens, width), f"(1, tokens, {width})"),
              "negative_attention_mask": ((1, tokens), "(1, tokens)")}
    for name, (shape, text) in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{option}: expected {name} of shape {text} in {path}, got {tuple(tensors[name].shape)}")
    return tensors


class PixArtTask:
    """Text-conditional PixArt sampled by a diffusers scheduler, as the PixArt pipelines run it: with guidance > 1
    the [negative, positive] CFG batch, guidance on the eps channels; learned sigma dropped. DPM-Solver++ is a
    coefficient table (its step may run inside the CUDA graphs); the other schedulers step themselves
    (`samplers.SchedulerSteps`)."""

    output = solver_output = staticmethod(first_output)  # the model output the solver steps (B, C, H, W)
    text_dim = "caption_channels"  # config key of the text embeddings' width
    text_dims = {}
    prompt_keys = EMBEDDING_KEYS[:2]  # (P, L, D), (P, L): the bank's prompts
    negative_keys = EMBEDDING_KEYS[2:]  # (1, L, D), (1, L): the unconditional prompt
    patch = staticmethod(DiTTask.patch)
    experts, model_kwargs = DiTTask.experts, DiTTask.model_kwargs
    unpack, decode = staticmethod(DiTTask.unpack), staticmethod(DiTTask.decode)

    def __init__(self, transformer, scheduler, embeddings: dict, num_steps: int, guidance: float, *,
                 latent_size: tuple | None = None):
        self.transformer, self.guidance, self.num_steps = transformer, guidance, num_steps
        self.guided = guidance > 1
        self.scheduler, self.sampler = scheduler, type(scheduler).__name__  # each generation steps a fresh copy
        steps = SchedulerSteps(scheduler, num_steps)
        self.timesteps = steps.timesteps
        self.table = dpm_solver_table(steps.scheduler) if self.sampler == DPM_SOLVER else None
        self.step_in_graph = self.table is not None
        cfg = transformer.config
        self.latent_size = latent_size  # (h, w) of the latents, by default the model's (sample_size, sample_size)
        self.latent_shape = (cfg.in_channels, *(latent_size or (cfg.sample_size, cfg.sample_size)))
        self.embeddings = embeddings
        self.solver_guidance = {"guidance_scale": guidance, "cond_first": False} if self.guided else {}

    def macs(self):
        """The `macs.MacCount` of one forward at the latents' size and the bank's prompt tokens."""
        from ..macs import count_macs

        height, width = (side * VAE_FACTOR for side in self.latent_shape[-2:])
        return count_macs(self.transformer, height, width, text_tokens=self.embeddings["prompt_embeds"].shape[1])

    def with_steps(self, num_steps: int) -> "PixArtTask":
        """The same task sampled with another step count."""
        return PixArtTask(self.transformer, self.scheduler, self.embeddings, num_steps, self.guidance,
                          latent_size=self.latent_size)

    def conditions(self, batch: int, generator: torch.Generator) -> dict:
        count = self.embeddings["prompt_embeds"].shape[0]
        return {"prompt_index": torch.randint(0, count, (batch,), generator=generator)}

    def begin(self, generator: torch.Generator | None = None) -> SchedulerSteps:
        return SchedulerSteps(self.scheduler, self.num_steps, generator)

    def prepare(self, cond, device) -> dict:
        """The timesteps (T,) and the prompts of cond["prompt_index"] (B,) on `device`: with guidance the CFG batch
        of 2B, the bank's negative prompt first; the micro-conditions of the pixel size where the model reads them."""
        index, e, dtype = cond["prompt_index"], self.embeddings, self.transformer.dtype
        batch = len(index)
        embeds, mask = e["prompt_embeds"][index], e["prompt_attention_mask"][index]
        if self.guided:
            embeds = torch.cat([e["negative_embeds"].expand(batch, -1, -1), embeds])
            mask = torch.cat([e["negative_attention_mask"].expand(batch, -1), mask])
        rows = embeds.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:  # the pipeline's micro-conditions of the pixel size
            height, width = self.latent_shape[-2] * VAE_FACTOR, self.latent_shape[-1] * VAE_FACTOR
            added = {"resolution": torch.tensor([[height, width]], device=device, dtype=dtype).repeat(rows, 1),
                     "aspect_ratio": torch.tensor([[height / width]], device=device, dtype=dtype).repeat(rows, 1)}
        return {"timesteps": torch.tensor(self.timesteps, dtype=torch.long, device=device),
                "kwargs": {"encoder_hidden_states": embeds.to(device, dtype), "encoder_attention_mask": mask.to(device),
                           "added_cond_kwargs": added}}

    def update(self, state, x, out, i: int):
        eps = self.combined(out, x.shape[1])[:x.shape[0], :x.shape[1]]
        return state.step(eps, i, x)

    def combined(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        """`out` as the sampler uses it: [negative, positive] halves, guidance on every eps channel (none at
        guidance <= 1)."""
        if not self.guided:
            return out
        return guidance_combined(out, channels, self.guidance, cond_first=False)


def additional_conditions(cfg) -> bool:
    """Whether the forward takes resolution and aspect-ratio micro-conditions (by default PixArt-α 1024's)."""
    use = cfg.get("use_additional_conditions")
    return cfg.sample_size == 128 if use is None else use


def example_inputs(cfg, batch: int, h: int, w: int, text: torch.Tensor, frames) -> dict:
    """The forward kwargs of `batch` latents (B, C, h, w) and captions `text` (B, L, C) on the meta device."""
    meta = dict(device="meta")
    return {"hidden_states": torch.empty(batch, cfg.in_channels, h, w, **meta),
            "timestep": torch.zeros(batch, dtype=torch.long, **meta), "encoder_hidden_states": text,
            "added_cond_kwargs": ({"resolution": torch.empty(batch, 2, **meta),
                                   "aspect_ratio": torch.empty(batch, 1, **meta)} if additional_conditions(cfg)
                                  else {"resolution": None, "aspect_ratio": None})}


def random_pipeline(pipeline_class, transformer, vae, scheduler):
    return pipeline_class(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)


def make_task(spec, transformers: list, scheduler, sampler: str, embeddings: dict, steps: int,
              guidance: float) -> PixArtTask:
    """The task of `sampler` (a key of `SAMPLERS`): its scheduler class at the config of `scheduler` (the
    pipeline's)."""
    return PixArtTask(transformers[0], sampler_scheduler(scheduler, sampler), embeddings, steps, guidance)


def read_embeddings(path, cfg, option: str) -> dict:
    return load_prompt_embeddings(path, cfg.caption_channels, option)


def _pixart(sample_size, hub_id, pipeline=None, tokens=120, **config) -> Preset:
    return Preset.square(TRANSFORMER, {"sample_size": sample_size, "caption_channels": 4096, **config},
                         sample_size * 8, SAMPLERS, "dpm-solver++", text_tokens=tokens, hub_id=hub_id, vae=SD_VAE,
                         own_pipeline=pipeline)


PRESETS = {
    "pixart-alpha-256": _pixart(32, "PixArt-alpha/PixArt-XL-2-256x256"),
    "pixart-alpha-512": _pixart(64, "PixArt-alpha/PixArt-XL-2-512x512"),
    "pixart-alpha-1024": _pixart(128, "PixArt-alpha/PixArt-XL-2-1024-MS"),
    "pixart-sigma-2048": _pixart(256, "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", SIGMA_PIPELINE, 300,
                                 use_additional_conditions=False),
    "tiny-pixart": Preset.square(TRANSFORMER, TINY_PIXART, 64, SAMPLERS, "dpm-solver++", text_tokens=8, vae=TINY_VAE),
}

FAMILY = register(Family(
    "pixart", TRANSFORMER, PIPELINE, "AutoencoderKL", PixArtTask, None, encode, example_inputs, presets=PRESETS,
    kind="pixart", make_task=make_task, samplers=SAMPLERS,
    pipeline_scheduler="DPMSolverMultistepScheduler", random_pipeline=random_pipeline, half=torch.float16,
    read_embeddings=read_embeddings, train_guidance=TRAIN_GUIDANCE))
