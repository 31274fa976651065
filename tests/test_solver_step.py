"""solver_step: the fused sampler step (Triton kernel, interpreter on CPU) against the torch reference in fp32."""

import pytest
import torch
from _helpers import DEVICE, DTYPES, assert_matches_reference, dtype_id, nan_like, randn

from harmonica.kernels.solver_step import guided_eps, solver_step, solver_step_fwd, solver_step_ref

SHAPES = [(2, 4, 5, 7), (1, 4, 40, 33)]  # odd sizes; the second spans two programs along H*W
# guidance: (scale, guided channels, conditional half first), as DiT (3 of 4 channels) and PixArt use it
GUIDANCE = {"none": None, "dit": (1.5, 3, True), "pixart": (4.5, None, False)}


def make_step(shape, dtype, guidance, strided, seed=0):
    """x, out (with a learned-variance half of the channels), x0_prev (fp32) and fresh coefficients."""
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    rows = B if guidance is None else 2 * B
    x = randn(shape, dtype, gen=gen, strided=strided)
    out = randn((rows, 2 * C, H, W), dtype, gen=gen, strided=strided)
    x0_prev = randn(shape, torch.float32, gen=gen, strided=strided)
    coefficients = torch.randn(5, generator=gen).to(DEVICE)
    return x, out, x0_prev, coefficients


def options_of(guidance) -> dict:
    if guidance is None:
        return {}
    scale, channels, cond_first = guidance
    return {"guidance_scale": scale, "guided_channels": channels, "cond_first": cond_first}


def f32(t):
    return t.to(torch.float32, copy=True)


CASES = [(s, d, g, st) for s in SHAPES for d in DTYPES for g in GUIDANCE for st in (False, True)]
CASE_IDS = [f"B{s[0]}-C{s[1]}-H{s[2]}-W{s[3]}-{dtype_id(d)}-{g}-{'strided' if st else 'contig'}"
            for s, d, g, st in CASES]


@pytest.mark.parametrize("multistep", [True, False], ids=["with-x0-prev", "ddim"])
@pytest.mark.parametrize("shape,dtype,guidance,strided", CASES, ids=CASE_IDS)
def test_kernel_matches_the_fp32_reference(shape, dtype, guidance, strided, multistep):
    x, out, x0_prev, coefficients = make_step(shape, dtype, GUIDANCE[guidance], strided)
    options = options_of(GUIDANCE[guidance])
    prev = x0_prev if multistep else None
    x_out, x0_out = nan_like(x), torch.full(shape, float("nan"), device=DEVICE)
    solver_step_fwd(x, out, coefficients, x0_prev=prev, x_out=x_out, x0_out=x0_out, **options)

    ref_x0, low_x0 = (torch.empty(shape, device=DEVICE) for _ in range(2))
    ref_x, _ = solver_step_ref(f32(x), f32(out), coefficients, x0_prev=prev, x0_out=ref_x0, **options)
    low_x, _ = solver_step_ref(x, out, coefficients, x0_prev=prev, x0_out=low_x0, **options)
    assert x_out.dtype == dtype
    assert_matches_reference(x_out, low_x, ref_x, "x_next")
    assert_matches_reference(x0_out.to(dtype), low_x0.to(dtype), ref_x0, "x0")


@pytest.mark.parametrize("guidance", GUIDANCE)
def test_kernel_in_place_and_without_x0(guidance):
    x, out, x0_prev, coefficients = make_step((2, 4, 5, 7), torch.float32, GUIDANCE[guidance], strided=True)
    options = options_of(GUIDANCE[guidance])
    expected_x, expected_x0 = solver_step_ref(x.clone(), out, coefficients, x0_prev=x0_prev.clone(),
                                              x0_out=torch.empty_like(x0_prev), **options)
    state, prev = x.clone(), x0_prev.clone()
    result, x0 = solver_step_fwd(state, out, coefficients, x0_prev=prev, x_out=state, x0_out=prev, **options)
    assert result is state and x0 is prev
    torch.testing.assert_close(state, expected_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prev, expected_x0, rtol=1e-5, atol=1e-5)
    fresh, none = solver_step_fwd(x, out, coefficients, x0_prev=x0_prev, **options)
    assert none is None and fresh.data_ptr() != x.data_ptr()
    torch.testing.assert_close(fresh, expected_x, rtol=1e-5, atol=1e-5)


