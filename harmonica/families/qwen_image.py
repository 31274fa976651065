"""The Qwen-Image family: `QwenImageTransformer2DModel` in `QwenImagePipeline`, its VAE `AutoencoderKLQwenImage`.

Block adapter: `QwenImageTransformerBlock` (diffusers transformer_qwenimage.py). Image stream x (B, N, D) and
text stream c (B, M, D). Units, in execution order: the joint attention `attn` (one unit feeding both streams,
each with its adaLN gate; its slot holds both outputs), the image MLP `img_mlp` and the text MLP `txt_mlp`. The
modulations `img_mod`, `txt_mod` (temb -> shift, scale, gate for each unit) always run; a unit's body is its
LayerNorm, modulation and attention/MLP. Blocks built with `zero_cond_t` (per-token image modulations,
`modulate_index`) are not supported: their gates are (B, N, D), which the fused residual ops do not take.

The transformer's forward (diffusers') derives per-prompt text lengths from the text mask with a fallback it
copies from the host (`torch.as_tensor(length, device=...)`: a synchronous host-to-device copy, which a CUDA
graph capture refuses); while an engine is enabled on a Qwen-Image transformer (from `setup` to `teardown`),
the transformer's module holds a `compute_text_seq_len_from_mask` that makes it on the device instead, with the
same results; the last engine's `teardown` puts diffusers' back.

Task: packed latents (B, h/2 w/2, 4C), embeddings with their mask, img_shapes, timestep t / 1000; the pipeline's
true CFG rescales the guided velocity to the conditional one's norm per token, which the task applies before a
guidance-free `solver_step`. Prompts: prompt_embeds, prompt_embeds_mask (P, L) and the negative pair (the
pipeline trims a batch to its longest prompt and returns no mask when every token counts: the mask is then all
ones); the task pads both to one length.
"""

import sys

import torch

from .. import adapters
from ..adapters import Adapter
from ..flow import VAE_FACTOR, FlowTask, as_4d, denormalized
from ..solvers import FlowMatchSchedule
from . import Family, FlowModel, Preset, register
from .flux import _clip_fp16, _modulate
from .wan import TINY_VAE as TINY_WAN_VAE

TRANSFORMER, PIPELINE = "QwenImageTransformer2DModel", "QwenImagePipeline"


def joint_attention(block, x, c, image_mod, text_mod, text_mask, image_rotary_emb, kwargs):
    """Unit attn: attention over the modulated image x (B, N, D) and text c (B, M, D) tokens together.
    image_mod, text_mod: (shift, scale) each (B, D); text_mask: (B, M) bool or None (no padding).
    Returns ((B, N, D), (B, M, D))."""
    return block.attn(hidden_states=_modulate(block.img_norm1, x, *image_mod),
                      encoder_hidden_states=_modulate(block.txt_norm1, c, *text_mod),
                      encoder_hidden_states_mask=text_mask, image_rotary_emb=image_rotary_emb, **kwargs)


def image_mlp(block, x, shift, scale):
    """Unit img_mlp: the MLP of the modulated LayerNorm of x (B, N, D); shift, scale (B, D). Returns (B, N, D)."""
    return block.img_mlp(_modulate(block.img_norm2, x, shift, scale))


def text_mlp(block, c, shift, scale):
    """Unit txt_mlp: the text MLP of c (B, M, D); shift, scale (B, D). Returns (B, M, D)."""
    return block.txt_mlp(_modulate(block.txt_norm2, c, shift, scale))


REPLACED = {}  # module name -> [diffusers' compute_text_seq_len_from_mask there, engines enabled]


