"""gated_residual: the Triton kernels (interpreter on CPU) against the torch reference in fp32."""

import pytest
import torch
from _helpers import DEVICE, DTYPES, assert_matches_reference, dtype_id, nan_like, randn
from hypothesis import given
from hypothesis import strategies as st

from harmonica.kernels import _triton
from harmonica.kernels.gated_residual import (
    BLEND,
    COMPUTE,
    REUSE,
    GatedResidualFunction,
    _launch_shape,
    gated_residual,
    gated_residual_bwd,
    gated_residual_compute,
    gated_residual_compute_ref,
    gated_residual_forecast,
    gated_residual_forecast_fwd,
    gated_residual_forecast_ref,
    gated_residual_fwd,
    gated_residual_ref,
    gated_residual_reuse,
    gated_residual_reuse_ref,
)

SHAPES = [(2, 63, 72), (1, 5, 1152)]
GATES = ["BD", "B1D", "chunk", "none"]  # chunk: a strided (B, D) slice of a (B, 6D) modulation, as diffusers makes


def make_gate(kind, B, D, dtype, gen):
    if kind == "none":
        return None
    if kind == "chunk":
        return randn((B, 6 * D), dtype, gen=gen)[:, 2 * D:3 * D]
    gate = randn((B, D), dtype, gen=gen)
    return gate.unsqueeze(1) if kind == "B1D" else gate


def make_unit(shape, dtype, gate_kind, strided, seed=0, gate_dtype=None):
    """h, fresh, cache in `dtype`; the gate in `gate_dtype` (default: `dtype`)."""
    gen = torch.Generator().manual_seed(seed)
    h, fresh, cache = (randn(shape, dtype, gen=gen, strided=strided) for _ in range(3))
    return h, fresh, cache, make_gate(gate_kind, shape[0], shape[2], gate_dtype or dtype, gen)


def f32(t):
    """An fp32 copy (never `t` itself, which the reference may write)."""
    return None if t is None else t.to(torch.float32, copy=True)


def case_id(shape, dtype, strided, gate):
    B, N, D = shape
    return f"B{B}-N{N}-D{D}-{dtype_id(dtype)}-{'strided' if strided else 'contig'}-gate{gate}"


CASES = [(s, d, st_, g) for s in SHAPES for d in DTYPES for st_ in (False, True) for g in GATES]
CASE_IDS = [case_id(*c) for c in CASES]


@pytest.mark.parametrize("r_value,tau", [(0.7, 0.1), (0.05, 0.1), (0.3, None)], ids=["write", "keep", "no-tau"])
@pytest.mark.parametrize("shape,dtype,strided,gate_kind", CASES, ids=CASE_IDS)
def test_blend_kernel(shape, dtype, strided, gate_kind, r_value, tau):
    h, fresh, cache, gate = make_unit(shape, dtype, gate_kind, strided)
    r = torch.tensor(r_value, device=DEVICE)
    slot = randn(shape, dtype, gen=torch.Generator(), strided=strided).copy_(cache)
    out = nan_like(h)
    gated_residual_fwd(h, fresh, slot, r, gate, out, mode=BLEND, tau=tau, write_cache=tau is not None)

    cache32, cache_lp = f32(cache), cache.clone()
    expected = gated_residual_ref(f32(h), f32(fresh), cache32, r, f32(gate), tau)
    assert_matches_reference(out, gated_residual_ref(h, fresh, cache_lp, r, gate, tau), expected, "out")
    if tau is not None and r_value > tau:
        assert_matches_reference(slot, cache_lp, cache32, "cache")
    else:
        assert torch.equal(slot, cache), "cache: written although r <= tau or no tau"


