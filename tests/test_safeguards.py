"""Restarts, non-finite values, the best iterate, and errors raised midway."""

import numpy as np
import pytest

import fixedpoint
from fixedpoint import problems


def test_nonfinite_midway_returns_best_finite_iterate():
    p = problems.chandrasekhar(20, 0.9)
    seen = []

    def g(x):
        if len(seen) >= 6:
            return np.full_like(x, np.inf)
        seen.append(x.copy())
        return p.g(x)

    res = fixedpoint.solve(g, p.x0, tol=1e-14)
    assert res.status == "nonfinite" and not res.converged
    best = int(np.argmin(res.residual_history[:6]))
    np.testing.assert_array_equal(res.x, seen[best])
    assert np.isfinite(res.x).all() and res.residual == res.residual_history[best]


def test_singular_gram_restarts_instead_of_failing():
    # n = 1: all residuals are collinear, so with lam = 0 the Gram matrix is singular
    res = fixedpoint.anderson(np.cos, np.zeros(1), lam=0.0, tol=1e-13)
    assert res.converged and res.n_restarts >= 1
    assert res.x[0] == pytest.approx(0.7390851332151607, abs=1e-12)


def test_residual_blow_up_restarts_history():
    p = problems.linear_contraction(20, rho=0.5)
    count = [0]

    def g(x):
        count[0] += 1
        return p.g(x) + (1e7 if count[0] == 6 else 0.0)  # one wild evaluation

    res = fixedpoint.anderson(g, p.x0, tol=1e-12, stop_mode="abs")
    assert res.converged and res.n_restarts >= 1
    np.testing.assert_allclose(res.x, p.solution, atol=1e-10)
    assert res.residual_history[5] > 1e6


def test_error_in_g_keeps_what_was_computed():
    p = problems.chandrasekhar(20, 0.9)
    count = [0]

    def g(x):
        count[0] += 1
        if count[0] == 5:
            raise KeyboardInterrupt
        return p.g(x)

    with pytest.raises(KeyboardInterrupt) as info:
        fixedpoint.solve(g, p.x0, tol=1e-14)
    partial = info.value.fixedpoint_result
    assert partial.status == "error" and partial.n_fev == 4 and len(partial.residual_history) == 4
    assert partial.residual == pytest.approx(partial.residual_history.min())
    assert np.isfinite(partial.x).all()


@pytest.mark.parametrize("method", ["forward", "anderson"])
def test_best_iterate_of_every_sample_when_residuals_rise_and_fall(backend, method):
    """Non-normal linear maps: residuals grow, shrink and grow again, differently per sample, and the
    solve stops at max_iter; each sample's result is its own iterate of smallest residual."""
    xp = backend.xp
    J = np.array([[0.6, 2.5], [-0.4, 0.7]])  # complex eigenvalues, |λ| < 1, far from normal
    scales = np.array([1.0, 1.2, 0.9, 1.4])  # spectral radius > 1 for the later samples: they diverge
    A = backend.asarray(scales[:, None, None] * J[None])
    x0 = backend.asarray(np.linspace(1.0, 2.0, 8).reshape(4, 2))
    seen = []

    def g(x):
        return xp.sum(A * x[:, None, :], axis=-1)

    def record(info):
        seen.append(np.array(backend.numpy(info.x)))  # a copy: info.x is the solver's buffer

    # Anderson with a window of 2 (one difference): a window of m > 2 would solve these 2-D linear maps exactly
    own = {"m": 2} if method == "anderson" else {}
    res = fixedpoint.solve(g, x0, method=method, batch=True, tol=1e-30, max_iter=25, callback=record, **own)
    hist = res.residual_history
    assert hist.shape == (25, 4) and not np.all(np.diff(hist, axis=0) <= 0, axis=0).any()  # none monotone
    got = backend.numpy(res.x)
    for b in range(4):
        k = int(np.nanargmin(hist[:, b]))
        np.testing.assert_array_equal(got[b], seen[k][b])
        assert res.residual[b] == hist[k, b]
