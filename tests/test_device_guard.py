"""Fused kernels run on their tensors' device: with another device current, a launch makes the tensors' device
current (kernel loaded, stream taken, compiled kernel keyed on it) and restores the previous one. Checked in a
process without the interpreter, through aot's stand-in driver (kernels compiled for sm_90, launches stubbed),
its current device set to 0 while the tensors report device 90 (the stand-in's device of sm_90). The launch
hooks: an exit hook alone receives the launch metadata."""

import contextlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from harmonica import graphs
from harmonica.graphs import CudaGraphBackend

SCRIPT = r"""
import json, sys
import torch
from triton import knobs
from triton.runtime.driver import driver
from harmonica.kernels import _launch, aot, gated_residual_reuse

with aot.stubbed_launches(90) as (compiled, launches):
    stand_in = driver.active
    stand_in.set_current_device(0)  # the current device is not the tensors'
    _launch.tensor_device = lambda tensor: 90  # the tensors' device
    streams = []
    stand_in.get_current_stream = lambda device=None: streams.append([device, stand_in.device]) or 0
    exits = []
    knobs.runtime.launch_exit_hook.add(exits.append)
    try:
        h, slot, gate = torch.randn(2, 63, 72), torch.randn(2, 63, 72), torch.randn(2, 72)
        gated_residual_reuse(h, slot, gate)  # through the JIT (a compile under the stubs)
        gated_residual_reuse(h, slot, gate)  # the compiled kernel, directly
        metadata = [launch[1][6] for launch in launches if isinstance(launch, tuple)]
    finally:
        knobs.runtime.launch_exit_hook.remove(exits.append)
    result = {"current_after": stand_in.device, "streams": streams, "metadata": [m is not None for m in metadata],
              "keys": sorted({key[0] for launcher in _launch.Launcher.instances for key in launcher.compiled}),
              "caches": sorted({d for launcher in _launch.Launcher.instances
                                for d in getattr(launcher.kernel, "device_caches", {}) if d in (0, 90)
                                and launcher.kernel.device_caches[d][0]})}
    for launcher in _launch.Launcher.instances:  # whatever went to device 0 on a wrong path
        launcher.forget(0)
json.dump(result, open(sys.argv[1], "w"))
"""


def test_a_launch_runs_on_the_tensors_device_and_restores_the_current_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "r.json")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["current_after"] == 0  # restored
    assert result["keys"] == [90]  # the compiled kernel is the tensors' device's
    assert result["streams"] and all(s == [90, 90] for s in result["streams"]), result["streams"]
    assert result["caches"] == [90], result  # the JIT compiled and loaded it for the tensors' device
    assert result["metadata"] == [True]  # the direct launch passed the exit hook its launch metadata


class FakeStream:
    def __init__(self, cuda, device: int, name: str):
        self.cuda, self.device, self.name = cuda, device, name

    def wait_stream(self, other) -> None:
        self.cuda.log.append(f"{self.name} waits on {other.name}")


class FakeGraph:
    def __init__(self, cuda):
        self.cuda = cuda

    def replay(self) -> None:
        self.cuda.log.append(f"replay of a device-{self.device} graph with device {self.cuda.current} current")


class FakeCuda:
    """What CudaGraphBackend uses of torch.cuda, for devices that are not there, with torch's semantics: a
    current device and each device's current stream; entering a stream makes its device current. Device 0 is
    current at first, unlike the tensors'."""

    def __init__(self):
        self.current, self.log, self.made = 0, [], 0
        self.streams = {}

    def current_device(self) -> int:
        return self.current

    def current_stream(self) -> FakeStream:
        return self.streams.setdefault(self.current, FakeStream(self, self.current, f"default-{self.current}"))

    def Stream(self) -> FakeStream:  # noqa: N802 - torch.cuda's name
        self.made += 1
        return FakeStream(self, self.current, f"side-{self.current}")

    def graph_pool_handle(self):
        return ("pool", self.current)

    def CUDAGraph(self) -> FakeGraph:  # noqa: N802 - torch.cuda's name
        return FakeGraph(self)

    def memory_snapshot(self) -> list:
        return []

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = previous

    @contextlib.contextmanager
    def stream(self, stream):
        previous_device, previous = self.current, self.streams.get(stream.device)
        self.current, self.streams[stream.device] = stream.device, stream
        try:
            yield
        finally:
            self.current, self.streams[stream.device] = previous_device, previous

    @contextlib.contextmanager
    def graph(self, graph, pool, stream):
        graph.device = stream.device
        with self.stream(stream):
            yield


