"""The cache engine on tiny diffusers DiT and PixArt transformers (CPU, fp32)."""

import contextlib

import pytest
import torch
from _helpers import assert_matches_reference, cuda_inputs, make_model, step_inputs, units_of
from torch.utils._python_dispatch import TorchDispatchMode

import harmonica
from harmonica import CacheSchedule
from harmonica.adapters import ADAPTERS
from harmonica.engine import CacheEngine
from harmonica.models import build_pipeline
from harmonica.units import cached_units

MODELS = ["tiny-dit", "tiny-pixart"]
STEPS = 4


@torch.no_grad()
def trajectory(model, steps=STEPS):
    return [model(**step_inputs(model, s)).sample for s in range(steps)]


@pytest.mark.parametrize("name", MODELS)
def test_no_cache_and_disable_are_bitwise_the_plain_model(name):
    model = make_model(name)
    plain = trajectory(model)
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, units_of(model)))
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model), plain))
    harmonica.disable(model)
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model), plain))
    assert not hasattr(model, "_harmonica")


class AtenOps(TorchDispatchMode):
    """Every aten op while `on`: its name and each tensor argument's and result's shape, strides and dtype."""

    def __init__(self):
        super().__init__()
        self.on, self.ops = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.ops.append((str(func), [(tuple(t.shape), t.stride(), t.dtype) for t in tensors]))
        return out


def block_ops(model) -> list:
    """The aten ops of one forward from its second block on (blocks, output norm and projection)."""
    log = AtenOps()
    hook = model.transformer_blocks[1].register_forward_pre_hook(lambda *_: setattr(log, "on", True))
    with torch.no_grad(), log:
        model(**step_inputs(model, 0))
    hook.remove()
    return log.ops


def test_no_cache_pixart_runs_the_plain_blocks_aten_ops():
    """From the second block on, an all-compute schedule runs diffusers' own ops on the same layouts, op for op:
    PatchEmbed's transposed (token stride 1) stream leaves the residual in the first block, as diffusers'
    `attn_output + hidden_states` makes it contiguous. Carried through every block (the fused ops' result is laid
    out like h), it cost a copy in each LayerNorm and the cross-attention query projection's matmul with an
    unfused bias: 4 extra (B, N, D) copies a block, besides strided residual kernels (PixArt-alpha 1024 fp16 on
    an H200: 3.7 ms a step over the plain pipeline)."""
    model = make_model("tiny-pixart")
    plain = block_ops(model)
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, units_of(model)))
    ops = block_ops(model)
    first = next((i for i, (a, b) in enumerate(zip(ops, plain)) if a != b), min(len(ops), len(plain)))
    assert ops == plain, (f"{len(ops)} ops against the plain blocks' {len(plain)}; the first difference, op {first}: "
                          f"{ops[first:first + 1]} against {plain[first:first + 1]}")


@pytest.mark.parametrize("name", MODELS)
def test_units_run_exactly_as_scheduled(name):
    """Module calls per step follow the table; the first step computes everything; a reuse differs."""
    model = make_model(name)
    K = units_of(model)
    table = torch.rand(STEPS, K, generator=torch.Generator().manual_seed(0)) > 0.5
    table[0] = True
    calls = torch.zeros(STEPS, K, dtype=torch.bool)
    engine = harmonica.enable(model, CacheSchedule(table, "random"))
    for k, (_, module) in enumerate(cached_units(model)):
        module.register_forward_hook(lambda *_, k=k: calls.__setitem__((engine.step, k), True))
    cached = trajectory(model)
    assert torch.equal(calls, table)
    assert torch.equal(cached[0], trajectory(make_model(name), 1)[0])
    assert not torch.equal(cached[-1], trajectory(make_model(name))[-1])


def dit_adapter(engine):
    """`engine`'s instance of the DiT adapter (adapters/basic.py), which holds its state for the engine's model."""
    (adapter,) = [adapter for adapter in engine.adapters if type(adapter) is ADAPTERS["BasicTransformerBlock"]]
    return adapter


