"""The LTX-2 family: `LTX2VideoTransformer3DModel` in `LTX2Pipeline` (video with audio), its VAE
`AutoencoderKLLTX2Video`.

Block adapter: `LTX2VideoTransformerBlock` (diffusers transformer_ltx2.py), in `transformer_blocks`. Two residual
streams, video x (B, N, D) and audio a (B, A, D_a); eight units, each one residual update of one stream, in execution
order: the video and audio self-attentions `attn1`, `audio_attn1` (gates msa); their cross-attentions to the text
`attn2`, `audio_attn2` (ungated; LTX-2.3's cross_attn_mod: gated, with modulated queries and text); the
audio-to-video `audio_to_video_attn` (video queries, audio keys; gate a2v) and video-to-audio `video_to_audio_attn`
(audio queries, video keys; gate v2a), which both read the streams as they are after the text cross-attentions (the
adapter keeps the video's for the v2a keys); the feed-forwards `ff`, `audio_ff` (gates mlp). A unit's body is its
RMSNorm, modulation and attention/MLP; the modulations (the block's tables plus the transformer's per-step
embeddings) always run. STG's perturbed self-attention and isolated modalities (no a2v / v2a unit runs) go through
as diffusers runs them. Refused with one line: per-token timesteps (the image-conditioned pipelines' temb
(B, N, 6 D)), which the fused residual ops do not take.

Task: the pipeline's packed video tokens (B, F h w, C) (latents of the 32x VAE, 8x in time) followed by its packed
audio tokens (B, A, C_a M) (A latent audio frames of M mel bins) in one latent tensor (B, F h w + A, C): the audio's
width must equal the video's (128 for LTX-2). Both streams take the same sigmas (the pipeline steps the audio with
a copy of its scheduler), so one Euler step steps both. Text: the pipeline's connector outputs (its Gemma-3 features
through `LTX2TextConnectors`), prompt_embeds and audio_prompt_embeds (P, L, caption_channels) and their mask (P, L).
CFG: [uncond, cond] in one batch at the pipeline's guidance_scale for both streams; the pipeline's x0-space delta
equals velocity CFG. Not reproduced (the pipeline's defaults, set them off to compare): a separate
audio_guidance_scale (default 7), spatio-temporal guidance (stg_scale 1, an extra forward), modality-isolation
guidance (modality_scale 3, an extra forward) and guidance_rescale (0.7). Decode: the video alone (the latents
denormalised, the VAE's timestep 0 where it is timestep-conditioned); the audio (audio VAE and vocoder) is not
decoded.
"""

import torch

from .. import adapters
from ..adapters import Adapter
from ..flow import FlowTask
from ..solvers import FlowMatchSchedule
from . import Family, FlowModel, Preset, register

TRANSFORMER, PIPELINE = "LTX2VideoTransformer3DModel", "LTX2Pipeline"
VIDEO_FACTOR, FRAME_FACTOR = 32, 8  # the video VAE's spatial and temporal compression
FPS = 24.0  # the pipeline's default frame_rate


def _modulate(norm, h, shift, scale):
    """norm(h) * (1 + scale) + shift; h (B, L, D), shift and scale (B, 1, D)."""
    return norm(h) * (1 + scale) + shift


def _self_attention(block, norm, attn, h, shift, scale, rotary_emb, mask, perturbation):
    kwargs = {}
    if block.perturbed_attn:  # STG: diffusers passes the block's perturbation to its perturbed processor
        kwargs = {"perturbation_mask": perturbation[0], "all_perturbed": perturbation[1]}
    return attn(hidden_states=_modulate(norm, h, shift, scale), encoder_hidden_states=None,
                query_rotary_emb=rotary_emb, attention_mask=mask, **kwargs)


def video_self_attention(block, x, shift, scale, rotary_emb, mask, perturbation):
    """Unit attn1: self-attention over the modulated norm1 of the video x (B, N, D). Returns (B, N, D)."""
    return _self_attention(block, block.norm1, block.attn1, x, shift, scale, rotary_emb, mask, perturbation)


def audio_self_attention(block, a, shift, scale, rotary_emb, mask, perturbation):
    """Unit audio_attn1: self-attention over the modulated audio_norm1 of the audio a (B, A, D_a). Returns
    (B, A, D_a)."""
    return _self_attention(block, block.audio_norm1, block.audio_attn1, a, shift, scale, rotary_emb, mask,
                           perturbation)


