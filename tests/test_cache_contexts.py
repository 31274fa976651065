"""Two cache sets for pipelines that run classifier-free guidance as two passes (diffusers' cache_context
"cond" / "uncond": WanPipeline, QwenImagePipeline, FluxPipeline's true CFG), on tiny random pipelines
without text encoders or VAE (prompt embeddings passed, latent output; CPU, fp32)."""

import warnings

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, QwenImagePipeline, WanPipeline
from test_adapters_flux import make_flux
from test_adapters_qwen_image import make_qwen_image
from test_adapters_sd3 import make_sd3, num_units
from test_adapters_sd3 import step_inputs as sd3_inputs
from test_adapters_wan import make_wan

import harmonica
from harmonica import CacheSchedule
from harmonica.units import cached_units

STEPS, UNITS, M = 4, 6, 5  # UNITS: tiny Wan's 2 blocks x 3 units


def make_pipe(kind):
    parts = dict(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler())
    if kind == "flux":
        return FluxPipeline(transformer=make_flux(), tokenizer_2=None, text_encoder_2=None, **parts)
    return (WanPipeline(transformer=make_wan(), **parts) if kind == "wan"
            else QwenImagePipeline(transformer=make_qwen_image(), **parts))


def generate(pipe, guided=True):
    """A 4-step generation's latents; guided: the cond and uncond passes of every step."""
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, M, 16, generator=gen), torch.randn(1, M, 16, generator=gen)
    common = dict(prompt_embeds=cond, num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(1))
    if isinstance(pipe, WanPipeline):
        return pipe(negative_prompt_embeds=uncond, height=32, width=32, num_frames=5,
                    guidance_scale=5.0 if guided else 1.0, **common).frames
    if isinstance(pipe, FluxPipeline):
        pooled, negative_pooled = torch.randn(1, 16, generator=gen), torch.randn(1, 16, generator=gen)
        return pipe(pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                    negative_pooled_prompt_embeds=negative_pooled, height=32, width=32,
                    true_cfg_scale=4.0 if guided else 1.0, **common).images
    mask = torch.ones(1, M, dtype=torch.long)
    return pipe(prompt_embeds_mask=mask, negative_prompt_embeds=uncond, negative_prompt_embeds_mask=mask,
                height=32, width=32, true_cfg_scale=4.0 if guided else 1.0, **common).images


def flat(slots) -> list:
    """The tensors of a slot list (a several-stream unit's slot is a tuple)."""
    return [part for slot in slots for part in (slot if isinstance(slot, tuple) else (slot,))]


@pytest.mark.parametrize("kind", ["wan", "qwen_image", "flux"])
def test_each_pass_equals_its_own_engine(kind):
    """FORA:2: every transformer call of the guided generation equals the same calls of its pass (cond or
    uncond) replayed on a fresh engine of its own; each pass runs the schedule's units at its own steps,
    with slots of its own; no warning; disable leaves nothing behind."""
    pipe = make_pipe(kind)
    model = pipe.transformer
    units = len(cached_units(model))
    schedule = CacheSchedule.fora(STEPS, units, 2)
    engine = harmonica.enable(pipe, schedule)
    calls = {"cond": torch.zeros(STEPS, units, dtype=torch.bool), "uncond": torch.zeros(STEPS, units, dtype=torch.bool)}
    forwards = []  # (context, kwargs, output) of every transformer call

    def record_unit(k):
        def hook(module, args, output):
            calls[engine.context][engine.step, k] = True
        return hook

    def record_forward(module, args, kwargs, output):
        forwards.append((engine.context, {k: v.clone() if isinstance(v, torch.Tensor) else v
                                          for k, v in kwargs.items()}, output[0].clone()))

    hooks = [module.register_forward_hook(record_unit(k)) for k, (_, module) in enumerate(cached_units(model))]
    hooks.append(model.register_forward_hook(record_forward, with_kwargs=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(pipe)
    for hook in hooks:
        hook.remove()
    assert [context for context, _, _ in forwards] == ["cond", "uncond"] * STEPS
    assert torch.equal(calls["cond"], schedule.table) and torch.equal(calls["uncond"], schedule.table)
    cond_slots, uncond_slots = flat(engine.other_contexts["cond"].slots.entries), flat(engine.slots)
    assert len(cond_slots) == len(uncond_slots) >= units
    assert {s.data_ptr() for s in cond_slots}.isdisjoint(s.data_ptr() for s in uncond_slots)
    both = engine.cache_bytes()
    harmonica.disable(pipe)
    assert "cache_context" not in vars(model)

    for context in ("cond", "uncond"):
        alone = harmonica.enable(model, schedule)
        harmonica.reset(model)
        with torch.no_grad():
            for name, kwargs, output in forwards:
                if name == context:
                    assert torch.equal(model(**kwargs)[0], output)
        assert 2 * alone.cache_bytes() == both
        harmonica.disable(model)


def test_begin_restarts_every_pass():
    """A generation begun (scheduler.set_timesteps) after a partial one starts both passes at step 0: it
    equals the same generation on a fresh pipeline."""
    pipe = make_pipe("wan")
    harmonica.enable(pipe, CacheSchedule.fora(STEPS, UNITS, 2))
    model = pipe.transformer
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 4, 4), encoder_hidden_states=torch.randn(1, M, 16),
                  timestep=torch.tensor([500.0]))
    with torch.no_grad():
        for context in ("cond", "uncond"):  # step 0 of both passes
            with model.cache_context(context):
                model(**inputs)
    latents = generate(pipe)
    fresh = make_pipe("wan")
    harmonica.enable(fresh, CacheSchedule.fora(STEPS, UNITS, 2))
    assert torch.equal(latents, generate(fresh))


def test_cuda_graphs_take_one_pass_only():
    """With cuda_graphs (a graph replays one set of slots), an unguided generation runs and a guided one is
    refused at its second pass."""
    pipe = make_pipe("wan")
    harmonica.enable(pipe, CacheSchedule.fora(STEPS, UNITS, 2), cuda_graphs=True)
    generate(pipe, guided=False)
    with pytest.raises(ValueError, match=r"^cuda_graphs=True: expected one cache context .* 'cond' and 'uncond'"):
        generate(pipe)


def test_skip_layer_guidance_is_refused():
    model = make_sd3("sd35")
    with torch.no_grad():
        plain = model(**sd3_inputs(0), skip_layers=[1]).sample  # diffusers' own forward takes it
        engine = harmonica.enable(model, CacheSchedule.fora(STEPS, num_units("sd35"), 2))
        harmonica.reset(model)
        with pytest.raises(ValueError, match=r"^skip_guidance_layers: expected None .* skip_layers=\[1\]$"):
            model(**sd3_inputs(0), skip_layers=[1])
        engine.set_off()  # caching off: no unit reads an earlier step, so a forward may skip blocks
        assert torch.equal(model(**sd3_inputs(0), skip_layers=[1]).sample, plain)