@pytest.mark.parametrize("write", [True, False], ids=["write", "no-write"])
@pytest.mark.parametrize("shape,dtype,strided,gate_kind", CASES, ids=CASE_IDS)
def test_compute_kernel(shape, dtype, strided, gate_kind, write):
    h, fresh, _, gate = make_unit(shape, dtype, gate_kind, strided)
    slot = nan_like(fresh) if write else None
    out = nan_like(h)
    gated_residual_fwd(h, fresh, slot, None, gate, out, mode=COMPUTE, write_cache=write)
    expected = gated_residual_compute_ref(f32(h), f32(fresh), f32(gate))
    assert_matches_reference(out, gated_residual_compute_ref(h, fresh, gate), expected, "out")
    if write:
        assert torch.equal(slot, fresh), "cache: not an exact copy of fresh"


@pytest.mark.parametrize("shape,dtype,strided,gate_kind", CASES, ids=CASE_IDS)
def test_reuse_kernel(shape, dtype, strided, gate_kind):
    h, _, cache, gate = make_unit(shape, dtype, gate_kind, strided)
    before = cache.clone()
    out = nan_like(h)
    gated_residual_fwd(h, None, cache, None, gate, out, mode=REUSE)
    expected = gated_residual_reuse_ref(f32(h), f32(cache), f32(gate))
    assert_matches_reference(out, gated_residual_reuse_ref(h, cache, gate), expected, "out")
    assert torch.equal(cache, before), "cache: modified by the reuse form"


A, B = 0.75, -0.375  # forecast coefficients, exact in fp32 (Triton passes host floats as fp32)


@pytest.mark.parametrize("shape,dtype,strided,gate_kind", CASES, ids=CASE_IDS)
def test_forecast_kernel(shape, dtype, strided, gate_kind):
    """h + g * (a * newest + b * older) against the fp32 reference; the slots are only read."""
    h, older, newest, gate = make_unit(shape, dtype, gate_kind, strided)
    before = newest.clone(), older.clone()
    out = nan_like(h)
    gated_residual_forecast_fwd(h, newest, older, A, B, gate, out)
    expected = gated_residual_forecast_ref(f32(h), f32(newest), f32(older), A, B, f32(gate))
    assert_matches_reference(out, gated_residual_forecast_ref(h, newest, older, A, B, gate), expected, "out")
    assert torch.equal(newest, before[0]) and torch.equal(older, before[1]), "slots: modified by the forecast form"


@pytest.mark.parametrize("mutation", ["swap", "drop-b"])
def test_a_mutated_forecast_fails_the_kernel_check(mutation):
    """The comparison above tells the forecast from its likely bugs: slots swapped, b dropped."""
    h, older, newest, gate = make_unit((2, 63, 72), torch.float16, "BD", True)
    mutated = {"swap": (h, older, newest, A, B), "drop-b": (h, newest, older, A, 0.0)}[mutation]
    expected = gated_residual_forecast_ref(f32(h), f32(newest), f32(older), A, B, f32(gate))
    with pytest.raises(AssertionError, match="elements beyond"):
        assert_matches_reference(gated_residual_forecast_ref(*mutated, gate),
                                 gated_residual_forecast_ref(h, newest, older, A, B, gate), expected, "out")


