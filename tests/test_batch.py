"""Batch mode: per-sample weights, flags, counts, best iterates; converged samples frozen."""

import numpy as np
import pytest

import fixedpoint
from fixedpoint import problems


@pytest.mark.parametrize("method", ["anderson", "forward"])
def test_batch_equals_independent_solves(backend, method):
    p = problems.tanh_layer(d=12, batch=5, rho=0.95, seed=1, backend=backend.xp, dtype=backend.xp.float64,
                            device=backend.device)
    res = fixedpoint.solve(p.g, p.x0, method=method, batch=True, tol=1e-11)
    assert res.status == "converged" and res.converged.shape == (5,) and res.converged.all()
    assert res.residual_history.shape == (res.n_fev, 5) and res.n_fev == res.n_iter.max()
    full = backend.numpy(res.x)
    for i in range(5):
        def gi(z, i=i):
            zz = backend.xp.concat([p.x0[:i, ...], z[None, :], p.x0[i + 1:, ...]], axis=0)
            return p.g(zz)[i, ...]

        one = fixedpoint.solve(gi, p.x0[i, ...], method=method, tol=1e-11)
        assert one.n_iter == res.n_iter[i]
        np.testing.assert_allclose(full[i], backend.numpy(one.x), rtol=1e-9, atol=1e-12)


def test_converged_samples_are_frozen():
    target = np.array([1.0, 2.0, 3.0])
    rates = np.array([0.0, 0.5, 0.9])  # sample 0 converges at once, sample 2 slowly
    seen = []

    def g(x):
        return target[:, None] + rates[:, None] * (x - target[:, None])

    res = fixedpoint.forward_iteration(g, np.zeros((3, 4)), batch=True, tol=1e-8, stop_mode="abs",
                                       callback=lambda info: seen.append(np.array(info.x)))
    assert res.converged.all()
    assert res.n_iter[0] < res.n_iter[1] < res.n_iter[2] == res.n_fev
    seen = np.array(seen)
    k0 = res.n_iter[0]
    assert np.all(seen[k0:, 0] == seen[k0 - 1, 0])  # sample 0 no longer moves once converged
    assert np.isnan(res.residual_history[k0:, 0]).all() and np.isfinite(res.residual_history[:k0, 0]).all()
    np.testing.assert_allclose(res.x, np.broadcast_to(target[:, None], (3, 4)), atol=1e-8)


def test_nonfinite_sample_does_not_spoil_the_others():
    p = problems.tanh_layer(d=8, batch=3, rho=0.9)
    calls = [0]

    def g(z):
        calls[0] += 1
        out = p.g(z)
        if calls[0] > 3:
            out[1] = np.nan
        return out

    res = fixedpoint.anderson(g, p.x0, batch=True, tol=1e-10)
    assert res.status == "nonfinite"
    assert list(res.sample_status) == ["converged", "nonfinite", "converged"]
    assert np.isfinite(res.x).all() and np.isfinite(res.residual[1])
    clean = fixedpoint.anderson(p.g, p.x0, batch=True, tol=1e-10)
    np.testing.assert_allclose(res.x[[0, 2]], clean.x[[0, 2]], rtol=1e-12)
    assert res.n_iter[1] == 4


def test_batch_needs_a_batch_axis():
    with pytest.raises(ValueError, match="batch"):
        fixedpoint.solve(lambda x: x, np.asarray(1.0), batch=True)


@pytest.mark.parametrize("lam_mode", ["relative", "relative_max", "absolute"])
def test_full_window_systems_equal_the_masked_ones(lam_mode):
    # Once every window is full, the host path builds the bordered systems without masks; they must be the
    # systems of the general (masked) path, including a sample whose residuals are all zero (scale 1).
    from fixedpoint.backend import resolve_namespace
    from fixedpoint.kernels import Kernels

    kern = Kernels(resolve_namespace("numpy"), "cpu")
    rng = np.random.default_rng(3)
    B, m, n = 6, 4, 30
    h = fixedpoint.Anderson(m=m, lam=1e-3, lam_mode=lam_mode).init(kern, B, n, np.float64)
    for _ in range(m + 1):
        f = rng.standard_normal((B, n))
        f[0] = 0.0
        h.push(rng.standard_normal((B, n)), f)
    assert h.valid.all()
    rhs_masked = h._system_masked().copy()
    masked = h.H.copy()
    h.H[...] = np.nan
    np.testing.assert_array_equal(h._system_full(), rhs_masked)
    np.testing.assert_allclose(h.H, masked, rtol=1e-15, atol=0)


def test_many_small_systems_solve_like_lapack():
    # Kernels.solve_spd takes a vectorised LDL^T from MANY_SYSTEMS systems on: check it against LAPACK,
    # for well and badly conditioned systems, and a singular one (non-finite, no error).
    from fixedpoint.backend import resolve_namespace
    from fixedpoint.kernels import MANY_SYSTEMS, Kernels

    kern = Kernels(resolve_namespace("numpy"), "cpu")
    rng = np.random.default_rng(5)
    for k in (1, 2, 5, 12):
        F = rng.standard_normal((MANY_SYSTEMS, k, k + 3)) * np.logspace(0, -6, k)[:, None]
        A = F @ F.transpose(0, 2, 1)
        b = rng.standard_normal((MANY_SYSTEMS, k))
        A0, b0 = A.copy(), b.copy()
        y = kern.solve_spd(A, b)
        np.testing.assert_array_equal(A, A0)  # the inputs are left as they were
        np.testing.assert_array_equal(b, b0)
        np.testing.assert_allclose(A @ y[:, :, None], b[:, :, None], rtol=0, atol=1e-7 * np.abs(b).max())
        np.testing.assert_allclose(y, np.linalg.solve(A, b[:, :, None])[:, :, 0], rtol=1e-6, atol=0)
    A[0] = 0.0
    with np.errstate(all="ignore"):
        y = kern.solve_spd(A, b)
    assert not np.isfinite(y[0]).all() and np.isfinite(y[1:]).all()


def test_thousands_of_samples_take_the_one_sample_steps():
    # B = 400 solves its small systems by the vectorised LDL^T; the steps are those of one-sample solves
    p = problems.tanh_layer(d=8, batch=400, rho=0.95, seed=2)
    res = fixedpoint.solve(p.g, p.x0, batch=True, tol=1e-11)
    assert res.converged.all()
    for i in (0, 123, 399):
        def gi(z, i=i):
            zz = p.x0.copy()
            zz[i] = z
            return p.g(zz)[i]

        one = fixedpoint.solve(gi, p.x0[i], tol=1e-11)
        assert one.n_iter == res.n_iter[i]
        np.testing.assert_allclose(res.x[i], one.x, rtol=1e-9, atol=1e-12)
