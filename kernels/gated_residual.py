"""Router-gated residual update of one cached unit (method.md sections 1-4).

A unit (`attn1`, `attn2` or `ff` of a transformer block) adds its gated output to the residual stream:

    h_out = h + g * (r * fresh + (1 - r) * cache)

- h, fresh, cache: (B, N, D) residual stream, the unit's fresh output, the unit's cache slot.
- g: the adaLN gate, (B, D) or (B, 1, D), broadcast over the N tokens of each batch row;
  None where the unit has no gate (PixArt cross-attention). In h's dtype, or float32 over a
  low-precision h: the residual is then added in fp32, `(h.float() + g * value).to(h.dtype)` (Wan).
- r: the unit's router value at this step, a 0-dim tensor, read only on the device.

Three forms share one kernel:
- `gated_residual`: soft gating (training). With `tau`, the slot becomes the blend where
  r > tau, in the same pass (method.md section 4). Differentiable in h, fresh, r and g.
- `gated_residual_compute`: `h + g * fresh`, and `cache <- fresh` in the same pass (inference).
- `gated_residual_reuse`: `h + g * cache`; no fresh output exists (inference).
A fourth form has its own small kernel (two slots and two coefficients; the three forms keep their arguments):
- `gated_residual_forecast`: `h + g * (a * newest + b * older)`, a reused unit's output forecast from its last
  two computed outputs with host coefficients a, b (inference; harmonica/forecast.py). a = 1, b = 0 is the
  reuse form's value exactly.

The blend is evaluated as `cache + r * (fresh - cache)`: the same value with one multiply, and it
keeps the slot itself out of the autograd graph of the reference, so it can be overwritten in place.
Kernels load, compute in fp32 and cast at the store; any strides are accepted.
"""

import functools
import math

import torch

from ._checks import KERNEL_DTYPES, check_device, check_kernel_dtype, check_like, check_tensor
from ._launch import Launcher
from ._triton import kernel_path, require_triton, tl, triton

BLEND, COMPUTE, REUSE = 0, 1, 2  # the forms: the kernel's MODE
# a kernel may read a module global only as a constexpr (the compiler refuses plain ints)
_COMPUTE, _REUSE = tl.constexpr(COMPUTE), tl.constexpr(REUSE)
_TILE_ELEMENTS = 2048