@pytest.mark.parametrize("gate_dtype", [None, torch.float32], ids=["gate-like-h", "fp32-gate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forecast_at_one_zero_is_the_reuse_form_bitwise(dtype, gate_dtype):
    """a = 1, b = 0: the kernel's value is the newest slot exactly (1 * c1 + 0 * c2, c2 finite), so the output is
    the reuse kernel's bit for bit; so is the public op's (the references on CPU)."""
    h, older, newest, gate = make_unit((2, 63, 72), dtype, "chunk", True, seed=4, gate_dtype=gate_dtype)
    if gate_dtype is None and dtype != torch.float32:
        gate = gate.to(dtype)
    reuse, forecast = nan_like(h), nan_like(h)
    gated_residual_fwd(h, None, newest, None, gate, reuse, mode=REUSE)
    gated_residual_forecast_fwd(h, newest, older, 1.0, 0.0, gate, forecast)
    assert torch.equal(forecast, reuse)
    assert torch.equal(gated_residual_forecast(h, newest, older, 1.0, 0.0, gate), gated_residual_reuse(h, newest, gate))


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=dtype_id)
def test_forecast_fp32_gate_kernel(dtype, strided):
    """An fp32 gate over a low-precision stream (Wan): `h + g * (a c1 + b c2)` formed in fp32 and rounded once,
    within one rounding of the exact (fp64) value plus five fp32 operations (two products, a sum, the gate
    product, the residual add), each at most one fp32 unit roundoff of the magnitudes it combines."""
    shape = (3, 37, 75)
    h, older, newest, gate = make_unit(shape, dtype, "chunk" if strided else "B1D", strided, seed=11,
                                       gate_dtype=torch.float32)
    out = nan_like(h)
    gated_residual_forecast_fwd(h, newest, older, A, B, gate, out)
    h64, c1, c2, g64 = (t.double() for t in (h, newest, older, gate.view(-1, 1, shape[2])))
    exact = h64 + g64 * (A * c1 + B * c2)
    unit = 2.0 ** -24
    bound = one_rounding(exact, dtype) + 5 * unit * (h64.abs() + g64.abs() * (abs(A) * c1.abs() + abs(B) * c2.abs()))
    assert_within("out", out, exact, bound)


def test_forecast_bad_inputs_name_the_argument():
    gen = torch.Generator().manual_seed(0)
    h, c1, c2 = (torch.randn(2, 5, 8, generator=gen) for _ in range(3))
    with pytest.raises(ValueError, match=r"older: expected shape \(2, 5, 8\) \(from h\), got \(2, 5, 9\)"):
        gated_residual_forecast(h, c1, torch.randn(2, 5, 9), 1.0, 0.5)
    with pytest.raises(ValueError, match=r"newest: expected dtype torch.float32 \(from h\), got torch.float16"):
        gated_residual_forecast(h, c1.half(), c2, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"b: expected a finite Python float \(a forecast coefficient\), got nan"):
        gated_residual_forecast(h, c1, c2, 1.0, float("nan"))
    with pytest.raises(ValueError, match=r"a: expected a finite Python float .*, got tensor"):
        gated_residual_forecast(h, c1, c2, torch.tensor(1.0), 0.5)


def test_out_may_alias_h():
    h, fresh, cache, gate = make_unit((2, 63, 72), torch.float32, "BD", False)
    expected = gated_residual_ref(h, fresh, cache.clone(), torch.tensor(0.4, device=DEVICE), gate)
    gated_residual_fwd(h, fresh, cache, torch.tensor(0.4, device=DEVICE), gate, h, mode=BLEND)
    torch.testing.assert_close(h, expected)


def _grads(fn, h, fresh, cache, r, gate, tau, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (h, fresh, r)]
    gate_leaf = None if gate is None else gate.detach().clone().requires_grad_()
    out = fn(*leaves[:2], cache, leaves[2], gate_leaf, tau)
    inputs = leaves + ([] if gate_leaf is None else [gate_leaf])
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("tau", [0.1, None], ids=["write", "no-write"])
@pytest.mark.parametrize("shape,dtype,strided,gate_kind", CASES, ids=CASE_IDS)
def test_backward_kernel(shape, dtype, strided, gate_kind, tau):
    """Gradients for h, fresh, r and gate; with a slot write, r and gate still see the old slot."""
    h, fresh, cache, gate = make_unit(shape, dtype, gate_kind, strided)
    r = torch.tensor(0.6, device=DEVICE)
    dout = randn(shape, dtype, gen=torch.Generator().manual_seed(1))
    slot = cache.clone()
    got = _grads(GatedResidualFunction.apply, h, fresh, slot, r, gate, tau, dout)
    lowp = _grads(gated_residual_ref, h, fresh, cache.clone(), r, gate, tau, dout)
    expected = _grads(gated_residual_ref, f32(h), f32(fresh), f32(cache), r, f32(gate), tau, f32(dout))
    for name, g, lp, e in zip(["dh", "dfresh", "dr", "dgate"], got, lowp, expected):
        assert_matches_reference(g, lp, e, name)
    if tau is not None:
        assert not torch.equal(slot, cache), "cache: the in-pass write did not happen"


def test_no_gradient_for_the_cache():
    h, fresh, cache, gate = make_unit((2, 7, 8), torch.float32, "BD", False)
    with pytest.raises(ValueError, match=r"cache: expected a tensor that does not require grad"):
        gated_residual(h, fresh, cache.requires_grad_(), torch.tensor(0.5, device=DEVICE), gate)


@pytest.mark.parametrize("gate_kind", ["BD", "none"])
def test_public_ops_on_device(gate_kind):
    """The public functions (reference on CPU, kernels on CUDA) against the fp32 reference."""
    h, fresh, cache, gate = make_unit((2, 63, 72), torch.float32, gate_kind, True)
    r = torch.tensor(0.8, device=DEVICE)
    slot = cache.clone()
    out = gated_residual(h, fresh, slot, r, gate, tau=0.5)
    torch.testing.assert_close(out, gated_residual_ref(h, fresh, cache.clone(), r, gate))
    torch.testing.assert_close(slot, cache + 0.8 * (fresh - cache))

    slot = nan_like(fresh)
    result = gated_residual_compute(h, fresh, gate, cache=slot)
    torch.testing.assert_close(result, gated_residual_compute_ref(h, fresh, gate))
    assert torch.equal(slot, fresh)
    result = nan_like(h)
    assert gated_residual_reuse(h, cache, gate, out=result) is result
    torch.testing.assert_close(result, gated_residual_reuse_ref(h, cache, gate))


def test_public_soft_form_gradients():
    h, fresh, cache, gate = make_unit((2, 63, 72), torch.float32, "B1D", False)
    r = torch.tensor(0.3, device=DEVICE)
    dout = torch.randn(h.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = _grads(lambda *a: gated_residual(*a[:5], tau=a[5]), h, fresh, cache.clone(), r, gate, 0.1, dout)
    expected = _grads(gated_residual_ref, h, fresh, cache.clone(), r, gate, 0.1, dout)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_reference_semantics():
    """What the engine relies on: the compute form is diffusers' `gate * out + h` bit for bit, and
    a soft gate at r = 0 adds exactly the cached tensor (at r = 1 the blend is fresh up to rounding)."""
    gen = torch.Generator().manual_seed(0)
    h, fresh, cache = (torch.randn(2, 9, 8, generator=gen) for _ in range(3))
    gate = torch.randn(2, 8, generator=gen)
    assert torch.equal(gated_residual_compute_ref(h, fresh, gate), gate.unsqueeze(1) * fresh + h)
    assert torch.equal(gated_residual_ref(h, fresh, cache.clone(), torch.tensor(0.0), gate), h + gate[:, None] * cache)
    torch.testing.assert_close(gated_residual_ref(h, fresh, cache.clone(), torch.tensor(1.0), gate),
                               h + gate[:, None] * fresh)
    assert torch.equal(gated_residual_reuse_ref(h, cache), h + cache)


def _bad(**changes):
    gen = torch.Generator().manual_seed(0)
    args = dict(h=torch.randn(2, 5, 8, generator=gen), fresh=torch.randn(2, 5, 8, generator=gen),
                cache=torch.randn(2, 5, 8, generator=gen), r=torch.tensor(0.5), gate=torch.randn(2, 8, generator=gen))
    args.update(changes)
    return args


@pytest.mark.parametrize("args,message", [
    (_bad(h=torch.randn(5, 8)), r"h: expected a 3-D tensor, got shape \(5, 8\)"),
    (_bad(fresh=torch.randn(2, 5, 9)), r"fresh: expected shape \(2, 5, 8\) \(from h\), got \(2, 5, 9\)"),
    (_bad(cache=torch.randn(2, 5, 8, dtype=torch.float64)),
     r"cache: expected dtype torch.float32 \(from h\), got torch.float64"),
    (_bad(cache=torch.randn(2, 5, 8, device="meta")), r"cache: expected device cpu \(from h\), got meta"),
    (_bad(gate=torch.randn(3, 8)), r"gate: expected shape \(2, 8\) or \(2, 1, 8\) .*, got \(3, 8\)"),
    (_bad(gate=torch.randn(2, 8).half()), r"gate: expected dtype torch.float32 \(from h\), got torch.float16"),
    (_bad(r=torch.tensor([0.5])), r"r: expected a 0-dim floating tensor .*, got shape \(1,\)"),
    (_bad(r=torch.tensor(1)), r"r: expected a 0-dim floating tensor .* dtype torch.int64"),
    (_bad(r=0.5), r"r: expected a torch.Tensor, got float"),
    (_bad(r=torch.tensor(0.5, device="meta")), r"r: expected device cpu \(from h\), got meta"),
], ids=["h-ndim", "fresh-shape", "cache-dtype", "cache-device", "gate-batch", "gate-dtype", "r-shape", "r-dtype",
        "r-float", "r-device"])
def test_bad_input_names_argument(args, message):
    with pytest.raises(ValueError, match=message):
        gated_residual(**args)


def test_bad_tau_and_out():
    with pytest.raises(ValueError, match=r"tau: expected a float in \[0, 1\), got 1.5"):
        gated_residual(**_bad(), tau=1.5)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 5, 8\) \(from h\), got \(2, 5\)"):
        gated_residual_reuse(torch.randn(2, 5, 8), torch.randn(2, 5, 8), out=torch.empty(2, 5))
    args = _bad()
    args["fresh"].requires_grad_()
    with pytest.raises(ValueError, match=r"out: expected None when gradients are required"):
        gated_residual(**args, out=torch.empty(2, 5, 8))


@given(
    B=st.integers(1, 3), N=st.integers(1, 40), D=st.integers(1, 90),
    dtype=st.sampled_from(DTYPES), mode=st.sampled_from([BLEND, COMPUTE, REUSE]),
    gate_kind=st.sampled_from(GATES), strided=st.booleans(), r_value=st.floats(0.0, 1.0),
)
def test_random_shapes(B, N, D, dtype, mode, gate_kind, strided, r_value):
    h, fresh, cache, gate = make_unit((B, N, D), dtype, gate_kind, strided)
    r = torch.tensor(r_value, device=DEVICE)
    out = nan_like(h)
    gated_residual_fwd(h, fresh, cache.clone(), r, gate, out, mode=mode)
    # the compute and reuse forms are the blend at r = 1 and r = 0
    r_eff = {BLEND: r, COMPUTE: torch.ones_like(r), REUSE: torch.zeros_like(r)}[mode]
    expected = gated_residual_ref(f32(h), f32(fresh), f32(cache), r_eff, f32(gate))
    assert_matches_reference(out, gated_residual_ref(h, fresh, cache.clone(), r_eff, gate), expected, "out")


# ---- an fp32 gate over a low-precision stream (Wan: the residual added in fp32) ----

LOW_DTYPES = (torch.float16, torch.bfloat16)
FP32_GATE_SHAPE = (3, 37, 75)  # odd N and D: partial tiles in both
U32 = 2.0 ** -24  # unit roundoff of fp32


def one_rounding(exact, dtype):
    """How far one rounding of `exact` (fp64) to `dtype` may move it: half a unit in the last place
    (round to nearest), a whole one for the interpreter's fp32 -> bf16 cast (it truncates)."""
    info = torch.finfo(dtype)
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(info.tiny))))
    return ulp * (1.0 if DEVICE == "cpu" and dtype == torch.bfloat16 else 0.5)


