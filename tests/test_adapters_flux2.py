"""FLUX.2's block adapters on a tiny random Flux2Transformer2DModel (CPU, fp32), and its pipeline under `enable`."""

import diffusers
import pytest
import torch
from _adapter_checks import (
    all_equal,
    assert_fora_reuses,
    assert_graph_replay_equals_eager,
    assert_no_cache_is_plain,
    distinct_random_parameters,
    trajectory,
)
from PIL import Image

import harmonica
from harmonica import CacheSchedule
from harmonica.families import flux2
from harmonica.flow import flow_sample, flow_task
from harmonica.models import FLOW_PRESETS, build_transformer, load_vae
from harmonica.prompts import random_embeddings
from harmonica.units import cached_units

B, N, M, STEPS = 2, 16, 5, 4  # N: a 4 x 4 grid of packed 2 x 2 latent patches
UNITS = 2 * 3 + 2 * 1  # 2 double-stream blocks (attn, ff, ff_context) + 2 single-stream blocks (attn_mlp)
WIDTH = 16  # 2 heads x 8


def make_flux2():
    model = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))
    return distinct_random_parameters(model)


def ids(n, rows=4):
    """4-axis position ids (n, 4): image tokens (0, row, column, 0) of a rows-wide grid; rows None: text tokens
    (0, 0, 0, position)."""
    zeros, position = torch.zeros(n), torch.arange(n, dtype=torch.float32)
    if rows is None:
        return torch.stack([zeros, zeros, zeros, position], dim=1)
    return torch.stack([zeros, position // rows, position % rows, zeros], dim=1)


def step_inputs(step):
    """The transformer's arguments at `step` (Flux2Pipeline's: sigma as the timestep, the guidance value)."""
    gen = torch.Generator().manual_seed(100 + step)
    return dict(hidden_states=torch.randn(B, N, 4, generator=gen), encoder_hidden_states=torch.randn(B, M, 16,
                                                                                                     generator=gen),
                timestep=torch.full((B,), 1.0 - 0.2 * step), guidance=torch.full((B,), 4.0), img_ids=ids(N),
                txt_ids=ids(M, None))


def run(model, steps=STEPS):
    return trajectory(model, steps, step_inputs)


def test_units_of_a_flux2_transformer():
    """A single block's unit is its `attn` module: the parallel attention and MLP, fused projections."""
    model = make_flux2()
    units = cached_units(model)
    assert [name for name, _ in units] == [f"transformer_blocks.{b}.{kind}" for b in range(2)
                                           for kind in ("attn", "ff", "ff_context")] + [
        f"single_transformer_blocks.{b}.attn_mlp" for b in range(2)]
    assert units[6][1] is model.single_transformer_blocks[0].attn


def test_no_cache_and_disable_are_bitwise_the_plain_model():
    assert_no_cache_is_plain(make_flux2(), run, UNITS, STEPS)


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs():
    """The joint attentions' slots hold both streams; a single block's slot holds its `attn` module's output."""
    assert_fora_reuses(make_flux2(), run, UNITS, joint={0, 3})


def test_fora_sampling_is_close_to_the_uncached_sampling():
    """tiny-flux2 sampled over 20 steps (flow_sample): FORA:2's latents differ from the uncached ones, by less than a
    quarter of what another prompt changes, and by less than over 4 steps (closer steps, closer unit outputs)."""
    spec = FLOW_PRESETS["tiny-flux2"]
    transformer = build_transformer("tiny-flux2")
    bank = random_embeddings(transformer, 2, spec.text_tokens, torch.Generator().manual_seed(0))
    errors, prompt_change = {}, None
    for steps in (4, 20):
        task = flow_task(transformer, bank, steps, spec.guidance, **spec.size)
        noise = torch.randn(1, *task.latent_shape, generator=torch.Generator().manual_seed(1))
        plain = flow_sample(task, torch.tensor([1]), latents=noise)
        harmonica.enable(transformer, CacheSchedule.fora(steps, len(cached_units(transformer)), 2))
        cached = flow_sample(task, torch.tensor([1]), latents=noise)
        harmonica.disable(transformer)
        errors[steps] = (cached - plain).abs().max().item()
        prompt_change = (flow_sample(task, torch.tensor([0]), latents=noise) - plain).abs().max().item()
    assert 0 < errors[20] < errors[4] and errors[20] < prompt_change / 4


def test_graph_replay_equals_the_eager_engine():
    assert_graph_replay_equals_eager(make_flux2(), run, UNITS, STEPS + 1)


@pytest.mark.parametrize("kind", ["double", "single"])
def test_fp16_blocks_clip_as_diffusers_does(kind):
    """fp16 streams at +-6e4 plus MLP outputs scaled up overflow; diffusers clips the text stream of a double block
    and the whole stream of a single block to +-65504 at the block's end, and so does the adapter (bitwise)."""
    model = make_flux2().half()
    gen = torch.Generator().manual_seed(7)
    x, c = (torch.randn(B, n, WIDTH, generator=gen).sign().mul(6e4).half() for n in (N, M))
    rotary = model.pos_embed(torch.cat([ids(M, None), ids(N)]))
    if kind == "double":
        block = model.transformer_blocks[0]
        for mlp in (block.ff, block.ff_context):
            mlp.linear_out.weight.data.mul_(4000)
        mods = [torch.randn(B, 6 * WIDTH, generator=gen).half() for _ in range(2)]
        inputs = dict(hidden_states=x, encoder_hidden_states=c, temb_mod_img=mods[0], temb_mod_txt=mods[1],
                      image_rotary_emb=rotary)
    else:
        block = model.single_transformer_blocks[0]
        block.attn.to_out.weight.data.mul_(4000)
        inputs = dict(hidden_states=torch.cat([c, x], dim=1), encoder_hidden_states=None,
                      temb_mod=torch.randn(B, 3 * WIDTH, generator=gen).half(), image_rotary_emb=rotary)
    with torch.no_grad():
        plain = block(**inputs)
    streams = plain if isinstance(plain, tuple) else (plain,)
    assert (streams[0].abs() == 65504).any(), "no stream overflowed: the test checks nothing"
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
    with torch.no_grad():
        cached = block(**inputs)
    harmonica.disable(model)
    assert all_equal(cached if isinstance(cached, tuple) else (cached,), streams)


def test_reference_image_kv_cache_is_refused():
    """FLUX.2 Klein's KV pipeline: reference tokens with per-token modulations, their keys and values kept."""
    model = make_flux2()
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
    with pytest.raises(ValueError, match=r"^kv_cache_mode: expected None \(FLUX.2 Klein's reference-image KV cache "
                                         r"is not supported by harmonica\), got 'extract'$"), torch.no_grad():
        model(**step_inputs(0), kv_cache_mode="extract", num_ref_tokens=4)
    harmonica.disable(model)


def pipeline(transformer, vae=None):
    """Flux2Pipeline without its text encoder: prompts are embeddings."""
    return diffusers.Flux2Pipeline(scheduler=flux2.SCHEDULE.scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                   transformer=transformer)


def no_cache_then_fora(pipe, transformer, generate, plain):
    """Yield the engine of `enable(pipe, no-cache)`, then of FORA:2, each after one `generate()` (disabled when the
    caller resumes); then assert the no-cache latents are bitwise `plain` and FORA:2's are not."""
    units = len(cached_units(transformer))
    runs = []
    for schedule in (CacheSchedule.no_cache(STEPS, units), CacheSchedule.fora(STEPS, units, 2)):
        engine = harmonica.enable(pipe, schedule)
        runs.append(generate())
        yield engine
        harmonica.disable(pipe)
    assert torch.equal(runs[0], plain) and not torch.equal(runs[1], plain)


def test_the_pipeline_with_a_reference_image_runs_cached():
    """enable(pipe): the pipeline's reference image is more image tokens in every forward; with the no-cache
    schedule its latents are bitwise the plain pipeline's, with FORA:2 they differ."""
    spec = FLOW_PRESETS["tiny-flux2"]
    transformer = build_transformer("tiny-flux2")
    pipe = pipeline(transformer, load_vae("tiny-flux2", random_weights=True))
    gen = torch.Generator().manual_seed(3)
    image = Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=gen, dtype=torch.uint8).numpy())
    embeds = torch.randn(1, spec.text_tokens, spec.config["joint_attention_dim"], generator=gen)

    def generate():
        return pipe(image=image, prompt_embeds=embeds, num_inference_steps=STEPS, height=spec.height,
                    width=spec.width, guidance_scale=spec.guidance, generator=torch.Generator().manual_seed(1),
                    output_type="latent").images

    plain = generate()
    for engine in no_cache_then_fora(pipe, transformer, generate, plain):
        assert engine.last_input_shape[1] == 2 * plain.shape[1]  # the 64 x 64 reference: as many tokens again


