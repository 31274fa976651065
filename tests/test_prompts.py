"""Prompt embeddings from a pipeline's own text encoders (harmonica/prompts.py, `harmonica embed`), on tiny random
text encoders with character-level tokenizers (no download): the written file drives our loop (flow models) or
the pipeline (PixArt) to what the pipeline computes from the prompt strings themselves."""

import diffusers
import pytest
import torch
import transformers
from _helpers import rounding_bound
from safetensors.torch import load_file
from test_flow import ltx2_call, ltx2_pipeline, pipeline_noise

from harmonica import cli
from harmonica.families.pixart import load_prompt_embeddings
from harmonica.flow import flow_sample, flow_task, load_flow_embeddings
from harmonica.models import FLOW_PRESETS, PRESETS, build_transformer
from harmonica.prompts import encode_prompts, save_prompt_embeddings

PROMPTS = ["a red cube", "two cats on a sofa, watercolor", "x"]
NEGATIVE = "blurry"
TOKENS = 16  # max_sequence_length: short, for speed (Qwen-Image, FLUX.2: their default, past their templates)
STEPS = 2
# the bank encodes its prompts in one batch, a pipeline one prompt alone, `harmonica embed` with encoders read from
# files (weights 16- not 64-byte aligned): other matmul kernels (a 1-row projection is a matrix-vector product),
# one rounding per term of the encoders' longest reduction (T5's d_ff, 2 x 32)
ENCODER_TERMS = 2 * 32
FLOW = ("tiny-flux", "tiny-sd3", "tiny-sd35", "tiny-wan", "tiny-qwen-image", "tiny-flux2", "tiny-z-image", "tiny-ltx2")
# a Qwen-style chat template (Z-Image's pipeline applies its tokenizer's to each prompt)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_characters() -> list:
    """The 256 characters byte-level BPE writes bytes as (printable ones as themselves, the rest shifted)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(shifted))]


def clip(hidden: int, projection: bool = False):
    """A CLIP text encoder (with projection: SD3's) and a character-level CLIPTokenizer."""
    chars = byte_characters()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(chars)},
             **{c + "</w>": 2 + len(chars) + i for i, c in enumerate(chars)}}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                         projection_dim=hidden // 2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model_class = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return model_class(config).eval(), tokenizer


def t5(width: int, model_class=transformers.T5EncoderModel):
    """A T5 (or UMT5) encoder and a character-level T5Tokenizer."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in byte_characters()]
    tokenizer = transformers.T5Tokenizer(vocab=pieces, extra_ids=0)
    config_class = transformers.UMT5Config if model_class is transformers.UMT5EncoderModel else transformers.T5Config
    config = config_class(vocab_size=len(pieces), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=2,
                          relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return model_class(config).eval(), tokenizer


def character_tokenizer():
    """A character-level Qwen2Tokenizer (byte-level BPE without merges), <|endoftext|> its padding."""
    vocab = {"<|endoftext|>": 0, **{c: 1 + i for i, c in enumerate(byte_characters())}}
    return transformers.Qwen2Tokenizer(vocab=vocab, merges=[])


def qwen(width: int):
    """A Qwen2.5-VL (text part used) and a character-level Qwen2Tokenizer."""
    tokenizer = character_tokenizer()
    config = transformers.Qwen2_5_VLConfig(
        text_config={"hidden_size": width, "intermediate_size": width, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "bos_token_id": 0, "eos_token_id": 0,
                     "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": width}, vocab_size=len(tokenizer))
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer


def mistral(width: int):
    """A Mistral 3 (its language model used: the pipeline stacks its layers 10, 20 and 30, width / 3 each) and a
    character-level Qwen2Tokenizer with a chat template of the pipeline's system and user turns."""
    tokenizer = character_tokenizer()
    tokenizer.chat_template = ("{% for message in messages %}{{ message['role'] }}: "
                               "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}\n{% endfor %}")
    config = transformers.Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": width // 3, "intermediate_size": width,
                     "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "head_dim": width // 6, "vocab_size": len(tokenizer)},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 8})
    return transformers.Mistral3ForConditionalGeneration(config).eval(), tokenizer


