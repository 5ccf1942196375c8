"""Broyden's iterates against a plain implementation of the same limited-memory good Broyden (pairs, ring
buffer, restarts) on both layouts of its pairs (stacked: short rows and accelerators; per sample: NumPy
vector work on long rows), in a batch, with samples stopping and packed; no allocation of size n per
iteration."""

import importlib
import tracemalloc

import numpy as np
import pytest

import fixedpoint
from fixedpoint import Broyden
from fixedpoint.interop import to_numpy
from fixedpoint.kernels import SHORT_ROWS


def plain_broyden(g, x0, iters, m, beta=1.0, restart_growth=10.0, degenerate_tol=1e-10, dense=False):
    """The first ``iters`` iterates of limited-memory good Broyden on F(x) = g(x) − x for one sample, computed
    plainly: H = −β I + Σ u_i v_iᵀ over the last m pairs, applied to vectors (or formed as an n×n matrix with
    ``dense``), H ΔF formed directly, u = (Δx − H ΔF) / (Δxᵀ H ΔF), v = Hᵀ Δx; a restart (pairs forgotten, the
    step β f) when ‖f‖ exceeds ``restart_growth`` times its smallest value since the last restart or when the
    denominator is degenerate.  Also returns the number of restarts."""
    x = np.array(x0, dtype=np.float64)
    n = x.size
    pairs: list = []

    def H(v, transpose=False):
        if dense:
            M = -beta * np.eye(n) + sum((np.outer(u, w) for u, w in pairs), np.zeros((n, n)))
            return (M.T if transpose else M) @ v
        if transpose:
            return -beta * v + sum((w * (u @ v) for u, w in pairs), np.zeros(n))
        return -beta * v + sum((u * (w @ v) for u, w in pairs), np.zeros(n))

    f = g(x) - x
    ref = np.linalg.norm(f)
    xs, restarts = [x], 0
    x_new = x + beta * f
    for _ in range(iters - 1):
        xs.append(x_new)
        f_new = g(x_new) - x_new
        r = np.linalg.norm(f_new)
        dx, df = x_new - x, f_new - f
        a = H(df)
        denom = dx @ a
        ok = r <= restart_growth * ref and abs(denom) > degenerate_tol * np.linalg.norm(dx) * np.linalg.norm(a)
        if ok:
            pairs = (pairs + [((dx - a) / denom, H(dx, transpose=True))])[-m:]
            ref = min(ref, r)
            step = -H(f_new)
        else:
            pairs, ref, restarts = [], r, restarts + 1
            step = beta * f_new
        x, f = x_new, f_new
        x_new = x + step
    return np.array(xs), restarts


def shift_tanh_map(rates, u, a=0.8, b=0.5):
    """g_i(z) = r_i tanh(a z + b roll(z)) + u_i: cheap at any n, each row from that row alone, a Jacobian that is
    neither symmetric nor a multiple of the identity."""
    def g(z, rows=None):
        r, uu = (rates, u) if rows is None else (rates[rows], u[rows])
        return r * np.tanh(a * z + b * np.roll(z, 1, axis=-1)) + uu

    return g


def iterates(g, x0, method, iters, backend="numpy"):
    """x_0 .. x_{iters-1} of a batch solve, as NumPy float64 (B, iters, n), and the result."""
    seen = []
    kw = dict(method=method, batch=True, tol=1e-300, stop_mode="abs", max_iter=iters,
              callback=lambda info: seen.append(np.array(to_numpy(info.x), dtype=np.float64)))
    if backend == "numpy":
        res = fixedpoint.solve(g, x0, **kw)
    else:
        torch = pytest.importorskip("torch")
        from fixedpoint.backend import emulate_accelerator

        def gt(z):
            return torch.from_numpy(g(z.numpy()))

        x0t = torch.from_numpy(x0)
        if backend == "torch-emulated":  # the accelerator path: stacked pairs, vector work in PyTorch
            with emulate_accelerator():
                res = fixedpoint.solve(gt, x0t, **kw)
        else:  # CPU tensors: NumPy views
            res = fixedpoint.solve(gt, x0t, **kw)
    return np.stack(seen, axis=1), res


def problem(B, n, seed=0):
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.9, 1.1, B)[:, None]
    return shift_tanh_map(rates, rng.standard_normal((B, n))), np.zeros((B, n))


