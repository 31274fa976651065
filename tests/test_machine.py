"""The machine record on a fake NVML: the device is found by PCI bus id, NVML failures are recorded."""

import sys
import types

import pytest
import torch

from harmonica.bench import machine


class NVMLError(Exception):
    pass


def fake_pynvml(calls: list, *, init_error=None, power_error=None, handle_error=None):
    """A pynvml with one GPU at PCI address 0000:3b:00.0; `calls` records (function, argument)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU = 1, 2, 0
    nvml.nvmlClocksThrottleReasonGpuIdle, nvml.nvmlClocksThrottleReasonSwPowerCap = 1, 4
    nvml.nvmlClocksThrottleReasonAll, nvml.nvmlClocksThrottleReasonNone = 0xFF, 0

    def init():
        calls.append(("init", None))
        if init_error:
            raise NVMLError(init_error)

    def handle_by_bus_id(bus_id):
        calls.append(("handle", bus_id))
        if handle_error or bus_id != "0000:3b:00.0":
            raise NVMLError(handle_error or "Not Found")
        return "h3b"

    def power(handle):
        if power_error:
            raise NVMLError(power_error)
        return 412_500

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: calls.append(("shutdown", None))
    nvml.nvmlDeviceGetHandleByPciBusId = handle_by_bus_id
    nvml.nvmlDeviceGetHandleByIndex = lambda index: pytest.fail("the device is looked up by index")
    nvml.nvmlSystemGetDriverVersion = lambda: "570.86"
    nvml.nvmlDeviceGetClockInfo = lambda handle, clock: {1: 1980, 2: 2619}[clock]
    nvml.nvmlDeviceGetPowerUsage = power
    nvml.nvmlDeviceGetTemperature = lambda handle, sensor: 41
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = lambda handle: 4
    return nvml


@pytest.fixture
def cuda_device(monkeypatch):
    """torch sees one device, index 0 (CUDA_VISIBLE_DEVICES=3), at PCI address 0000:3b:00.0."""
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)


def test_state_of_the_device_found_by_pci_bus_id(cuda_device, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls))
    assert machine.gpu_state() == {
        "gpu": "NVIDIA H100 80GB HBM3", "pci_bus_id": "0000:3b:00.0", "driver": "570.86", "sm_clock_mhz": 1980,
        "mem_clock_mhz": 2619, "power_w": 412.5, "temperature_c": 41, "throttle_reasons": ["SwPowerCap"]}
    assert calls == [("init", None), ("handle", "0000:3b:00.0"), ("shutdown", None)]


@pytest.mark.parametrize("errors,expected", [
    ({"init_error": "Driver Not Loaded"}, {"nvml_error": "nvmlInit: Driver Not Loaded"}),
    ({"handle_error": "GPU is lost"},
     {"nvml_error": "nvmlDeviceGetHandleByPciBusId('0000:3b:00.0'): GPU is lost"}),
])
def test_nvml_failures_are_recorded(cuda_device, monkeypatch, errors, expected):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], **errors))
    assert machine.gpu_state() == {"gpu": "NVIDIA H100 80GB HBM3", "pci_bus_id": "0000:3b:00.0", **expected}


def test_a_failing_reading_keeps_the_others(cuda_device, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls, power_error="Not Supported"))
    state = machine.gpu_state()
    assert "power_w" not in state and state["nvml_errors"] == {"power_w": "Not Supported"}
    assert (state["sm_clock_mhz"], state["temperature_c"]) == (1980, 41)
    assert calls[-1] == ("shutdown", None)


def test_missing_nvidia_ml_py_is_recorded(cuda_device, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    state = machine.gpu_state()
    assert state["nvml_error"].startswith("nvidia-ml-py not importable (")
    assert state["gpu"] == "NVIDIA H100 80GB HBM3"


def test_machine_info_records_the_gpu_with_cuda(cuda_device, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error="Unknown Error"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = machine.machine_info()
    assert (info["gpu"], info["nvml_error"]) == ("NVIDIA H100 80GB HBM3", "nvmlInit: Unknown Error")
    assert {"date", "commit", "torch", "triton", "diffusers"} <= set(info)


def test_the_commit_comes_from_harmonica_commit_where_set(monkeypatch):
    """The device tool's copy of the tree has no .git: bench/gpu/check.sh's commands pass the commit."""
    monkeypatch.setenv("HARMONICA_COMMIT", "abc1234")
    assert machine.git_commit() == "abc1234"
