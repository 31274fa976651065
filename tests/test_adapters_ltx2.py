"""LTX-2's block adapter on a tiny random LTX2VideoTransformer3DModel (CPU, fp32): video and audio streams."""

import pytest
import torch
from _adapter_checks import (
    assert_fora_reuses,
    assert_graph_replay_equals_eager,
    assert_no_cache_is_plain,
    distinct_random_parameters,
)

import harmonica
from harmonica import CacheSchedule
from harmonica.models import build_transformer
from harmonica.units import cached_units

B, FRAMES, SIDE, AUDIO, M, STEPS = 2, 2, 2, 5, 4, 4  # 2 x 2 x 2 video tokens, 5 audio tokens, 4 text tokens
KINDS = ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn", "ff",
         "audio_ff")
UNITS = 2 * len(KINDS)  # tiny-ltx2: 2 blocks


def make_ltx2():
    return distinct_random_parameters(build_transformer("tiny-ltx2"))


def step_inputs(step):
    """The transformer's arguments at `step` (LTX2Pipeline's: its timestep as sigma too, the text for both)."""
    gen = torch.Generator().manual_seed(100 + step)
    return dict(hidden_states=torch.randn(B, FRAMES * SIDE * SIDE, 8, generator=gen),
                audio_hidden_states=torch.randn(B, AUDIO, 8, generator=gen),
                encoder_hidden_states=torch.randn(B, M, 16, generator=gen),
                audio_encoder_hidden_states=torch.randn(B, M, 16, generator=gen),
                timestep=torch.full((B,), 1000.0 - 200 * step), sigma=torch.full((B,), 1000.0 - 200 * step),
                num_frames=FRAMES, height=SIDE, width=SIDE, audio_num_frames=AUDIO, use_cross_timestep=True)


@torch.no_grad()
def run(model, steps=STEPS):
    """Each step's video and audio outputs as one (B, N + A, C) tensor; the position coordinates made once, as the
    pipeline makes them (the forward builds them from host data otherwise)."""
    coords = dict(video_coords=model.rope.prepare_video_coords(B, FRAMES, SIDE, SIDE, "cpu"),
                  audio_coords=model.audio_rope.prepare_audio_coords(B, AUDIO, "cpu"))
    outs = [model(**step_inputs(s), **coords) for s in range(steps)]
    return [torch.cat([out.sample, out.audio_sample], dim=1) for out in outs]


def test_units_of_an_ltx2_transformer():
    names = [name for name, _ in cached_units(make_ltx2())]
    assert names == [f"transformer_blocks.{b}.{kind}" for b in range(2) for kind in KINDS]


def test_no_cache_and_disable_are_bitwise_the_plain_model():
    assert_no_cache_is_plain(make_ltx2(), run, UNITS, STEPS)


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs():
    """Each unit's slot holds its attention's or MLP's output: the a2v and v2a units one stream each."""
    assert_fora_reuses(make_ltx2(), run, UNITS)


def test_isolated_modalities_run_no_audio_video_unit():
    """isolate_modalities (the pipeline's modality guidance): no a2v / v2a unit runs, bitwise as diffusers."""
    model = make_ltx2()
    with torch.no_grad():
        plain = model(**step_inputs(0), isolate_modalities=True)
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
    try:
        with torch.no_grad():
            cached = model(**step_inputs(0), isolate_modalities=True)
    finally:
        harmonica.disable(model)
    assert torch.equal(cached.sample, plain.sample) and torch.equal(cached.audio_sample, plain.audio_sample)


def test_per_token_timesteps_are_refused():
    """The image-conditioned pipelines' timestep per token (B, N): one line, before any unit runs."""
    model = make_ltx2()
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
    inputs = {**step_inputs(0), "timestep": torch.full((B, FRAMES * SIDE * SIDE), 1000.0)}
    try:
        with pytest.raises(ValueError, match=r"^temb: expected one timestep per sample \(B, 1, n D\), got shape "
                                             r"\(2, 8, 96\) \(per-token timesteps are not supported by harmonica\)$"):
            with torch.no_grad():
                model(**inputs)
    finally:
        harmonica.disable(model)


def test_graph_replay_equals_the_eager_engine():
    assert_graph_replay_equals_eager(make_ltx2(), run, UNITS, STEPS + 1)