@pytest.mark.parametrize("m, beta", [(3, 1.0), (20, 1.0), (4, 0.7)])
def test_stacked_iterates_match_a_dense_reference(m, beta):
    # short rows: the stacked layout; m = 3 wraps the ring buffer within the 14 iterations
    B, n, iters = 3, 40, 14
    g, x0 = problem(B, n)
    seen, res = iterates(g, x0, Broyden(m=m, beta=beta), iters)
    for i in range(B):
        ref, restarts = plain_broyden(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], iters, m, beta, dense=True)
        assert restarts == res.n_restarts[i] == 0
        np.testing.assert_allclose(seen[i], ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["numpy", "torch", "torch-emulated"])
@pytest.mark.parametrize("m, beta", [(3, 1.0), (5, 0.6)])
def test_long_rows_iterates_match_the_reference(backend, m, beta):
    # n > SHORT_ROWS: NumPy (and CPU tensors through NumPy views) keep each sample's pairs in one block and
    # derive d = Uᵀp from small quantities; the emulated accelerator takes the stacked layout
    B, n, iters = 3, SHORT_ROWS + 904, 14
    g, x0 = problem(B, n, seed=1)
    seen, res = iterates(g, x0, Broyden(m=m, beta=beta), iters, backend)
    for i in range(B):
        ref, restarts = plain_broyden(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], iters, m, beta)
        assert restarts == res.n_restarts[i] == 0
        np.testing.assert_allclose(seen[i], ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n", [40, SHORT_ROWS + 4])
def test_restarts_match_the_reference(n):
    # an expanding map (rate 3 > 1): the steps overshoot, the residual grows and samples restart, some
    # more often than others; the pairs a restart forgets and the derived products d must follow
    B, iters = 4, 25
    rng = np.random.default_rng(3)
    rates = np.array([[0.5], [2.0], [3.0], [4.0]])
    g = shift_tanh_map(rates, rng.standard_normal((B, n)))
    x0 = np.zeros((B, n))
    seen, res = iterates(g, x0, Broyden(m=4), iters)
    total = 0
    for i in range(B):
        ref, restarts = plain_broyden(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], iters, 4)
        assert restarts == res.n_restarts[i]
        total += restarts
        np.testing.assert_allclose(seen[i], ref, rtol=1e-7, atol=1e-9)
    assert total >= 3


@pytest.mark.parametrize("n", [40, SHORT_ROWS + 4])
def test_packed_samples_follow_the_reference(n):
    # samples stop at different iterations and leave the working arrays (compact): those left keep their
    # pairs (per sample: their blocks renumbered) and derived products
    B, m = 5, 3
    rng = np.random.default_rng(4)
    rates = np.array([[0.1], [0.95], [0.3], [0.9], [0.05]])
    g = shift_tanh_map(rates, rng.standard_normal((B, n)))
    x0 = np.zeros((B, n))
    res = fixedpoint.solve(g, x0, method=Broyden(m=m), batch=True, compact=True, tol=1e-10, stop_mode="abs")
    assert res.converged.all() and len(set(res.n_iter.tolist())) >= 3
    for i in range(B):
        ref, _ = plain_broyden(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], int(res.n_iter[i]), m)
        np.testing.assert_allclose(res.x[i], ref[-1], rtol=1e-8, atol=1e-10)


def test_observe_step_and_pack_allocate_nothing_of_size_n(monkeypatch):
    # per-sample layout, 4 samples stopping at different iterations (packed each time): from the third
    # iteration on, the method's own calls allocate less than a quarter of one sample's vector (the loop's
    # record of finished samples, allocated at the first stop, is the loop's)
    state_cls = importlib.import_module("fixedpoint.broyden")._BroydenState
    B, n = 4, 50_000
    rates = np.array([0.1, 0.3, 0.6, 0.9])[:, None]
    c = np.linspace(0.0, 1.0, n)
    worst = {"bytes": 0, "calls": 0}

    def traced(name):
        inner = getattr(state_cls, name)

        def call(self, *args, **kwargs):
            if self.k < 3:
                return inner(self, *args, **kwargs)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                return inner(self, *args, **kwargs)
            finally:
                worst["bytes"] = max(worst["bytes"], tracemalloc.get_traced_memory()[1] - base)
                worst["calls"] += 1
        return call

    for name in ("observe", "step", "pack"):
        monkeypatch.setattr(state_cls, name, traced(name))
    tracemalloc.start()
    try:
        res = fixedpoint.solve(lambda z, rows: rates[rows] * np.tanh(z) + c, np.zeros((B, n)), method=Broyden(m=3),
                               batch=True, compact=True, tol=1e-12, stop_mode="abs", max_iter=60)
    finally:
        tracemalloc.stop()
    assert len(set(res.n_iter.tolist())) == 4, res.n_iter  # samples stopped at different iterations
    assert worst["calls"] > 100 and worst["bytes"] < n * 8 // 4, worst
