"""The step of a table sampler (harmonica/solvers.py), classifier-free guidance included, in one pass.

From the transformer output `out` (B, or 2B with guidance; >= C channels, H, W) and the sample x
(B, C, H, W), with the step's coefficients (p, q, a, b, c):

    eps    = cond                                   without guidance
    eps    = uncond + s * (cond - uncond)           on the first G channels with guidance (cond elsewhere)
    x0     = p * x + q * eps
    x_next = a * x + b * x0 + c * x0_prev

cond and uncond are the two batch halves of `out` (DiT puts the conditional half first, PixArt the
unconditional one); channels past C (a learned variance) are ignored. Unfused, `solver_step_ref`
on fp16 runs 17 tensor operations per step for DiT and 16 for PixArt (counted in
tests/test_solver_step.py); here one kernel reads out, x and x0_prev once and writes x_next and x0,
in place if asked (each element is read before it is written, by the same program). The
coefficients are read on the device, so a captured graph replays any step of the table.
Kernels load, compute in fp32 and cast at the store; any strides are accepted.
"""

import functools

import torch

from ._checks import KERNEL_DTYPES, check_device, check_kernel_dtype, check_like, check_tensor
from ._launch import Launcher
from ._triton import kernel_path, require_triton, tl, triton

_BLOCK = 1024
COEFFICIENTS = 5  # p, q, a, b, c