def text_lengths(encoder_hidden_states, encoder_hidden_states_mask):
    """(M, per-prompt lengths (B,) long, mask (B, M) bool) of text tokens (B, M, D) and their mask (B, M) or
    None: a prompt's length is its last unmasked token's position + 1, M for a prompt with none. As diffusers'
    `compute_text_seq_len_from_mask`, without a host-to-device copy (CUDA-graph safe)."""
    batch, length = encoder_hidden_states.shape[:2]
    mask = encoder_hidden_states_mask
    if mask is None:
        return length, None, None
    if tuple(mask.shape[:2]) != (batch, length):
        raise ValueError(f"encoder_hidden_states_mask: expected shape ({batch}, {length}), got {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    last = (mask * torch.arange(1, length + 1, device=mask.device)).amax(dim=1)
    return length, torch.where(last > 0, last, torch.full_like(last, length)), mask


def _modulations(mod, temb):
    """The two units' (shift, scale, gate) of one stream, each (B, D), from temb (B, D)."""
    first, second = mod(temb).chunk(2, dim=-1)
    return first.chunk(3, dim=-1), second.chunk(3, dim=-1)


class QwenImageBlockAdapter(Adapter):
    block_class = "QwenImageTransformerBlock"
    kinds = ("attn", "img_mlp", "txt_mlp")
    bodies = {"attn": joint_attention, "img_mlp": image_mlp, "txt_mlp": text_mlp}

    def setup(self, engine, blocks: list) -> None:
        """Put `text_lengths` in the transformer's diffusers module, shared by the engines enabled there."""
        module = sys.modules[type(engine.transformer).__module__]
        self.patched = None  # the module whose text-length function this engine's setup replaced
        if hasattr(module, "compute_text_seq_len_from_mask"):  # the forward looks it up there at each call
            replaced = REPLACED.setdefault(module.__name__, [module.compute_text_seq_len_from_mask, 0])
            replaced[1] += 1
            module.compute_text_seq_len_from_mask = text_lengths
            self.patched = module

    def teardown(self, engine, blocks: list) -> None:
        """diffusers' text-length function back once the last engine that replaced it is removed."""
        module, self.patched = self.patched, None
        if module is not None:
            replaced = REPLACED[module.__name__]
            replaced[1] -= 1
            if replaced[1] == 0:
                module.compute_text_seq_len_from_mask = REPLACED.pop(module.__name__)[0]

    @classmethod
    def check(cls, name: str, block) -> None:
        if block.zero_cond_t:
            raise ValueError(f"{name}: expected a Qwen-Image block without zero_cond_t (per-token image "
                             f"modulations), got zero_cond_t=True")

    def forward(self, engine, block, index, position, hidden_states, encoder_hidden_states,
                encoder_hidden_states_mask, temb, image_rotary_emb=None, joint_attention_kwargs=None,
                modulate_index=None):
        """diffusers' `QwenImageTransformerBlock.forward` unit by unit. Returns (text, image) as diffusers does."""
        if modulate_index is not None:
            raise ValueError("modulate_index: expected None (per-token modulations are not supported), got a tensor")
        kwargs = joint_attention_kwargs or {}
        x, c = hidden_states, encoder_hidden_states
        (shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp) = _modulations(block.img_mod, temb)
        (c_shift, c_scale, c_gate), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = _modulations(block.txt_mod, temb)
        bodies = engine.bodies[self.block_class]
        x, c = engine.run_unit(index["attn"], lambda: bodies["attn"](block, x, c, (shift, scale), (c_shift, c_scale),
                                                                     encoder_hidden_states_mask, image_rotary_emb,
                                                                     kwargs), (gate, c_gate), (x, c))
        x = engine.run_unit(index["img_mlp"], lambda: bodies["img_mlp"](block, x, shift_mlp, scale_mlp),
                            gate_mlp, x)
        c = engine.run_unit(index["txt_mlp"], lambda: bodies["txt_mlp"](block, c, c_shift_mlp, c_scale_mlp),
                            c_gate_mlp, c)
        return _clip_fp16(c), _clip_fp16(x)


adapters.register(QwenImageBlockAdapter)


class QwenImageTask(FlowTask):
    packed = True
    prompt_keys = ("prompt_embeds", "prompt_embeds_mask")
    negative_keys = ("negative_prompt_embeds", "negative_prompt_embeds_mask")

    def __init__(self, transformer, embeddings, *args, **kwargs):
        super().__init__(transformer, pad_prompts(embeddings), *args, **kwargs)
        self.solver_guidance = {}  # the norm-rescaled true CFG is applied in `velocity`

    def _timestep_input(self, t):
        return t.to(self.transformer.dtype) / 1000

    def _inputs(self, prompts, device):
        side = (self.height // VAE_FACTOR // 2, self.width // VAE_FACTOR // 2)
        embeds = prompts["prompt_embeds"]
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": prompts["prompt_embeds_mask"],
                "img_shapes": [[(1, *side)]] * embeds.shape[0]}

    def velocity(self, out):
        """The pipeline's true CFG: v = v_u + s (v_c - v_u), rescaled to |v_c| over channels per token."""
        if not self.guided:
            return as_4d(out)
        uncond, cond = out.chunk(2)
        v = uncond + self.guidance * (cond - uncond)
        return as_4d(v * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(v, dim=-1, keepdim=True)))

    def unpack(self, latents):
        import diffusers

        return getattr(diffusers, PIPELINE)._unpack_latents(latents, self.height, self.width, VAE_FACTOR)

    def _vae_latents(self, vae, latents):
        return denormalized(vae, latents)

    def decode(self, vae, latents):
        return super().decode(vae, latents)[:, :, 0]  # its VAE decodes one frame


