"""Flow-matching models (harmonica/flow.py) on tiny random transformers of each family: the loop against the
diffusers pipeline's own, `harmonica sample` and `harmonica train` through cli.main, bad inputs."""

import json
import os
import re
import socket

import diffusers
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _helpers import patch_cli, rounding_bound
from safetensors.torch import load_file, save_file

import harmonica
from harmonica import cli
from harmonica.flow import cur_for_speedup, flow_sample, flow_task
from harmonica.macs import MacCount
from harmonica.models import FLOW_PRESETS, build_transformer, load_vae
from harmonica.prompts import random_embeddings
from harmonica.router import Router
from harmonica.schedule import CacheSchedule

TINY = ("tiny-flux", "tiny-sd3", "tiny-sd35", "tiny-wan", "tiny-qwen-image", "tiny-flux2", "tiny-z-image",
        "tiny-hunyuan-video15", "tiny-ltx2")
STEPS = 4


def pipeline_noise(name, noise):
    """`noise` (B, *latent_shape) as the family's pipeline takes it: FLUX.2's packed tokens (B, N, 4C) as the 2 x 2
    patches its pipeline draws, (B, 4C, h/2, w/2)."""
    spec = FLOW_PRESETS[name]
    if spec.class_name != "Flux2Transformer2DModel":
        return noise
    return noise.transpose(1, 2).reshape(noise.shape[0], -1, spec.height // 16, spec.width // 16)


def pipeline_latents(name, transformer, bank, noise, vae=None, scheduler=None):
    """The final latents of the family's diffusers pipeline (no text encoders, no VAE) from `noise`, on prompt 1;
    with `vae`, its decoded output as numpy in [0, 1] (images (1, H, W, 3), Wan frames (1, F, H, W, 3)).
    scheduler: the pipeline's (default: a fresh one of the family's config)."""
    spec = FLOW_PRESETS[name]
    scheduler = scheduler or spec.family.scheduler.scheduler()
    prompts = {key: value if key.startswith("negative") else value[1:2] for key, value in bank.items()}
    common = dict(latents=pipeline_noise(name, noise), num_inference_steps=STEPS, height=spec.height,
                  width=spec.width, output_type="latent" if vae is None else "np")
    encoders = dict(text_encoder=None, tokenizer=None)
    if spec.class_name == "FluxTransformer2DModel":
        pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder_2=None, tokenizer_2=None,
                                      transformer=transformer, **encoders)
        return pipe(**prompts, guidance_scale=spec.guidance, **common).images
    if spec.class_name == "SD3Transformer2DModel":
        pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, **encoders,
                                                  **{f"{part}_{i}": None for part in encoders for i in (2, 3)})
        return pipe(**prompts, guidance_scale=spec.guidance, **common).images
    if spec.class_name == "WanTransformer3DModel":
        pipe = diffusers.WanPipeline(vae=vae, scheduler=scheduler, transformer=transformer, **encoders)
        return pipe(**prompts, guidance_scale=spec.guidance, num_frames=spec.frames, **common).frames
    if spec.class_name == "HunyuanVideo15Transformer3DModel":  # its pipeline reads its VAE's factors: a random one
        pipe = diffusers.HunyuanVideo15Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae or load_vae(name, random_weights=True),
            text_encoder_2=None, tokenizer_2=None, **encoders,
            guider=diffusers.ClassifierFreeGuidance(guidance_scale=spec.guidance))
        return pipe(**prompts, num_frames=spec.frames, **common).frames
    if spec.class_name == "Flux2Transformer2DModel":
        pipe = diffusers.Flux2Pipeline(scheduler=scheduler, vae=vae, transformer=transformer, **encoders)
        return pipe(**prompts, guidance_scale=spec.guidance, **common).images
    if spec.class_name == "ZImageTransformer2DModel":  # its prompts: one tensor per prompt, its own tokens
        pipe = diffusers.ZImagePipeline(scheduler=scheduler, vae=vae, transformer=transformer, **encoders)
        embeds = {key: [e[m.bool()] for e, m in zip(prompts[key], prompts[f"{key}_mask"])]
                  for key in ("prompt_embeds", "negative_prompt_embeds")}
        return pipe(**embeds, guidance_scale=spec.guidance, **common).images
    if spec.class_name == "LTX2VideoTransformer3DModel":
        return ltx2_pipeline_latents(name, transformer, prompts, noise, vae, scheduler)
    pipe = diffusers.QwenImagePipeline(scheduler=scheduler, vae=vae, transformer=transformer, **encoders)
    return pipe(**prompts, true_cfg_scale=spec.guidance, **common).images


