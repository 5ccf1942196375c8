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
    # Once every window is full, the host path builds the systems without masks; a sample's system must be, to
    # the bit, the one the general (masked) path builds, including a sample whose residuals are all zero
    # (scale 1): otherwise a sample's steps would depend on its neighbours' windows.
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
    np.testing.assert_array_equal(h._system(), np.ones((B, m)))
    full = h.H.copy()
    h.valid = h.valid.copy()
    h.valid[5, 1] = False  # one slot of one sample: the masked path for all
    rhs = h._system()
    np.testing.assert_array_equal(h.H[:5], full[:5])
    np.testing.assert_array_equal(rhs[5], [1.0, 0.0, 1.0, 1.0])
    assert h.H[5, 1, 1] == 1.0 and not h.H[5, 1, [0, 2, 3]].any() and not h.H[5, [0, 2, 3], 1].any()


@pytest.mark.parametrize("B", [1, 3, 400])
def test_small_systems_solve_like_lapack_and_alike_in_any_batch(B):
    # Kernels.solve_spd solves by LDL^T, vectorised over the batch or one system at a time in Python floats:
    # close to LAPACK, for well and badly conditioned systems, each system's solution the same to the bit in any
    # batch, and a singular system non-finite (no error).
    from fixedpoint.backend import resolve_namespace
    from fixedpoint.kernels import LDL_MAX_K, Kernels

    kern = Kernels(resolve_namespace("numpy"), "cpu")
    rng = np.random.default_rng(5)
    for k in (1, 2, 5, LDL_MAX_K, LDL_MAX_K + 3):
        F = rng.standard_normal((B, k, k + 3)) * np.logspace(0, -6, k)[:, None]
        A = F @ F.transpose(0, 2, 1)
        b = rng.standard_normal((B, k))
        A0, b0 = A.copy(), b.copy()
        y = kern.solve_spd(A, b)
        np.testing.assert_array_equal(A, A0)  # the inputs are left as they were
        np.testing.assert_array_equal(b, b0)
        np.testing.assert_allclose(A @ y[:, :, None], b[:, :, None], rtol=0, atol=1e-7 * np.abs(b).max())
        np.testing.assert_allclose(y, np.linalg.solve(A, b[:, :, None])[:, :, 0], rtol=1e-6, atol=0)
        for i in {0, B // 2, B - 1}:  # alone, and among 399 others (vectorised) or 2 (one at a time)
            np.testing.assert_array_equal(kern.solve_spd(A[i:i + 1], b[i:i + 1])[0], y[i])
    A[0] = 0.0
    with np.errstate(all="ignore"):
        y = kern.solve_spd(A, b)
    assert not np.isfinite(y[0]).all() and np.isfinite(y[1:]).all()


def test_thousands_of_samples_take_the_one_sample_steps():
    # B = 400 solves its small systems by the vectorised LDL^T; the steps are those of one-sample solves
    # (g is a matrix product, whose rows round differently for one row and for 400)
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
        np.testing.assert_allclose(res.x[i], one.x, rtol=1e-9, atol=1e-12)  # g's rows differ in the last bits


@pytest.mark.parametrize("method", ["anderson", "broyden"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_tiny_sample_alone_has_the_bits_it_has_in_a_batch(method, n):
    """Rows of two or three entries, where NumPy's matmul rounds by batch size (kernels.TINY_ROWS)."""
    rng = np.random.default_rng(n)
    A = rng.standard_normal((n, n))
    A *= 0.9 / np.linalg.norm(A, 2)
    b = rng.standard_normal((4, n))

    def g(X, bb=b):  # each sample's row alone, the same bits in any batch
        return np.stack([np.tanh(A @ r) for r in X]) + bb

    res = fixedpoint.solve(g, np.zeros((4, n)), method=method, tol=1e-13, batch=True)
    assert res.converged.all()
    for i in range(4):
        one = fixedpoint.solve(lambda X, i=i: g(X, b[i:i + 1]), np.zeros((1, n)), method=method, tol=1e-13,
                               batch=True)
        assert one.n_iter[0] == res.n_iter[i]
        np.testing.assert_array_equal(one.x[0], res.x[i])
