"""Flux's block adapters on a tiny random FluxTransformer2DModel (CPU, fp32)."""

import torch
from _adapter_checks import (
    assert_fora_reuses,
    assert_graph_replay_equals_eager,
    assert_no_cache_is_plain,
    distinct_random_parameters,
    trajectory,
)
from diffusers import FluxTransformer2DModel

import harmonica
from harmonica import CacheSchedule
from harmonica.units import cached_units

B, N, M, STEPS = 2, 16, 5, 4
UNITS = 2 * 3 + 2 * 1  # 2 joint blocks (attn, ff, ff_context) + 2 single blocks (attn_mlp)


def make_flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                   axes_dims_rope=(2, 2, 4))
    return distinct_random_parameters(model)


def step_inputs(step):
    gen = torch.Generator().manual_seed(100 + step)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    return dict(hidden_states=torch.randn(B, N, 4, generator=gen),
                encoder_hidden_states=torch.randn(B, M, 16, generator=gen),
                pooled_projections=torch.randn(B, 16, generator=gen), timestep=torch.full((B,), 1.0 - 0.2 * step),
                img_ids=torch.stack([torch.zeros(N), rows.flatten(), cols.flatten()], dim=1), txt_ids=torch.zeros(M, 3))


def run(model, steps=STEPS):
    return trajectory(model, steps, step_inputs)


def test_units_of_a_flux_transformer():
    names = [name for name, _ in cached_units(make_flux())]
    assert names == [f"transformer_blocks.{b}.{kind}" for b in range(2) for kind in ("attn", "ff", "ff_context")] + [
        f"single_transformer_blocks.{b}.attn_mlp" for b in range(2)]


def test_no_cache_and_disable_are_bitwise_the_plain_model():
    assert_no_cache_is_plain(make_flux(), run, UNITS, STEPS)


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs():
    """The joint attentions' slots hold both streams; a single block's unit output is its proj_out's."""
    model = make_flux()
    assert_fora_reuses(model, run, UNITS, joint={0, 3},
                       taps={6 + b: block.proj_out for b, block in enumerate(model.single_transformer_blocks)})


def test_graph_replay_equals_the_eager_engine():
    assert_graph_replay_equals_eager(make_flux(), run, UNITS, STEPS + 1)


def test_summary_counts_the_packed_tokens_of_the_latest_forward():
    """FLUX's hidden_states are packed tokens (B, L, C): the speedup is counted at L image tokens and the
    forward's text tokens, not at the last two dimensions read as a latent image."""
    from harmonica.macs import count_macs

    model = make_flux()
    harmonica.enable(model, CacheSchedule.fora(STEPS, UNITS, 2))
    harmonica.reset(model)
    run(model)
    report = harmonica.summary(model)
    harmonica.disable(model)
    expected = CacheSchedule.fora(STEPS, UNITS, 2).theoretical_speedup(count_macs(model, 16, 16 * N, text_tokens=M))
    assert report.counted_at == f"{N} image tokens"
    assert report.theoretical_speedup == expected
    default_text = CacheSchedule.fora(STEPS, UNITS, 2).theoretical_speedup(count_macs(model, 16, 16 * N))
    assert abs(default_text - expected) > 1e-3  # the forward's M text tokens count, not a default