def _text_attention(norm, attn, h, query_mod, text, text_mod, mask):
    """norm(h) (modulated by query_mod (shift, scale), where given) attending to the text (B, L, D) (modulated by
    text_mod, where given)."""
    query = norm(h) if query_mod is None else _modulate(norm, h, *query_mod)
    if text_mod is not None:
        text = text * (1 + text_mod[1]) + text_mod[0]
    return attn(query, encoder_hidden_states=text, query_rotary_emb=None, attention_mask=mask)


def video_text_attention(block, x, query_mod, text, text_mod, mask):
    """Unit attn2: the video x (B, N, D) attending to the text (B, L, D). Returns (B, N, D)."""
    return _text_attention(block.norm2, block.attn2, x, query_mod, text, text_mod, mask)


def audio_text_attention(block, a, query_mod, text, text_mod, mask):
    """Unit audio_attn2: the audio a (B, A, D_a) attending to its text (B, L, D_a). Returns (B, A, D_a)."""
    return _text_attention(block.audio_norm2, block.audio_attn2, a, query_mod, text, text_mod, mask)


def audio_to_video_attention(block, x, a, video_mod, audio_mod, rotary_embs, mask):
    """Unit audio_to_video_attn: the video x (B, N, D) attending to the audio a (B, A, D_a), each its modulated
    norm; video_mod, audio_mod: (scale, shift) each (B, 1, D); rotary_embs: (video's, audio's). Returns (B, N, D)."""
    query = block.audio_to_video_norm(x) * (1 + video_mod[0]) + video_mod[1]
    keys = block.video_to_audio_norm(a) * (1 + audio_mod[0]) + audio_mod[1]
    return block.audio_to_video_attn(query, encoder_hidden_states=keys, query_rotary_emb=rotary_embs[0],
                                     key_rotary_emb=rotary_embs[1], attention_mask=mask)


def video_to_audio_attention(block, a, x, audio_mod, video_mod, rotary_embs, mask):
    """Unit video_to_audio_attn: the audio a (B, A, D_a) attending to the video x (B, N, D) (the video before the
    audio-to-video update), each its modulated norm; rotary_embs: (video's, audio's). Returns (B, A, D_a)."""
    query = block.video_to_audio_norm(a) * (1 + audio_mod[0]) + audio_mod[1]
    keys = block.audio_to_video_norm(x) * (1 + video_mod[0]) + video_mod[1]
    return block.video_to_audio_attn(query, encoder_hidden_states=keys, query_rotary_emb=rotary_embs[1],
                                     key_rotary_emb=rotary_embs[0], attention_mask=mask)


def video_feed_forward(block, x, shift, scale):
    """Unit ff: the MLP of the modulated norm3 of x (B, N, D). Returns (B, N, D)."""
    return block.ff(_modulate(block.norm3, x, shift, scale))


def audio_feed_forward(block, a, shift, scale):
    """Unit audio_ff: the MLP of the modulated audio_norm3 of a (B, A, D_a). Returns (B, A, D_a)."""
    return block.audio_ff(_modulate(block.audio_norm3, a, shift, scale))


def _mod_params(block, table, temb, batch):
    """The rows of the block's modulation `table` (n, D) plus the step's temb (B, 1, n D): n tensors (B, 1, D)
    (diffusers' `get_mod_params`); a ValueError for per-token timesteps (B, N, n D)."""
    if temb.shape[1] != 1:
        raise ValueError(f"temb: expected one timestep per sample (B, 1, n D), got shape {tuple(temb.shape)} "
                         f"(per-token timesteps are not supported by harmonica)")
    return block.get_mod_params(table, temb, batch)


def _prompt_modulation(block, table, temb, batch, like):
    """(shift, scale) of a cross_attn_mod block's text: the table plus the step's prompt embedding, or the table
    alone (use_prompt_adaln_single=False), as diffusers computes them."""
    if temb is not None:
        return _mod_params(block, table, temb, batch)
    return table[None, None].to(device=like.device, dtype=like.dtype).unbind(dim=2)


