"""Batched cache copies: many (src, dst) pairs of any sizes in one launch per dtype pair.

Refreshing every cache slot at a step, or snapshotting and restoring all slots, is a list of
copies. A Python loop of `copy_` pays one launch per slot (56 for DiT-XL/2, 84 for PixArt); this
op pays one per (src dtype, dst dtype) combination, usually exactly one.

- srcs[i], dsts[i]: equal shapes; the sizes of different pairs may differ; dtypes fp32/fp16/bf16,
  a dst dtype other than its src's casts the value (rounded to nearest).
- Every tensor must view as rows of its last dimension: last stride 1 and the leading dimensions
  collapsible into one row stride (contiguous tensors and slices of them, such as `x[:, :, :k]`).

The pairs are described by a `CacheCopyPlan`, built once and run every step: its metadata lives on
the device, so running it is a single launch and no host work.
"""

from collections import defaultdict

import torch

from ._checks import KERNEL_DTYPES, check_device, check_tensor
from ._launch import Launcher
from ._triton import kernel_path, require_triton, tl, triton

_TILE = 4096  # elements per program
_MAX_BLOCK_C = 256  # columns per program on the rows path


@triton.jit
def _cache_copy_fwd_kernel(
    src_anchor, dst_anchor, meta_ptr, n_pairs,
    ROWS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (tile, pair) copies one tile of one pair. meta rows: src offset, dst offset, then
    numel (flat) or row count, columns, src row stride, dst row stride (rows path). Every offset,
    stride and count is a multiple of ALIGN elements (the host checked), so contiguous runs of ALIGN
    elements move as 128-bit accesses. Counts fit int32: no 64-bit division anywhere."""
    pair = tl.program_id(1)
    tile = tl.program_id(0)
    src_off = tl.multiple_of(tl.load(meta_ptr + pair), ALIGN)
    dst_off = tl.multiple_of(tl.load(meta_ptr + n_pairs + pair), ALIGN)
    if ROWS:
        n_rows = tl.load(meta_ptr + 2 * n_pairs + pair).to(tl.int32)
        cols = tl.multiple_of(tl.load(meta_ptr + 3 * n_pairs + pair).to(tl.int32), ALIGN)
        src_stride = tl.multiple_of(tl.load(meta_ptr + 4 * n_pairs + pair), ALIGN)
        dst_stride = tl.multiple_of(tl.load(meta_ptr + 5 * n_pairs + pair), ALIGN)
        col_tiles = tl.cdiv(cols, BLOCK_C)
        row = ((tile // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
        col = ((tile % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        mask = (row < n_rows) & (col < cols)
        src_idx = src_off + row.to(tl.int64) * src_stride + col
        dst_idx = dst_off + row.to(tl.int64) * dst_stride + col
    else:
        numel = tl.multiple_of(tl.load(meta_ptr + 2 * n_pairs + pair), ALIGN)
        idx = tile.to(tl.int64) * (BLOCK_R * BLOCK_C) + tl.arange(0, BLOCK_R * BLOCK_C)
        mask = idx < numel
        src_idx = src_off + idx
        dst_idx = dst_off + idx
    x = tl.load(src_anchor + src_idx, mask=mask)
    tl.store(dst_anchor + dst_idx, x.to(dst_anchor.dtype.element_ty), mask=mask)


_launch = Launcher(_cache_copy_fwd_kernel, num_warps=8)


def _rows_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` as a (rows, columns) view with unit column stride, or a ValueError naming `name`."""
    cols = t.shape[-1] if t.dim() else 1
    try:
        rows = t.view(-1, cols)
    except RuntimeError:
        rows = None
    if rows is None or (cols > 1 and rows.stride(1) != 1):
        raise ValueError(f"{name}: expected a tensor whose leading dimensions collapse into rows of its last "
                         f"dimension with last stride 1 (contiguous or sliced), got shape {tuple(t.shape)} "
                         f"strides {t.stride()}; pass .contiguous()")
    return rows


class _Group:
    """The pairs of one (src dtype, dst dtype) combination, with their device metadata and launch shape."""

    def __init__(self, pairs):
        src_rows = [s for s, _ in pairs]
        dst_rows = [d for _, d in pairs]
        self.src_anchor, self.dst_anchor = src_rows[0], dst_rows[0]
        src_offs = _element_offsets(self.src_anchor, src_rows)
        dst_offs = _element_offsets(self.dst_anchor, dst_rows)
        numels = [s.numel() for s in src_rows]
        cols = [s.shape[1] for s in src_rows]
        src_strides = [s.stride(0) for s in src_rows]
        dst_strides = [d.stride(0) for d in dst_rows]
        self.rows = any(n > c and (rs != c or ds != c) for n, c, rs, ds in zip(numels, cols, src_strides, dst_strides))
        if self.rows:
            counts = [n // c for n, c in zip(numels, cols)]
            self.block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(max(cols)))
            self.block_r = _TILE // self.block_c
            tiles = max(triton.cdiv(r, self.block_r) * triton.cdiv(c, self.block_c) for r, c in zip(counts, cols))
            aligned = src_offs + dst_offs + cols + src_strides + dst_strides
        else:
            counts = numels
            self.block_r, self.block_c = 1, _TILE
            tiles = triton.cdiv(max(numels), _TILE)
            aligned = src_offs + dst_offs + numels
        if max(numels) >= 2**31:
            raise ValueError(f"srcs: expected fewer than 2**31 elements per tensor, got {max(numels)}")
        self.align = _alignment(aligned, self.src_anchor, self.dst_anchor)
        self.n_pairs = len(pairs)
        self.grid = (tiles, self.n_pairs, 1)
        meta = [src_offs, dst_offs, counts, cols, src_strides, dst_strides]  # rows read by the kernel
        self.meta = torch.tensor(meta, dtype=torch.int64).to(self.src_anchor.device)


def _element_offsets(anchor: torch.Tensor, tensors) -> list:
    """Start of each tensor, in elements from `anchor` (one dtype, so the byte distance divides)."""
    return [(t.data_ptr() - anchor.data_ptr()) // anchor.element_size() for t in tensors]


def _alignment(quantities, src_anchor: torch.Tensor, dst_anchor: torch.Tensor) -> int:
    """Elements per aligned run: the largest power of two, at most 16 bytes of the narrower dtype, that
    divides every offset, stride and count of a group (both anchors 16-byte aligned); else 1. Each
    tensor's runs then start on a multiple of run x its element size bytes."""
    if src_anchor.data_ptr() % 16 or dst_anchor.data_ptr() % 16:
        return 1
    align = 16 // min(src_anchor.element_size(), dst_anchor.element_size())
    while align > 1 and any(q % align for q in quantities):
        align //= 2
    return align


class CacheCopyPlan:
    """Copies `srcs[i]` into `dsts[i]` for all i; validated once, run any number of times.

    The plan records addresses, not values: running it copies whatever the tensors hold then.
    The tensors must stay alive (the plan keeps references) and keep their storage.
    """

    def __init__(self, srcs, dsts):
        srcs, dsts = list(srcs), list(dsts)
        if len(srcs) != len(dsts):
            raise ValueError(f"dsts: expected {len(srcs)} tensors (one per src), got {len(dsts)}")
        for i, (s, d) in enumerate(zip(srcs, dsts)):
            check_tensor(f"srcs[{i}]", s)
            check_tensor(f"dsts[{i}]", d)
            if s.shape != d.shape:
                raise ValueError(f"dsts[{i}]: expected shape {tuple(s.shape)} (from srcs[{i}]), got {tuple(d.shape)}")
            for name, t in ((f"srcs[{i}]", s), (f"dsts[{i}]", d)):
                check_device(name, t, "srcs[0]", srcs[0])
                if t.dtype not in KERNEL_DTYPES:
                    raise ValueError(f"{name}: expected one of {KERNEL_DTYPES}, got {t.dtype}")
            if d.requires_grad:
                raise ValueError(f"dsts[{i}]: expected a tensor that does not require grad, got requires_grad=True")
        self.srcs, self.dsts = srcs, dsts
        self._rows = [(_rows_view(f"srcs[{i}]", s), _rows_view(f"dsts[{i}]", d))
                      for i, (s, d) in enumerate(zip(srcs, dsts))]
        self._groups = None
        if srcs and kernel_path(srcs[0]):  # the metadata goes to the device now: a first call may be captured
            self.groups  # noqa: B018 - builds them

    @property
    def groups(self) -> list:
        """Pairs grouped by (src dtype, dst dtype), empty pairs left out, with their metadata on the device;
        built with the plan where it takes the kernel path, else on first use."""
        if self._groups is None:
            by_dtypes = defaultdict(list)
            for s, d in self._rows:
                if s.numel():
                    by_dtypes[s.dtype, d.dtype].append((s, d))
            self._groups = [_Group(pairs) for pairs in by_dtypes.values()]
        return self._groups

    def __call__(self) -> None:
        if self.srcs and kernel_path(self.srcs[0]):
            cache_copy_fwd(self)
        else:
            cache_copy_ref(self.srcs, self.dsts)

def cache_copy_fwd(plan: CacheCopyPlan) -> None:
    """Launch one kernel per dtype group of `plan`."""
    require_triton("cache_copy")
    for g in plan.groups:
        _launch(g.grid, (g.src_anchor, g.dst_anchor, g.meta), (), (g.n_pairs,),
                dict(ROWS=g.rows, ALIGN=g.align, BLOCK_R=g.block_r, BLOCK_C=g.block_c))

def cache_copy_ref(srcs, dsts) -> None:
    """Torch definition: `dsts[i].copy_(srcs[i])` for every i."""
    for s, d in zip(srcs, dsts):
        d.copy_(s)

def cache_copy(srcs, dsts) -> None:
    """Copy `srcs[i]` into `dsts[i]` for every i (casting to the dst dtype) in one launch per dtype pair.

    srcs, dsts: equal-length sequences of tensors on one device; pair shapes equal, sizes free.
    For copies repeated every step, build a `CacheCopyPlan` once and call it instead.
    """
    CacheCopyPlan(srcs, dsts)()