class BankConnectors(torch.nn.Module):
    """LTX-2's connectors as a look-up: the 'text encoder features' given to the pipeline are the bank's video and
    audio connector outputs side by side (P, L, 2 D); returns (video, audio, mask) as `LTX2TextConnectors` does."""

    device = torch.device("cpu")  # the pipeline's device: that of its modules

    def forward(self, features, mask, padding_side="left"):
        video, audio = features.chunk(2, dim=-1)
        return video, audio, mask


# a random audio VAE of 2 latent channels x 16 mel bins (4 latent bins: 8 = the tiny transformer's audio width) and a
# random vocoder of its mel spectrograms (2 channels x 16 bins)
LTX2_AUDIO_VAE = {"base_channels": 8, "latent_channels": 2, "num_res_blocks": 1, "mel_bins": 16}
LTX2_VOCODER = {"in_channels": 32, "hidden_channels": 8, "upsample_kernel_sizes": [4, 4], "upsample_factors": [2, 2],
                "resnet_kernel_sizes": [3], "resnet_dilations": [[1]], "output_sampling_rate": 16000}


def ltx2_pipeline(name, transformer, vae=None, scheduler=None, **parts):
    """`LTX2Pipeline` of the preset: `transformer`, its random VAE (for the latents' statistics) where `vae` is None,
    a random audio VAE, and the given text encoder, tokenizer, connectors; a random vocoder only to decode.
    scheduler: default a fresh one of the family's config."""
    from diffusers.pipelines.ltx2 import LTX2Vocoder

    scheduler = scheduler or FLOW_PRESETS[name].family.scheduler.scheduler()
    return diffusers.LTX2Pipeline(scheduler=scheduler, transformer=transformer,
                                  vae=vae if vae is not None else load_vae(name, random_weights=True),
                                  audio_vae=diffusers.AutoencoderKLLTX2Audio(**LTX2_AUDIO_VAE),
                                  vocoder=None if vae is None else LTX2Vocoder(**LTX2_VOCODER), **parts)


