"""Input checks shared by the kernels: every message names the argument, the expected and the actual."""

import torch

from ._triton import kernel_path

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def check_like(name: str, t, ref_name: str, ref: torch.Tensor, *, shape=None) -> None:
    """`t` must have `ref`'s shape (or `shape`), dtype and device."""
    check_tensor(name, t)
    want = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(t.shape) != want:
        raise ValueError(f"{name}: expected shape {want} (from {ref_name}), got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} (from {ref_name}), got {t.dtype}")
    check_device(name, t, ref_name, ref)


def check_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (from {ref_name}), got {t.device}")


def check_kernel_dtype(name: str, t: torch.Tensor) -> None:
    """CUDA tensors go to Triton, which supports fp32/fp16/bf16 here."""
    if kernel_path(t) and t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: expected one of {KERNEL_DTYPES} on CUDA, got {t.dtype}")