def test_guided_eps_follows_each_models_convention():
    gen = torch.Generator().manual_seed(4)
    cond, uncond, sigma = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    out = torch.cat([torch.cat([cond, sigma], 1), torch.cat([uncond, sigma], 1)])  # DiT: conditional half first
    dit = guided_eps(out, 4, 1.5, 3)
    torch.testing.assert_close(dit[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(dit[:, 3], cond[:, 3])
    swapped = torch.cat([torch.cat([uncond, sigma], 1), torch.cat([cond, sigma], 1)])  # PixArt: unconditional first
    torch.testing.assert_close(guided_eps(swapped, 4, 4.5, cond_first=False), uncond + 4.5 * (cond - uncond))
    assert torch.equal(guided_eps(out[:2], 4), cond)


@pytest.mark.parametrize("change, message", [
    ({"out": "rows"}, r"out: expected shape \(4, >= 4, 5, 7\) for x of shape \(2, 4, 5, 7\) with guidance"),
    ({"coefficients": torch.float64}, r"coefficients: expected a \(5,\) float32 tensor"),
    ({"x0_prev": torch.float16}, r"x0_prev: expected a \(2, 4, 5, 7\) float32 tensor \(from x\)"),
    ({"guided_channels": 5}, r"guided_channels: expected an integer in \[1, 4\]"),
    ({"x_out": torch.float16}, r"x_out: expected dtype torch.float32 \(from x\)"),
])
def test_bad_input_is_named(change, message):
    x, out, x0_prev, coefficients = make_step((2, 4, 5, 7), torch.float32, GUIDANCE["dit"], strided=False)
    kwargs = {"guidance_scale": 1.5, "x0_prev": x0_prev}
    if "out" in change:
        out = out[:2]
    if "coefficients" in change:
        coefficients = coefficients.double()
    if "x0_prev" in change:
        kwargs["x0_prev"] = x0_prev.half()
    if "guided_channels" in change:
        kwargs["guided_channels"] = 5
    if "x_out" in change:
        kwargs["x_out"] = x.half()
    with pytest.raises(ValueError, match=message):
        solver_step(x, out, coefficients, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_graph_capture_poison_replay(dtype):
    """The step captured once replays any row of a table: the coefficients are read on the device."""
    x, out, x0_prev, coefficients = make_step((2, 4, 32, 32), dtype, GUIDANCE["pixart"], strided=False)
    options = options_of(GUIDANCE["pixart"])
    static = coefficients.clone()
    x_out, x0_out = nan_like(x), torch.full(x.shape, float("nan"), device="cuda")
    solver_step(x, out, static, x0_prev=x0_prev, x_out=x_out, x0_out=x0_out, **options)  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        solver_step(x, out, static, x0_prev=x0_prev, x_out=x_out, x0_out=x0_out, **options)
    other = torch.randn(5, device="cuda")
    static.copy_(other)
    x_out.fill_(float("nan"))
    x0_out.fill_(float("nan"))
    graph.replay()
    eager_x, eager_x0 = solver_step(x, out, other, x0_prev=x0_prev, x_out=nan_like(x),
                                    x0_out=torch.full(x.shape, float("nan"), device="cuda"), **options)
    assert torch.equal(x_out, eager_x) and torch.equal(x0_out, eager_x0), "the replay differs from the eager step"
    low_x0, ref_x0 = torch.empty_like(x0_out), torch.empty_like(x0_out)
    low_x, _ = solver_step_ref(x, out, other, x0_prev=x0_prev, x0_out=low_x0, **options)
    ref_x, _ = solver_step_ref(f32(x), f32(out), other, x0_prev=x0_prev, x0_out=ref_x0, **options)
    assert_matches_reference(x_out, low_x, ref_x, "x_next")
    assert_matches_reference(x0_out.to(dtype), low_x0.to(dtype), ref_x0, "x0")


@pytest.mark.parametrize("guidance, expected", [("dit", 17), ("pixart", 16)])
def test_the_unfused_step_is_as_many_operations_as_the_docs_say(guidance, expected):
    """kernels/solver_step.py and the kernel micro-benchmark quote these counts (fp16, in place)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):  # operations that write a tensor (views are free)
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not func.is_view
            return func(*args, **(kwargs or {}))

    x, out, x0_prev, coefficients = make_step((1, 4, 8, 8), torch.float16, GUIDANCE[guidance], strided=False)
    options = options_of(GUIDANCE[guidance])
    with CountOps() as ops:
        solver_step_ref(x, out, coefficients, x0_prev=x0_prev, x_out=x, x0_out=x0_prev, **options)
    assert ops.count == expected