class LTX2BlockAdapter(Adapter):
    block_class = "LTX2VideoTransformerBlock"
    kinds = ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn", "ff",
             "audio_ff")
    bodies = {"attn1": video_self_attention, "audio_attn1": audio_self_attention, "attn2": video_text_attention,
              "audio_attn2": audio_text_attention, "audio_to_video_attn": audio_to_video_attention,
              "video_to_audio_attn": video_to_audio_attention, "ff": video_feed_forward,
              "audio_ff": audio_feed_forward}

    def forward(self, engine, block, index, position, hidden_states, audio_hidden_states, encoder_hidden_states,
                audio_encoder_hidden_states, temb, temb_audio, temb_ca_scale_shift, temb_ca_audio_scale_shift,
                temb_ca_gate, temb_ca_audio_gate, temb_prompt=None, temb_prompt_audio=None, video_rotary_emb=None,
                audio_rotary_emb=None, ca_video_rotary_emb=None, ca_audio_rotary_emb=None,
                encoder_attention_mask=None, audio_encoder_attention_mask=None, self_attention_mask=None,
                audio_self_attention_mask=None, a2v_cross_attention_mask=None, v2a_cross_attention_mask=None,
                use_a2v_cross_attention=True, use_v2a_cross_attention=True, perturbation_mask=None,
                all_perturbed=None):
        """diffusers' `LTX2VideoTransformerBlock.forward` unit by unit. Returns (video, audio)."""
        batch = hidden_states.size(0)
        video = _mod_params(block, block.scale_shift_table, temb, batch)
        audio = _mod_params(block, block.audio_scale_shift_table, temb_audio, batch)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = video[:6]
        a_shift, a_scale, a_gate, a_shift_mlp, a_scale_mlp, a_gate_mlp = audio[:6]
        query_mod = gate_text = a_query_mod = a_gate_text = text_mod = a_text_mod = None
        if block.video_cross_attn_adaln:
            query_mod, gate_text = video[6:8], video[8]
        if block.audio_cross_attn_adaln:
            a_query_mod, a_gate_text = audio[6:8], audio[8]
        if block.cross_attn_adaln:
            text_mod = _prompt_modulation(block, block.prompt_scale_shift_table, temb_prompt, batch,
                                          hidden_states)
            a_text_mod = _prompt_modulation(block, block.audio_prompt_scale_shift_table, temb_prompt_audio, batch,
                                            audio_hidden_states)
        perturbation = (perturbation_mask, all_perturbed)
        bodies, run = engine.bodies[self.block_class], engine.run_unit
        x, a = hidden_states, audio_hidden_states
        x = run(index["attn1"], lambda: bodies["attn1"](block, x, shift, scale, video_rotary_emb, self_attention_mask,
                                                        perturbation), gate, x)
        a = run(index["audio_attn1"], lambda: bodies["audio_attn1"](block, a, a_shift, a_scale, audio_rotary_emb,
                                                                    audio_self_attention_mask, perturbation), a_gate, a)
        x = run(index["attn2"], lambda: bodies["attn2"](block, x, query_mod, encoder_hidden_states, text_mod,
                                                        encoder_attention_mask), gate_text, x)
        a = run(index["audio_attn2"], lambda: bodies["audio_attn2"](block, a, a_query_mod, audio_encoder_hidden_states,
                                                                    a_text_mod, audio_encoder_attention_mask),
                a_gate_text, a)
        if use_a2v_cross_attention or use_v2a_cross_attention:
            x, a = self._audio_video(engine, block, index, x, a, (temb_ca_scale_shift, temb_ca_audio_scale_shift,
                                                                  temb_ca_gate, temb_ca_audio_gate),
                                     (ca_video_rotary_emb, ca_audio_rotary_emb),
                                     (a2v_cross_attention_mask, v2a_cross_attention_mask),
                                     (use_a2v_cross_attention, use_v2a_cross_attention))
        x = run(index["ff"], lambda: bodies["ff"](block, x, shift_mlp, scale_mlp), gate_mlp, x)
        a = run(index["audio_ff"], lambda: bodies["audio_ff"](block, a, a_shift_mlp, a_scale_mlp), a_gate_mlp, a)
        return x, a

    def _audio_video(self, engine, block, index, x, a, tembs, rotary_embs, masks, use):
        """The a2v and v2a units (each where `use` says), both reading (x, a) as given. Returns (x, a)."""
        batch = x.size(0)

        def mod(table, temb):
            return _mod_params(block, table, temb, batch)

        video_ca, audio_ca, video_gate, audio_gate = tembs
        v_a2v_scale, v_a2v_shift, v_v2a_scale, v_v2a_shift = mod(block.video_a2v_cross_attn_scale_shift_table[:4],
                                                                  video_ca)
        a_a2v_scale, a_a2v_shift, a_v2a_scale, a_v2a_shift = mod(block.audio_a2v_cross_attn_scale_shift_table[:4],
                                                                  audio_ca)
        (a2v_gate,) = mod(block.video_a2v_cross_attn_scale_shift_table[4:], video_gate)
        (v2a_gate,) = mod(block.audio_a2v_cross_attn_scale_shift_table[4:], audio_gate)
        bodies, video_in = engine.bodies[self.block_class], x
        if use[0]:
            x = engine.run_unit(index["audio_to_video_attn"], lambda: bodies["audio_to_video_attn"](
                block, video_in, a, (v_a2v_scale, v_a2v_shift), (a_a2v_scale, a_a2v_shift), rotary_embs, masks[0]),
                a2v_gate, x)
        if use[1]:
            a = engine.run_unit(index["video_to_audio_attn"], lambda: bodies["video_to_audio_attn"](
                block, a, video_in, (a_v2a_scale, a_v2a_shift), (v_v2a_scale, v_v2a_shift), rotary_embs, masks[1]),
                v2a_gate, a)
        return x, a


