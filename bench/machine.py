"""The machine a measurement ran on: versions, commit and, with CUDA, the GPU's state from NVML."""

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The short commit of the clone, or $HARMONICA_COMMIT where set (the device tool's copy of the tree has no
    .git: bench/gpu/check.sh's commands pass it)."""
    if os.environ.get("HARMONICA_COMMIT"):
        return os.environ["HARMONICA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def pci_bus_id(device: int) -> str:
    """PCI address ('0000:3b:00.0') of torch's CUDA device `device`. CUDA_VISIBLE_DEVICES renumbers torch's
    devices but not NVML's, so NVML finds the device by this address, not by index."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


def _nvml_readings(pynvml, handle) -> dict:
    """What NVML is asked for: key -> function of no arguments."""
    def throttle_reasons():
        reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = reasons_fn(handle)
        names = [name for name in dir(pynvml) if name.startswith("nvmlClocksThrottleReason")
                 and name not in ("nvmlClocksThrottleReasonAll", "nvmlClocksThrottleReasonNone")]
        return sorted(n.removeprefix("nvmlClocksThrottleReason") for n in names if mask & getattr(pynvml, n))

    return {
        "driver": pynvml.nvmlSystemGetDriverVersion,
        "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
        "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
        "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        "throttle_reasons": throttle_reasons,
    }


def gpu_state(device: int | None = None) -> dict:
    """Name and PCI address of torch's CUDA device (default: the current one) and, from NVML, driver, clocks,
    power, temperature and throttle reasons. NVML failures do not raise: they are recorded under
    `nvml_error` (NVML unusable) or `nvml_errors` (key -> error of the readings that failed)."""
    device = torch.cuda.current_device() if device is None else device
    state = {"gpu": torch.cuda.get_device_name(device), "pci_bus_id": pci_bus_id(device)}
    try:
        import pynvml

        pynvml.nvmlInit()
    except ImportError as error:
        return {**state, "nvml_error": f"nvidia-ml-py not importable ({error})"}
    except pynvml.NVMLError as error:
        return {**state, "nvml_error": f"nvmlInit: {error}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(state["pci_bus_id"])
        errors = {}
        for key, read in _nvml_readings(pynvml, handle).items():
            try:
                state[key] = read()
            except pynvml.NVMLError as error:
                errors[key] = str(error)
        if errors:
            state["nvml_errors"] = errors
    except pynvml.NVMLError as error:
        state["nvml_error"] = f"nvmlDeviceGetHandleByPciBusId({state['pci_bus_id']!r}): {error}"
    finally:
        pynvml.nvmlShutdown()
    return state


def machine_info() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        **{p: _version(p) for p in ("torch", "triton", "diffusers")},
    }
    if torch.cuda.is_available():
        info.update(gpu_state())
    return info