@pytest.mark.parametrize("shared", [True, False])
def test_dit_embedding_once_per_step_when_every_block_holds_the_same(shared):
    model = make_model("tiny-dit")  # equal-sized parameters get equal values: every block's embedder is the same
    if not shared:
        with torch.no_grad():
            model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(0.5)
    plain = trajectory(model)
    engine = harmonica.enable(model, CacheSchedule.no_cache(STEPS, units_of(model)))
    assert dit_adapter(engine).shared_embedding == shared
    calls = []
    for block in model.transformer_blocks:
        block.norm1.emb.register_forward_hook(lambda *_: calls.append(engine.step))
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model), plain))
    blocks = len(model.transformer_blocks)  # + 1: diffusers' final layer calls block 0's embedder too
    assert calls == [s for s in range(STEPS) for _ in range(1 + (1 if shared else blocks))]


def dit_generation(model, steps=6):
    from harmonica.samplers import dit_ddim_sample

    dtype = next(model.parameters()).dtype
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    return dit_ddim_sample(model, torch.tensor([3, 7]), num_steps=steps, latents=latents)


def fp64_dit_generation(schedule=None):
    """The generation with every weight and activation in fp64 (the sampler's update stays fp32), with
    per-step modulations (no table): the reference against which an fp32 path's rounding is measured."""
    model = make_model("tiny-dit").double()
    if schedule is not None:
        dit_adapter(harmonica.enable(model, schedule)).shared_embedding = False
    return dit_generation(model)


def test_dit_modulations_are_computed_once_per_generation():
    """The batched modulation linear takes other GEMM kernels than the per-step one (MKL picks them by
    shape and CPU), so the two fp32 paths agree only to rounding: each must be as close to the fp64
    generation as the other, within twice its error (_helpers.assert_matches_reference)."""
    model = make_model("tiny-dit")  # every block's embedder is the same
    plain = dit_generation(model)
    engine = harmonica.enable(model, CacheSchedule.no_cache(6, units_of(model)))
    calls = []
    for block in model.transformer_blocks:
        block.norm1.linear.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    assert_matches_reference(dit_generation(model), plain, fp64_dit_generation(), "no-cache table")
    assert calls == [6 * 4] * len(model.transformer_blocks), "one linear over 6 steps x CFG batch 4 per block"
    assert engine.modulation.modulations.shape == (6, 2, 4, 6 * 16)

    fora = CacheSchedule.fora(6, units_of(model), 2)
    harmonica.enable(model, fora)
    with_table = dit_generation(model)
    dit_adapter(model._harmonica.engine).shared_embedding = False  # per-step, per-block modulations
    assert_matches_reference(with_table, dit_generation(model), fp64_dit_generation(fora), "fora:2 table")
    assert not torch.equal(with_table, plain)


def test_a_generation_without_known_timesteps_computes_modulations_per_step():
    """After a sampler's generation, plain forwards (no timesteps announced) must not reuse its table."""
    model = make_model("tiny-dit")
    plain = trajectory(model)
    engine = harmonica.enable(model, CacheSchedule.no_cache(STEPS, units_of(model)))
    dit_generation(model, STEPS)
    assert engine.timesteps is None and engine.step == 0
    assert all(torch.equal(a, b) for a, b in zip(trajectory(model), plain))
    assert not engine.modulation_active


def test_reused_unit_adds_gate_times_cache():
    model = make_model("tiny-dit")
    K = units_of(model)
    engine = CacheEngine(model, CacheSchedule.fora(2, K, 2))
    gen = torch.Generator().manual_seed(0)
    h, fresh = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 16, 16, generator=gen)
    gate0, gate1 = torch.randn(2, 16, generator=gen), torch.randn(2, 16, generator=gen)
    engine.run_unit(0, lambda: fresh, gate0, h)  # step 0 computes and fills the slot (step 1 reuses it)
    engine.step = 1
    out = engine.run_unit(0, lambda: pytest.fail("a reused unit was computed"), gate1, h)
    assert torch.equal(out, h + gate1[:, None] * fresh)