def ltx2_call(pipe, name, noise, steps=STEPS, decode=False, **kwargs):
    """`pipe` at one guidance scale for both streams, without STG, modality isolation and rescaling (as harmonica's
    loop), `steps` steps from `noise` (1, N + A, C): its final video and audio tokens (1, N + A, C) packed as the
    task's, or with `decode` its frames."""
    from harmonica.families.ltx2 import FRAME_FACTOR, VIDEO_FACTOR

    spec = FLOW_PRESETS[name]
    side = VIDEO_FACTOR * pipe.transformer.config.patch_size
    video_tokens = ((spec.frames - 1) // FRAME_FACTOR + 1) * (spec.height // side) * (spec.width // side)
    video, audio = pipe(**kwargs, latents=noise[:, :video_tokens], audio_latents=noise[:, video_tokens:],
                        num_inference_steps=steps, height=spec.height, width=spec.width, num_frames=spec.frames,
                        guidance_scale=spec.guidance, audio_guidance_scale=spec.guidance, stg_scale=0.0,
                        audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0, guidance_rescale=0.0,
                        audio_guidance_rescale=0.0, output_type="np" if decode else "latent", return_dict=False)
    if decode:
        return video
    return torch.cat([pipe._pack_latents(video), pipe._pack_audio_latents(audio)], dim=1)


def ltx2_pipeline_latents(name, transformer, prompts, noise, vae, scheduler):
    """`ltx2_call` on the bank's prompts (through `BankConnectors`) with `scheduler`."""
    pipe = ltx2_pipeline(name, transformer, vae, scheduler, text_encoder=None, tokenizer=None,
                         connectors=BankConnectors())
    embeds = {f"{key}prompt_embeds": torch.cat([prompts[f"{key}prompt_embeds"], prompts[f"{key}audio_prompt_embeds"]],
                                               dim=-1) for key in ("", "negative_")}
    masks = {f"{key}prompt_attention_mask": prompts[f"{key}prompt_attention_mask"] for key in ("", "negative_")}
    return ltx2_call(pipe, name, noise, decode=vae is not None, **embeds, **masks)


@pytest.mark.parametrize("name", TINY)
def test_loop_without_caching_is_the_pipelines(name):
    """flow_sample, bare and with harmonica's no-cache schedule (the adapters' unit-by-unit blocks), against the
    pipeline's loop (scheduler.step on the same transformer) from the same noise and prompt."""
    spec = FLOW_PRESETS[name]
    transformer = build_transformer(name)
    bank = random_embeddings(transformer, 2, spec.text_tokens, torch.Generator().manual_seed(0))
    task = flow_task(transformer, bank, STEPS, spec.guidance, **spec.size)
    noise = torch.randn(1, *task.latent_shape, generator=torch.Generator().manual_seed(1))
    reference = pipeline_latents(name, transformer, bank, noise)
    bare = flow_sample(task, torch.tensor([1]), latents=noise)
    units = len(harmonica.units.cached_units(transformer))
    harmonica.enable(transformer, CacheSchedule(torch.ones(STEPS, units, dtype=torch.bool), "no-cache"))
    try:
        enabled = flow_sample(task, torch.tensor([1]), latents=noise)
    finally:
        harmonica.disable(transformer)
    # the pipeline steps x + (sigma_next - sigma) v, the table a x + b (x - sigma v): a few roundings of |x| per step
    tolerance = rounding_bound(reference, 8 * STEPS)
    for ours in (bare, enabled):
        assert ours.shape == reference.shape
        error = (ours - reference).abs().max().item()
        assert error <= tolerance, f"{error:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize("name", TINY)
def test_decode_is_the_pipelines(name):
    """task.decode of our final latents against the pipeline's own decode (its random VAE, same noise and prompt):
    within the loop's rounding carried through the VAE; a wrong latent scaling is far."""
    spec = FLOW_PRESETS[name]
    transformer, vae = build_transformer(name), load_vae(name, random_weights=True)
    for norm in (m for m in vae.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # FLUX.2's latent statistics
        norm.running_mean.normal_(generator=torch.Generator().manual_seed(2))
        norm.running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(3))
    buffers = dict(vae.named_buffers(recurse=False))
    if "latents_mean" in buffers:  # LTX-2's latent statistics
        buffers["latents_mean"].normal_(generator=torch.Generator().manual_seed(2))
        buffers["latents_std"].uniform_(0.5, 2, generator=torch.Generator().manual_seed(3))
    bank = random_embeddings(transformer, 2, spec.text_tokens, torch.Generator().manual_seed(0))
    task = flow_task(transformer, bank, STEPS, spec.guidance, **spec.size)
    noise = torch.randn(1, *task.latent_shape, generator=torch.Generator().manual_seed(1))
    reference = torch.from_numpy(pipeline_latents(name, transformer, bank, noise, vae))
    with torch.no_grad():
        latents = flow_sample(task, torch.tensor([1]), latents=noise)
        decoded = task.decode(vae, latents)
    assert decoded.shape[:2] == (1, 3) and decoded.shape[-2:] == (spec.height, spec.width)
    if decoded.dim() == 5:  # Wan: (B, 3, F, H, W) -> (B, F, H, W, 3), every frame
        assert decoded.shape[2] == spec.frames
        ours = decoded.permute(0, 2, 3, 4, 1)
    else:
        ours = decoded.permute(0, 2, 3, 1)
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    # the loop's own bound (test_loop_without_caching_is_the_pipelines), x16 for the decoder's gain, halved by x / 2
    tolerance = rounding_bound(latents, 8 * 8 * STEPS)
    assert error <= tolerance, f"{error:.3g} > {tolerance:.3g}"
    task._vae_latents = lambda vae, latents: latents  # the latents as the VAE's own, unscaled: far
    with torch.no_grad():
        unscaled = task.decode(vae, flow_sample(task, torch.tensor([1]), latents=noise))
    assert unscaled.shape == decoded.shape and (unscaled - decoded).abs().max() > 100 * tolerance


def run_cli(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out


@pytest.mark.parametrize("name", TINY)
def test_sample_with_fora(name, tmp_path, capsys):
    base = ["sample", "--model", name, "--random-weights", "--steps", str(STEPS)]
    printed = run_cli(base + ["--schedule", "fora:2", "--out", str(tmp_path / "fora.safetensors")], capsys)
    run_cli(base + ["--out", str(tmp_path / "plain.safetensors")], capsys)
    fora, plain = (load_file(str(tmp_path / f"{n}.safetensors"))["latents"] for n in ("fora", "plain"))
    spec = FLOW_PRESETS[name]
    with torch.device("meta"):
        transformer = build_transformer(name)
    task = flow_task(transformer, random_embeddings(transformer, 1, spec.text_tokens, torch.Generator()),
                     STEPS, spec.guidance, **spec.size)
    # the speedup at the preset's pixel size and prompt tokens (packed latents alone only tell their tokens)
    size = f"{spec.height}x{spec.width}" + (f"x{spec.frames}" if spec.frames else "")
    speedup = CacheSchedule.fora(STEPS, len(task.macs().names), 2).theoretical_speedup(task.macs())
    assert re.search(rf"fora:2 \(FlowMatchEulerDiscreteScheduler\): 4 steps x \d+ units, CUR 50.0%, theoretical "
                     rf"speedup {speedup:.2f}x at {size},", printed), printed
    assert fora.shape == task.unpack(torch.zeros(1, *task.latent_shape)).shape  # unpacked
    assert torch.isfinite(fora).all()
    assert (fora - plain).abs().max() > 1e-3  # reused units change the sample


@pytest.mark.parametrize("name", TINY)
def test_train_writes_a_router_that_samples(name, tmp_path, capsys):
    out = tmp_path / "run"
    speedup = ["--target-speedup", "1.2"] if name == "tiny-flux" else []
    printed = run_cli(["train", "--model", name, "--random-weights", "--objective", "iepo", "--steps", str(STEPS),
                       "--iterations", "3", "--eval-batch", "2",  # the closing table on 2 noises, not 64
                       "--batch", "2", "--lambda-batch", "1", "--out", str(out), *speedup], capsys)
    if speedup:  # the CUR target of 1.2x at the task's MACs (64x64, 8 text tokens)
        with torch.device("meta"):
            transformer = build_transformer(name)
        spec = FLOW_PRESETS[name]
        task = flow_task(transformer, random_embeddings(transformer, 1, spec.text_tokens, torch.Generator()),
                         STEPS, spec.guidance, **spec.size)
        target = torch.load(out / "checkpoint-rank0.pt", weights_only=True)["config"]["target_cur"]
        assert target == pytest.approx(cur_for_speedup(task.macs(), 1.2, STEPS), rel=1e-12)
        assert f"target speedup 1.2x: target CUR {target:.1%}" in printed
    router = Router.from_pretrained(out / "router")
    info = json.loads((out / "router" / "router.json").read_text())
    assert info["model_class"] == FLOW_PRESETS[name].class_name
    assert info["sampler"] == "FlowMatchEulerDiscreteScheduler" and len(info["timesteps"]) == STEPS
    assert info["complete"] and info["iterations"] == 3
    # caching at steps 1 and 3 whatever training did: the sample must follow the router's schedule
    with torch.no_grad():
        router.logits[1::2], router.logits[2] = -5.0, 5.0
    router.set_forecast(None)  # fitted along the trained schedule, not this one
    router.save_pretrained(tmp_path / "edited")
    again = Router.from_pretrained(tmp_path / "edited")
    assert torch.equal(again.logits, router.logits) and again.info == router.info
    printed = run_cli(["sample", "--model", name, "--random-weights", "--router", str(tmp_path / "edited"),
                       "--out", str(tmp_path / "routed.safetensors")], capsys)
    assert f"CUR {again.schedule().cur:.1%}" in printed and "CUR 50.0%" in printed


def test_cur_for_speedup_on_known_macs():
    macs = MacCount(names=("a", "b", "c", "d"), unit_macs=(1.0,) * 4, always_macs=4.0)
    cur = cur_for_speedup(macs, 1.25, 5)  # (1 - 1/1.25) * 8 / 4
    assert cur == pytest.approx(0.4)
    table = torch.ones(5, 4, dtype=torch.bool)
    table[1:3] = False  # 8 of 20 reused
    schedule = CacheSchedule(table, "x")
    assert schedule.cur == pytest.approx(cur) and schedule.theoretical_speedup(macs) == pytest.approx(1.25)
    with pytest.raises(ValueError, match=r"--target-speedup: expected a speedup in \(1, 1.66\) for 5 steps"):
        cur_for_speedup(macs, 1.7, 5)  # reusing every unit of steps 1-4 gives 40 / 24
    with pytest.raises(ValueError, match="--target-speedup: expected a speedup in"):
        cur_for_speedup(macs, 1.0, 5)


def write_flux_router(directory):
    """A trained-for-tiny-flux router (nominally) at 4 steps."""
    from harmonica.router import RouterInfo

    spec = FLOW_PRESETS["tiny-flux"]
    with torch.device("meta"):
        transformer = build_transformer("tiny-flux")
    bank = random_embeddings(transformer, 1, spec.text_tokens, torch.Generator().manual_seed(0))
    task = flow_task(transformer, bank, STEPS, spec.guidance, **spec.size)
    info = RouterInfo.for_model(transformer, sampler=task.sampler, timesteps=task.timesteps)
    Router(STEPS, len(info.units), info=info).save_pretrained(directory)
    return directory


TINY_FLUX = ["sample", "--model", "tiny-flux", "--random-weights"]
TRAIN_FLUX = ["train", "--model", "tiny-flux", "--random-weights", "--out", "TMP/run"]
CASES = {
    "router-of-another-model": (["sample", "--model", "tiny-sd3", "--random-weights", "--router", "ROUTER"],
                                r"--router: \S+ was trained for something else than --model tiny-sd3 \(model_class: "
                                r"router has FluxTransformer2DModel, got SD3Transformer2DModel;"),
    "router-steps": (TINY_FLUX + ["--router", "ROUTER", "--steps", "8"],
                     r"--steps: the router \S+ was trained for 4 steps, got --steps 8; leave --steps out"),
    "bad-out": (TINY_FLUX + ["--out", "TMP/x.latents"],
                r"--out: expected an image file name \(.png, .jpg, ...\) or a .safetensors file name \(the final "
                r"latents\), got '\S+x.latents'"),
    "prompt": (TINY_FLUX + ["--prompt", "a cat"], r"--prompt: expected it alone, with the weights' text encoders, got "
                                                  r"--prompt 'a cat' with --random-weights \(no text encoders\)"),
    "class-label": (TINY_FLUX + ["--class-label", "3"], r"--class-label: expected only with a DiT model"),
    "sampler": (TINY_FLUX + ["--sampler", "dpm-solver++"], r"--sampler: expected one of "
                                                           r"\['FlowMatchEulerDiscreteScheduler'\] for tiny-flux"),
    "graph-step": (TINY_FLUX + ["--cuda-graphs", "--scheduler-in-graph"],
                   r"--scheduler-in-graph: expected a sampler whose step can run inside the graphs \(dit-ddim, "
                   r"dpm-solver\+\+\), got FlowMatchEulerDiscreteScheduler"),
    "embeddings-keys": (TINY_FLUX + ["--prompt-embeddings", "EMBEDS"],
                        r"--prompt-embeddings: embeddings: expected the keys \['prompt_embeds', "
                        r"'pooled_prompt_embeds'\] for FluxTransformer2DModel, missing \['pooled_prompt_embeds'\]"),
    "embeddings-width": (["sample", "--model", "tiny-wan", "--random-weights", "--prompt-embeddings", "EMBEDS"],
                         r"embeddings: expected prompt_embeds of shape \(prompts, tokens, 32\) for "
                         r"WanTransformer3DModel, got \(1, 3, 5\)"),
    "no-published-weights": (["sample", "--model", "tiny-flux"], r"--random-weights: tiny-flux has no published "
                                                                 r"weights; expected --random-weights or --weights"),
    "train-sampler": (TRAIN_FLUX + ["--sampler", "iddpm"], r"--sampler: expected only with a PixArt model, got "
                                                           r"--sampler 'iddpm' with --model tiny-flux"),
    "train-speedup": (TRAIN_FLUX + ["--target-speedup", "0.5"],
                      r"--target-speedup: expected a theoretical speedup > 1, got 0.5"),
    "train-no-embeds": (["train", "--model", "flux.1-dev", "--out", "TMP/run"], r"--embeds: the weights of flux.1-dev"),
}


@pytest.mark.parametrize("argv,message", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the error")

    patch_cli(monkeypatch, "load_experts", refuse)
    save_file({"prompt_embeds": torch.zeros(1, 3, 5), "negative_prompt_embeds": torch.zeros(1, 3, 5)},
              str(tmp_path / "embeds.safetensors"))
    replace = {"ROUTER": str(write_flux_router(tmp_path / "router")), "EMBEDS": str(tmp_path / "embeds.safetensors")}
    words = [replace.get(word, word.replace("TMP", str(tmp_path))) for word in argv]
    assert cli.main(words) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harmonica: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]


def test_unknown_model_lists_the_flow_presets(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sample", "--model", "flux-schnell"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'flux-schnell'" in error
    assert all(f"'{name}'" in error for name in FLOW_PRESETS)


def test_weights_from_a_pipeline_folder_and_prompt_file(tmp_path, capsys):
    """--weights loads the `transformer` folder of a pipeline directory; --prompt-embeddings replaces the random
    prompt: the same weights and prompt as --random-weights give the same latents, up to rounding."""
    spec = FLOW_PRESETS["tiny-flux"]
    transformer = build_transformer("tiny-flux", seed=0)  # what --random-weights --seed 0 builds
    transformer.save_pretrained(tmp_path / "pipe" / "transformer")
    bank = random_embeddings(transformer, 2, spec.text_tokens, torch.Generator().manual_seed(5))
    save_file(bank, str(tmp_path / "prompts.safetensors"))
    base = ["sample", "--model", "tiny-flux", "--steps", str(STEPS), "--schedule", "fora:2",
            "--prompt-embeddings", str(tmp_path / "prompts.safetensors")]
    printed = run_cli(base + ["--weights", str(tmp_path / "pipe"), "--out", str(tmp_path / "hub.safetensors")], capsys)
    assert f"model tiny-flux ({tmp_path / 'pipe'})" in printed
    run_cli(base + ["--random-weights", "--out", str(tmp_path / "random.safetensors")], capsys)
    hub, random = (load_file(str(tmp_path / f"{n}.safetensors"))["latents"] for n in ("hub", "random"))
    # the weights read from the folder sit at other addresses (16- not 64-byte aligned), where MKL may take other
    # kernels: a rounding per term of the longest reduction (the timestep embedding's 256 channels) per step
    tolerance = rounding_bound(random, 256 * STEPS)
    assert (hub - random).abs().max().item() <= tolerance
    run_cli(["sample", "--model", "tiny-flux", "--steps", str(STEPS), "--schedule", "fora:2", "--random-weights",
             "--out", str(tmp_path / "random-prompt.safetensors")], capsys)
    other = load_file(str(tmp_path / "random-prompt.safetensors"))["latents"]
    assert (other - random).abs().max().item() > 100 * tolerance  # another prompt is far: the check can fail


def test_train_resumes_exactly(tmp_path, capsys):
    """A flow training stopped after 3 of 6 iterations and resumed writes the router of an uninterrupted run
    (the prompt bank, noise and lambda state come back from the checkpoint)."""
    base = ["train", "--model", "tiny-qwen-image", "--random-weights", "--objective", "iepo", "--steps", str(STEPS),
            "--batch", "2",
            "--lambda-batch", "1", "--refresh", "2"]
    run_cli(base + ["--iterations", "6", "--out", str(tmp_path / "straight")], capsys)
    run_cli(base + ["--iterations", "3", "--out", str(tmp_path / "split")], capsys)
    run_cli(base + ["--iterations", "6", "--out", str(tmp_path / "split"), "--resume"], capsys)
    straight, resumed = (Router.from_pretrained(tmp_path / name / "router") for name in ("straight", "split"))
    assert torch.equal(straight.logits, resumed.logits)
    info = json.loads((tmp_path / "split" / "router" / "router.json").read_text())
    assert info["iterations"] == 6 and info["complete"]
    assert len((tmp_path / "split" / "train_log.jsonl").read_text().splitlines()) == 6


def _torchrun_rank(rank, world, port, argv):
    """One rank of `harmonica train` as torchrun starts it (the environment it sets)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert cli.main(argv) == 0


def test_train_under_torchrun_combines_the_ranks(tmp_path, capsys):
    """Two ranks of a flow training (gloo, as torchrun would run `harmonica train`) end with the same router,
    which differs from one rank's: the ranks' gradients and lambda were averaged."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["train", "--model", "tiny-wan", "--random-weights", "--objective", "iepo", "--steps", str(STEPS),
            "--batch", "2", "--eval-batch", "0",  # no closing table: the logits are compared
            "--lambda-batch", "1", "--refresh", "2", "--iterations", "4"]
    mp.spawn(_torchrun_rank, args=(2, port, argv + ["--out", str(tmp_path / "ddp")]), nprocs=2)
    ranks = [torch.load(tmp_path / "ddp" / f"checkpoint-rank{r}.pt", weights_only=True)["logits"] for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1])
    assert torch.equal(Router.from_pretrained(tmp_path / "ddp" / "router").logits, ranks[0])
    run_cli(argv + ["--out", str(tmp_path / "single")], capsys)
    single = Router.from_pretrained(tmp_path / "single" / "router").logits
    assert not torch.equal(single, ranks[0]), "the ranks' gradients were not combined"


@pytest.mark.parametrize("name,out,size", [("tiny-flux", "x.png", (64, 64)), ("tiny-wan", "x.gif", (32, 32))])
def test_sample_decodes_to_an_image_or_an_animation(name, out, size, tmp_path, capsys):
    """--out with an image (video: .gif) suffix decodes the final latents through the preset's VAE: the file holds
    the decoded pixels of the same latents the .safetensors run writes (Wan: one frame per video frame)."""
    from PIL import Image, ImageSequence

    base = ["sample", "--model", name, "--random-weights", "--steps", str(STEPS), "--schedule", "fora:2"]
    printed = run_cli(base + ["--out", str(tmp_path / out)], capsys)
    assert f"decoded written to {tmp_path / out}" in printed
    run_cli(base + ["--out", str(tmp_path / "x.safetensors")], capsys)
    spec = FLOW_PRESETS[name]
    latents = load_file(str(tmp_path / "x.safetensors"))["latents"]
    task = flow_task(build_transformer(name), random_embeddings(build_transformer(name), 1, spec.text_tokens,
                                                                      torch.Generator()), STEPS, spec.guidance,
                     **spec.size)
    task.unpack = lambda x: x  # the file holds unpacked latents already
    with torch.no_grad():
        decoded = task.decode(load_vae(name, random_weights=True), latents)
    expected = (decoded[0].float() / 2 + 0.5).clamp(0, 1).mul(255).round()
    expected = expected.unsqueeze(1) if expected.dim() == 3 else expected  # (3, F, H, W)
    with Image.open(tmp_path / out) as image:
        frames = [torch.from_numpy(np.array(frame.convert("RGB"))).permute(2, 0, 1).float()
                  for frame in ImageSequence.Iterator(image)]
    assert len(frames) == expected.shape[1] == (spec.frames or 1) and frames[0].shape[1:] == size
    if out.endswith(".png"):  # lossless: the pixels themselves
        assert (frames[0] - expected[:, 0]).abs().max() <= 1
    else:  # GIF: a 256-colour palette per frame
        assert all((frame - expected[:, i]).abs().mean() < 16 for i, frame in enumerate(frames))


def test_decoding_a_real_preset_needs_its_weights(tmp_path, capsys):
    assert cli.main(["sample", "--model", "flux.1-dev", "--random-weights", "--out", str(tmp_path / "x.png")]) == 2
    assert "--out: flux.1-dev has no random VAE to decode with" in capsys.readouterr().err
    assert cli.main(["sample", "--model", "tiny-wan", "--random-weights", "--out", str(tmp_path / "x.png")]) == 2
    assert "--out: expected a .safetensors (the final latents), .gif or .webp file name" in capsys.readouterr().err
