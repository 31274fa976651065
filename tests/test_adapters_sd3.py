"""SD3/SD3.5's block adapter on tiny random SD3Transformer2DModels (CPU, fp32): SD3 (3 joint blocks, the
last one `context_pre_only`) and SD3.5 with dual attention in block 0. The caching tests run SD3.5, whose
blocks cover every path: dual attention (block 0), both streams (blocks 0, 1), the last block (2)."""

import pytest
import torch
from _adapter_checks import (
    assert_fora_reuses,
    assert_graph_replay_equals_eager,
    assert_no_cache_is_plain,
    distinct_random_parameters,
    trajectory,
)
from diffusers import SD3Transformer2DModel

import harmonica
from harmonica import CacheSchedule
from harmonica.units import cached_units

B, SIZE, M, STEPS = 2, 8, 5, 4
KINDS = ("attn", "ff", "ff_context")
# [(dual attention layers, unit kinds per block)]: blocks 0-1 (attn, ff, ff_context) and the last (attn, ff);
# a dual block adds attn2 after attn
VARIANTS = {"sd3": ((), [KINDS, KINDS, ("attn", "ff")]),
            "sd35": ((0,), [("attn", "attn2", "ff", "ff_context"), KINDS, ("attn", "ff")])}


def make_sd3(variant):
    model = SD3Transformer2DModel(sample_size=SIZE, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=SIZE,
                                  dual_attention_layers=VARIANTS[variant][0])
    return distinct_random_parameters(model)


def num_units(variant):
    return sum(len(kinds) for kinds in VARIANTS[variant][1])


def step_inputs(step, seed=100, batch=B):
    gen = torch.Generator().manual_seed(seed + step)
    return dict(hidden_states=torch.randn(batch, 4, SIZE, SIZE, generator=gen),
                encoder_hidden_states=torch.randn(batch, M, 16, generator=gen),
                pooled_projections=torch.randn(batch, 16, generator=gen),
                timestep=torch.full((batch,), 1.0 - 0.2 * step))


def run(model, steps=STEPS, inputs=step_inputs):
    return trajectory(model, steps, inputs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_units_of_an_sd3_transformer(variant):
    names = [name for name, _ in cached_units(make_sd3(variant))]
    assert names == [f"transformer_blocks.{b}.{kind}" for b, kinds in enumerate(VARIANTS[variant][1])
                     for kind in kinds]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_cache_and_disable_are_bitwise_the_plain_model(variant):
    assert_no_cache_is_plain(make_sd3(variant), run, num_units(variant), STEPS)


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs(variant="sd35"):
    """The joint attentions' slots hold both streams, but the last block's the image's alone (the text
    output it discards is not kept)."""
    model = make_sd3(variant)
    attn = [k for k, (name, _) in enumerate(cached_units(model)) if name.endswith(".attn")]
    assert_fora_reuses(model, run, num_units(variant), joint=attn[:-1], image_only=attn[-1:])


def test_a_cfg_batch_keeps_its_halves_apart(variant="sd35"):
    """FORA:2 on a batch of cond and uncond halves (different inputs) gives each half what it gives alone,
    bitwise. Alone = as both halves of a batch of 2: equal shapes, so equal rounding (a batch of 1 rounds
    its matmuls otherwise)."""
    model = make_sd3(variant)
    schedule = CacheSchedule.fora(STEPS, num_units(variant), 2)

    def batch(*seeds):
        def inputs(s):
            halves = [step_inputs(s, seed=seed, batch=1) for seed in seeds]
            return {name: torch.cat([half[name] for half in halves]) for name in halves[0]}
        return inputs

    results = []
    for seeds in ((100, 200), (100, 100), (200, 200)):
        harmonica.enable(model, schedule)
        harmonica.reset(model)
        results.append(run(model, inputs=batch(*seeds)))
        harmonica.disable(model)
    for both, cond, uncond in zip(*results, strict=True):
        assert torch.equal(both[0], cond[0]) and torch.equal(both[1], uncond[1])
    assert not torch.equal(results[0][-1][0], results[0][-1][1])


def test_graph_replay_equals_the_eager_engine():
    assert_graph_replay_equals_eager(make_sd3("sd35"), run, num_units("sd35"), STEPS + 1)


def test_feed_forward_chunking_is_refused():
    model = make_sd3("sd3")
    model.enable_forward_chunking(4)
    with pytest.raises(ValueError, match=r"transformer_blocks\[0\]: expected an SD3 block without feed-forward "
                                         r"chunking, got chunk size 4 \(enable_forward_chunking\)"):
        harmonica.enable(model, CacheSchedule.no_cache(STEPS, num_units("sd3")))
    assert not any("forward" in vars(m) for m in model.modules())
