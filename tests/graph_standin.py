"""A CPU stand-in for CUDA graphs that refuses what a real capture forbids and replays as a GPU does.

A capture runs the call once under the rules, records every aten op it ran with its arguments and outputs,
puts back every storage of an input as it was (a capture runs nothing: also the bytes of an input's storage
outside the views declared as inputs) and poisons its output. A replay does not run the
Python again: it re-executes the recorded ops with their captured arguments, writing each op's result into
the tensor the capture allocated for it, so it repeats the captured work whatever the host state is now: a
view chosen on the host (`table[step]`) replays the capture's row, a host float the capture's value. It checks
every aten op of a capture (a TorchDispatchMode) and every fused-op launch (the launchers `*_fwd` and the
references `*_ref` of `harmonica.kernels`, patched only while the stand-in captures). It raises
`CaptureViolation` on:

- a host sync: an op that reads a device value on the host (`.item()`, `bool`/`if` on a tensor,
  `torch.equal`, `nonzero`, boolean-mask indexing, `tolist`, `numpy`, `.cpu()`, `.to("cpu")`) and the host
  calls that are no aten ops (`torch.cuda.synchronize`, event and stream `synchronize`/`query`);
- a host-to-device copy: a tensor built from host data (`torch.tensor`, `as_tensor`, `from_numpy`; a number
  assigned into a slice, `t[i, :n] = 1`, is a 0-d host tensor that torch's setitem hands to `fill_`: on a GPU a
  fill kernel with the number as its argument, allowed; any other read of that tensor, `copy_` into a 0-d
  element, is refused), a read of a tensor the caller marks as host memory (`host()`: on a GPU, a CPU input
  copied in), or a read of any tensor that is neither a graph input (`inputs()`: for the runner its static
  inputs, the transformer's parameters and buffers, the cache slots, the sampler buffers, DiT's modulation step
  buffer) nor allocated by the capture itself;
- memory outside the graph's pool: a replay while memory the capture read is no graph input any more (a
  buffer reallocated since: a GPU replay reads the old address);
- a kernel variant first launched in a capture: a fused-op launch whose signature (function, tensor
  dtypes, shapes, strides and 16-byte alignment, flags) no warm-up ran (on a GPU, a Triton compile
  and module load inside the capture);
- a collective whose result the capture never waited for (on a GPU its stream is not joined back into the
  captured one: the capture fails);
- a refused call the code caught, or one made on another thread while the capture ran: the capture is
  invalidated and its end raises (CUDA's global capture mode, torch.cuda.graph's default: another thread's
  unsafe call errors there and the capture fails). The host calls patched here are refused on every thread;
  the aten ops of other threads are not seen (a dispatch mode is per thread), so another thread's `.item()`
  is not.

Pool reuse across graphs: the graphs captured since the last `new_pool` share one pool, as the runner's do.
A later capture may take the memory an earlier capture's intermediates freed, so a replay overwrites the
outputs of the graphs captured after it in its pool: they are poisoned (NaN, -1 for integers) at the end of
the replay. The outputs of graphs captured before it stay (alive while it was captured, the allocator could
not hand them out).

Tracking is per storage, which is what a verdict needs: device memory is valid per allocation (any byte of
a live input's storage may be read on a GPU) and reallocated per allocation. What a read sees (a row not
refreshed between replays, a write after a read in one storage) is not tracked but executed: a replay
re-runs the captured ops on the memory as it is, in capture order, as one stream does.

Collectives (context parallelism on 2 gloo ranks): a capture may issue them, as NCCL allows when every rank
captures the same sequence; they run then (each rank's capture meets the other's) and are recorded with the other
ops. A replay re-issues them, in the captured order on the captured buffers, and waits for each before the next op
(one stream's order); `issued` lists the collectives the replays issued. An AsyncCollectiveTensor (what a
functional collective returns) is tracked as the tensor it wraps.

Not modelled: inductor's own Triton kernels (a compiled body's ops are seen as the aten ops its graph runs).
"""

