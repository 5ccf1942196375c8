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


@pytest.mark.parametrize("lam_mode", ["relative", "relative_max", "absolute"])
def test_one_sample_path_takes_the_batched_steps_through_restarts(lam_mode):
    # B = 1 runs a host-scalar path of its own; two identical samples run the batched one.  Both must take
    # the same steps, through partial windows and a restart after a residual blow-up.
    p = problems.linear_contraction(20, rho=0.5)

    def wild_at_6(x, count):  # one wild evaluation, the 6th
        count.append(1)
        return p.g(x) + (1e7 if len(count) == 6 else 0.0)

    method = fixedpoint.Anderson(m=4, lam_mode=lam_mode, lam=1e-10)
    c1, c2 = [], []
    one = fixedpoint.solve(lambda x: wild_at_6(x, c1), p.x0, method=method, tol=1e-12, stop_mode="abs")
    both = fixedpoint.solve(lambda x: wild_at_6(x, c2), np.stack([p.x0, p.x0]), method=method, batch=True,
                            tol=1e-12, stop_mode="abs")
    assert one.converged and one.n_restarts >= 1
    assert list(both.n_iter) == [one.n_iter] * 2 and list(both.n_restarts) == [one.n_restarts] * 2
    # after the blow-up (1e7) the residuals carry its rounding: 1e7 x 1e-16 x a few steps
    np.testing.assert_allclose(both.residual_history[:, 0], one.residual_history, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(both.x[1], one.x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lam_mode", ["relative", "relative_max", "absolute"])
def test_one_sample_weights_do_not_depend_on_the_scale_of_the_problem(lam_mode):
    # The one-sample path solves for the weights without normalising H while its diagonal lies in
    # [1e-100, 1e100], and normalises outside: a problem scaled by 2^±400 (exact in floating point) must take
    # the same steps, scaled (absolute residuals: the relative test's ε would dominate at 2^-400).  Absolute λ is
    # in the units of H, so it is scaled with the problem there.
    p = problems.linear_contraction(20, rho=0.9)
    runs = []
    for e in (0, 400, -400):
        s = 2.0 ** e
        lam = 1e-8 * s * s if lam_mode == "absolute" else 1e-8
        res = fixedpoint.solve(lambda x, s=s: s * p.g(x / s), p.x0 * s, tol=1e-9 * s, stop_mode="abs",
                               method=fixedpoint.Anderson(m=5, lam=lam, lam_mode=lam_mode))
        runs.append((res, s))
    (ref, _), *scaled = runs
    assert ref.converged
    for res, s in scaled:
        assert res.converged and res.n_iter == ref.n_iter
        np.testing.assert_allclose(res.x / s, ref.x, rtol=1e-9, atol=0)
        np.testing.assert_allclose(res.residual_history / s, ref.residual_history, rtol=1e-6)


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
