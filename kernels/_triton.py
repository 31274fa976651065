"""Triton, when installed; otherwise a stand-in so the CPU path imports without it.

CUDA builds of torch ship their own pinned triton, so the package does not require it. Without
triton the `@triton.jit` kernels are defined but never launched: on CPU tensors the public ops
run their torch reference, and a CUDA tensor without triton gets a clear error.
"""

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only install without the `test` extra
    HAVE_TRITON = False

    class _MissingTriton:
        @staticmethod
        def jit(fn):
            return fn

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << (n - 1).bit_length()

    class _MissingLanguage:
        @staticmethod
        def constexpr(value):
            return value

        def __getattr__(self, name):
            return None

    triton = _MissingTriton()
    tl = _MissingLanguage()


# Set by harmonica.kernels.aot.stubbed_launches (launches that do nothing): CPU tensors then take the
# kernel path too, so its host cost can be measured without a GPU.
KERNELS_ON_CPU = False


def kernel_path(t) -> bool:
    """Whether an op on tensor `t` launches its Triton kernel (CUDA) or runs its torch reference (CPU)."""
    return t.is_cuda or KERNELS_ON_CPU


def require_triton(op: str) -> None:
    if not HAVE_TRITON:
        raise RuntimeError(f"{op}: CUDA tensors need triton (pip install triton), which is not installed")
