"""DLPack bridges: zero-copy where possible, and the usual pitfalls."""

import numpy as np
import pytest

import fixedpoint
from fixedpoint import problems
from fixedpoint.interop import convert, same_memory, to_numpy

torch = pytest.importorskip("torch")


def test_numpy_torch_zero_copy_both_ways():
    a = np.arange(12.0).reshape(3, 4)
    t = convert(a, "torch")
    assert isinstance(t, torch.Tensor) and same_memory(a, t)
    back = convert(t, "numpy")
    assert isinstance(back, np.ndarray) and same_memory(back, t)
    np.testing.assert_array_equal(back, a)


def test_requires_grad_is_detached():
    t = torch.arange(4.0, requires_grad=True)
    a = convert(t, "numpy")
    assert same_memory(a, t) and not isinstance(a, torch.Tensor)
    np.testing.assert_array_equal(a, [0, 1, 2, 3])


def test_negative_strides_and_non_contiguous():
    a = np.arange(10.0)[::-1]
    t = convert(a, "torch")
    np.testing.assert_array_equal(t.numpy(), a)
    tt = torch.arange(12.0).reshape(3, 4).T
    np.testing.assert_array_equal(convert(tt, "numpy"), tt.numpy())


def test_readonly_numpy_is_copied_not_refused():
    a = np.arange(5.0)
    a.setflags(write=False)
    t = convert(a, "torch")
    np.testing.assert_array_equal(t.numpy(), a)


def test_bool_and_bfloat16():
    b = np.array([True, False, True])
    tb = convert(b, "torch")
    assert tb.dtype == torch.bool and tb.tolist() == [True, False, True]
    assert convert(tb, "numpy").dtype == np.bool_
    h = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    a = convert(h, "numpy")
    assert a.dtype == np.float32 and a.tolist() == [1.5, -2.0]
    assert convert(a, "torch", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_array_api_strict_round_trip():
    pytest.importorskip("array_api_strict")
    a = np.linspace(0, 1, 5)
    s = convert(a, "array_api_strict")
    assert fixedpoint.backend.library_name(fixedpoint.backend.namespace_of(s)) == "array_api_strict"
    np.testing.assert_array_equal(to_numpy(s), a)
    np.testing.assert_array_equal(to_numpy(convert(s, "torch")), a)


def test_torch_caller_solved_on_numpy_calls_g_with_torch():
    p = problems.chandrasekhar(30, 0.9, backend="torch", dtype=torch.float64)
    kinds = set()

    def g(h):
        kinds.add(type(h))
        return p.g(h)

    res = fixedpoint.solve(g, p.x0, backend="numpy", tol=1e-11)
    assert kinds == {torch.Tensor} and isinstance(res.x, torch.Tensor) and res.x.dtype == torch.float64
    native = fixedpoint.solve(p.g, p.x0, tol=1e-11)
    assert res.n_iter == native.n_iter
    np.testing.assert_allclose(res.x.numpy(), native.x.numpy(), rtol=1e-12)


def test_numpy_caller_solved_on_torch_and_strict():
    p = problems.chandrasekhar(30, 0.9)
    for backend in ("torch", "array_api_strict"):
        res = fixedpoint.solve(p.g, p.x0, backend=backend, tol=1e-11)
        assert isinstance(res.x, np.ndarray) and res.converged
        np.testing.assert_allclose(res.x, p.solution, rtol=1e-9)


def test_bfloat16_model_solved_on_numpy():
    w = torch.full((8, 8), 0.05, dtype=torch.bfloat16, requires_grad=True)
    seen = set()

    def g(z):
        seen.add(z.dtype)
        return torch.tanh(z @ w + 1)

    res = fixedpoint.solve(g, torch.zeros(8, dtype=torch.bfloat16), backend="numpy", tol=1e-2)
    assert res.converged and res.x.dtype == torch.bfloat16 and seen == {torch.bfloat16}


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"):
        fixedpoint.solve(np.cos, np.zeros(2), backend="jax-ish")