def test_training_mode_soft_gating():
    model = make_model("tiny-dit")
    engine = CacheEngine(model)
    gates = torch.tensor([[1.0] * 4, [0.3, 0.05, 0.3, 0.3]], requires_grad=True)
    engine.set_training(gates, tau=0.1)
    gen = torch.Generator().manual_seed(0)
    h, f0, f1 = (torch.randn(2, 16, 16, generator=gen) for _ in range(3))
    engine.run_unit(1, lambda: f0, None, h)
    assert torch.equal(engine.slots[1], f0)
    engine.step = 1
    out = engine.run_unit(1, lambda: f1, None, h)
    torch.testing.assert_close(out, h + 0.05 * f1 + 0.95 * f0)
    assert torch.equal(engine.slots[1], f0), "r = 0.05 <= tau must keep the slot"
    out.sum().backward()
    torch.testing.assert_close(gates.grad[1, 1], (f1 - f0).sum())


@pytest.mark.parametrize("name", MODELS)
def test_generations_restart_and_slots_are_reused(name):
    """A second generation equals the first even with the slots poisoned in between."""
    model = make_model(name)
    engine = harmonica.enable(model, CacheSchedule.fora(STEPS, units_of(model), 2))
    first = trajectory(model)
    slots = list(engine.slots)
    for slot in slots:
        if slot is not None:
            slot.fill_(float("nan"))
    second = trajectory(model)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert [s is t for s, t in zip(slots, engine.slots)] == [True] * len(slots), "slots were reallocated"
    assert engine.cache_bytes() == units_of(model) * 2 * 16 * 16 * 4


@contextlib.contextmanager
def forbid_host_reads(allowed=()):
    """Make every read of a tensor value on the host raise, but of the tensors `allowed` (and their views)."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    allowed = {t.untyped_storage().data_ptr() for t in allowed}

    def guarded(name):
        def read(self, *args, **kwargs):
            if self.untyped_storage().data_ptr() not in allowed:
                raise AssertionError("a tensor value was read on the host inside the step loop")
            return saved[name](self, *args, **kwargs)
        return read

    try:
        for n in names:
            setattr(torch.Tensor, n, guarded(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("name", MODELS)
def test_step_loop_reads_no_tensor_value(name):
    """None but the timestep argument, a host tensor here (a CUDA one is never read: the gpu tests)."""
    model = make_model(name)
    harmonica.enable(model, CacheSchedule.fora(STEPS, units_of(model), 2))
    inputs = [step_inputs(model, s) for s in range(STEPS)]
    with forbid_host_reads([step["timestep"] for step in inputs]), torch.no_grad():
        for step in inputs:
            model(**step)


@pytest.mark.parametrize("pipeline", ["PixArtAlphaPipeline", "PixArtSigmaPipeline"])
def test_cfg_halves_share_decisions_and_slots(pipeline):
    """PixArt's pipelines run both CFG halves as one batch: one call per computed unit, one slot of 2B."""
    import diffusers

    parts = build_pipeline("tiny-pixart", random_weights=True).components
    pipe = getattr(diffusers, pipeline)(**parts)
    K = units_of(pipe.transformer)
    engine = harmonica.enable(pipe, CacheSchedule.fora(6, K, 2))
    calls = []
    attn1 = cached_units(pipe.transformer)[0][1]
    attn1.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 8)
    pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
         negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=mask, num_inference_steps=6,
         height=64, width=64, use_resolution_binning=False, output_type="latent")
    assert calls == [2, 2, 2]
    assert engine.slots[0].shape[0] == 2
    assert harmonica.summary(pipe).sampler == "DPMSolverMultistepScheduler"


def test_pipeline_errors():
    pipe = build_pipeline("tiny-dit", random_weights=True)
    harmonica.enable(pipe, CacheSchedule.fora(5, units_of(pipe.transformer), 2))
    with pytest.raises(ValueError, match=r"num_inference_steps: expected 5 \(the cache schedule's steps\), got 3"):
        pipe(class_labels=[1], num_inference_steps=3, output_type="latent")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    with pytest.raises(RuntimeError, match=r"pipe.scheduler: replaced after harmonica.enable"):
        pipe(class_labels=[1], num_inference_steps=5, output_type="latent")