adapters.register(LTX2BlockAdapter)


def _pipeline():
    import diffusers

    return getattr(diffusers, PIPELINE)


def audio_frames(cfg, frames: int) -> int:
    """The latent audio frames of `frames` video frames at the pipeline's frame rate (its duration times the audio
    latents per second: sampling rate / hop length / the audio VAE's temporal compression), as the pipeline rounds
    them."""
    per_second = cfg.audio_sampling_rate / cfg.audio_hop_length / float(cfg.audio_scale_factor)
    return round(frames / FPS * per_second)


class LTX2Task(FlowTask):
    text_dim = "caption_channels"
    prompt_keys = ("prompt_embeds", "audio_prompt_embeds", "prompt_attention_mask")
    negative_keys = ("negative_prompt_embeds", "negative_audio_prompt_embeds", "negative_prompt_attention_mask")

    def _latent_shape(self, cfg) -> tuple:
        """(F h w + A, C): the video tokens, then the audio tokens."""
        multiple = VIDEO_FACTOR * cfg.patch_size
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height, width: expected multiples of {multiple} for {self.class_name}, got "
                             f"{self.height}x{self.width}")
        if cfg.audio_in_channels != cfg.in_channels or cfg.patch_size_t != 1:
            raise ValueError(f"config: expected audio_in_channels = in_channels ({cfg.in_channels}) and patch_size_t "
                             f"1 (one latent tensor of video and audio tokens), got {cfg.audio_in_channels} and "
                             f"{cfg.patch_size_t}")
        side = multiple
        self.grid = (FAMILY.latent_frames(self.frames), self.height // side, self.width // side)
        self.video_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.audio_frames = audio_frames(cfg, self.frames)
        return (self.video_tokens + self.audio_frames, cfg.in_channels)

    @property
    def image_seq_len(self) -> int:
        return self.video_tokens  # the pipeline's mu: the packed video latents' length

    def _inputs(self, prompts, device):
        frames, height, width = self.grid
        mask, rows = prompts["prompt_attention_mask"], prompts["prompt_embeds"].shape[0]
        return {"encoder_hidden_states": prompts["prompt_embeds"],
                "audio_encoder_hidden_states": prompts["audio_prompt_embeds"], "encoder_attention_mask": mask,
                "audio_encoder_attention_mask": mask, "num_frames": frames, "height": height, "width": width,
                "fps": FPS, "audio_num_frames": self.audio_frames, "use_cross_timestep": True,
                **{key: self._coords(key, device).expand(rows, -1, -1, -1) for key in ("video_coords", "audio_coords")}}

    def _step_inputs(self, model_in, t, inputs):
        """The video tokens and the audio tokens of model_in (R, F h w + A, C); t as the timestep and the sigma."""
        video, audio = model_in[:, :self.video_tokens], model_in[:, self.video_tokens:]
        return {"hidden_states": video, "audio_hidden_states": audio, "timestep": t, "sigma": t}

    def _coords(self, key, device):
        """The pipeline's video or audio position coordinates (1, 3, F h w, 2) or (1, 1, A, 2) on `device`, made
        once: the forward builds them from host data otherwise, which a CUDA graph capture refuses."""
        if (key, device) not in self._device_tensors:
            rope = self.transformer.rope if key == "video_coords" else self.transformer.audio_rope
            self._device_tensors[(key, device)] = (
                rope.prepare_video_coords(1, *self.grid, device, fps=FPS) if key == "video_coords"
                else rope.prepare_audio_coords(1, self.audio_frames, device))
        return self._device_tensors[(key, device)]

    def output(self, result):
        """The video and audio outputs (B, N, C), (B, A, C) as one tensor (B, N + A, C), as the latents."""
        return torch.cat([result[0], result[1]], dim=1)

    def unpack(self, latents):
        """The video tokens (B, F h w, C) of latents -> the VAE's latents (B, C, F, h, w), the pipeline's unpacking."""
        return _pipeline()._unpack_latents(latents[:, :self.video_tokens], *self.grid)

    def decode(self, vae, latents):
        """The pipeline's decode of the video (B, 3, frames, H, W) (its default decode_timestep 0); no audio."""
        latents = self._vae_latents(vae, self.unpack(latents).to(vae.device, vae.dtype))
        timestep = None
        if vae.config.timestep_conditioning:
            timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype)
        return vae.decode(latents, timestep, return_dict=False)[0]

    def _vae_latents(self, vae, latents):
        return _pipeline()._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)


