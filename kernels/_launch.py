"""Kernel launches with a small host cost.

`kernel[grid](...)` goes through Triton's JIT binder at every call: argument binding, specialisation
and the cache key cost tens of microseconds, paid by every unit of every step (56 for DiT-XL/2, 84 for
PixArt). `Launcher` pays it once per specialisation: the first launch goes through the JIT (compiling
if needed) and keeps the compiled kernel; later launches with the same specialisation call it directly.

The specialisation key holds everything Triton specialises on: each tensor's dtype and 16-byte
alignment, every integer argument's value (sizes and strides, so divisibility and width follow), the
constexprs and the device. Float arguments are passed, not keyed. Under torch.compile the JIT path is
always taken, since dynamo traces `kernel[grid]` launches and nothing else (inductor's code sets the device).

Every launch runs on the tensors' device: when another device is current (`pipe.to("cuda:1")` with device 0
current), it is made current for the launch, so the kernel is loaded on, and launched into the current stream
of, the device its pointers belong to, then the previous device is restored.

Launch hooks (`triton.knobs.runtime.launch_enter_hook` / `launch_exit_hook`, which profilers set): a direct
launch calls both, with the kernel's launch metadata, as the JIT does; other JIT hooks (`jit_cache_hook`,
`jit_post_compile_hook`) run only at the first launch of a specialisation, which goes through the JIT.
"""

import torch

try:  # the device guard: triton's driver (torch.cuda's current device)
    from triton.runtime.driver import driver
except ImportError:  # no triton: the torch references run
    driver = None
try:  # direct launches need triton >= 3.4 (its knobs); without, every launch goes through the JIT
    from triton import knobs
    from triton.runtime.jit import JITFunction
except ImportError:
    JITFunction = None


class Launcher:
    """Launches one `@triton.jit` kernel whose parameters are, in order: tensors, floats, integers,
    constexprs. options: launch options such as num_warps (the same for every launch)."""

    instances = []  # every launcher, for harmonica.kernels.aot's clean-up

    def __init__(self, kernel, **options):
        Launcher.instances.append(self)
        self.kernel = kernel
        self.options = options
        self.compiled = {}
        # the interpreter (TRITON_INTERPRET=1) builds no JIT function: it only runs kernel[grid]
        self.direct = JITFunction is not None and isinstance(kernel, JITFunction)

    def __call__(self, grid: tuple, tensors: tuple, floats: tuple, ints: tuple, constexprs: dict) -> None:
        """grid: 3 entries (x, y, z)."""
        device = tensor_device(tensors[0])
        if device is None or torch.compiler.is_compiling():
            self._launch(grid, tensors, floats, ints, constexprs)
            return
        current = driver.active.get_current_device()
        if device == current:
            self._launch(grid, tensors, floats, ints, constexprs, device)
            return
        driver.active.set_current_device(device)
        try:
            self._launch(grid, tensors, floats, ints, constexprs, device)
        finally:
            driver.active.set_current_device(current)

    def _launch(self, grid, tensors, floats, ints, constexprs, device=None) -> None:
        """The launch on the current device (`device`: its index where known)."""
        if not self.direct or torch.compiler.is_compiling():
            self.kernel[grid](*tensors, *floats, *ints, **constexprs, **self.options)
            return
        if device is None:  # as the JIT: kernels are loaded per current device
            device = driver.active.get_current_device()
        key = (device, ints, *constexprs.values(), *[t.dtype for t in tensors], *[t.data_ptr() % 16 for t in tensors])
        compiled = self.compiled.get(key)
        if compiled is None:
            self.compiled[key] = self.kernel[grid](*tensors, *floats, *ints, **constexprs, **self.options)
            return
        args = (*tensors, *floats, *ints, *constexprs.values())
        enter, leave = _hook(knobs.runtime.launch_enter_hook), _hook(knobs.runtime.launch_exit_hook)
        stream = driver.active.get_current_stream(device)
        metadata = None if enter is None and leave is None else compiled.launch_metadata(grid, stream, *args)
        compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *args)

    def forget(self, device) -> None:
        """Drop the compiled kernels of `device`."""
        self.compiled = {key: kernel for key, kernel in self.compiled.items() if key[0] != device}


def tensor_device(tensor: torch.Tensor) -> int | None:
    """The CUDA device index of `tensor`; None off CUDA (the interpreter, aot's compiles without a GPU)."""
    index = tensor.get_device()
    return index if index >= 0 and tensor.is_cuda else None


def _hook(hook):
    """A launch hook (profilers set them), or None for none: newer tritons hold an empty chain of hooks,
    whose launch metadata would cost more than the rest of the launch."""
    return None if hook is None or getattr(hook, "calls", True) == [] else hook
