"""Qwen-Image's block adapter on a tiny random QwenImageTransformer2DModel (CPU, fp32)."""

import pytest
import torch
from _adapter_checks import (
    assert_fora_reuses,
    assert_graph_replay_equals_eager,
    assert_no_cache_is_plain,
    distinct_random_parameters,
    fora_batch_and_rows_alone,
    trajectory,
)
from diffusers import QwenImageTransformer2DModel

import harmonica
from harmonica import CacheSchedule
from harmonica.engine import CacheEngine
from harmonica.families import qwen_image as qwen_adapter
from harmonica.units import cached_units

B, N, M, STEPS = 2, 16, 5, 4  # N: a 4 x 4 grid of packed 2 x 2 latent patches
UNITS = 2 * 3  # 2 blocks (attn, img_mlp, txt_mlp)
MASK = torch.tensor([[True] * M, [True] * (M - 2) + [False] * 2])  # row 1's last two text tokens: padding


def make_qwen_image(**config):
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        axes_dims_rope=(2, 2, 4), **config)
    return distinct_random_parameters(model)


def step_inputs(step, rows=slice(None), mask=MASK):
    """The transformer's arguments at `step` (QwenImagePipeline's), for the batch rows `rows`; mask None:
    no text padding (the pipeline drops an all-True mask)."""
    gen = torch.Generator().manual_seed(100 + step)
    hidden, text = torch.randn(B, N, 16, generator=gen), torch.randn(B, M, 16, generator=gen)
    count = len(range(B)[rows])
    return dict(hidden_states=hidden[rows], encoder_hidden_states=text[rows],
                encoder_hidden_states_mask=None if mask is None else mask[rows],
                timestep=torch.full((count,), 1.0 - 0.2 * step), img_shapes=[[(1, 4, 4)]] * count)


def run(model, steps=STEPS, rows=slice(None), mask=MASK):
    return trajectory(model, steps, lambda s: step_inputs(s, rows, mask))


def test_units_of_a_qwen_image_transformer():
    names = [name for name, _ in cached_units(make_qwen_image())]
    assert names == [f"transformer_blocks.{b}.{kind}" for b in range(2) for kind in ("attn", "img_mlp", "txt_mlp")]


def test_no_cache_and_disable_are_bitwise_the_plain_model():
    assert_no_cache_is_plain(make_qwen_image(), run, UNITS, STEPS)


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs():
    """The joint attentions' slots hold both streams (image, text)."""
    assert_fora_reuses(make_qwen_image(), run, UNITS, joint={0, 3})


def test_cfg_batch_halves_equal_the_halves_run_alone():
    """A CFG batch (row 0 cond, row 1 uncond with padded text) under FORA:2: each half's trajectory is
    the one it has run alone (its slots are the batch's rows, never mixed). Up to rounding: the CPU
    matmuls of 1 and 2 rows round differently (diffusers' own model too), within fp32 eps x the longest
    reduction (the MLPs' hidden width 4 x 16) x the output's magnitude."""
    batch, alone = fora_batch_and_rows_alone(make_qwen_image(), lambda model, rows: run(model, rows=rows),
                                             UNITS, STEPS, B)
    for row in range(B):
        for a, b in zip(batch, alone[row], strict=True):
            tolerance = torch.finfo(torch.float32).eps * 4 * 16 * b.abs().max().item()
            torch.testing.assert_close(a[row:row + 1], b, rtol=0, atol=tolerance)