def qwen3(width: int):
    """A Qwen3 (Z-Image's text encoder) and a character-level Qwen2Tokenizer with a chat template."""
    tokenizer = character_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = transformers.Qwen3Config(hidden_size=width, intermediate_size=width, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                      vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.Qwen3Model(config).eval(), tokenizer


def gemma3(width: int):
    """A Gemma-3 text model (LTX-2's text encoder; its 3 hidden states stacked: width x 3 features a token) and a
    character-level Qwen2Tokenizer."""
    tokenizer = character_tokenizer()
    config = transformers.Gemma3TextConfig(hidden_size=width, intermediate_size=width, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.Gemma3TextModel(config).eval(), tokenizer


def ltx2_connectors(width: int):
    """LTX-2's text connectors on `gemma3`'s features: one layer and 4 registers a stream, width wide."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    return LTX2TextConnectors(
        caption_channels=width, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=width // 2, video_connector_num_layers=1,
        video_connector_num_learnable_registers=4, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=width // 2, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=4).eval()


def pipeline(name: str, transformer=None):
    """The preset's pipeline with tiny text encoders (seeded), `transformer` (may be None) and no VAE."""
    torch.manual_seed(0)
    if name == "tiny-pixart":
        encoder, tokenizer = t5(PRESETS[name].config["caption_channels"])
        return diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None,
                                             transformer=transformer, scheduler=diffusers.DPMSolverMultistepScheduler())
    spec = FLOW_PRESETS[name]
    scheduler = spec.family.scheduler.scheduler()
    parts = {"transformer": transformer, "scheduler": scheduler, "vae": None}
    if spec.pipeline == "FluxPipeline":
        (clip_l, clip_tokenizer), (t5_xxl, t5_tokenizer) = clip(spec.config["pooled_projection_dim"]), t5(32)
        return diffusers.FluxPipeline(text_encoder=clip_l, tokenizer=clip_tokenizer, text_encoder_2=t5_xxl,
                                      tokenizer_2=t5_tokenizer, **parts)
    if spec.pipeline == "StableDiffusion3Pipeline":  # pooled: 8 + 8 projected; embeddings: 16 + 16 CLIP, T5 32
        (clip_l, tok_l), (clip_g, tok_g), (t5_xxl, tok_t5) = clip(16, True), clip(16, True), t5(32)
        return diffusers.StableDiffusion3Pipeline(text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g,
                                                  tokenizer_2=tok_g, text_encoder_3=t5_xxl, tokenizer_3=tok_t5,
                                                  **parts)
    if spec.pipeline == "WanPipeline":
        encoder, tokenizer = t5(spec.config["text_dim"], transformers.UMT5EncoderModel)
        return diffusers.WanPipeline(text_encoder=encoder, tokenizer=tokenizer, **parts)
    if spec.pipeline == "Flux2Pipeline":
        encoder, tokenizer = mistral(spec.config["joint_attention_dim"])
        return diffusers.Flux2Pipeline(text_encoder=encoder, tokenizer=tokenizer, **parts)
    if spec.pipeline == "ZImagePipeline":
        encoder, tokenizer = qwen3(spec.config["cap_feat_dim"])
        return diffusers.ZImagePipeline(text_encoder=encoder, tokenizer=tokenizer, **parts)
    if spec.pipeline == "LTX2Pipeline":
        encoder, tokenizer = gemma3(spec.config["caption_channels"])
        return ltx2_pipeline(name, transformer, scheduler=scheduler, text_encoder=encoder, tokenizer=tokenizer,
                             connectors=ltx2_connectors(spec.config["caption_channels"]))
    encoder, tokenizer = qwen(spec.config["joint_attention_dim"])
    return diffusers.QwenImagePipeline(text_encoder=encoder, tokenizer=tokenizer, **parts)


def tokens(name: str) -> int | None:
    """max_sequence_length: TOKENS, but the pipeline's default for the chat-templated prompts (Qwen-Image, FLUX.2,
    Z-Image)."""
    return None if FLOW_PRESETS[name].pipeline in ("QwenImagePipeline", "Flux2Pipeline", "ZImagePipeline") else TOKENS


def pipeline_from_strings(name, pipe, noise, prompt: str):
    """The pipeline's final latents from `noise` for the prompt string itself (and NEGATIVE under CFG)."""
    spec = FLOW_PRESETS[name]
    common = dict(latents=pipeline_noise(name, noise), num_inference_steps=STEPS, height=spec.height,
                  width=spec.width, output_type="latent",
                  **({"max_sequence_length": tokens(name)} if tokens(name) else {}))
    if not spec.family.task.cfg:  # FLUX.1, FLUX.2: the distilled guidance, no negative prompt
        return pipe(prompt=prompt, guidance_scale=spec.guidance, **common).images
    if spec.pipeline == "WanPipeline":
        return pipe(prompt=prompt, negative_prompt=NEGATIVE, guidance_scale=spec.guidance, num_frames=spec.frames,
                    **common).frames
    if spec.pipeline == "QwenImagePipeline":
        return pipe(prompt=prompt, negative_prompt=NEGATIVE, true_cfg_scale=spec.guidance, **common).images
    if spec.pipeline == "LTX2Pipeline":
        return ltx2_call(pipe, name, noise, STEPS, prompt=prompt, negative_prompt=NEGATIVE, max_sequence_length=TOKENS)
    return pipe(prompt=prompt, negative_prompt=NEGATIVE, guidance_scale=spec.guidance, **common).images


@pytest.mark.parametrize("name", FLOW)
def test_saved_embeddings_sample_what_the_pipeline_samples_from_the_strings(name, tmp_path):
    """strings -> `save_prompt_embeddings` -> file -> `load_flow_embeddings` -> our loop, against the pipeline run on
    the strings: equal within the loop's and the encoders' rounding for a middle prompt of the bank."""
    spec = FLOW_PRESETS[name]
    transformer = build_transformer(name)
    pipe = pipeline(name, transformer)
    negative = NEGATIVE if spec.family.task.cfg else None
    written = save_prompt_embeddings(pipe, PROMPTS, tmp_path / "prompts.safetensors", negative, tokens(name))
    bank = load_flow_embeddings(tmp_path / "prompts.safetensors")
    assert bank.keys() == written.keys() and all(torch.equal(bank[k], written[k]) for k in bank)
    assert all(value.shape[0] == (1 if key.startswith("negative") else len(PROMPTS)) for key, value in bank.items())
    assert not torch.equal(bank["prompt_embeds"][0], bank["prompt_embeds"][1])  # the tokenizer tells prompts apart
    task = flow_task(transformer, bank, STEPS, spec.guidance, **spec.size)
    noise = torch.randn(1, *task.latent_shape, generator=torch.Generator().manual_seed(1))
    reference = pipeline_from_strings(name, pipe, noise, PROMPTS[1])
    ours = flow_sample(task, torch.tensor([1]), latents=noise)
    tolerance = rounding_bound(reference, 8 * STEPS + ENCODER_TERMS)  # test_flow's loop bound, and the encoders'
    error = (ours - reference).abs().max().item()
    assert error <= tolerance, f"{error:.3g} > {tolerance:.3g}"
    other = flow_sample(task, torch.tensor([0]), latents=noise)
    assert (other - reference).abs().max().item() > 100 * tolerance  # another prompt is far: the check can fail


def test_pixart_embeddings_drive_the_pipeline_as_the_strings_do(tmp_path):
    """PixArt's file (the keys `load_prompt_embeddings` reads) given to the pipeline as embeddings equals the
    pipeline on the prompt string and the negative prompt, up to the encoders' rounding."""
    transformer = build_transformer("tiny-pixart")
    pipe = pipeline("tiny-pixart", transformer)
    save_prompt_embeddings(pipe, PROMPTS, tmp_path / "prompts.safetensors", NEGATIVE, TOKENS)
    bank = load_prompt_embeddings(tmp_path / "prompts.safetensors")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(latents=noise, num_inference_steps=STEPS, height=64, width=64, output_type="latent",
                  max_sequence_length=TOKENS, use_resolution_binning=False)
    reference = pipe(prompt=PROMPTS[1], negative_prompt=NEGATIVE, clean_caption=False, **common).images
    ours = pipe(prompt_embeds=bank["prompt_embeds"][1:2], prompt_attention_mask=bank["prompt_attention_mask"][1:2],
                negative_prompt=None, negative_prompt_embeds=bank["negative_embeds"],
                negative_prompt_attention_mask=bank["negative_attention_mask"], **common).images
    tolerance = rounding_bound(reference, ENCODER_TERMS)  # one loop, the pipeline's: the encoders' rounding alone
    assert (ours - reference).abs().max().item() <= tolerance
    swapped = pipe(prompt_embeds=bank["negative_embeds"], prompt_attention_mask=bank["negative_attention_mask"],
                   negative_prompt=None, negative_prompt_embeds=bank["prompt_embeds"][1:2],
                   negative_prompt_attention_mask=bank["prompt_attention_mask"][1:2], **common).images
    assert (swapped - reference).abs().max().item() > 100 * tolerance


def test_sample_with_a_prompt_runs_the_text_encoders_of_the_weights(tmp_path, capsys):
    """`harmonica sample --weights DIR --prompt P` encodes P with the folder's text encoders: the latents of the
    file `harmonica embed` writes for P, up to the encoders' rounding; another prompt gives other latents."""
    pipe = pipeline("tiny-pixart", build_transformer("tiny-pixart"))
    pipe.save_pretrained(tmp_path / "pipe")
    save_prompt_embeddings(pipe, PROMPTS[:1], tmp_path / "e.safetensors")
    base = ["sample", "--model", "tiny-pixart", "--weights", str(tmp_path / "pipe"), "--steps", str(STEPS)]
    for out, source in (("prompt", ["--prompt", PROMPTS[0]]), ("file", ["--prompt-embeddings",
                                                                         str(tmp_path / "e.safetensors")]),
                        ("other", ["--prompt", PROMPTS[1]])):
        assert cli.main(base + source + ["--out", str(tmp_path / f"{out}.safetensors")]) == 0, capsys.readouterr().err
    prompt, file, other = (load_file(str(tmp_path / f"{name}.safetensors"))["latents"]
                           for name in ("prompt", "file", "other"))
    tolerance = rounding_bound(file, 8 * STEPS + ENCODER_TERMS)
    assert (prompt - file).abs().max().item() <= tolerance
    assert (other - file).abs().max().item() > 100 * tolerance


def test_the_text_encoders_of_two_experts_load_neither_expert(tmp_path):
    """Wan 2.2 A14B's folder holds `transformer` and `transformer_2`: `load_text_encoders` loads neither."""
    from harmonica.models import load_text_encoders

    pipe = pipeline("tiny-wan2.2", build_transformer("tiny-wan2.2"))
    pipe.register_modules(transformer_2=build_transformer("tiny-wan2.2", seed=1))
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "transformer_2").is_dir()
    encoders = load_text_encoders("tiny-wan2.2", weights=str(tmp_path / "pipe"))
    assert encoders.transformer is None and encoders.transformer_2 is None and encoders.text_encoder is not None