def pipeline_generation(pipe, steps: int) -> None:
    """One generation of a tiny DiT/PixArt pipeline (its timesteps: CPU tensors on the CPU)."""
    if type(pipe).__name__ == "DiTPipeline":
        pipe(class_labels=[1], num_inference_steps=steps, output_type="latent")
        return
    embeds, mask = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0)), torch.ones(1, 8)
    pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
         negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=mask,
         num_inference_steps=steps, height=64, width=64, use_resolution_binning=False, output_type="latent")


@pytest.mark.parametrize("name", MODELS)
def test_a_bare_transformer_run_by_a_pipeline_with_other_steps(name):
    """enable(pipe.transformer, ...) hooks no scheduler: a generation of more or fewer steps than the
    schedule is caught from the host timesteps; generations told apart by the step count alone warn once."""
    pipe = build_pipeline(name, random_weights=True)
    harmonica.enable(pipe.transformer, CacheSchedule.fora(4, units_of(pipe.transformer), 2))
    with pytest.raises(ValueError, match=r"^num_inference_steps: expected 4 \(the cache schedule's steps\), got more "
                                         r"\(timestep \d+ after \d+ at step 0\); pass the pipeline to harmonica"):
        pipeline_generation(pipe, 6)
    harmonica.reset(pipe.transformer)
    pipeline_generation(pipe, 3)
    with pytest.raises(ValueError, match=r"^num_inference_steps: expected 4 .*, got 3 \(timestep \d+ after \d+ at "
                                         r"step 3\)"):
        pipeline_generation(pipe, 4)
    harmonica.reset(pipe.transformer)
    with pytest.warns(UserWarning, match=r"a generation started that no sampler announced") as record:
        for _ in range(3):
            pipeline_generation(pipe, 4)
    assert len([w for w in record if "no sampler announced" in str(w.message)]) == 1


def test_bad_arguments():
    model = make_model("tiny-dit")
    with pytest.raises(ValueError, match=r"schedule: expected 4 units \(from the transformer\), got 3"):
        harmonica.enable(model, CacheSchedule.fora(4, 3, 2))
    with pytest.raises(ValueError, match=r"router_or_schedule: expected a Router or CacheSchedule, got str"):
        harmonica.enable(model, "fora:2")
    with pytest.raises(ValueError, match=r"expected one with harmonica enabled"):
        harmonica.summary(model)
    model.transformer_blocks[0].norm_type = "layer_norm"
    with pytest.raises(ValueError, match=r"transformer_blocks\[0\]: expected a DiT or PixArt block, got one with "
                                         r"norm_type 'layer_norm'"):
        harmonica.enable(model, CacheSchedule.fora(4, 4, 2))


def test_summary_counts_macs_at_the_latest_resolution():
    model = make_model("tiny-pixart")
    harmonica.enable(model, CacheSchedule.fora(STEPS, units_of(model), 2))
    trajectory(model)
    report = harmonica.summary(model)
    assert report.cur == 0.5
    assert report.counted_at == "64x64"
    assert 1.5 < report.theoretical_speedup < 2.0  # half the unit MACs skipped, the always-run part kept
    assert "CUR 50.0%" in str(report)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_step_loop_has_no_host_sync(name):
    model = make_model(name).cuda()
    harmonica.enable(model, CacheSchedule.fora(STEPS, units_of(model), 2))
    inputs = [cuda_inputs(model, s) for s in range(STEPS)]
    with torch.no_grad():
        for step in inputs:  # compile the kernels first
            model(**step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in inputs:
                model(**step)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_fused_path_matches_the_plain_model(name):
    model = make_model(name).cuda()
    with torch.no_grad():
        plain = [model(**cuda_inputs(model, s)).sample for s in range(STEPS)]
        harmonica.enable(model, CacheSchedule.no_cache(STEPS, units_of(model)))
        fused = [model(**cuda_inputs(model, s)).sample for s in range(STEPS)]
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
