"""The adapter mechanism on a toy two-list transformer: a joint unit feeding two residual streams (as
Flux's joint attention), per-stream units, a one-unit block in a second list; unsupported classes."""

import re

import pytest
import torch
from _adapter_checks import assert_no_cache_is_plain
from _helpers import rounding_bound
from torch import nn

import harmonica
from harmonica import CacheSchedule
from harmonica.adapters import ADAPTERS, Adapter, register, supported
from harmonica.engine import CacheEngine
from harmonica.units import cached_units, units_of

D, N, M, B, STEPS = 8, 5, 3, 2, 4


class ToyJointBlock(nn.Module):
    """Image stream x (B, N, D) and text stream c (B, M, D): a joint unit `attn`, then `ff` on x and
    `ff_context` on c, each update gated by a (B, 1, D) modulation of temb (B, D)."""

    def __init__(self):
        super().__init__()
        self.mod, self.attn = nn.Linear(D, 4 * D), nn.Linear(D, D)
        self.ff, self.ff_context = nn.Linear(D, D), nn.Linear(D, D)

    def gates(self, temb):
        return [g[:, None] for g in self.mod(temb).chunk(4, dim=1)]

    def attend(self, x, c):
        joint = torch.tanh(self.attn(torch.cat([c, x], dim=1)))
        joint = joint + joint.mean(dim=1, keepdim=True)  # the streams see each other
        return joint[:, M:], joint[:, :M]

    def forward(self, x, c, temb):
        return self.run(lambda compute: compute(), x, c, temb)

    def run(self, unit, x, c, temb):
        """unit: (compute) -> the unit's output(s) to add."""
        ga, gc, gf, gfc = self.gates(temb)
        ax, ac = unit(lambda: self.attend(x, c))
        x, c = x + ga * ax, c + gc * ac
        x = x + gf * unit(lambda: self.ff(x))
        return x, c + gfc * unit(lambda: self.ff_context(c))


class ToySingleBlock(nn.Module):
    """One unit on x (B, N, D): `proj`, gated."""

    def __init__(self):
        super().__init__()
        self.mod, self.proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x, temb):
        return self.run(lambda compute: compute(), x, temb)

    def run(self, unit, x, temb):
        return x + self.mod(temb)[:, None] * unit(lambda: torch.tanh(self.proj(x)))


class ToyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(1, D)
        self.transformer_blocks = nn.ModuleList([ToyJointBlock(), ToyJointBlock()])
        self.single_transformer_blocks = nn.ModuleList([ToySingleBlock()])
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))

    def forward(self, hidden_states, timestep, encoder_hidden_states, unit=None):
        """unit: None runs each block's forward, else each block's `run` with it (the reference)."""
        temb = torch.nn.functional.silu(self.embed(timestep[:, None].float()))
        x, c = hidden_states, encoder_hidden_states
        for block in self.transformer_blocks:
            x, c = block(x, c, temb) if unit is None else block.run(unit, x, c, temb)
        for block in self.single_transformer_blocks:
            x = block(x, temb) if unit is None else block.run(unit, x, temb)
        return x


class ToyJointAdapter(Adapter):
    block_class = "ToyJointBlock"
    kinds = ("attn", "ff", "ff_context")
    bodies = {"attn": lambda block, x, c: block.attend(x, c), "ff": lambda block, x: block.ff(x),
              "ff_context": lambda block, c: block.ff_context(c)}

    def forward(self, engine, block, index, position, x, c, temb):
        ga, gc, gf, gfc = block.gates(temb)
        bodies = engine.bodies[self.block_class]
        x, c = engine.run_unit(index["attn"], lambda: bodies["attn"](block, x, c), (ga, gc), (x, c))
        x = engine.run_unit(index["ff"], lambda: bodies["ff"](block, x), gf, x)
        return x, engine.run_unit(index["ff_context"], lambda: bodies["ff_context"](block, c), gfc, c)


class ToySingleAdapter(Adapter):
    block_class = "ToySingleBlock"
    kinds = ("proj",)
    bodies = {"proj": lambda block, x: torch.tanh(block.proj(x))}

    def forward(self, engine, block, index, position, x, temb):
        bodies = engine.bodies[self.block_class]
        return engine.run_unit(index["proj"], lambda: bodies["proj"](block, x), block.mod(temb)[:, None], x)


UNITS = 7  # 2 joint blocks x 3 + 1 single block x 1


@pytest.fixture
def toy():
    register(ToyJointAdapter)
    register(ToySingleAdapter)
    yield ToyTransformer()
    del ADAPTERS["ToyJointBlock"], ADAPTERS["ToySingleBlock"]


def step_inputs(step):
    gen = torch.Generator().manual_seed(step)
    return dict(hidden_states=torch.randn(B, N, D, generator=gen), timestep=torch.full((B,), 900 - 200 * step),
                encoder_hidden_states=torch.randn(B, M, D, generator=gen))


@torch.no_grad()
def trajectory(model, steps=STEPS, unit_for_step=None):
    return [model(**step_inputs(s), unit=None if unit_for_step is None else unit_for_step(s)) for s in range(steps)]


def scheduled_reference(model, table):
    """The generation with unit k of step s computed where table[s, k], else its latest computed output."""
    cache = {}

    def unit_for_step(s):
        ks = iter(range(UNITS))  # units run in execution order, once each per forward

        def unit(compute):
            k = next(ks)
            if table[s, k]:
                cache[k] = compute()
            return cache[k]
        return unit
    return trajectory(model, unit_for_step=unit_for_step)


