"""CuPy and PyTorch CUDA: the same solvers on the GPU.  Marked ``gpu``; skipped without a usable CUDA device."""

import importlib.util

import numpy as np
import pytest

import fixedpoint
from fixedpoint import problems
from fixedpoint.interop import convert, same_memory, to_numpy

pytestmark = pytest.mark.gpu


def _cupy():
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed")
    import cupy

    if not cupy.cuda.is_available():
        pytest.skip("cupy is installed but no CUDA device is usable")
    return cupy


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no usable CUDA device")
    return torch


def _gpu_backends():
    return [("cupy", None), ("torch", "cuda")]


@pytest.mark.parametrize("lib, device", _gpu_backends())
@pytest.mark.parametrize("method", ["anderson", "forward"])
def test_h_equation_on_gpu_matches_numpy(lib, device, method):
    xp_mod = _cupy() if lib == "cupy" else _torch_cuda()
    dtype = xp_mod.float64
    p = problems.chandrasekhar(200, 0.99, backend=lib, dtype=dtype, device=device)
    ref = problems.chandrasekhar(200, 0.99)
    res = fixedpoint.solve(p.g, p.x0, method=method, tol=1e-10)
    host = fixedpoint.solve(ref.g, ref.x0, method=method, tol=1e-10)
    assert res.converged and res.n_iter == host.n_iter
    assert res.n_fev % 10 == 0  # default check_every on a GPU
    np.testing.assert_allclose(to_numpy(res.x), ref.solution, rtol=1e-9)


@pytest.mark.parametrize("lib, device", _gpu_backends())
def test_batch_float32_on_gpu(lib, device):
    xp_mod = _cupy() if lib == "cupy" else _torch_cuda()
    p = problems.tanh_layer(d=64, batch=16, backend=lib, dtype=xp_mod.float32, device=device)
    res = fixedpoint.solve(p.g, p.x0, batch=True, tol=1e-5)
    assert res.converged.all() and res.x.dtype == xp_mod.float32
    resid = to_numpy(p.g(res.x) - res.x)
    assert np.linalg.norm(resid, axis=1).max() < 1e-3


def test_torch_cuda_and_cupy_share_memory():
    cupy = _cupy()
    torch = _torch_cuda()
    t = torch.arange(10.0, device="cuda")
    c = convert(t, "cupy")
    assert isinstance(c, cupy.ndarray) and same_memory(c, t)
    back = convert(c, "torch")
    assert back.device.type == "cuda" and same_memory(back, t)


def test_torch_cuda_model_solved_by_cupy():
    _cupy()
    torch = _torch_cuda()
    p = problems.chandrasekhar(100, 0.9, backend="torch", dtype=torch.float64, device="cuda")
    res = fixedpoint.solve(p.g, p.x0, backend="cupy", tol=1e-10)
    assert isinstance(res.x, torch.Tensor) and res.x.device.type == "cuda" and res.converged
    np.testing.assert_allclose(to_numpy(res.x), to_numpy(p.solution), rtol=1e-9)


def test_numpy_caller_solved_on_cupy():
    _cupy()
    p = problems.chandrasekhar(100, 0.9)
    res = fixedpoint.solve(p.g, p.x0, backend="cupy", tol=1e-10)
    assert isinstance(res.x, np.ndarray) and res.converged
    np.testing.assert_allclose(res.x, p.solution, rtol=1e-9)


def test_backends_reports_a_usable_gpu():
    if not (importlib.util.find_spec("cupy") or importlib.util.find_spec("torch")):
        pytest.skip("no GPU library installed")
    usable = [b for b in fixedpoint.backends(usable_only=True) if b.device.startswith("cuda")]
    if not usable:
        pytest.skip("no usable CUDA device")
    assert all("cuda" in b.device for b in usable)
