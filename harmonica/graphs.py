"""CUDA graphs for cached sampling: one graph per distinct schedule row (method.md section 3).

A learned schedule is static, so the transformer forward of step t depends on the step only through
its row: which units compute, which slots are written. Steps with equal rows share one graph; the
inputs (latents, timestep, conditions) are copied into static buffers before `replay()`, so the
timestep and everything derived from it (the adaLN modulations) are graph inputs. The cache slots
have fixed addresses (allocated once), so a replay reads and writes them in place.

A graph's key is the row with whether DiT's modulation table is active (the blocks then read its
step buffer instead of computing the embedding) and, with a linear forecast (forecast.py), the step's row of
its plan: which slots each unit writes and reads and its coefficients, host constants each capture bakes (steps
that differ only in them get graphs of their own). The first time a key appears, the inputs are copied
into the static buffers and the step runs twice on them eagerly on a side stream (the warm-up: lazy
initialisation, kernel compiles and the cuBLAS workspace of that stream happen outside the capture;
the sampler buffers are restored in between, and the second run is the step's real result), then the
graph is captured on the same stream. A change of input shapes, dtypes or devices drops every graph
(recapture). The graphs share one memory pool, a fresh one after each drop (a pool whose graphs are
all gone cannot be captured into again); outputs are cloned before the next replay.

Under diffusers' context parallelism (parallel.py) each rank captures its own graphs, on its shard, with the
collectives its step issues inside them (NCCL captures them when every rank captures the same sequence and the
replays run in lockstep): a computed unit's all-to-all (Ulysses) or all-gather (ring), the output's gather; a
reused unit issues none. The static schedule is the same on every rank (checked at `enable`), so the ranks
capture and replay the same keys at the same steps. At each capture the collectives are logged
(`CollectiveLog`: the unit, op, shapes and dtypes of each) and a digest of their units and ops compared over the
group (`parallel.check_same_collectives`): a rank whose sequence differs is refused with one line before any replay.
diffusers hands on the gathered output without waiting for its all-gather; the runner waits for it inside the
graph (`_waited`), as a capture must end with every stream it forked joined back.

With `scheduler_in_graph`, a sampler that can (`samplers.dit_ddim_sample`, `samplers.pixart_sample`)
sets an epilogue: its step (the fused `kernels.solver_step` with the step's coefficients from
`solvers.py`, on buffers of fixed address) runs inside each graph right after the forward, instead
of eagerly after the replay.
"""

import contextlib
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from . import events, parallel

_WARNED_CPU = False
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")  # torch.distributed's ops


def graph_plan(schedule) -> list:
    """Graph index of every step: steps with equal keys share a graph. len(set(plan)) graphs."""
    index = {}
    return [index.setdefault(key, len(index)) for key in schedule.step_keys]


def input_signature(args, kwargs) -> tuple:
    """What a captured graph is specialised to: tensor shapes, dtypes, devices and non-tensor values."""
    def describe(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, str(value.device), value.stride())
        if isinstance(value, dict):
            return ("dict", tuple((k, describe(v)) for k, v in sorted(value.items())))
        if isinstance(value, (list, tuple)):
            return ("seq", tuple(describe(v) for v in value))
        return ("value", repr(value))

    return describe(list(args)), describe(kwargs)


