"""The machine a measurement ran on: versions, commit and, with CUDA, the GPU's state from NVML."""

import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
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


def gpu_state() -> dict:
    """Name, driver, clocks, power, temperature and throttle reasons of the current GPU (NVML)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = reasons_fn(handle)
        names = [name for name in dir(pynvml) if name.startswith("nvmlClocksThrottleReason")
                 and name not in ("nvmlClocksThrottleReasonAll", "nvmlClocksThrottleReasonNone")]
        return {
            "gpu": pynvml.nvmlDeviceGetName(handle),
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "throttle_reasons": sorted(n.removeprefix("nvmlClocksThrottleReason") for n in names
                                       if mask & getattr(pynvml, n)),
        }
    finally:
        pynvml.nvmlShutdown()


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