import contextlib
import importlib
import weakref
from dataclasses import dataclass

import torch
from torch._C._distributed_c10d import _get_work_registry_size
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from harmonica.graphs import is_collective

aten = torch.ops.aten
HOST_SYNCS = {aten._local_scalar_dense.default, aten.item.default, aten.equal.default, aten.is_nonzero.default,
              aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor, aten._unique2.default,
              aten.unique_consecutive.default, aten.unique_dim.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
HOST_FROM_DATA = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
KERNEL_MODULES = ("harmonica.kernels.gated_residual", "harmonica.kernels.solver_step", "harmonica.kernels.cache_copy")


class CaptureViolation(RuntimeError):
    """Something a CUDA graph capture (or replay) cannot do."""


def _tensors(value) -> list:
    """The plain tensors in `value`; a wrapper subclass (a collective's AsyncCollectiveTensor) gives those it wraps."""
    found = []
    for t in tree_leaves(value):
        if is_traceable_wrapper_subclass(t):
            found += _tensors([getattr(t, name) for name in t.__tensor_flatten__()[0]])
        elif isinstance(t, torch.Tensor):
            found.append(t)
    return found


def _completed(func, result):
    """`result` of op `func` once complete: a collective's tensors waited on, its Work waited."""
    if is_collective(func):
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                torch.ops._c10d_functional.wait_tensor(leaf)
            elif hasattr(leaf, "wait"):
                leaf.wait()
    return result


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storages(tensors) -> dict:
    """address -> weak reference of each tensor's storage."""
    return {_address(t): StorageWeakRef(t.untyped_storage()) for t in tensors}


def _alive(storages: dict, address: int) -> bool:
    """Whether `address` holds one of `storages` (an address can be reused once its storage is freed)."""
    ref = storages.get(address)
    return ref is not None and not ref.expired()


def variant(name: str, args, kwargs) -> tuple:
    """What a Triton launch is specialised on: the function, each tensor's dtype, shape, strides and
    16-byte alignment, the flags and integers (floats are runtime values)."""
    def describe(value):
        if isinstance(value, torch.Tensor):
            return value.dtype, tuple(value.shape), value.stride(), value.data_ptr() % 16 == 0
        if isinstance(value, dict):
            return tuple((k, describe(v)) for k, v in sorted(value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        if isinstance(value, float):
            return float
        return describe(vars(value)) if hasattr(value, "__dict__") else value

    return name, describe(args), describe(kwargs)


@contextlib.contextmanager
def _patched(targets):
    """Set (object, name, value) for the duration, then restore."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    for obj, name, value in targets:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _launch_points():
    """(module, name) of every fused-op launcher and reference, where the library looks them up."""
    package = importlib.import_module("harmonica.kernels")
    points = []
    for module in map(importlib.import_module, KERNEL_MODULES):
        for name in dir(module):
            if name.endswith(("_fwd", "_ref")) and callable(getattr(module, name)):
                points += [(module, name)] + ([(package, name)] if hasattr(package, name) else [])
    return points


def _launches(record):
    """Patch every launch point to call `record(variant)` first."""
    def wrap(name, fn):
        def launch(*args, **kwargs):
            record(variant(name, args, kwargs))
            return fn(*args, **kwargs)
        return launch

    return _patched([(obj, name, wrap(name, getattr(obj, name))) for obj, name in _launch_points()])


class _Rules(TorchDispatchMode):
    """The rules over the aten ops of one capture or replay. inputs: the storages the run may read besides
    its own allocations (`_storages`); reads, allocations (alike) and trace record what it did."""

    def __init__(self, phase: str, inputs: dict, host: dict | None = None):
        super().__init__()
        self.phase, self.inputs, self.host = phase, inputs, host or {}
        self.reads, self.allocations = {}, {}
        self.numbers = {}  # the 0-d host tensors of numbers assigned into slices: only `fill_` may read them
        self.violations = []  # every refusal, caught or not (a refused call invalidates the capture)
        self.trace = []  # (op, ((bytes, dtype) of each new allocation)) per op
        self.ops = []  # (func, args, kwargs, out) per op, as run: what a replay re-executes

    def refuse(self, what: str):
        self.violations.append(what)
        raise CaptureViolation(f"{self.phase}: {what}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors((args, kwargs))
        if func in HOST_SYNCS or (func in INDEXING and any(t.dtype in (torch.bool, torch.uint8) for t in tensors[1:])):
            self.refuse(f"host sync ({func}: reads a device value on the host)")
        if func in HOST_FROM_DATA:
            if not (func == aten.lift_fresh.default and tensors[0].dim() == 0):
                self.refuse(f"host-to-device copy ({func}: a tensor built from host data)")
            self.numbers.update(_storages(tensors))
        for t in tensors:
            address = _address(t)
            if _alive(self.numbers, address):
                if func not in (aten.lift_fresh.default, aten.fill_.Tensor) or t is not tensors[-1]:
                    self.refuse(f"host-to-device copy ({func} reads a number from the host as a tensor)")
                continue
            if _alive(self.host, address):
                self.refuse(f"host-to-device copy ({func} reads a {tuple(t.shape)} {t.dtype} tensor in host memory)")
            if address and not _alive(self.allocations, address):
                if not _alive(self.inputs, address):
                    self.refuse(f"{func} reads a {tuple(t.shape)} {t.dtype} tensor that is neither a graph input nor "
                                "allocated by the capture (on a GPU: host data copied in, or a stale address "
                                "outside the graph's pool)")
                self.reads[address] = self.inputs[address]
        out = func(*args, **kwargs)
        new = []
        for t in _tensors(out):
            address = _address(t)
            if (address and not _alive(self.inputs, address) and not _alive(self.allocations, address)
                    and not _alive(self.numbers, address)):
                self.allocations.update(_storages([t]))
                new.append((t.untyped_storage().nbytes(), t.dtype))
        self.trace.append((str(func), tuple(new)))
        self.ops.append((func, args, kwargs, out))
        return out


@contextlib.contextmanager
def _checked(rules: _Rules, on_launch):
    def refusal(name):
        return lambda *args, **kwargs: rules.refuse(f"host sync (Tensor.{name}: copies a device tensor to the host)")

    def to(tensor, *args, **kwargs):
        if "cpu" in args or kwargs.get("device") == "cpu":
            rules.refuse("host sync (Tensor.to('cpu'): copies a device tensor to the host)")
        return to_device(tensor, *args, **kwargs)

    def host_call(name):
        return lambda *args, **kwargs: rules.refuse(f"host sync ({name}: waits for the device on the host)")

    to_device = torch.Tensor.to
    host_reads = [(torch.Tensor, name, refusal(name)) for name in ("tolist", "numpy", "cpu")]
    host_reads += [(torch.Tensor, "to", to), (torch.cuda, "synchronize", host_call("torch.cuda.synchronize"))]
    host_reads += [(cls, name, host_call(f"{cls.__name__}.{name}")) for cls in (torch.cuda.Event, torch.cuda.Stream)
                   for name in ("synchronize", "query")]
    with _launches(on_launch), _patched(host_reads), rules:
        yield


def _allocations(trace) -> list:
    return [allocation for _, new in trace for allocation in new]


def _ops(trace) -> list:
    return [op for op, _ in trace]


@dataclass(eq=False)
class Captured:
    fn: object
    output: object
    rules: _Rules
    pool: list  # weak references to the graphs of its pool, in capture order


def _poison(captured: Captured) -> None:
    """Fill the output tensors the capture allocated (not the graph inputs it returns): NaN, -1 for integers."""
    for t in _tensors(captured.output):
        if _alive(captured.rules.allocations, _address(t)):
            t.fill_(float("nan") if t.is_floating_point() else -1)


class StandInGraphs:
    """Graph backend without CUDA that enforces the capture rules and replays as a GPU (module docstring).

    inputs: () -> the tensors a graph may read (read when a capture starts and at each replay); host: () ->
    tensors in host memory (a capture may not read them). The pool: the graphs captured since the last
    `new_pool` (a replay poisons the outputs of those captured after it) and the bytes their captures allocated
    (no reuse counted), what `pool_bytes` reports.
    """

    def __init__(self, inputs, host=list):
        self.inputs, self.host = inputs, host
        self.variants = set()  # fused-op launches the warm-ups ran
        self.issued = []  # the collectives the replays issued, in order (op names)
        self.new_pool()

    def new_pool(self) -> None:
        self.pool, self.graphs = 0, []

    def pool_bytes(self) -> int:
        return self.pool

    def warm_up(self, fn):
        with _launches(self.variants.add):
            return fn()

    def _first_launch(self, launched) -> None:
        if launched not in self.variants:
            raise CaptureViolation(f"capture: first launch of a fused-op variant no warm-up ran (a compile inside "
                                   f"the capture on a GPU): {launched}")

    def capture(self, fn) -> Captured:
        """Run `fn` under the rules, recording its ops, then put back the storage of every input as it was (a
        capture runs nothing) and poison the output (a captured output holds nothing until a replay). Raises when
        a refused call was caught or made on another thread (the capture is invalidated)."""
        inputs = _tensors(self.inputs())
        storages = {_address(t): t.untyped_storage() for t in inputs if _address(t)}
        saved = {address: storage.clone() for address, storage in storages.items()}
        rules = _Rules("capture", _storages(inputs), _storages(_tensors(self.host())))
        pending = _get_work_registry_size()  # collectives issued and not yet waited for
        with _checked(rules, self._first_launch):
            output = fn()
        if _get_work_registry_size() > pending:
            raise CaptureViolation("capture: a collective whose result the capture never waited for (on a GPU its "
                                   "stream is not joined back into the captured one)")
        if rules.violations:
            raise CaptureViolation(f"capture: invalidated by a refused call that was caught or made on another "
                                   f"thread ({rules.violations[0]})")
        for address, storage in storages.items():
            storage.copy_(saved[address])
        captured = Captured(fn, output, rules, self.graphs)
        _poison(captured)
        self.graphs.append(weakref.ref(captured))
        self.pool += sum(size for _, new in rules.trace for size, _ in new)
        return captured

    def replay(self, captured: Captured):
        """Re-execute the captured ops with their captured arguments (the Python is not run), each op's result
        written into the tensor the capture allocated for it, then poison the outputs of the graphs captured
        after it in its pool (they may lie in its intermediates); refuses while memory the capture read is no
        graph input any more. Returns the captured output."""
        capture = captured.rules
        inputs = _storages(_tensors(self.inputs()))
        for address, ref in capture.reads.items():
            if not (_alive(inputs, address) and inputs[address].cdata == ref.cdata):
                raise CaptureViolation("replay: reads memory that is no graph input any more (reallocated since the "
                                       "capture: outside the graph's pool, a GPU replay reads the old address)")
        for func, args, kwargs, out in capture.ops:
            result = _completed(func, func(*args, **kwargs))
            if is_collective(func):
                self.issued.append(str(func))
            for was, now in zip(_tensors(out), _tensors(result)):
                if _address(was) != _address(now):  # a new tensor: into the capture's; in place and views: there
                    was.copy_(now)
        graphs = [ref() for ref in captured.pool]
        for later in graphs[graphs.index(captured) + 1:]:
            if later is not None:
                _poison(later)
        return captured.output


def runner_inputs(runner) -> list:
    """What a `GraphRunner`'s graphs may read: its static inputs and sampler buffers, the transformer's
    parameters and buffers, the cache slots and DiT's modulation step buffer."""
    engine, static = runner.engine, runner.static
    return _tensors(((static.args, static.kwargs), list(engine.transformer.parameters()),
                     list(engine.transformer.buffers()), engine.slots, list(runner.buffers.values()),
                     engine.modulation.step_buffer))
