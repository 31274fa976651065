"""HunyuanVideo 1.5's block adapter on a tiny random HunyuanVideo15Transformer3DModel (CPU, fp32), its pipeline under
`enable`, its MAC count on meta tensors and what it refuses."""

import diffusers
import pytest
import torch
from _adapter_checks import (
    all_equal,
    assert_fora_reuses,
    assert_no_cache_is_plain,
    distinct_random_parameters,
    trajectory,
)
from graph_standin import StandInGraphs, runner_inputs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import harmonica
from harmonica import CacheSchedule
from harmonica.flow import flow_task
from harmonica.macs import count_macs
from harmonica.models import FLOW_PRESETS, build_transformer, load_vae
from harmonica.prompts import random_embeddings
from harmonica.units import cached_units

NAME = "tiny-hunyuan-video15"
B, STEPS = 2, 4
LATENT = (9, 2, 2, 3)  # 2C + 1 channels (latents, condition latents, mask), 2 frames of 2 x 3: 12 tokens
M, M2, IMAGE = 5, 4, 3  # Qwen2.5-VL, ByT5 and image tokens (the transformer takes any count)
UNITS = 2 * 3  # 2 blocks x (attn, ff, ff_context)


def make_hunyuan():
    return distinct_random_parameters(build_transformer(NAME))


def step_inputs(step):
    """The transformer's arguments at `step`: text-to-video (zero image embeddings), the rows' prompts padded
    differently (masks), the second row with ByT5 glyph tokens, the first without."""
    gen = torch.Generator().manual_seed(100 + step)
    return dict(hidden_states=torch.randn(B, *LATENT, generator=gen), timestep=torch.full((B,), 900.0 - 200 * step),
                encoder_hidden_states=torch.randn(B, M, 16, generator=gen),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
                encoder_hidden_states_2=torch.randn(B, M2, 12, generator=gen),
                encoder_attention_mask_2=torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]]),
                image_embeds=torch.zeros(B, IMAGE, 8))


def run(model, steps=STEPS):
    return trajectory(model, steps, step_inputs)


def test_units_of_a_hunyuan_video15_transformer():
    names = [name for name, _ in cached_units(make_hunyuan())]
    assert names == [f"transformer_blocks.{b}.{kind}" for b in range(2) for kind in ("attn", "ff", "ff_context")]


def test_no_cache_and_disable_are_bitwise_the_plain_model():
    assert_no_cache_is_plain(make_hunyuan(), run, UNITS, STEPS)


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs():
    """The joint attentions' slots hold both streams (image, text)."""
    assert_fora_reuses(make_hunyuan(), run, UNITS, joint={0, 3})


def test_the_forward_under_enable_is_diffusers_with_image_tokens_too():
    """Under enable the transformer's forward joins the text streams without host syncs: bitwise diffusers' join,
    also with nonzero image embeddings (all image tokens valid, joined first), and diffusers' forward again after
    disable."""
    model = make_hunyuan()

    def inputs(step):
        image = torch.randn(B, IMAGE, 8, generator=torch.Generator().manual_seed(step))
        return {**step_inputs(step), "image_embeds": image}

    with torch.no_grad():
        plain = trajectory(model, STEPS, inputs)
        harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
        assert model.forward.__func__ is not type(model).forward
        enabled = trajectory(model, STEPS, inputs)
        harmonica.disable(model)
    assert all_equal(enabled, plain) and "forward" not in vars(model)


def test_cuda_graphs_capture_the_forward():
    """FORA:2 under cuda_graphs on the graph stand-in (it refuses host syncs, such as boolean indexing): two
    captures, bitwise the eager engine's steps; disable puts diffusers' forward back."""
    model, schedule = make_hunyuan(), CacheSchedule.fora(STEPS, UNITS, 2)
    with torch.no_grad():
        harmonica.enable(model, schedule)
        eager = run(model)
        harmonica.enable(model, schedule, cuda_graphs=True)
        runner = model._harmonica.graphs
        runner.backend = StandInGraphs(lambda: runner_inputs(runner))
        graphed = run(model)
        harmonica.disable(model)
    assert (runner.captures, runner.replays) == (2, STEPS - 2)  # steps 0 and 1 capture, 2 and 3 replay
    assert all_equal(graphed, eager) and "forward" not in vars(model)


def test_the_pipelines_own_loop_under_enable():
    """HunyuanVideo15Pipeline's loop (its guider's CFG as two passes in diffusers' cache contexts) under
    harmonica.enable(pipe): one slot set per pass; the no-cache schedule is bitwise the plain pipeline, twice in a
    row; FORA:2 is another sample."""
    spec, model = FLOW_PRESETS[NAME], make_hunyuan()
    pipe = diffusers.HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=model, vae=load_vae(NAME, random_weights=True),
        scheduler=spec.family.scheduler.scheduler(), text_encoder_2=None, tokenizer_2=None,
        guider=diffusers.ClassifierFreeGuidance(guidance_scale=spec.guidance))
    bank = random_embeddings(model, 1, 6, torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 2, 2, 3, generator=torch.Generator().manual_seed(1))

    def sample():
        return pipe(**bank, latents=noise, num_inference_steps=STEPS, height=spec.height, width=spec.width,
                    num_frames=spec.frames, output_type="latent").frames

    plain = sample()
    engine = harmonica.enable(pipe, CacheSchedule.no_cache(STEPS, UNITS))
    try:
        assert torch.equal(sample(), plain) and torch.equal(sample(), plain)
        assert {"pred_cond", "pred_uncond"} <= {engine.context, *engine.other_contexts}
        harmonica.enable(pipe, CacheSchedule.fora(STEPS, UNITS, 2))
        assert not torch.equal(sample(), plain)
    finally:
        harmonica.disable(pipe)


def test_macs_on_meta_tensors_are_a_real_forwards():
    """count_macs runs the forward's data-dependent steps on meta tensors (MetaMasks): the FLOPs of a real CPU
    forward of the tiny preset at its size, with the pipeline's 729 image and 256 ByT5 tokens (its attention as
    matmuls, which the counter counts, as on meta tensors)."""
    spec = FLOW_PRESETS[NAME]
    model = build_transformer(NAME)
    bank = random_embeddings(model, 1, spec.text_tokens, torch.Generator().manual_seed(0))
    bank["prompt_embeds_2"] = torch.randn(1, 256, 12)
    bank["prompt_embeds_mask_2"] = torch.zeros(1, 256, dtype=torch.long)
    task = flow_task(model, bank, STEPS, 1.0, **spec.size)  # no CFG: one row
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(**task.model_kwargs(torch.randn(1, *task.latent_shape),
                                  task.prepare({"prompt_index": torch.tensor([0])}, "cpu"), 0))
    macs = count_macs(NAME)
    assert macs.total == counter.get_total_flops() / 2
    assert len(macs.names) == UNITS and all(m > 0 for m in macs.unit_macs)


def test_image_to_video_transformers_are_refused():
    spec = FLOW_PRESETS[NAME]
    torch.manual_seed(0)
    model = diffusers.HunyuanVideo15Transformer3DModel(**{**spec.config, "task_type": "i2v"})
    bank = random_embeddings(model, 1, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^task_type: expected 't2v' for HunyuanVideo15Transformer3DModel "
                                         r"\(image-to-video conditioning is not supported by harmonica\), got 'i2v'$"):
        flow_task(model, bank, STEPS, spec.guidance, **spec.size)