def assert_within(name, actual, exact, bound):
    """|actual - exact| <= bound elementwise (NaN fails); reports count and place of the worst."""
    err = (actual.double() - exact).abs()
    bad = ~(err <= bound)
    if bad.any():
        worst = (err - bound).nan_to_num(float("inf")).argmax()
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} elements beyond the bound; worst at flat "
                             f"index {int(worst)}: error {err.flatten()[worst].item():.3g} > "
                             f"{bound.flatten()[worst].item():.3g}")


def fp64(*tensors):
    return [t.double() for t in tensors]


def fp32_gate_unit(dtype, strided, seed):
    """A (3, 37, 75) unit in `dtype` with an fp32 gate: (B, 1, D), or a strided chunk (B, D) when `strided`."""
    return make_unit(FP32_GATE_SHAPE, dtype, "chunk" if strided else "B1D", strided, seed=seed,
                     gate_dtype=torch.float32)


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", [BLEND, COMPUTE, REUSE], ids=["blend", "compute", "reuse"])
def test_fp32_gate_forward_kernel(mode, dtype, strided):
    """`h + g * value` formed in fp32 from the fp32 gate and rounded once to h's dtype: within one rounding
    of the exact (fp64) value plus four fp32 operations. A gate or a product g * value rounded to h's
    dtype first is beyond it wherever h and g * value nearly cancel."""
    h, fresh, cache, gate = fp32_gate_unit(dtype, strided, seed=5)
    r = torch.tensor(0.3, device=DEVICE)  # > tau: the blend form writes the slot
    slot = randn(FP32_GATE_SHAPE, dtype, gen=torch.Generator(), strided=strided).copy_(cache)
    if mode == COMPUTE:
        slot.fill_(float("nan"))
    out = nan_like(h)
    gated_residual_fwd(h, None if mode == REUSE else fresh, slot, r if mode == BLEND else None, gate, out,
                       mode=mode, tau=0.1 if mode == BLEND else None, write_cache=mode != REUSE)

    h64, fresh64, cache64, g64 = fp64(h, fresh, cache, gate.view(-1, 1, gate.shape[-1]))
    blend = cache64 + 0.3 * (fresh64 - cache64)
    value = {BLEND: blend, COMPUTE: fresh64, REUSE: cache64}[mode]
    exact = h64 + g64 * value
    assert out.dtype == dtype
    assert_within("out", out, exact, one_rounding(exact, dtype) + 4 * U32 * (h64.abs() + (g64 * value).abs()))
    if mode == BLEND:
        assert_within("cache", slot, blend, one_rounding(blend, dtype) + 3 * U32 * (cache64.abs() + fresh64.abs()))
    else:
        assert torch.equal(slot, fresh if mode == COMPUTE else cache), "cache: not fresh (compute) or not kept (reuse)"