def test_the_graph_backend_works_on_its_device_whatever_device_is_current():
    cuda = FakeCuda()
    backend = CudaGraphBackend(torch.device("cuda", 1), cuda=cuda)
    assert (backend.stream.device, backend.pool) == (1, ("pool", 1))
    seen = []

    def step():
        seen.append((cuda.current, cuda.current_stream().name))
        return "output"

    assert backend.warm_up(step) == "output"
    captured = backend.capture(step)
    assert backend.replay(captured) == "output"
    assert seen == [(1, "side-1"), (1, "side-1")]  # warm-up and capture on the side stream of device 1
    assert cuda.log == ["side-1 waits on default-1", "default-1 waits on side-1",  # ordered after device 1's work
                        "replay of a device-1 graph with device 1 current"]
    assert cuda.current == 0
    backend.new_pool()
    assert backend.pool == ("pool", 1)


def test_the_runner_keeps_one_graph_backend_per_device(monkeypatch):
    """The runner's backend follows the hidden states' device: a new one, with its stream on it, for another."""
    class Backend(CudaGraphBackend):
        def __init__(self, device):
            super().__init__(device, cuda=FakeCuda())

    monkeypatch.setattr(graphs, "CudaGraphBackend", Backend)
    runner = graphs.GraphRunner(engine=None, forward=None)
    first = runner._backend_for(torch.device("cuda", 1))
    assert first.device == torch.device("cuda", 1) and first.stream.device == 1
    assert runner._backend_for(torch.device("cuda", 1)) is first
    second = runner._backend_for(torch.device("cuda", 2))
    assert second is not first and second.stream.device == 2 and runner.backend is second
    runner.backend = stand_in = object()  # a backend the caller set (the tests' stand-in) stays
    assert runner._backend_for(torch.device("cuda", 3)) is stand_in


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_a_model_on_the_second_device_runs_there_with_the_first_current():
    """Eager fused kernels and CUDA graphs of a model on cuda:1 while cuda:0 is current equal eager on cuda:1."""
    from _helpers import make_model, step_inputs, units_of

    import harmonica
    from harmonica import CacheSchedule

    torch.cuda.set_device(0)
    model = make_model("tiny-dit").to("cuda:1")
    schedule = CacheSchedule.fora(5, units_of(model), 2)
    inputs = [{k: v.to("cuda:1") if torch.is_tensor(v) else v for k, v in step_inputs(model, s).items()}
              for s in range(5)]
    with torch.no_grad():
        harmonica.enable(model, schedule)
        with torch.cuda.device(1):
            reference = [model(**step).sample for step in inputs]
        eager = [model(**step).sample for step in inputs]
        harmonica.enable(model, schedule, cuda_graphs=True)
        graphed = [model(**step).sample for _ in range(2) for step in inputs]
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    for a, b in zip(reference, eager):
        assert b.device == torch.device("cuda", 1) and torch.equal(a, b)
    for a, b in zip(reference * 2, graphed):
        assert b.device == torch.device("cuda", 1) and torch.equal(a, b)


def test_bench_timing_records_its_events_on_the_measured_devices_stream(monkeypatch):
    from harmonica.bench import timing

    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self, stream=None):  # torch: None is the current device's current stream
            log.append(("record", stream))

        def synchronize(self):
            log.append(("synchronize",))

        def elapsed_time(self, other):
            return 2.5

    cuda = SimpleNamespace(Event=Event, synchronize=lambda device: log.append(("synchronize", device)),
                           current_stream=lambda device=None: f"stream of {device}")
    monkeypatch.setattr(timing, "torch", SimpleNamespace(cuda=cuda))
    device = torch.device("cuda", 1)
    assert timing.timed(lambda x: log.append(("fn", x)) or "out", 7, device=device) == ("out", 2.5)
    assert log == [("synchronize", device), ("record", f"stream of {device}"), ("fn", 7),
                   ("record", f"stream of {device}"), ("synchronize",)]
