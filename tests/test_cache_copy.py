"""cache_copy: one launch per dtype pair copies many slots of different sizes, casting if asked."""

import importlib

import pytest
import torch
from _helpers import DEVICE, DTYPES, dtype_id, randn
from hypothesis import given
from hypothesis import strategies as st

from harmonica.kernels.cache_copy import CacheCopyPlan, cache_copy, cache_copy_fwd

# the module itself: the package attribute `cache_copy` is the public function of the same name
cache_copy_module = importlib.import_module("harmonica.kernels.cache_copy")
SHAPES = [(2, 63, 72), (130,), (1, 5, 1152), (3, 7), ()]


def expected_copy(src, dst_dtype):
    """What the kernel must store. The CPU interpreter truncates where the GPU rounds a narrowing cast,
    so narrowing casts there get one unit in the last place."""
    return src.to(dst_dtype)


def assert_copied(dst, src, name):
    want = expected_copy(src, dst.dtype)
    narrowing = torch.finfo(dst.dtype).bits < torch.finfo(src.dtype).bits or {src.dtype, dst.dtype} == {
        torch.float16, torch.bfloat16}
    if DEVICE == "cpu" and narrowing:
        torch.testing.assert_close(dst, want, rtol=torch.finfo(dst.dtype).eps, atol=0, msg=name)
    else:
        assert torch.equal(dst, want), f"{name}: {int((dst != want).sum())} of {dst.numel()} elements differ"


def row_slice(rows, cols, dtype, gen):
    """Fresh values in a (rows, cols) view of a wider buffer: row stride cols + 3, not contiguous."""
    return randn((rows, cols + 3), dtype, gen=gen)[:, 1:cols + 1]


def nan_buffer(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dst_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("src_dtype", DTYPES, ids=dtype_id)
def test_copies_slots_of_different_sizes(src_dtype, dst_dtype):
    gen = torch.Generator().manual_seed(0)
    srcs = [randn(s, src_dtype, gen=gen) for s in SHAPES]
    dsts = [nan_buffer(s, dst_dtype) for s in SHAPES]
    plan = CacheCopyPlan(srcs, dsts)
    cache_copy_fwd(plan)
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        assert_copied(d, s, f"dsts[{i}]")


@pytest.mark.parametrize("strided_srcs", [True, False], ids=["both-strided", "dst-strided"])
def test_strided_views_leave_the_rest_untouched(strided_srcs):
    """Slices of bigger buffers: the pair's elements are copied, the gaps keep their sentinel."""
    gen = torch.Generator().manual_seed(1)
    src_base = randn((4, 10, 16), torch.float32, gen=gen)
    srcs = [src_base[:, :, 3:12], src_base.view(40, 16)[::2], row_slice(5, 9, torch.float32, gen)]
    if not strided_srcs:
        srcs = [s.contiguous() for s in srcs]
    dst_base = torch.full((3, 4, 10, 16), 7.0, device=DEVICE)
    dsts = [dst_base[0, :, :, :9], dst_base[1].view(40, 16)[1::2], dst_base[2, 1, :5, 2:11]]
    cache_copy_fwd(CacheCopyPlan(srcs, dsts))
    written = torch.zeros_like(dst_base, dtype=torch.bool)
    written[0, :, :, :9] = written[2, 1, :5, 2:11] = True
    written[1].view(40, 16)[1::2] = True
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        assert_copied(d, s, f"dsts[{i}]")
    assert torch.all(dst_base[~written] == 7.0), "elements outside the destination views were written"


def test_one_launch_per_dtype_pair(monkeypatch):
    launches = []
    kernel = cache_copy_module._launch.kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(cache_copy_module._launch, "kernel", Counting())
    gen = torch.Generator().manual_seed(2)
    srcs = [randn((2, 9 + i, 8), torch.float32, gen=gen) for i in range(12)]
    dsts = [nan_buffer(s.shape, torch.bfloat16 if i % 3 == 0 else torch.float32) for i, s in enumerate(srcs)]
    cache_copy_fwd(CacheCopyPlan(srcs, dsts))
    assert len(launches) == 2
    assert sorted(grid[1] for grid in launches) == [4, 8]
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        assert_copied(d, s, f"dsts[{i}]")


def test_plan_copies_current_values_every_run():
    gen = torch.Generator().manual_seed(3)
    srcs = [randn((3, 5), torch.float16, gen=gen) for _ in range(3)]
    dsts = [nan_buffer((3, 5), torch.float16) for _ in range(3)]
    plan = CacheCopyPlan(srcs, dsts)
    for _ in range(2):
        for s in srcs:
            s.copy_(torch.randn(s.shape, generator=gen))
        cache_copy_fwd(plan)
        for s, d in zip(srcs, dsts):
            assert torch.equal(s, d)


def test_public_op_on_device():
    gen = torch.Generator().manual_seed(4)
    srcs = [randn(s, torch.bfloat16, gen=gen) for s in SHAPES]
    dsts = [nan_buffer(s, torch.float32) for s in SHAPES]
    cache_copy(srcs, dsts)
    for s, d in zip(srcs, dsts):
        assert torch.equal(d, s.float())


@pytest.mark.parametrize("srcs,dsts,message", [
    ([torch.zeros(3)], [], r"dsts: expected 1 tensors \(one per src\), got 0"),
    ([torch.zeros(3)], [torch.zeros(4)], r"dsts\[0\]: expected shape \(3,\) \(from srcs\[0\]\), got \(4,\)"),
    ([torch.zeros(3), torch.zeros(2)], [torch.zeros(3), torch.zeros(2, device="meta")],
     r"dsts\[1\]: expected device cpu \(from srcs\[0\]\), got meta"),
    ([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3)], r"srcs\[0\]: expected one of .*, got torch.int32"),
    ([torch.zeros(4, 3).t()], [torch.zeros(3, 4)], r"srcs\[0\]: expected a tensor whose leading dimensions collapse"),
    ([torch.zeros(3)], [torch.zeros(3, requires_grad=True)],
     r"dsts\[0\]: expected a tensor that does not require grad"),
    ([torch.zeros(3)], ["x"], r"dsts\[0\]: expected a torch.Tensor, got str"),
], ids=["count", "shape", "device", "dtype", "layout", "grad", "type"])
def test_bad_input_names_argument(srcs, dsts, message):
    with pytest.raises(ValueError, match=message):
        cache_copy(srcs, dsts)