def assert_fp32_gate_grads(dfresh, dr, dgate, dout, fresh, cache, r, gate):
    """Gradients of the soft form with an fp32 gate: dfresh in fresh's dtype within one rounding, dr and
    dgate in fp32 (r's and the gate's dtypes) within fp32 summation error. Each sum runs over a tile's
    columns, then its rows, then the partial sums of the tiles: no partial sum passes through more
    additions than those lengths together (plus the roundings forming each term)."""
    assert (dfresh.dtype, dr.dtype, dgate.dtype) == (fresh.dtype, torch.float32, torch.float32)
    assert dgate.shape == gate.shape
    B, N, D = fresh.shape
    (block_n, block_d), grid = _launch_shape(B, N, D)
    dout64, fresh64, cache64, g64 = fp64(dout, fresh, cache, gate.view(B, 1, D))
    r64, diff = r.double(), fresh64 - cache64
    dvalue = dout64 * g64
    exact = dvalue * r64
    assert_within("dfresh", dfresh, exact, one_rounding(exact, fresh.dtype) + 2 * U32 * exact.abs())
    terms = dvalue * diff
    adds = block_d + block_n + grid[0] * grid[1] * B + 3
    assert_within("dr", dr, terms.sum(), adds * U32 * terms.abs().sum())
    terms = dout64 * (cache64 + r64 * diff)
    adds = block_n + grid[0] + 4
    assert_within("dgate", dgate.view(B, D), terms.sum(1), adds * U32 * terms.abs().sum(1))


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=dtype_id)
def test_fp32_gate_backward_kernel(dtype, strided):
    """The backward launcher with an fp32 gate over fp16/bf16 fresh, cache and dout (NaN-free by
    construction: every gradient buffer is written by the kernel or the partial sums)."""
    _, fresh, cache, gate = fp32_gate_unit(dtype, strided, seed=6)
    r = torch.tensor(0.3, device=DEVICE)
    dout = randn(FP32_GATE_SHAPE, dtype, gen=torch.Generator().manual_seed(7), strided=strided)
    dfresh, dr, dgate = gated_residual_bwd(dout, fresh, cache, r, gate, need_fresh=True, need_r=True, need_gate=True)
    assert_fp32_gate_grads(dfresh, dr, dgate, dout, fresh, cache, r, gate)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=dtype_id)
