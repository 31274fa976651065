"""Flux's block adapters on a tiny random FluxTransformer2DModel (CPU, fp32)."""

import torch
from diffusers import FluxTransformer2DModel
from graph_standin import StandInGraphs, runner_inputs

import harmonica
from harmonica import CacheSchedule
from harmonica.units import cached_units

B, N, M, STEPS = 2, 16, 5, 4
UNITS = 2 * 3 + 2 * 1  # 2 joint blocks (attn, ff, ff_context) + 2 single blocks (attn_mlp)


def make_flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                   axes_dims_rope=(2, 2, 4))
    with torch.no_grad():  # distinct values for every parameter (the image and text stream's weights differ)
        for i, p in enumerate(model.parameters()):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    return model


def step_inputs(step):
    gen = torch.Generator().manual_seed(100 + step)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    return dict(hidden_states=torch.randn(B, N, 4, generator=gen),
                encoder_hidden_states=torch.randn(B, M, 16, generator=gen),
                pooled_projections=torch.randn(B, 16, generator=gen), timestep=torch.full((B,), 1.0 - 0.2 * step),
                img_ids=torch.stack([torch.zeros(N), rows.flatten(), cols.flatten()], dim=1), txt_ids=torch.zeros(M, 3))


@torch.no_grad()
def trajectory(model, steps=STEPS):
    return [model(**step_inputs(s)).sample for s in range(steps)]


def test_units_of_a_flux_transformer():
    names = [name for name, _ in cached_units(make_flux())]
    assert names == [f"transformer_blocks.{b}.{kind}" for b in range(2) for kind in ("attn", "ff", "ff_context")] + [
        f"single_transformer_blocks.{b}.attn_mlp" for b in range(2)]


def test_no_cache_and_disable_are_bitwise_the_plain_model():
    model = make_flux()
    plain = trajectory(model)
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
    harmonica.reset(model)
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model), plain, strict=True))
    harmonica.disable(model)
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model), plain, strict=True))
    assert not any("forward" in vars(m) for m in model.modules())


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs():
    """FORA:2 over 4 steps: CUR 50%; reused units do not run; each slot holds its unit's step-2 output
    (the joint attention's: both streams), which step 3 reuses."""
    model = make_flux()
    plain = trajectory(model)
    schedule = CacheSchedule.fora(STEPS, UNITS, 2)
    assert schedule.cur == 0.5
    engine = harmonica.enable(model, schedule)
    harmonica.reset(model)
    calls = torch.zeros(STEPS, UNITS, dtype=torch.bool)
    fresh = {}  # unit -> its module's output at step 2
    single = {k: block for k, block in zip(range(6, 8), model.single_transformer_blocks)}

    def record(k):
        def hook(module, args, output):
            calls[engine.step, k] = True
            if engine.step == 2 and k not in single:
                fresh[k] = output
        return hook

    hooks = [module.register_forward_hook(record(k)) for k, (_, module) in enumerate(cached_units(model))]
    hooks += [block.proj_out.register_forward_hook(lambda m, a, out, k=k: fresh.__setitem__(k, out) if engine.step == 2
                                                  else None) for k, block in single.items()]
    cached = trajectory(model)
    for hook in hooks:
        hook.remove()
    assert torch.equal(calls, schedule.table)
    assert sorted(fresh) == list(range(UNITS))
    for k in range(UNITS):
        slot, expected = engine.slots[k], fresh[k]
        if k % 3 == 0 and k < 6:  # joint attention: (image (B, N, D), text (B, M, D))
            assert isinstance(slot, tuple) and all(torch.equal(s, e) for s, e in zip(slot, expected, strict=True))
        else:
            assert torch.equal(slot, expected)
    assert torch.equal(cached[2], plain[2]) and not torch.equal(cached[3], plain[3])
    harmonica.disable(model)


def test_graph_replay_equals_the_eager_engine():
    model = make_flux()
    schedule = CacheSchedule.fora(STEPS + 1, UNITS, 2)
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


def test_summary_counts_the_packed_tokens_of_the_latest_forward():
    """FLUX's hidden_states are packed tokens (B, L, C): the speedup is counted at L image tokens and the
    forward's text tokens, not at the last two dimensions read as a latent image."""
    from harmonica.bench.macs import count_macs

    model = make_flux()
    harmonica.enable(model, CacheSchedule.fora(STEPS, UNITS, 2))
    harmonica.reset(model)
    trajectory(model)
    report = harmonica.summary(model)
    harmonica.disable(model)
    expected = CacheSchedule.fora(STEPS, UNITS, 2).theoretical_speedup(count_macs(model, 16, 16 * N, caption_tokens=M))
    assert report.counted_at == f"{N} image tokens"
    assert report.theoretical_speedup == expected
    default_text = CacheSchedule.fora(STEPS, UNITS, 2).theoretical_speedup(count_macs(model, 16, 16 * N))
    assert abs(default_text - expected) > 1e-3  # the forward's M text tokens count, not a default
