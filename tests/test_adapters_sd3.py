"""SD3/SD3.5's block adapter on tiny random SD3Transformer2DModels (CPU, fp32): SD3 (3 joint blocks, the
last one `context_pre_only`) and SD3.5 with dual attention in block 0. The caching tests run SD3.5, whose
blocks cover every path: dual attention (block 0), both streams (blocks 0, 1), the last block (2)."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from graph_standin import StandInGraphs, runner_inputs

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
    with torch.no_grad():  # distinct values for every parameter (the image and text stream's weights differ)
        for i, p in enumerate(model.parameters()):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    return model


def num_units(variant):
    return sum(len(kinds) for kinds in VARIANTS[variant][1])


def step_inputs(step, seed=100, batch=B):
    gen = torch.Generator().manual_seed(seed + step)
    return dict(hidden_states=torch.randn(batch, 4, SIZE, SIZE, generator=gen),
                encoder_hidden_states=torch.randn(batch, M, 16, generator=gen),
                pooled_projections=torch.randn(batch, 16, generator=gen),
                timestep=torch.full((batch,), 1.0 - 0.2 * step))


@torch.no_grad()
def trajectory(model, steps=STEPS, inputs=step_inputs):
    return [model(**inputs(s)).sample for s in range(steps)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_units_of_an_sd3_transformer(variant):
    names = [name for name, _ in cached_units(make_sd3(variant))]
    assert names == [f"transformer_blocks.{b}.{kind}" for b, kinds in enumerate(VARIANTS[variant][1])
                     for kind in kinds]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_cache_and_disable_are_bitwise_the_plain_model(variant):
    model = make_sd3(variant)
    plain = trajectory(model)
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, num_units(variant)))
    harmonica.reset(model)
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model), plain, strict=True))
    harmonica.disable(model)
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model), plain, strict=True))
    assert not any("forward" in vars(m) for m in model.modules())


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs(variant="sd35"):
    """FORA:2 over 4 steps: CUR 50%; reused units do not run; each slot holds its unit's step-2 output
    (the joint attention's: both streams, but the image's alone in the last block), which step 3 reuses."""
    model = make_sd3(variant)
    plain = trajectory(model)
    K = num_units(variant)
    schedule = CacheSchedule.fora(STEPS, K, 2)
    assert schedule.cur == 0.5
    engine = harmonica.enable(model, schedule)
    harmonica.reset(model)
    calls = torch.zeros(STEPS, K, dtype=torch.bool)
    fresh = {}  # unit -> its module's output at step 2

    def record(k):
        def hook(module, args, output):
            calls[engine.step, k] = True
            if engine.step == 2:
                fresh[k] = output
        return hook

    units = cached_units(model)
    hooks = [module.register_forward_hook(record(k)) for k, (_, module) in enumerate(units)]
    cached = trajectory(model)
    for hook in hooks:
        hook.remove()
    assert torch.equal(calls, schedule.table)
    assert sorted(fresh) == list(range(K))
    last = f"transformer_blocks.{len(model.transformer_blocks) - 1}.attn"
    for k, (name, _) in enumerate(units):
        slot, expected = engine.slots[k], fresh[k]
        if name.endswith(".attn") and name != last:  # (image (B, N, D), text (B, M, D))
            assert isinstance(slot, tuple) and all(torch.equal(s, e) for s, e in zip(slot, expected, strict=True))
        elif name == last:  # the text output the last block discards is not kept
            assert torch.equal(slot, expected[0])
        else:
            assert torch.equal(slot, expected)
    assert torch.equal(cached[2], plain[2]) and not torch.equal(cached[3], plain[3])
    harmonica.disable(model)


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
        results.append(trajectory(model, inputs=batch(*seeds)))
        harmonica.disable(model)
    for both, cond, uncond in zip(*results, strict=True):
        assert torch.equal(both[0], cond[0]) and torch.equal(both[1], uncond[1])
    assert not torch.equal(results[0][-1][0], results[0][-1][1])


def test_graph_replay_equals_the_eager_engine():
    model = make_sd3("sd35")
    schedule = CacheSchedule.fora(STEPS + 1, num_units("sd35"), 2)
    harmonica.enable(model, schedule)
    harmonica.reset(model)
    eager = trajectory(model, STEPS + 1)
    harmonica.disable(model)
    harmonica.enable(model, schedule, cuda_graphs=True)
    runner = model._harmonica.graphs
    runner.backend = StandInGraphs(lambda: runner_inputs(runner))
    harmonica.reset(model)
    replayed = trajectory(model, STEPS + 1)
    harmonica.disable(model)
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed, strict=True))
    assert runner.captures == 3 and runner.replays == 2


def test_feed_forward_chunking_is_refused():
    model = make_sd3("sd3")
    model.enable_forward_chunking(4)
    with pytest.raises(ValueError, match=r"transformer_blocks\[0\]: expected an SD3 block without feed-forward "
                                         r"chunking, got chunk size 4 \(enable_forward_chunking\)"):
        harmonica.enable(model, CacheSchedule.no_cache(STEPS, num_units("sd3")))
    assert not any("forward" in vars(m) for m in model.modules())