@triton.jit
def _solver_step_kernel(
    x_ptr, out_ptr, coef_ptr, prev_ptr, x_out_ptr, x0_out_ptr,
    scale, B, W, HW, guided_channels,
    s_xb, s_xc, s_xh, s_xw, s_ob, s_oc, s_oh, s_ow, s_pb, s_pc, s_ph, s_pw,
    s_yb, s_yc, s_yh, s_yw, s_zb, s_zc, s_zh, s_zw,
    GUIDED: tl.constexpr, UNCOND_FIRST: tl.constexpr, HAS_PREV: tl.constexpr, WRITE_X0: tl.constexpr,
    PLANES: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (hw tile, channel, batch row). PLANES: every tensor's (H, W) plane is contiguous, so
    an element's offset in its plane is hw itself (contiguous runs: 128-bit accesses, no division)."""
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    hw = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = hw < HW
    if PLANES:
        h = 0
        w = hw
    else:
        h = (hw // W).to(tl.int64)
        w = (hw % W).to(tl.int64)

    x = tl.load(x_ptr + b * s_xb + c * s_xc + h * s_xh + w * s_xw, mask=mask).to(tl.float32)
    o_offs = c * s_oc + h * s_oh + w * s_ow
    cond_b = b
    uncond_b = b + B
    if UNCOND_FIRST:
        cond_b = b + B
        uncond_b = b
    eps = tl.load(out_ptr + cond_b * s_ob + o_offs, mask=mask).to(tl.float32)
    if GUIDED:
        guide = (tl.zeros_like(hw) + c) < guided_channels  # a block mask
        uncond = tl.load(out_ptr + uncond_b * s_ob + o_offs, mask=mask & guide).to(tl.float32)
        eps = tl.where(guide, uncond + scale * (eps - uncond), eps)

    p = tl.load(coef_ptr)
    q = tl.load(coef_ptr + 1)
    a = tl.load(coef_ptr + 2)
    k = tl.load(coef_ptr + 3)
    x0 = p * x + q * eps
    x_next = a * x + k * x0
    if HAS_PREV:
        prev = tl.load(prev_ptr + b * s_pb + c * s_pc + h * s_ph + w * s_pw, mask=mask).to(tl.float32)
        x_next += tl.load(coef_ptr + 4) * prev
    tl.store(x_out_ptr + b * s_yb + c * s_yc + h * s_yh + w * s_yw, x_next.to(x_out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_out_ptr + b * s_zb + c * s_zc + h * s_zh + w * s_zw, x0, mask=mask)


_launch = Launcher(_solver_step_kernel)


@functools.lru_cache(maxsize=256)
def _grid(B: int, C: int, HW: int) -> tuple:
    return triton.cdiv(HW, _BLOCK), C, B


def guided_eps(out: torch.Tensor, channels: int, guidance_scale: float | None = None,
               guided_channels: int | None = None, cond_first: bool = True) -> torch.Tensor:
    """eps (B, channels, H, W) in out's dtype from a transformer output (B or 2B, >= channels, H, W)."""
    eps = out[:, :channels]
    if guidance_scale is None:
        return eps
    guided = channels if guided_channels is None else guided_channels
    first, second = eps.chunk(2)
    cond, uncond = (first, second) if cond_first else (second, first)
    mixed = uncond[:, :guided] + guidance_scale * (cond[:, :guided] - uncond[:, :guided])
    return torch.cat([mixed, cond[:, guided:]], dim=1) if guided < channels else mixed


def solver_step_ref(x, out, coefficients, *, guidance_scale=None, guided_channels=None, cond_first=True,
                    x0_prev=None, x_out=None, x0_out=None):
    """Torch definition of `solver_step`: guidance in out's dtype, the update in fp32."""
    p, q, a, b, c = coefficients.float().unbind()
    eps = guided_eps(out, x.shape[1], guidance_scale, guided_channels, cond_first)
    x32 = x.float()
    x0 = p * x32 + q * eps.float()
    x_next = a * x32 + b * x0
    if x0_prev is not None:
        x_next = x_next + c * x0_prev.float()
    x_next = x_next.to(x.dtype)
    if x0_out is not None:
        x0_out.copy_(x0)
    return (x_next if x_out is None else x_out.copy_(x_next)), x0_out


def _plainly_valid(x, out, coefficients, guidance_scale, guided_channels, x0_prev, x_out, x0_out) -> bool:
    """The common case of `_check` (kernel dtypes) in a few comparisons; any doubt returns False and the
    full checks run."""
    try:
        shape, dtype, device = x.shape, x.dtype, x.device
        rows = 2 * shape[0] if guidance_scale is not None else shape[0]
        if (len(shape) != 4 or dtype not in KERNEL_DTYPES or out.dtype != dtype or out.device != device
                or out.shape[0] != rows or out.shape[1] < shape[1] or out.shape[2:] != shape[2:]):
            return False
        for t, want in ((x0_prev, torch.float32), (x0_out, torch.float32), (x_out, dtype)):
            if t is not None and (t.shape != shape or t.dtype != want or t.device != device):
                return False
        if coefficients.shape != (COEFFICIENTS,) or coefficients.dtype != torch.float32:
            return False
        return coefficients.device == device and (
            guided_channels is None or (guidance_scale is not None and 1 <= guided_channels <= shape[1]))
    except (AttributeError, IndexError, TypeError):
        return False


def _check(x, out, coefficients, guidance_scale, guided_channels, x0_prev, x_out, x0_out):
    if _plainly_valid(x, out, coefficients, guidance_scale, guided_channels, x0_prev, x_out, x0_out):
        return
    check_tensor("x", x, ndim=4)
    check_kernel_dtype("x", x)
    B, C, H, W = x.shape
    check_tensor("out", out, ndim=4)
    check_kernel_dtype("out", out)
    rows = 2 * B if guidance_scale is not None else B
    if out.shape[0] != rows or out.shape[1] < C or tuple(out.shape[2:]) != (H, W):
        raise ValueError(f"out: expected shape ({rows}, >= {C}, {H}, {W}) for x of shape {tuple(x.shape)} "
                         f"{'with' if guidance_scale is not None else 'without'} guidance, got {tuple(out.shape)}")
    check_device("out", out, "x", x)
    check_tensor("coefficients", coefficients)
    if tuple(coefficients.shape) != (COEFFICIENTS,) or coefficients.dtype != torch.float32:
        raise ValueError(f"coefficients: expected a ({COEFFICIENTS},) float32 tensor (p, q, a, b, c), got shape "
                         f"{tuple(coefficients.shape)} dtype {coefficients.dtype}")
    check_device("coefficients", coefficients, "x", x)
    for name, t in (("x0_prev", x0_prev), ("x0_out", x0_out)):
        if t is None:
            continue
        check_tensor(name, t)
        if tuple(t.shape) != tuple(x.shape) or t.dtype != torch.float32:
            raise ValueError(f"{name}: expected a {tuple(x.shape)} float32 tensor (from x), got shape "
                             f"{tuple(t.shape)} dtype {t.dtype}")
        check_device(name, t, "x", x)
    if x_out is not None:
        check_like("x_out", x_out, "x", x)
    if guided_channels is not None and (guidance_scale is None or not 1 <= guided_channels <= C):
        raise ValueError(f"guided_channels: expected an integer in [1, {C}] with a guidance_scale, got "
                         f"{guided_channels!r} (guidance_scale {guidance_scale!r})")


def solver_step(x, out, coefficients, *, guidance_scale=None, guided_channels=None, cond_first=True,
                x0_prev=None, x_out=None, x0_out=None):
    """One step of a table sampler, guidance included. Returns (x_next, x0_out).

    x: (B, C, H, W) sample; out: (B, >= C, H, W) transformer output, (2B, ...) with `guidance_scale`
    (halves: conditional first when `cond_first`, else unconditional first); guided_channels: how many
    leading channels are guided (default all; the original DiT guides 3 of 4).
    coefficients: (5,) float32 (p, q, a, b, c) on x's device, read only on the device.
    x0_prev: (B, C, H, W) float32 data prediction of the previous step, or None (c unused).
    x_out: where x_next goes (may be x; default a new tensor, x's dtype); x0_out: (B, C, H, W) float32
    that receives x0 (may be x0_prev), or None to skip it.
    """
    _check(x, out, coefficients, guidance_scale, guided_channels, x0_prev, x_out, x0_out)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or out.requires_grad)
    run = solver_step_ref if not kernel_path(x) or needs_grad else solver_step_fwd
    return run(x, out, coefficients, guidance_scale=guidance_scale, guided_channels=guided_channels,
               cond_first=cond_first, x0_prev=x0_prev, x_out=x_out, x0_out=x0_out)


def solver_step_fwd(x, out, coefficients, *, guidance_scale=None, guided_channels=None, cond_first=True,
                    x0_prev=None, x_out=None, x0_out=None):
    """Launch the kernel (inputs already checked); returns (x_next, x0_out)."""
    require_triton("solver_step")
    B, C, H, W = x.shape
    x_out = torch.empty_like(x) if x_out is None else x_out
    guided = guidance_scale is not None
    prev = x if x0_prev is None else x0_prev
    x0 = x if x0_out is None else x0_out
    sx, so, sp, sy, sz = strides = (x.stride(), out.stride(), prev.stride(), x_out.stride(), x0.stride())
    planes = all(s[3] == 1 and s[2] == W for s in strides)
    _launch(
        _grid(B, C, H * W), (x, out, coefficients, prev, x_out, x0), (float(guidance_scale) if guided else 0.0,),
        (B, W, H * W, C if guided_channels is None else guided_channels, *sx, *so, *sp, *sy, *sz),
        dict(GUIDED=guided, UNCOND_FIRST=guided and not cond_first, HAS_PREV=x0_prev is not None,
             WRITE_X0=x0_out is not None, PLANES=planes, BLOCK=_BLOCK),
    )
    return x_out, x0_out