def test_unit_names_and_modules_follow_the_block_lists_in_order(toy):
    names = [name for name, _ in cached_units(toy)]
    assert names == [f"transformer_blocks.{b}.{kind}" for b in range(2) for kind in ("attn", "ff", "ff_context")] + [
        "single_transformer_blocks.0.proj"]
    assert cached_units(toy)[1][1] is toy.transformer_blocks[0].ff
    assert units_of(toy)[-1].modules == ("single_transformer_blocks.0.proj",)


def test_no_cache_and_disable_are_bitwise_the_plain_model(toy):
    assert_no_cache_is_plain(toy, trajectory, UNITS, STEPS)


def test_a_joint_unit_reuses_both_streams_as_scheduled(toy):
    """FORA:2: reused units do not run, the generation equals the scheduled reference, and the joint
    unit's slot holds one tensor per stream."""
    schedule = CacheSchedule.fora(STEPS, UNITS, 2)
    plain = trajectory(toy)
    calls = torch.zeros(STEPS, UNITS, dtype=torch.bool)
    engine = harmonica.enable(toy, schedule)
    harmonica.reset(toy)
    hooks = [module.register_forward_hook(lambda *_, k=k: calls.__setitem__((engine.step, k), True))
             for k, (_, module) in enumerate(cached_units(toy))]
    cached = trajectory(toy)
    for hook in hooks:
        hook.remove()
    slot = engine.slots[0]
    assert isinstance(slot, tuple) and [tuple(s.shape) for s in slot] == [(B, N, D), (B, M, D)]
    assert engine.cache_bytes() == 4 * B * D * (2 * (N + M + N + M) + N)  # fp32 slots of 2 joint blocks, 1 single
    harmonica.disable(toy)
    assert torch.equal(calls, schedule.table)
    assert all(torch.equal(a, b) for a, b in zip(cached, scheduled_reference(toy, schedule.table), strict=True))
    assert torch.equal(cached[0], plain[0]) and not torch.equal(cached[1], plain[1])


def test_training_blends_each_stream_of_a_joint_unit(toy):
    """Soft gating: each stream's output is slot + r (fresh - slot), the slot refreshed where r > tau."""
    gates = torch.rand(STEPS, UNITS, generator=torch.Generator().manual_seed(3))
    tau = 0.5
    engine = CacheEngine(toy)
    engine.set_training(gates, tau)
    engine.begin()
    cache = {}

    def unit_for_step(s):
        ks = iter(range(UNITS))

        def unit(compute):
            k, fresh = next(ks), compute()
            if s == 0:
                cache[k] = fresh
                return fresh
            parts = fresh if isinstance(fresh, tuple) else (fresh,)
            old = cache[k] if isinstance(fresh, tuple) else (cache[k],)
            blended = tuple(o + gates[s, k] * (f - o) for f, o in zip(parts, old))
            if gates[s, k] > tau:
                cache[k] = blended if isinstance(fresh, tuple) else blended[0]
            return blended if isinstance(fresh, tuple) else blended[0]
        return unit

    soft = trajectory(toy)
    engine.remove()
    reference = trajectory(toy, unit_for_step=unit_for_step)
    # the engine's fused ops may form the blend otherwise: a rounding per term of width D in each of the units
    for a, b in zip(soft, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=rounding_bound(b, D * UNITS))


def test_an_unsupported_block_class_is_named_with_the_supported_ones(toy):
    toy.single_transformer_blocks.append(nn.Linear(D, D))
    assert {"BasicTransformerBlock", "ToyJointBlock", "ToySingleBlock"} <= set(supported())
    message = re.escape(f"single_transformer_blocks[1]: expected a block of a supported class "
                        f"({', '.join(supported())}), got Linear")
    with pytest.raises(ValueError, match=message):
        cached_units(toy)
    with pytest.raises(ValueError, match=message):
        harmonica.enable(toy, CacheSchedule.no_cache(STEPS, UNITS + 1))
    assert not any("forward" in vars(m) for m in toy.modules()) and not hasattr(toy, "_harmonica")


@pytest.mark.parametrize("given", [nn.Linear(2, 2), [nn.Linear(2, 2)], []], ids=["module", "list", "empty-list"])
def test_a_model_without_block_lists_is_refused(given):
    got = "an empty list" if given == [] else "Linear"
    with pytest.raises(ValueError, match=re.escape(f"pipe_or_transformer: expected a diffusers pipeline, transformer "
                                                   f"or list of transformers with blocks of {', '.join(supported())}, "
                                                   f"got {got}")):
        harmonica.enable(given, CacheSchedule.no_cache(STEPS, 1))
    with pytest.raises(ValueError, match=r"transformer: expected a diffusers transformer with blocks"):
        cached_units(nn.Linear(2, 2))


def test_a_block_class_takes_one_adapter(toy):
    with pytest.raises(ValueError, match=r"adapter: expected one per block class, got a second for ToyJointBlock"):
        register(ToyJointAdapter)


def test_compile_takes_each_block_class_bodies_once_per_kind(toy):
    """One compiled graph per unit kind of each block class (attn, ff, ff_context, proj), shared by the
    blocks; the FORA generation stays bitwise the eager engine's; remove drops the compiled bodies."""
    schedule = CacheSchedule.fora(STEPS, UNITS, 2)
    engine = harmonica.enable(toy, schedule)
    harmonica.reset(toy)
    eager = trajectory(toy)
    graphs = []
    engine = harmonica.enable(toy, schedule, compile={"backend": lambda gm, _: graphs.append(gm) or gm.forward})
    harmonica.reset(toy)
    compiled = trajectory(toy)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))
    assert len(graphs) == 4 and set(engine.bodies) == {"ToyJointBlock", "ToySingleBlock"}
    harmonica.disable(toy)
    assert engine.bodies["ToyJointBlock"]["attn"] is ToyJointAdapter.bodies["attn"] and not engine._compiled_codes