def test_bad_input_is_a_clear_error():
    pipe = pipeline("tiny-flux")
    with pytest.raises(ValueError, match=r"negative_prompt: expected none for FluxPipeline .*got 'blurry'"):
        encode_prompts(pipe, PROMPTS, NEGATIVE)
    with pytest.raises(ValueError, match=r"prompts: expected a non-empty list of strings, got 'a red cube'"):
        encode_prompts(pipe, PROMPTS[0])
    with pytest.raises(ValueError, match=r"pipe: expected one of \[.*'ZImagePipeline'\], got DiTPipeline"):
        encode_prompts(diffusers.DiTPipeline(transformer=None, vae=None, scheduler=diffusers.DDIMScheduler()), PROMPTS)


def test_embed_command_writes_what_encode_prompts_returns(tmp_path, capsys):
    """`harmonica embed` on a saved pipeline folder (text encoders only) writes the pipeline's embeddings; bad
    arguments are one line before any loading."""
    pipe = pipeline("tiny-sd3")
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    argv = ["embed", "--model", "tiny-sd3", "--weights", str(tmp_path / "pipe"), "--prompts",
            str(tmp_path / "prompts.txt"), "--negative-prompt", NEGATIVE, "--max-sequence-length", str(TOKENS),
            "--out", str(tmp_path / "e.safetensors")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "3 prompts" in capsys.readouterr().out
    written, expected = load_file(str(tmp_path / "e.safetensors")), encode_prompts(pipe, PROMPTS, NEGATIVE, TOKENS)
    assert written.keys() == expected.keys()
    for key, value in expected.items():  # the masks exactly, the embeddings within the encoders' rounding
        atol = rounding_bound(value, ENCODER_TERMS) if value.is_floating_point() else 0
        torch.testing.assert_close(written[key], value, rtol=0, atol=atol, msg=key)
    (tmp_path / "empty.txt").write_text("\n \n")
    for change, message in (({"--prompts": str(tmp_path / "empty.txt")}, "--prompts: expected at least one"),
                            ({"--prompts": str(tmp_path / "none.txt")}, "--prompts: expected a text file"),
                            ({"--out": str(tmp_path / "e.pt")}, "--out: expected a .safetensors file name"),
                            ({"--weights": str(tmp_path / "missing")}, "could not load the weights of tiny-sd3")):
        bad = list(argv)
        for option, value in change.items():
            bad[bad.index(option) + 1] = value
        assert cli.main(bad) == 2
        assert message in capsys.readouterr().err