@triton.jit
def _gated_residual_fwd_kernel(
    h_ptr, fresh_ptr, cache_ptr, gate_ptr, r_ptr, out_ptr,
    tau, N, D,
    s_hb, s_hn, s_hd, s_fb, s_fn, s_fd, s_cb, s_cn, s_cd, s_gb, s_gd, s_ob, s_on, s_od,
    MODE: tl.constexpr, HAS_GATE: tl.constexpr, WRITE_CACHE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    mask = (rows < N) & (cols < D)
    c_offs = b * s_cb + rows * s_cn + cols * s_cd

    h = tl.load(h_ptr + b * s_hb + rows * s_hn + cols * s_hd, mask=mask).to(tl.float32)
    if MODE == _REUSE:
        value = tl.load(cache_ptr + c_offs, mask=mask).to(tl.float32)
    else:
        fresh = tl.load(fresh_ptr + b * s_fb + rows * s_fn + cols * s_fd, mask=mask)
        if MODE == _COMPUTE:
            value = fresh.to(tl.float32)
            if WRITE_CACHE:
                tl.store(cache_ptr + c_offs, fresh, mask=mask)
        else:
            cache = tl.load(cache_ptr + c_offs, mask=mask).to(tl.float32)
            r = tl.load(r_ptr).to(tl.float32)
            value = cache + r * (fresh.to(tl.float32) - cache)
            if WRITE_CACHE:
                write = mask & ((tl.zeros_like(value) + r) > tau)
                tl.store(cache_ptr + c_offs, value.to(cache_ptr.dtype.element_ty), mask=write)
    _add_gated(h, value, gate_ptr, out_ptr, b, rows, cols, mask, D, s_gb, s_gd, s_ob, s_on, s_od, HAS_GATE)


@triton.jit
def _add_gated(h, value, gate_ptr, out_ptr, b, rows, cols, mask, D, s_gb, s_gd, s_ob, s_on, s_od,
               HAS_GATE: tl.constexpr):
    """The residual update of every forward form: out = h + g * value (h, value fp32 tiles), cast at the store."""
    if HAS_GATE:
        g = tl.load(gate_ptr + b * s_gb + cols * s_gd, mask=cols < D).to(tl.float32)
        value = g * value
    tl.store(out_ptr + b * s_ob + rows * s_on + cols * s_od, (h + value).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_forecast_fwd_kernel(
    h_ptr, newest_ptr, older_ptr, gate_ptr, out_ptr,
    a, b_coef, N, D,
    s_hb, s_hn, s_hd, s_1b, s_1n, s_1d, s_2b, s_2n, s_2d, s_gb, s_gd, s_ob, s_on, s_od,
    HAS_GATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The forecast form: out = h + g * (a * newest + b * older), in fp32."""
    b = tl.program_id(2).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    mask = (rows < N) & (cols < D)
    h = tl.load(h_ptr + b * s_hb + rows * s_hn + cols * s_hd, mask=mask).to(tl.float32)
    newest = tl.load(newest_ptr + b * s_1b + rows * s_1n + cols * s_1d, mask=mask).to(tl.float32)
    older = tl.load(older_ptr + b * s_2b + rows * s_2n + cols * s_2d, mask=mask).to(tl.float32)
    value = a * newest + b_coef * older
    _add_gated(h, value, gate_ptr, out_ptr, b, rows, cols, mask, D, s_gb, s_gd, s_ob, s_on, s_od, HAS_GATE)


@triton.jit
def _gated_residual_bwd_kernel(
    dout_ptr, fresh_ptr, cache_ptr, gate_ptr, r_ptr, dfresh_ptr, dr_partial_ptr, dg_partial_ptr,
    N, D,
    s_ob, s_on, s_od, s_fb, s_fn, s_fd, s_cb, s_cn, s_cd, s_gb, s_gd,
    HAS_GATE: tl.constexpr, NEED_FRESH: tl.constexpr, NEED_R: tl.constexpr, NEED_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    cols = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    mask = (rows < N) & (cols < D)

    dout = tl.load(dout_ptr + b * s_ob + rows * s_on + cols * s_od, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr).to(tl.float32)
    dvalue = dout
    if HAS_GATE:
        dvalue = dout * tl.load(gate_ptr + b * s_gb + cols * s_gd, mask=cols < D, other=0.0).to(tl.float32)
    if NEED_FRESH:
        # dfresh is allocated contiguous (B, N, D)
        tl.store(dfresh_ptr + (b * N + rows) * D + cols, (dvalue * r).to(dfresh_ptr.dtype.element_ty), mask=mask)
    if NEED_R or NEED_GATE:
        fresh = tl.load(fresh_ptr + b * s_fb + rows * s_fn + cols * s_fd, mask=mask, other=0.0).to(tl.float32)
        cache = tl.load(cache_ptr + b * s_cb + rows * s_cn + cols * s_cd, mask=mask, other=0.0).to(tl.float32)
        diff = fresh - cache
        if NEED_R:
            tile = (b * tl.num_programs(0) + pid_n) * tl.num_programs(1) + pid_d
            tl.store(dr_partial_ptr + tile, tl.sum(tl.sum(dvalue * diff, axis=1), axis=0))
        if NEED_GATE:
            # dg_partial is (B, n_row_tiles, D): one partial column sum per row tile
            col_sum = tl.sum(dout * (cache + r * diff), axis=0)
            tl.store(dg_partial_ptr + (b * tl.num_programs(0) + pid_n) * D + cols, col_sum[None, :], mask=cols < D)


_launch_fwd = Launcher(_gated_residual_fwd_kernel)
_launch_bwd = Launcher(_gated_residual_bwd_kernel)
_launch_forecast = Launcher(_gated_forecast_fwd_kernel)


def _gate_strides(gate):
    """(stride over batch, stride over hidden) of a (B, D) or (B, 1, D) gate; (0, 0) for None."""
    if gate is None:
        return 0, 0
    return gate.stride(0), gate.stride(-1)


@functools.lru_cache(maxsize=256)
def _launch_shape(B: int, N: int, D: int):
    """(BLOCK_N, BLOCK_D) tile and grid for a (B, N, D) stream, computed once per shape."""
    block_d = min(128, triton.next_power_of_2(D))
    block_n = min(max(1, _TILE_ELEMENTS // block_d), triton.next_power_of_2(N))
    return (block_n, block_d), (triton.cdiv(N, block_n), triton.cdiv(D, block_d), B)


def gated_residual_fwd(h, fresh, cache, r, gate, out, *, mode: int, tau=None, write_cache: bool = False):
    """Launch the forward kernel; writes `out` (and the slot when `write_cache`). Inputs are checked."""
    require_triton("gated_residual")
    B, N, D = h.shape
    (block_n, block_d), grid = _launch_shape(B, N, D)
    fresh_ = h if fresh is None else fresh
    cache_ = h if cache is None else cache
    _launch_fwd(
        grid, (h, fresh_, cache_, h if gate is None else gate, h if r is None else r, out),
        (0.0 if tau is None else float(tau),),
        (N, D, *h.stride(), *fresh_.stride(), *cache_.stride(), *_gate_strides(gate), *out.stride()),
        dict(MODE=mode, HAS_GATE=gate is not None, WRITE_CACHE=write_cache, BLOCK_N=block_n, BLOCK_D=block_d),
    )
    return out


def gated_residual_forecast_fwd(h, newest, older, a: float, b: float, gate, out):
    """Launch the forecast kernel; writes `out`. Inputs are checked."""
    require_triton("gated_residual_forecast")
    B, N, D = h.shape
    (block_n, block_d), grid = _launch_shape(B, N, D)
    _launch_forecast(
        grid, (h, newest, older, h if gate is None else gate, out), (float(a), float(b)),
        (N, D, *h.stride(), *newest.stride(), *older.stride(), *_gate_strides(gate), *out.stride()),
        dict(HAS_GATE=gate is not None, BLOCK_N=block_n, BLOCK_D=block_d),
    )
    return out


def gated_residual_bwd(dout, fresh, cache, r, gate, *, need_fresh: bool, need_r: bool, need_gate: bool):
    """Gradients of the soft form for fresh, r and gate (None where not needed).

    dout, fresh, cache: (B, N, D); cache is the slot as it was before the forward wrote it.
    dfresh in fresh's dtype; dr and dgate summed in fp32, returned in r's and the gate's dtypes.
    """
    require_triton("gated_residual")
    B, N, D = dout.shape
    (block_n, block_d), grid = _launch_shape(B, N, D)
    f32 = dict(dtype=torch.float32, device=dout.device)
    dfresh = torch.empty((B, N, D), dtype=fresh.dtype, device=dout.device) if need_fresh else None
    dr_partial = torch.empty(grid[0] * grid[1] * B, **f32) if need_r else None
    dg_partial = torch.empty((B, grid[0], D), **f32) if need_gate else None
    cache_ = fresh if cache is None else cache
    _launch_bwd(
        grid, (dout, fresh, cache_, dout if gate is None else gate, r, dout if dfresh is None else dfresh,
               dout if dr_partial is None else dr_partial, dout if dg_partial is None else dg_partial),
        (), (N, D, *dout.stride(), *fresh.stride(), *cache_.stride(), *_gate_strides(gate)),
        dict(HAS_GATE=gate is not None, NEED_FRESH=need_fresh, NEED_R=need_r, NEED_GATE=need_gate,
             BLOCK_N=block_n, BLOCK_D=block_d),
    )
    dr = dr_partial.sum().to(r.dtype) if need_r else None
    dgate = dg_partial.sum(1).to(gate.dtype).view(gate.shape) if need_gate else None
    return dfresh, dr, dgate


class GatedResidualFunction(torch.autograd.Function):
    """Soft form with Triton forward and backward. No gradient flows into the cache."""

    @staticmethod
    def forward(ctx, h, fresh, cache, r, gate, tau):
        need_old_cache = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        # an in-place slot write would destroy the values the r and gate gradients need
        old_cache = (cache.clone() if tau is not None else cache) if need_old_cache else None
        out = torch.empty_like(h)
        gated_residual_fwd(h, fresh, cache, r, gate, out, mode=BLEND, tau=tau, write_cache=tau is not None)
        ctx.save_for_backward(fresh, old_cache, r, gate)
        return out

    @staticmethod
    def backward(ctx, dout):
        fresh, old_cache, r, gate = ctx.saved_tensors
        need_h, need_fresh, _, need_r, need_gate, _ = ctx.needs_input_grad
        dfresh, dr, dgate = gated_residual_bwd(
            dout, fresh, old_cache, r, gate,
            need_fresh=need_fresh, need_r=need_r, need_gate=need_gate,
        )
        return (dout if need_h else None), dfresh, None, dr, dgate, None


def _apply_gate(value, gate):
    if gate is None:
        return value
    return (gate.unsqueeze(1) if gate.dim() == 2 else gate) * value


def gated_residual_ref(h, fresh, cache, r, gate=None, tau=None):
    """Torch definition of the soft form; writes the blend into `cache` where r > tau."""
    blended = cache + r * (fresh - cache)
    if tau is not None:
        cache.copy_(torch.where(r > tau, blended.detach(), cache))
    return (h + _apply_gate(blended, gate)).to(h.dtype)


def gated_residual_compute_ref(h, fresh, gate=None, cache=None):
    """Torch definition of the compute form: `h + g * fresh`, and `cache <- fresh`."""
    if cache is not None:
        cache.copy_(fresh.detach())
    return (h + _apply_gate(fresh, gate)).to(h.dtype)


def gated_residual_reuse_ref(h, cache, gate=None):
    """Torch definition of the reuse form: `h + g * cache`."""
    return (h + _apply_gate(cache, gate)).to(h.dtype)


def gated_residual_forecast_ref(h, newest, older, a: float, b: float, gate=None):
    """Torch definition of the forecast form: `h + g * (a * newest + b * older)`."""
    return (h + _apply_gate(a * newest + b * older, gate)).to(h.dtype)


def _plainly_valid(h, fresh, cache, gate, out) -> bool:
    """The common case of `_check_unit` (inference forms, kernel dtypes) in a few comparisons, since
    every unit of every step pays it; any doubt returns False and the full checks run."""
    try:
        shape, dtype, device = h.shape, h.dtype, h.device
        if len(shape) != 3 or dtype not in KERNEL_DTYPES:
            return False
        for t in (fresh, cache, out):
            if t is not None and (t.shape != shape or t.dtype != dtype or t.device != device):
                return False
        if cache is not None and cache.requires_grad:
            return False
        if gate is None:
            return True
        gate_shape = gate.shape
        return (gate_shape[0] == shape[0] and gate_shape[-1] == shape[2] and gate.dtype in (dtype, torch.float32)
                and (len(gate_shape) == 2 or (len(gate_shape) == 3 and gate_shape[1] == 1)) and gate.device == device)
    except (AttributeError, IndexError, TypeError):
        return False


def _check_unit(h, *, fresh=None, cache=None, gate=None, r=None, out=None, tau=None):
    if r is None and tau is None and _plainly_valid(h, fresh, cache, gate, out):
        return
    check_tensor("h", h, ndim=3)
    check_kernel_dtype("h", h)
    for name, t in (("fresh", fresh), ("cache", cache), ("out", out)):
        if t is not None:
            check_like(name, t, "h", h)
    if cache is not None and cache.requires_grad:
        raise ValueError("cache: expected a tensor that does not require grad (slots hold detached values), "
                         "got requires_grad=True")
    if gate is not None:
        B, _, D = h.shape
        check_tensor("gate", gate)
        if tuple(gate.shape) not in ((B, D), (B, 1, D)):
            raise ValueError(f"gate: expected shape ({B}, {D}) or ({B}, 1, {D}) for h of shape {tuple(h.shape)}, "
                             f"got {tuple(gate.shape)}")
        if gate.dtype not in (h.dtype, torch.float32):
            also = "" if h.dtype == torch.float32 else " or torch.float32"
            raise ValueError(f"gate: expected dtype {h.dtype} (from h){also}, got {gate.dtype}")
        check_device("gate", gate, "h", h)
    if r is not None:
        check_tensor("r", r)
        if r.dim() != 0 or not r.is_floating_point():
            raise ValueError(f"r: expected a 0-dim floating tensor (the unit's router value at this step), "
                             f"got shape {tuple(r.shape)} dtype {r.dtype}")
        check_device("r", r, "h", h)
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau < 1):
        raise ValueError(f"tau: expected a float in [0, 1), got {tau!r}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _finish(result, out):
    return result if out is None else out.copy_(result)


def _run_inference_form(mode, h, fresh, cache, gate, out, ref_call):
    """CPU tensors and autograd run the torch reference; CUDA runs the kernel."""
    needs_grad = _needs_grad(h, fresh, gate)
    if needs_grad and out is not None:
        raise ValueError("out: expected None when gradients are required (an in-place result breaks autograd)")
    if not kernel_path(h) or needs_grad:
        return _finish(ref_call(), out)
    out = torch.empty_like(h) if out is None else out
    write = mode == COMPUTE and cache is not None
    return gated_residual_fwd(h, fresh, cache, None, gate, out, mode=mode, write_cache=write)


def gated_residual(h, fresh, cache, r, gate=None, *, tau=None, out=None):
    """Soft router-gated residual update, `h + g * (r * fresh + (1 - r) * cache)`.

    h, fresh, cache: (B, N, D), one dtype and device; gate: (B, D), (B, 1, D) or None;
    r: 0-dim floating tensor on the same device (never read on the host).
    tau: if given, `cache` becomes the blend where r > tau (same pass, detached).
    out: optional (B, N, D) result buffer (may be `h`); not allowed when gradients are required.
    Returns the updated (B, N, D) stream. Gradients flow to h, fresh, r and gate, never to cache.
    """
    _check_unit(h, fresh=fresh, cache=cache, gate=gate, r=r, out=out, tau=tau)
    needs_grad = _needs_grad(h, fresh, r, gate)
    if needs_grad and out is not None:
        raise ValueError("out: expected None when gradients are required (an in-place result breaks autograd)")
    if not kernel_path(h):
        return _finish(gated_residual_ref(h, fresh, cache, r, gate, tau), out)
    if needs_grad:
        return GatedResidualFunction.apply(h, fresh, cache, r, gate, tau)
    out = torch.empty_like(h) if out is None else out
    return gated_residual_fwd(h, fresh, cache, r, gate, out, mode=BLEND, tau=tau, write_cache=tau is not None)


def gated_residual_compute(h, fresh, gate=None, *, cache=None, out=None):
    """Computed unit at inference: `h + g * fresh`, and `cache <- fresh` in the same pass.

    h, fresh: (B, N, D); gate: (B, D), (B, 1, D) or None; cache: (B, N, D) slot to refresh, or None.
    out: optional (B, N, D) result buffer (may be `h`). Returns the updated stream.
    """
    _check_unit(h, fresh=fresh, cache=cache, gate=gate, out=out)
    return _run_inference_form(COMPUTE, h, fresh, cache, gate, out,
                               lambda: gated_residual_compute_ref(h, fresh, gate, cache))


def gated_residual_reuse(h, cache, gate=None, *, out=None):
    """Reused unit at inference: `h + g * cache`, with the current step's gate.

    h, cache: (B, N, D); gate: (B, D), (B, 1, D) or None; out: optional result buffer (may be `h`).
    """
    _check_unit(h, cache=cache, gate=gate, out=out)
    return _run_inference_form(REUSE, h, None, cache, gate, out, lambda: gated_residual_reuse_ref(h, cache, gate))


def gated_residual_forecast(h, newest, older, a: float, b: float, gate=None, *, out=None):
    """Reused unit at inference, forecast from its last two computed outputs: `h + g * (a * newest + b * older)`,
    with the current step's gate; fp32 arithmetic, one rounding at the store (the kernel).

    h, newest, older: (B, N, D), one dtype and device (newest: the unit's latest computed output, older: the one
    before); a, b: finite Python floats (host constants: a captured graph bakes them); gate: (B, D), (B, 1, D) or
    None; out: optional result buffer (may be `h`). a = 1, b = 0 gives `gated_residual_reuse(h, newest, gate)`.
    """
    if not _plainly_valid(h, newest, older, gate, out):
        _check_unit(h, gate=gate, out=out)
        for name, t in (("newest", newest), ("older", older)):
            check_like(name, t, "h", h)
    for name, value in (("a", a), ("b", b)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite Python float (a forecast coefficient), got {value!r}")
    if _needs_grad(h, newest, older, gate):
        raise ValueError("h: expected tensors that do not require grad (the forecast form is inference only), "
                         "got requires_grad=True")
    if not kernel_path(h):
        return _finish(gated_residual_forecast_ref(h, newest, older, a, b, gate), out)
    return gated_residual_forecast_fwd(h, newest, older, a, b, gate, torch.empty_like(h) if out is None else out)