class StaticInputs:
    """Static copies of a forward's tensor arguments (nested in dicts and sequences), refreshed by
    `copy_from` before each replay; non-tensor arguments are kept as they are."""

    def __init__(self, args, kwargs):
        self.args = self._clone(list(args))
        self.kwargs = self._clone(kwargs)

    @classmethod
    def _clone(cls, value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: cls._clone(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(cls._clone(v) for v in value)
        return value

    @classmethod
    def _copy(cls, static, value) -> None:
        if isinstance(static, torch.Tensor):
            static.copy_(value)
        elif isinstance(static, dict):
            for k in static:
                cls._copy(static[k], value[k])
        elif isinstance(static, (list, tuple)):
            for s, v in zip(static, value):
                cls._copy(s, v)

    def copy_from(self, args, kwargs) -> None:
        self._copy(self.args, list(args))
        self._copy(self.kwargs, kwargs)

    def nbytes(self) -> int:
        total = 0

        def visit(value):
            nonlocal total
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                for v in value.values():
                    visit(v)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    visit(v)

        visit(self.args)
        visit(self.kwargs)
        return total


def is_collective(func) -> bool:
    """Whether the dispatched op `func` is a torch.distributed collective (c10d's ops, the functional
    collectives), not the wait for one's result or its wrapping."""
    return func.namespace in COLLECTIVE_NAMESPACES and func._opname not in ("wait_tensor", "_wrap_tensor_autograd")


class CollectiveLog(TorchDispatchMode, events.Listener):
    """The collectives issued inside the `with`, in order: `calls`, each (the unit running it or None, the op,
    the shapes and dtypes of its tensors). The unit is what the engine tells its listeners (events.py): the log
    listens for the duration. Compiled code is logged as it runs: dynamo runs it under this mode, and compiles
    without it (`ignore_compile_internals`)."""

    def __init__(self):
        super().__init__()
        self.calls, self.unit = [], None

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_collective(func):
            tensors = tuple((tuple(t.shape), str(t.dtype)) for t in tree_leaves((args, kwargs))
                            if isinstance(t, torch.Tensor))
            self.calls.append((self.unit, str(func), tensors))
        return func(*args, **kwargs)

    def around_unit(self, name, computes, run, *args):
        self.unit = name
        try:
            return run(*args)
        finally:
            self.unit = None

    def __enter__(self):
        events.listen(self)
        return super().__enter__()

    def __exit__(self, *exc):
        events.unlisten(self)
        return super().__exit__(*exc)


def pool_segment_bytes(segments, pool) -> int:
    """Bytes of the device memory segments that memory pool `pool` holds, from
    `torch.cuda.memory_snapshot()` segments (dicts with `segment_pool_id` and `total_size`)."""
    return sum(s["total_size"] for s in segments if tuple(s["segment_pool_id"]) == tuple(pool))


class CudaGraphBackend:
    """torch.cuda graphs of one device, sharing one memory pool; warm-up and capture on one side stream of that
    device. The device is current during the warm-up, capture and replay, whatever device is current when the
    runner is called (`pipe.to("cuda:1")` with device 0 current): the side stream, the streams it orders
    against and the pool are that device's. cuda: the torch.cuda module (tests pass a stand-in)."""

    def __init__(self, device, cuda=torch.cuda):
        self.cuda = cuda
        device = torch.device(device)
        self.device = torch.device("cuda", cuda.current_device() if device.index is None else device.index)
        with cuda.device(self.device):
            self.stream = cuda.Stream()
        self.new_pool()

    def new_pool(self) -> None:
        """The graphs captured from now on share a fresh pool."""
        with self.cuda.device(self.device):
            self.pool = self.cuda.graph_pool_handle()

    def warm_up(self, fn):
        cuda = self.cuda
        with cuda.device(self.device):
            self.stream.wait_stream(cuda.current_stream())
            with cuda.stream(self.stream):
                result = fn()
            cuda.current_stream().wait_stream(self.stream)
        return result

    def capture(self, fn):
        with self.cuda.device(self.device):
            graph = self.cuda.CUDAGraph()
            with self.cuda.graph(graph, pool=self.pool, stream=self.stream):
                output = fn()
        return graph, output

    def replay(self, captured):
        graph, output = captured
        with self.cuda.device(self.device):
            graph.replay()
        return output

    def pool_bytes(self) -> int:
        """Device memory the graphs' pool holds: its segments, so neither the other pools (warm-up, cuBLAS
        workspaces, caches) nor `empty_cache` (it cannot free segments the graphs hold) change it."""
        return pool_segment_bytes(self.cuda.memory_snapshot(), self.pool)


class GraphRunner:
    """Runs an engine's transformer forward through one captured graph per distinct step key.

    forward: the transformer's original forward; backend: `CudaGraphBackend` (tests pass a stand-in);
    scheduler_inside: whether samplers may put their step inside the graphs (`set_epilogue`).
    """

    def __init__(self, engine, forward, backend=None, *, scheduler_inside: bool = False):
        self.engine, self.forward = engine, forward
        self.backend = backend
        self.graphs = {}
        self.signature = None
        self.schedule = None
        self.static = None
        self.captures = 0
        self.replays = 0
        self.resets = 0  # times every graph was dropped for a new signature or schedule
        self.capture_seconds = 0.0
        self.pool_bytes = 0
        self.scheduler_inside = scheduler_inside
        self.epilogue = self.epilogue_key = self.captured_epilogue_key = None
        self.buffers = {}  # the samplers' state buffers, by name
        self.collectives = {}  # under context parallelism: each key's captured collectives (`CollectiveLog.calls`)

    def reset(self) -> None:
        """Drop every graph (the next call of each key recaptures)."""
        self.graphs, self.signature, self.schedule, self.static = {}, None, None, None
        self.collectives = {}
        self.captured_epilogue_key = None
        self.pool_bytes = 0
        if self.backend is not None:
            self.backend.new_pool()

    def static_bytes(self) -> int:
        inputs = self.static.nbytes() if self.static is not None else 0
        return inputs + sum(b.numel() * b.element_size() for b in self.buffers.values())

    def set_epilogue(self, key, epilogue) -> None:
        """Run `epilogue(output)` right after the forward, inside every graph (None removes it). key: what
        the epilogue's captured work depends on besides its buffers (constants such as the guidance
        scale): graphs captured under another key are dropped at the next call. While an epilogue is set,
        a replay returns the graph's own output (overwritten by the next replay) instead of a copy."""
        self.epilogue, self.epilogue_key = epilogue, key

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """A sampler state buffer of fixed address (contents undefined when new): the same tensor for
        the same name, shape, dtype and device, so graphs captured with it stay valid."""
        current, device = self.buffers.get(name), torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" names the current device
            device = torch.device("cuda", torch.cuda.current_device())
        if current is None or current.shape != shape or current.dtype != dtype or current.device != device:
            current = self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
            self.reset()  # graphs captured with the old buffer would write to it
        return current

    def _run(self, args, kwargs):
        output = self.forward(*args, **kwargs)
        if self.epilogue is not None:
            self.epilogue(output)
        return output

    def _run_static(self):
        """The step on the static inputs (warm-up and capture), its collectives waited for."""
        return _waited(self._run(self.static.args, self.static.kwargs))

    def _warm_up(self):
        """The step twice on the static inputs, the sampler buffers restored in between; returns the
        second run's output, the step's real result."""
        saved = [b.clone() for b in self.buffers.values()]
        self._run_static()
        for buffer, value in zip(self.buffers.values(), saved):
            buffer.copy_(value)
        return self._run_static()

    def __call__(self, *args, **kwargs):
        engine = self.engine
        if not engine.policy.sampling:
            return self._run(args, kwargs)
        if not self._on_cuda(args, kwargs) and (self.backend is None or isinstance(self.backend, CudaGraphBackend)):
            _warn_cpu_once()
            return self._run(args, kwargs)
        backend = self._backend_for(self._device(args, kwargs))
        signature = input_signature(args, kwargs)
        if (signature != self.signature or engine.policy.schedule is not self.schedule
                or self.epilogue_key != self.captured_epilogue_key):
            if self.signature is not None and engine.step != 0:
                warnings.warn(f"cuda_graphs: the transformer's inputs changed within a generation (step "
                              f"{engine.step}), so every graph is captured again; pass tensors of fixed shapes "
                              "(not Python numbers) for arguments that change per step", stacklevel=2)
            self.resets += self.signature is not None
            self.reset()
            self.signature, self.schedule, self.static = signature, engine.policy.schedule, StaticInputs(args, kwargs)
            self.captured_epilogue_key = self.epilogue_key
        key = engine.graph_key()
        self.static.copy_from(args, kwargs)
        if key not in self.graphs:
            result = backend.warm_up(self._warm_up)
            self.graphs[key] = self._capture(backend, key)
            self.pool_bytes = backend.pool_bytes()
            self.captures += 1
            return result
        self.replays += 1
        output = backend.replay(self.graphs[key])
        return output if self.epilogue is not None else _clone_output(output)

    def _capture(self, backend, key):
        """The step captured on `backend`; under context parallelism with its collectives logged and compared over
        the group (a ValueError on every rank when one rank's differ)."""
        config = parallel.context_parallel_config(self.engine.transformer)
        log = CollectiveLog() if config is not None else contextlib.nullcontext()
        start = time.perf_counter()
        with log:
            captured = backend.capture(self._run_static)
        self.capture_seconds += time.perf_counter() - start
        if config is not None:
            parallel.check_same_collectives(self.engine, log.calls, config)
            self.collectives[key] = log.calls
        return captured

    def _backend_for(self, device: torch.device):
        """The graph backend of `device`: a new `CudaGraphBackend` for another device (the input signature then
        differs, so the other device's graphs are dropped); a backend the caller set is kept."""
        if self.backend is None or (isinstance(self.backend, CudaGraphBackend) and self.backend.device != device):
            self.backend = CudaGraphBackend(device)
        return self.backend

    def _hidden(self, args, kwargs):
        """The forward's latents, the first sample's where they come as a per-sample list."""
        hidden = self.engine.argument(args, kwargs, 0)
        return hidden[0] if isinstance(hidden, list) and hidden else hidden

    def _on_cuda(self, args, kwargs) -> bool:
        hidden = self._hidden(args, kwargs)
        return isinstance(hidden, torch.Tensor) and hidden.is_cuda

    def _device(self, args, kwargs) -> torch.device | None:
        """The device of the forward's hidden states, with its index (the graphs' device); None without them."""
        hidden = self._hidden(args, kwargs)
        if not isinstance(hidden, torch.Tensor):
            return None
        device = hidden.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device


def _waited(output):
    """`output` with each tensor a collective returned without waiting (an AsyncCollectiveTensor: diffusers' gather
    of the output under context parallelism) waited for: inside a capture the graph then joins the collective's
    stream (a real capture that ends with it unjoined fails), and the graph's output is a plain tensor."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return tree_map_only(AsyncCollectiveTensor, AsyncCollectiveTensor.wait, output)


def _clone_output(output):
    """A copy the next replay will not overwrite (diffusers outputs: a dataclass or a tuple, of tensors or lists)."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):  # a list: Z-Image's per-sample outputs
        return type(output)(_clone_output(o) for o in output)
    return type(output)(**{k: _clone_output(v) for k, v in output.items()})


def _warn_cpu_once() -> None:
    global _WARNED_CPU
    if not _WARNED_CPU:
        warnings.warn("cuda_graphs: the transformer runs on the CPU, where there are no CUDA graphs; "
                      "running eagerly", stacklevel=3)
        _WARNED_CPU = True