def test_public_soft_form_fp32_gate_gradients(dtype, monkeypatch):
    """Autograd through the public soft op on its kernel path (on CPU: the interpreter, by the switch the
    compile check uses) with an fp32 gate over a low-precision stream: dg in fp32, values against fp64."""
    monkeypatch.setattr(_triton, "KERNELS_ON_CPU", True)
    h, fresh, cache, gate = fp32_gate_unit(dtype, True, seed=8)
    r = torch.tensor(0.3, device=DEVICE)
    dout = randn(FP32_GATE_SHAPE, dtype, gen=torch.Generator().manual_seed(9))
    leaves = [t.detach().clone().requires_grad_() for t in (h, fresh, r, gate)]
    slot = cache.clone()
    out = gated_residual(leaves[0], leaves[1], slot, leaves[2], leaves[3], tau=0.1)
    assert type(out.grad_fn).__name__ == "GatedResidualFunctionBackward", "not the kernel path"
    dh, dfresh, dr, dgate = torch.autograd.grad(out, leaves, dout)
    assert dh.dtype == dtype and torch.equal(dh, dout)
    assert_fp32_gate_grads(dfresh, dr, dgate, dout, fresh, cache, r, gate)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,gate_dtype", [(d, d) for d in DTYPES] + [(d, torch.float32) for d in LOW_DTYPES],
                         ids=lambda d: dtype_id(d))