def pad_prompts(embeddings: dict) -> dict:
    """Prompt and negative embeddings padded to one length (zeros, mask 0), so that both halves of a CFG
    batch fit one tensor (the pipeline's encode_prompt trims each batch to its longest prompt)."""
    pairs = [("prompt_embeds", "prompt_embeds_mask"), ("negative_prompt_embeds", "negative_prompt_embeds_mask")]
    if not all(key in embeddings for pair in pairs for key in pair):
        return embeddings
    length = max(embeddings[key].shape[1] for key, _ in pairs)
    padded = dict(embeddings)
    for key, mask in pairs:
        extra = length - embeddings[key].shape[1]
        padded[key] = torch.nn.functional.pad(embeddings[key], (0, 0, 0, extra))
        padded[mask] = torch.nn.functional.pad(embeddings[mask], (0, extra))
    return padded


def encode(pipe, prompts, negative, extra):
    """The pipeline's `encode_prompt` of the prompts and the negative prompt (default ""), each with its mask."""
    def encode_texts(texts):
        embeds, mask = pipe.encode_prompt(texts, **extra)
        if mask is None:  # every token of every prompt counts
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    embeds, mask = encode_texts(prompts)
    negative_embeds, negative_mask = encode_texts(["" if negative is None else negative])
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "negative_prompt_embeds": negative_embeds,
            "negative_prompt_embeds_mask": negative_mask}


def example_inputs(cfg, batch, h, w, text, frames):
    """One forward's meta inputs: packed latents (B, h/2 w/2, C) of latent h x w, text (B, L, D)."""
    return {"hidden_states": torch.empty(batch, (h // 2) * (w // 2), cfg.in_channels, device="meta"),
            "encoder_hidden_states": text, "timestep": torch.zeros(batch, device="meta"),
            "img_shapes": [(1, h // 2, w // 2)] * batch}


# Qwen/Qwen-Image's scheduler_config.json, transcribed; the pipeline passes custom sigmas and always mu
SCHEDULE = FlowMatchSchedule("qwen-image", {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
    "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "use_dynamic_shifting": True,
    "time_shift_type": "exponential"}, custom_sigmas=True, mu="always", max_shift=1.15)
# transformer/config.json of the hub repository, transcribed (keys equal to diffusers' defaults left out);
# the pipeline does not pad: 512 is its max_sequence_length, the most a prompt takes
MODELS = {"qwen-image-1328": FlowModel(TRANSFORMER, {
    "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "guidance_embeds": False, "in_channels": 64,
    "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16,
    "patch_size": 2}, 1328, 1328, 512, "Qwen/Qwen-Image")}
TINY = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (8, 4, 4)}
# (steps, guidance): the pipeline's __call__ defaults (true_cfg_scale 4); its VAE takes Wan's VAE's arguments
PRESETS = {"qwen-image": Preset.of(MODELS["qwen-image-1328"], 50, 4.0),
           "tiny-qwen-image": Preset(TRANSFORMER, TINY, 64, 64, 8, 50, 4.0, vae=TINY_WAN_VAE)}

FAMILY = register(Family("qwen-image", TRANSFORMER, PIPELINE, "AutoencoderKLQwenImage", QwenImageTask, SCHEDULE,
                         encode, example_inputs, MODELS, PRESETS))
