"""Wan's block adapter on a tiny random WanTransformer3DModel (CPU; fp32, and bf16 for the fp32 residual)."""

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
from _helpers import DEVICE
from diffusers import WanTransformer3DModel

import harmonica
from harmonica import CacheSchedule
from harmonica.kernels.gated_residual import COMPUTE, gated_residual_fwd
from harmonica.units import cached_units

B, M, STEPS = 2, 5, 4
LATENT = (4, 3, 4, 4)  # channels, frames, height, width: 3 x 2 x 2 = 12 tokens at patch (1, 2, 2)
UNITS = 2 * 3  # 2 blocks x (attn1, attn2, ffn)


def make_wan(dtype=torch.float32):
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32)
    distinct_random_parameters(model)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # as from_pretrained(torch_dtype=dtype)
        keep = any(part in model._keep_in_fp32_modules for part in name.split("."))
        t.data = t.data.to(torch.float32 if keep else dtype)
    return model


def step_inputs(step, batch=B, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return dict(hidden_states=torch.randn(batch, *LATENT, generator=gen).to(dtype),
                encoder_hidden_states=torch.randn(batch, M, 16, generator=gen).to(dtype),
                timestep=torch.full((batch,), 900.0 - 200 * step))


def run(model, steps=STEPS, inputs=step_inputs):
    return trajectory(model, steps, inputs)


def test_units_of_a_wan_transformer():
    names = [name for name, _ in cached_units(make_wan())]
    assert names == [f"blocks.{b}.{kind}" for b in range(2) for kind in ("attn1", "attn2", "ffn")]


def test_no_cache_and_disable_are_bitwise_the_plain_model():
    assert_no_cache_is_plain(make_wan(), run, UNITS, STEPS)


def test_bf16_residual_is_added_in_fp32_as_diffusers_does():
    """bf16 model, fp32 modulation: the gated units add `(h.float() + out * gate).to(bf16)` (one rounding);
    the CPU engine runs the fused ops' torch references, bitwise diffusers' block forward."""
    model = make_wan(torch.bfloat16)

    def inputs(step):
        return step_inputs(step, dtype=torch.bfloat16)

    plain = run(model, inputs=inputs)
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
    harmonica.reset(model)
    cached = run(model, inputs=inputs)
    harmonica.disable(model)
    assert plain[0].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(cached, plain, strict=True))


def test_the_kernel_adds_an_fp32_gate_in_fp32():
    """The Triton kernel given bf16 h, fresh and an fp32 gate (B, 1, D): the fp32 value `h + gate * fresh`
    rounded once to bf16. The CPU interpreter computes as torch and truncates: bitwise. A GPU fuses the
    multiply-add (skipping the product's fp32 rounding) and rounds to nearest: within half a bf16 unit in
    the last place of the result plus that rounding."""
    gen = torch.Generator().manual_seed(0)
    h, fresh = (torch.randn(2, 12, 16, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    gate = torch.randn(2, 1, 16, generator=gen).to(DEVICE)
    slot, out = torch.full_like(fresh, float("nan")), torch.full_like(h, float("nan"))
    exact = h.float() + fresh.float() * gate  # Wan: (h.float() + out * gate), gate fp32
    gated_residual_fwd(h, fresh, slot, None, gate, out, mode=COMPUTE, write_cache=True)
    assert out.dtype == torch.bfloat16 and torch.equal(slot, fresh)
    if out.is_cuda:
        bound = exact.abs() * 2.0 ** -8 + (fresh.float() * gate).abs() * 2.0 ** -23
        assert ((out.float() - exact).abs() <= bound).all()
    else:
        assert torch.equal(out, (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16))


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs():
    assert_fora_reuses(make_wan(), run, UNITS)


def test_a_cfg_batch_keeps_its_halves_apart():
    """FORA:2 on a batch of cond and uncond rows: each row's trajectory is the one it has alone (the slots,
    gates and residual updates are per row). Batched matmuls may round differently: one fp32 rounding per
    term of the longest reduction (ffn_dim 32) of the output's scale."""
    batched, halves = fora_batch_and_rows_alone(make_wan(), lambda model, rows: run(model, inputs=lambda s: {
        k: v[rows] for k, v in step_inputs(s).items()}), UNITS, STEPS, B)
    for step, together in enumerate(batched):
        alone = torch.cat([halves[row][step] for row in range(B)])
        bound = 32 * torch.finfo(torch.float32).eps * together.abs().max().item()
        torch.testing.assert_close(together, alone, rtol=0, atol=bound)


def test_per_token_timesteps_are_refused():
    model = make_wan()
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
    harmonica.reset(model)
    inputs = step_inputs(0)
    inputs["timestep"] = torch.full((B, 12), 900.0)
    with pytest.raises(ValueError, match=r"temb: expected shape \(B, 6, D\) .*got \(2, 12, 6, 16\)"):
        with torch.no_grad():
            model(**inputs)
    harmonica.disable(model)


def test_graph_replay_equals_the_eager_engine():
    assert_graph_replay_equals_eager(make_wan(), run, UNITS, STEPS + 1)