def test_fp16_block_clips_both_streams_as_diffusers_does():
    """fp16 residual streams at +-6e4 plus MLP outputs scaled up overflow; diffusers clips both streams
    to +-65504 at the block's end, and so does the adapter (bitwise, each stream's output)."""
    model = make_qwen_image().half()
    block = model.transformer_blocks[0]
    with torch.no_grad():
        block.img_mlp.net[2].weight.mul_(4000)
        block.txt_mlp.net[2].weight.mul_(4000)
    gen = torch.Generator().manual_seed(7)
    inputs = dict(hidden_states=torch.randn(B, N, 16, generator=gen).sign().mul(6e4).half(),
                  encoder_hidden_states=torch.randn(B, M, 16, generator=gen).sign().mul(6e4).half(),
                  encoder_hidden_states_mask=MASK, temb=torch.randn(B, 16, generator=gen).half(),
                  image_rotary_emb=model.pos_embed([[(1, 4, 4)]] * B, max_txt_seq_len=M, device=torch.device("cpu")))
    with torch.no_grad():
        plain = block(**inputs)
    assert all((stream.abs() == 65504).any() for stream in plain), "no stream overflowed: the test checks nothing"
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
    with torch.no_grad():
        cached = block(**inputs)
    harmonica.disable(model)
    assert all(torch.equal(a, b) for a, b in zip(cached, plain, strict=True))


def test_per_token_modulation_is_refused():
    with pytest.raises(ValueError, match=r"transformer_blocks\[0\]: expected a Qwen-Image block without "
                                         r"zero_cond_t .*, got zero_cond_t=True"):
        CacheEngine(make_qwen_image(zero_cond_t=True), CacheSchedule.no_cache(STEPS, UNITS))


def rope_tables(model) -> list:
    """The rotary tables diffusers' QwenEmbedRope keeps in its caches: alive across steps, so a captured
    graph may read them."""
    rope, cpu = model.pos_embed, torch.device("cpu")
    return [*rope._get_device_freqs(cpu), rope._compute_video_freqs(1, 4, 4, 0, cpu)]


@pytest.mark.parametrize("mask", [MASK, None], ids=["text-padding", "no-padding"])
def test_graph_replay_equals_the_eager_engine(mask):
    """With text padding too: diffusers' model forward derives the text lengths from the mask with a fallback
    copied from the host (compute_text_seq_len_from_mask), which a capture refuses; the adapter's setup gives
    the forward a version without the copy (red before)."""
    model = make_qwen_image()
    assert_graph_replay_equals_eager(model, lambda model, steps: run(model, steps, mask=mask), UNITS, STEPS + 1,
                                     graph_inputs=lambda: rope_tables(model))


@pytest.mark.parametrize("rows", [[[True, True, False]], [[False, False, False]], [[True, False, True]],
                                  [[True, True, True], [False, True, False]]])
def test_text_lengths_are_diffusers(rows):
    """harmonica's text lengths equal diffusers' compute_text_seq_len_from_mask (the original function)."""
    from diffusers.models.transformers import transformer_qwenimage as module

    original = module.compute_text_seq_len_from_mask  # no engine is enabled between tests
    assert original is not qwen_adapter.text_lengths
    mask = torch.tensor(rows)
    text = torch.zeros(*mask.shape, 4)
    ours, theirs = qwen_adapter.text_lengths(text, mask.int()), original(text, mask.int())
    assert ours[0] == theirs[0] and torch.equal(ours[1], theirs[1]) and torch.equal(ours[2], theirs[2])
    assert qwen_adapter.text_lengths(text, None) == original(text, None)


def test_diffusers_text_lengths_are_back_once_the_last_engine_is_disabled():
    from diffusers.models.transformers import transformer_qwenimage as module

    original = module.compute_text_seq_len_from_mask
    first, second = make_qwen_image(), make_qwen_image()
    harmonica.enable(first, CacheSchedule.fora(STEPS, UNITS, 2))
    harmonica.enable(second, CacheSchedule.fora(STEPS, UNITS, 2))
    assert module.compute_text_seq_len_from_mask is qwen_adapter.text_lengths
    harmonica.disable(first)
    assert module.compute_text_seq_len_from_mask is qwen_adapter.text_lengths  # the second still runs
    harmonica.disable(second)
    assert module.compute_text_seq_len_from_mask is original
