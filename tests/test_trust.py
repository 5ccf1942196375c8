"""No false "converged": divergence, overflow, maps that write into their argument, every floating dtype."""

import numpy as np
import pytest

import fixedpoint
from fixedpoint import Anderson, Broyden, ForwardIteration

METHODS = [ForwardIteration(), Anderson(m=1), Anderson(), Broyden()]


# ---------------------------------------------------------------- divergence and overflow

@pytest.mark.parametrize("a", [2.0, 1.5, 1.1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_repelling_fixed_points_are_found_or_reported_diverged(a, dtype, method):
    """x = a x + 1 with a > 1: the fixed point 1/(1 - a) repels forward iteration, whose iterates grow
    without bound; Anderson (m >= 2) and Broyden extrapolate to it. Either the true fixed point, or a
    divergence: never a "converged" far from it (the relative residual used to underflow to 0 there)."""
    def g(x):
        return dtype(a) * x + dtype(1)

    res = fixedpoint.solve(g, np.zeros(3, dtype), method=method)
    if isinstance(method, ForwardIteration) or method == Anderson(m=1):
        assert res.status == "diverged" and res.sample_status == "diverged" and not res.converged, res
        assert res.n_fev < 1000 and np.isfinite(res.x).all()
        res = fixedpoint.solve(g, np.zeros(3, dtype), method=method, divtol=None)  # on regardless: still not
        assert res.status in ("max_iter", "nonfinite") and not res.converged, res
    else:
        assert res.converged, res
        np.testing.assert_allclose(res.x, 1 / (1 - a), rtol=1e-4)


def test_divergence_on_torch_in_batch_mode_and_per_sample():
    torch = pytest.importorskip("torch")
    rates = torch.tensor([[0.5], [2.0], [0.9]], dtype=torch.float32)
    res = fixedpoint.solve(lambda x: rates * x + 1, torch.zeros(3, 4), batch=True, method="forward")
    assert list(res.sample_status) == ["converged", "diverged", "converged"] and res.status == "diverged"
    torch.testing.assert_close(res.x[[0, 2]], torch.tensor([[2.0] * 4, [10.0] * 4]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_large_magnitudes_converge_without_overflow(method):
    """‖g(x)‖² overflows float32 at |x| ~ 1e19 and float64 at ~1e154: the norms must not."""
    res = fixedpoint.solve(lambda x: 0.5 * x + np.float32(1e19), np.zeros(10, np.float32), method=method)
    assert res.converged and res.x.dtype == np.float32, res
    np.testing.assert_allclose(res.x, 2e19, rtol=1e-4)
    res = fixedpoint.solve(lambda x: 0.5 * x + 1e200, np.zeros(10), method=method, tol=1e-10)
    assert res.converged, res
    np.testing.assert_allclose(res.x, 2e200, rtol=1e-8)


def test_overflowing_relative_residual_is_nonfinite_not_zero():
    """The residual is finite but g(x) is not: the sample is non-finite, never converged (issue: r = f / inf = 0)."""
    def g(x):
        y = 0.5 * x + 1.0
        y[0] = np.inf
        return y

    res = fixedpoint.solve(g, np.zeros(4), method="forward")
    assert res.status == "nonfinite" and not res.converged


def test_kernels_norms_are_safe_on_the_host():
    from fixedpoint.backend import resolve_namespace
    from fixedpoint.kernels import Kernels

    kern = Kernels(resolve_namespace("numpy"))
    a = np.array([[3e200, 4e200], [3.0, 4.0], [np.inf, 1.0], [np.nan, 1.0]])
    f32 = np.full((1, 10), 1e19, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # the fast path overflows on purpose
        r = kern.norms(a)
        np.testing.assert_allclose(r[:2], [5e200, 5.0], rtol=1e-15)
        assert r[2] == np.inf and np.isnan(r[3])
        np.testing.assert_allclose(kern.norms(f32), [np.sqrt(10) * 1e19], rtol=1e-6)
        np.testing.assert_allclose(kern.dot(f32, f32), [10 * 1e38], rtol=1e-6)


# ---------------------------------------------------------------- maps that write into their argument

def _in_place(x):
    x *= 0.5
    x += 1
    return x


def _junk_into_argument(x):
    y = 0.5 * x + 1
    x[...] = 7
    return y


@pytest.mark.parametrize("g", [_in_place, _junk_into_argument])
@pytest.mark.parametrize("method", ["forward", "anderson", "broyden"])
def test_map_that_modifies_its_argument_is_refused(g, method):
    with pytest.raises(ValueError, match="in place") as info:
        fixedpoint.solve(g, np.zeros(3), method=method)
    partial = info.value.fixedpoint_result  # nothing computed is lost
    assert partial.status == "error" and np.array_equal(partial.x, np.zeros(3))


@pytest.mark.parametrize("g", [_in_place, _junk_into_argument])
def test_torch_map_that_modifies_its_argument_is_refused(g):
    torch = pytest.importorskip("torch")
    for backend in (None, "numpy"):  # on the tensors, and through DLPack from the NumPy solver
        with pytest.raises(ValueError, match="in place"):
            fixedpoint.solve(g, torch.zeros(3), backend=backend)


def test_maps_returning_their_argument_unchanged_are_fine_where_checkable():
    res = fixedpoint.solve(lambda x: x, np.ones(3))  # every point is fixed
    assert res.converged and res.n_fev == 1
    res = fixedpoint.solve(lambda x: x[::-1], np.array([1.0, 2.0, 1.0]))  # a view: read-only, so trusted
    assert res.converged
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(ValueError, match="new array"):  # nothing to check the argument with: refused
        fixedpoint.solve(lambda x: x, strict.ones(3))


# ---------------------------------------------------------------- dtypes across backends

def test_every_floating_dtype_of_torch():
    torch = pytest.importorskip("torch")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for backend in (None, "numpy"):
            # 0.5 x + 100 has the fixed point 200, exact in every dtype
            res = fixedpoint.solve(lambda x: 0.5 * x + 100, torch.zeros(5, dtype=dtype), backend=backend)
            assert res.converged and res.x.dtype == dtype, (dtype, backend, res)
            torch.testing.assert_close(res.x.double(), torch.full((5,), 200.0, dtype=torch.float64), rtol=1e-4, atol=0)
        res = fixedpoint.solve(torch.cos, torch.zeros(3, dtype=dtype), tol=1e-2)
        assert res.converged and res.x.dtype == dtype
        torch.testing.assert_close(res.x.double(), torch.full((3,), 0.7390851, dtype=torch.float64), atol=1e-2, rtol=0)


def test_half_precision_numpy_and_large_entries():
    for dtype in (np.float16, np.float32, np.float64):
        res = fixedpoint.solve(lambda x, dtype=dtype: dtype(0.5) * x + dtype(100), np.zeros(6, dtype))
        assert res.converged and res.x.dtype == dtype, dtype
        np.testing.assert_allclose(res.x, 200, rtol=1e-4)


@pytest.mark.parametrize("backend", ["numpy", "torch", "array_api_strict"])
def test_integer_and_boolean_promotion_does_not_depend_on_backend(backend):
    pytest.importorskip(backend)
    for x0 in (np.arange(3, dtype=np.int32), np.array([True, False, True])):
        res = fixedpoint.solve(lambda x: 0.5 * x + 1.0, x0, backend=backend)
        assert res.converged and isinstance(res.x, np.ndarray) and res.x.dtype == np.float64
        np.testing.assert_allclose(res.x, 2.0, rtol=1e-4)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_lambda_and_tolerance_are_refused(value):
    with pytest.raises((ValueError, TypeError), match="lam"):
        fixedpoint.Anderson(lam=value)
    with pytest.raises((ValueError, TypeError), match="tol"):
        fixedpoint.solve(np.cos, np.zeros(2), tol=value)


def test_divtol_must_exceed_one():
    with pytest.raises(ValueError, match="divtol"):
        fixedpoint.solve(np.cos, np.zeros(2), divtol=0.5)
    assert fixedpoint.solve(np.cos, np.zeros(2), divtol=np.inf).converged