@given(sizes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 70)), min_size=1, max_size=6),
       src_dtype=st.sampled_from(DTYPES), dst_dtype=st.sampled_from(DTYPES), sliced=st.booleans())
def test_random_pairs(sizes, src_dtype, dst_dtype, sliced):
    gen = torch.Generator().manual_seed(5)
    srcs = [row_slice(r, c, src_dtype, gen) if sliced else randn((r, c), src_dtype, gen=gen) for r, c in sizes]
    dsts = [nan_buffer((r, c), dst_dtype) for r, c in sizes]
    plan = CacheCopyPlan(srcs, dsts)
    assert_alignment_promise(plan)
    cache_copy_fwd(plan)
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        assert_copied(d, s, f"dsts[{i}]")


def assert_alignment_promise(plan):
    """What the kernel tells the compiler (tl.multiple_of): every offset, count, column count and row
    stride it reads is a multiple of the group's ALIGN elements."""
    for g in plan.groups:
        src_offs, dst_offs, counts, cols, src_strides, dst_strides = g.meta.tolist()
        promised = src_offs + dst_offs + (cols + src_strides + dst_strides if g.rows else counts)
        assert all(q % g.align == 0 for q in promised), (g.align, promised)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_aligned_slots_take_16_byte_runs_and_wide_rows_span_tiles(dtype):
    """Contiguous slots of aligned sizes: 16 bytes per run. Rows wider than one column tile (256) and
    more rows than one row tile: every tile of every pair is copied, the gaps between rows are not."""
    gen = torch.Generator().manual_seed(6)
    slots = [randn((3, 40, 64), dtype, gen=gen) for _ in range(2)]
    flat = CacheCopyPlan(slots, [nan_buffer(s.shape, dtype) for s in slots])
    assert not flat.groups[0].rows and flat.groups[0].align == 16 // slots[0].element_size()
    base = randn((40, 600), dtype, gen=gen)
    srcs = [base[:, 8:308], base[:33, 320:584]]  # 300 and 264 columns: two column tiles each
    dst_base = torch.full((2, 40, 320), 7.0, dtype=dtype, device=DEVICE)
    dsts = [dst_base[0, :, :300], dst_base[1, :33, :264]]
    plan = CacheCopyPlan(srcs, dsts)
    g = plan.groups[0]
    assert g.rows and g.align == 4, "offsets, columns and strides share the factor 4 (312, 300, 264, 600, 320)"
    assert_alignment_promise(plan)
    for p in (flat, plan):
        cache_copy_fwd(p)
    for i, (s, d) in enumerate(zip(slots + srcs, flat.dsts + dsts)):
        assert_copied(d, s, f"pair {i}")
    written = torch.zeros_like(dst_base, dtype=torch.bool)
    written[0, :, :300] = written[1, :33, :264] = True
    assert torch.all(dst_base[~written] == 7.0), "elements outside the destination views were written"


@pytest.mark.gpu
def test_cuda_graph_replay():
    """A plan captured in a CUDA graph copies the values present at replay."""
    srcs = [torch.randn(2, 4096, 1152, device="cuda", dtype=torch.bfloat16) for _ in range(56)]
    dsts = [torch.empty_like(s) for s in srcs]
    plan = CacheCopyPlan(srcs, dsts)
    plan()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan()
    for s, d in zip(srcs, dsts):
        s.normal_()
        d.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(s, d) for s, d in zip(srcs, dsts))
