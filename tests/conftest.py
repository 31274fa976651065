"""Test configuration. Without CUDA the Triton kernels run on the CPU interpreter, which must be
switched on before any kernel module is imported (so here, before the test modules load)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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