def test_cuda_graph_replay(dtype, gate_dtype):
    """Capture each form in a CUDA graph, poison the outputs, replay: the replay equals the eager launch
    bitwise, and the eager launch matches the fp32 reference. The gate in h's dtype, or fp32 over
    fp16/bf16 (Wan)."""
    h, fresh, cache, gate = make_unit((2, 4096, 1152), dtype, "B1D", False, gate_dtype=gate_dtype)
    r = torch.tensor(0.7, device=DEVICE)
    slots = [cache.clone() for _ in range(3)]
    outs = [torch.empty_like(h) for _ in range(3)]

    def step():
        gated_residual(h, fresh, slots[0], r, gate, tau=0.1, out=outs[0])
        gated_residual_compute(h, fresh, gate, cache=slots[1], out=outs[1])
        gated_residual_reuse(h, slots[2], gate, out=outs[2])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture: the eager launch
    torch.cuda.current_stream().wait_stream(stream)
    eager_outs, eager_slots = [t.clone() for t in outs], [t.clone() for t in slots]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t in outs + slots:
        t.fill_(float("nan"))
    slots[0].copy_(cache)
    slots[2].copy_(cache)
    graph.replay()
    torch.cuda.synchronize()
    for name, replayed, eager in zip(["blend", "compute", "reuse", "blend slot", "compute slot", "reuse slot"],
                                     outs + slots, eager_outs + eager_slots):
        assert torch.equal(replayed, eager), f"{name}: the replay differs from the eager launch"
    assert torch.equal(slots[1], fresh)
    low = [gated_residual_ref(h, fresh, cache.clone(), r, gate), gated_residual_compute_ref(h, fresh, gate),
           gated_residual_reuse_ref(h, cache, gate)]
    exact = [gated_residual_ref(f32(h), f32(fresh), f32(cache), r, f32(gate)),
             gated_residual_compute_ref(f32(h), f32(fresh), f32(gate)), gated_residual_reuse_ref(f32(h), f32(cache),
                                                                                                  f32(gate))]
    for name, actual, lowp, ref32 in zip(["blend", "compute", "reuse"], eager_outs, low, exact):
        assert_matches_reference(actual, lowp, ref32, name)
