"""Shared fixtures: the array libraries every solver test runs on.

CPU libraries: NumPy, PyTorch (CPU) when installed, array-api-strict on its CPU
device and on one of its fake devices (which raises if any buffer is created on
the wrong device).  GPU libraries (CuPy, PyTorch CUDA) are in test_gpu.py, marked
``gpu`` and skipped where no CUDA device is usable.
"""

import importlib.util

import numpy as np
import pytest

from fixedpoint.backend import resolve_namespace

CPU_BACKENDS = ["numpy", "array_api_strict", "array_api_strict:device1"]
if importlib.util.find_spec("torch") is not None:
    CPU_BACKENDS.insert(1, "torch")


class Backend:
    """A library, device and dtype to build test arrays with."""

    def __init__(self, spec):
        name, _, dev = spec.partition(":")
        self.name = name
        self.xp = resolve_namespace(name)
        self.device = self.xp.Device(dev) if dev else None
        self.kw = {} if self.device is None else {"device": self.device}

    def asarray(self, a, dtype=None):
        out = self.xp.asarray(np.asarray(a), **self.kw)
        return out if dtype is None else self.xp.astype(out, dtype)

    def numpy(self, a):
        from fixedpoint.interop import to_numpy

        return np.asarray(to_numpy(a), dtype=np.float64)

    def __repr__(self):
        return self.name + (f":{self.device}" if self.device is not None else "")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return Backend(request.param)


@pytest.fixture
def one_torch_thread():
    """Run a test with torch on one thread: tiny tensors run faster so, and immune to other
    processes on the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
