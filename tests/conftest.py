"""Test configuration. Without CUDA the Triton kernels run on the CPU interpreter, which must be
switched on before any kernel module is imported (so here, before the test modules load)."""

import getpass
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Inductor's CPU code cache ignores the vector ISA ATen runs with (ATEN_CPU_CAPABILITY): a precompiled
# header cached under AVX-512 breaks a later build under `default`. One cache per capability.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{torch.backends.cpu.get_cpu_capability()}"))

from hypothesis import settings  # noqa: E402

# the interpreter runs a program in milliseconds, not microseconds: no deadline, few examples
settings.register_profile("harmonica", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("harmonica")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