def encode(pipe, prompts, negative, extra):
    """The pipeline's `encode_prompt` (Gemma-3 features of the prompts and the negative prompt, default "") through
    its `connectors`, as its __call__ runs them: prompt_embeds and audio_prompt_embeds (P, L, D) with
    prompt_attention_mask (P, L), and the negative triple (1, ...)."""
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
        prompts, negative_prompt=negative, do_classifier_free_guidance=True, **extra)
    side = getattr(pipe.tokenizer, "padding_side", "left") if pipe.tokenizer is not None else "left"
    video, audio, mask = pipe.connectors(torch.cat([negative_embeds[:1], embeds]),
                                         torch.cat([negative_mask[:1], mask]), padding_side=side)
    return {"prompt_embeds": video[1:], "audio_prompt_embeds": audio[1:], "prompt_attention_mask": mask[1:],
            "negative_prompt_embeds": video[:1], "negative_audio_prompt_embeds": audio[:1],
            "negative_prompt_attention_mask": mask[:1]}


def forward_size(cfg, sizes):
    """(height, width, frames) pixels of a forward from its latent grid arguments num_frames, height, width (the
    audio counted as the pipeline's at 24 fps)."""
    missing = sorted({"num_frames", "height", "width"} - set(sizes))
    if missing:
        raise ValueError(f"forward: expected the int arguments num_frames, height, width of {TRANSFORMER}, "
                         f"missing {missing}")
    side = VIDEO_FACTOR * cfg.patch_size
    return sizes["height"] * side, sizes["width"] * side, FAMILY.video_frames(sizes["num_frames"])


def example_inputs(cfg, batch, h, w, text, frames):
    """One forward's meta inputs: the video tokens of `frames` frames at h x w (latent pixels of the 32x VAE), the
    audio tokens of as long, the text (B, L, D) for both streams."""
    hs, ws, latent_frames = h // LTX2Task.patch(cfg), w // LTX2Task.patch(cfg), FAMILY.latent_frames(frames)
    audio = audio_frames(cfg, frames)
    return {"hidden_states": torch.empty(batch, latent_frames * hs * ws, cfg.in_channels, device="meta"),
            "audio_hidden_states": torch.empty(batch, audio, cfg.audio_in_channels, device="meta"),
            "encoder_hidden_states": text, "audio_encoder_hidden_states": text,
            "timestep": torch.zeros(batch, device="meta"), "num_frames": latent_frames, "height": hs, "width": ws,
            "fps": FPS, "audio_num_frames": audio}