def test_the_klein_pipeline_runs_cached_with_a_slot_set_per_pass():
    """FLUX.2 [klein]'s pipeline (no guidance input, true CFG as two passes in diffusers' cache contexts) under
    enable(pipe): one slot set per pass; with the no-cache schedule bitwise the plain pipeline, with FORA:2 not."""
    spec = FLOW_PRESETS["tiny-flux2"]
    torch.manual_seed(0)
    transformer = diffusers.Flux2Transformer2DModel(**{**spec.config, "guidance_embeds": False}).eval()
    pipe = diffusers.Flux2KleinPipeline(scheduler=flux2.SCHEDULE.scheduler(), text_encoder=None, tokenizer=None,
                                        vae=load_vae("tiny-flux2", random_weights=True), transformer=transformer)
    gen = torch.Generator().manual_seed(3)
    embeds, negative = (torch.randn(1, spec.text_tokens, spec.config["joint_attention_dim"], generator=gen)
                        for _ in range(2))

    def generate():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS,
                    height=spec.height, width=spec.width, guidance_scale=spec.guidance,
                    generator=torch.Generator().manual_seed(1), output_type="latent").images

    plain = generate()
    for engine in no_cache_then_fora(pipe, transformer, generate, plain):
        assert {"cond", "uncond"} <= {engine.context, *engine.other_contexts}