# the pipeline always passes sigmas linspace(1, 1/T, T) (numpy) and mu, from the packed video tokens with its
# `calculate_shift` fallbacks (base_image_seq_len 1024, max_image_seq_len 4096, base_shift 0.95, max_shift 2.05),
# written here as the scheduler's config with use_dynamic_shifting (mu used): Lightricks/LTX-2's scheduler_config.json
# is not readable here (no network), so a shift or shift_terminal of its own is not reproduced
SCHEDULE = FlowMatchSchedule("ltx-2", {"num_train_timesteps": 1000, "use_dynamic_shifting": True,
                                       "base_image_seq_len": 1024, "max_image_seq_len": 4096, "base_shift": 0.95,
                                       "max_shift": 2.05}, custom_sigmas=True, mu="always")
# LTX-2.0's transformer: the "2.0" config of diffusers' scripts/convert_ltx2_to_diffusers.py, transcribed (it equals
# the class's defaults); the pipeline's defaults: 512 x 768, 121 frames, max_sequence_length 1024 text tokens
MODELS = {"ltx-2-512x768": FlowModel(TRANSFORMER, {
    "in_channels": 128, "out_channels": 128, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 32,
    "attention_head_dim": 128, "cross_attention_dim": 4096, "vae_scale_factors": (8, 32, 32), "pos_embed_max_pos": 20,
    "base_height": 2048, "base_width": 2048, "audio_in_channels": 128, "audio_out_channels": 128,
    "audio_patch_size": 1, "audio_patch_size_t": 1, "audio_num_attention_heads": 32, "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048, "audio_scale_factor": 4, "audio_pos_embed_max_pos": 20,
    "audio_sampling_rate": 16000, "audio_hop_length": 160, "num_layers": 48, "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": 3840,
    "attention_bias": True, "attention_out_bias": True, "rope_theta": 10000.0, "causal_offset": 1},
    512, 768, 1024, "Lightricks/LTX-2", frames=121)}
# the "test" config of the conversion script, with 8 channels (video and audio alike)
TINY = {"in_channels": 8, "out_channels": 8, "num_attention_heads": 2, "attention_head_dim": 8,
        "cross_attention_dim": 16, "audio_in_channels": 8, "audio_out_channels": 8, "audio_num_attention_heads": 2,
        "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8, "num_layers": 2, "caption_channels": 16}
# a random 32x (8x in time) video VAE of 8 latent channels; the compressions written out, as the class's default
# (patch_size 2 ** scalings) counts its spatial-only and temporal-only downsamples in both (64x, 16x)
TINY_VAE = {"latent_channels": 8, "block_out_channels": (8, 16, 32, 64), "decoder_block_out_channels": (16, 32, 64),
            "layers_per_block": (1, 1, 1, 1, 1), "decoder_layers_per_block": (1, 1, 1, 1),
            "spatial_compression_ratio": VIDEO_FACTOR, "temporal_compression_ratio": FRAME_FACTOR}
# (steps, guidance): the pipeline's __call__ defaults (guidance_scale 3); tiny-ltx2: 9 frames, 2 latent frames
PRESETS = {"ltx-2": Preset.of(MODELS["ltx-2-512x768"], 30, 3.0),
           "tiny-ltx2": Preset(TRANSFORMER, TINY, 64, 64, 8, 30, 3.0, frames=9, vae=TINY_VAE)}

FAMILY = register(Family("ltx-2", TRANSFORMER, PIPELINE, "AutoencoderKLLTX2Video", LTX2Task, SCHEDULE, encode,
                         example_inputs, MODELS, PRESETS, frame_factor=FRAME_FACTOR, vae_factor=VIDEO_FACTOR,
                         forward_size=forward_size,
                         cache_dit_skip="cache-dit 1.5.3's LTX-2 adapter swaps the forward for its copy of an "
                                        "older diffusers' one, without this diffusers' `sigma` and "
                                        "`use_cross_timestep` arguments",
                         first_block_cache="diffusers' cache hooks have no registration of its two-stream block "
                                           "LTX2VideoTransformerBlock"))
