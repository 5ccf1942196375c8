"""Broyden's iterates against limited-memory good Broyden from its definition (the last m secant pairs applied
to −β I as n×n updates, restarts), on short and long rows, NumPy, CPU tensors and the accelerator path, in a
batch, with samples stopping and packed; one sample alone to the bit as inside a batch; the secant pair taken
from the iterates the loop hands over (a line search may change the step); no allocation of size n per
iteration."""

import importlib
import tracemalloc

import numpy as np
import pytest

import fixedpoint
from fixedpoint import Broyden
from fixedpoint.interop import to_numpy
from fixedpoint.kernels import SHORT_ROWS


def plain_broyden(g, x0, iters, m, beta=1.0, restart_growth=1e3, step_scale=None):
    """The first ``iters`` iterates of limited-memory good Broyden on F(x) = g(x) − x for one sample, from the
    definition: H_k is made from −β I by the good Broyden updates H ← H + (s − H y) sᵀH / (sᵀH y) with the
    last m secant pairs (s, y), oldest first, and the step is −H_k f_k;
    a restart (pairs forgotten, the step β f) when ‖f‖ exceeds ``restart_growth`` times its smallest value since
    the last restart.  ``step_scale(k)`` (optional) scales the k-th step, as a line search would.  Also returns
    the number of restarts."""
    x = np.array(x0, dtype=np.float64)
    pairs: list = []

    def H(v):
        # H = −β I + Σ_j u_j w_jᵀ, rebuilt from −β I with the window's pairs in order (the definition; each
        # update is rank one, so H is applied to vectors in O(m n) instead of formed)
        us, ws = [], []

        def apply(v, transpose=False):
            out = -beta * v
            for a, b in zip(us, ws):
                out = out + (b * (a @ v) if transpose else a * (b @ v))
            return out

        for s, y in pairs:
            hy = apply(y)
            us.append((s - hy) / (s @ hy))
            ws.append(apply(s, transpose=True))
        return apply(v)

    f = g(x) - x
    ref = np.linalg.norm(f)
    xs, restarts = [x], 0
    step = beta * f
    for k in range(iters - 1):
        x_new = x + (step if step_scale is None else step_scale(k) * step)
        xs.append(x_new)
        f_new = g(x_new) - x_new
        r = np.linalg.norm(f_new)
        if r <= restart_growth * ref:
            pairs = (pairs + [(x_new - x, f_new - f)])[-m:]
            ref = min(ref, r)
            step = -H(f_new)
        else:
            pairs, ref, restarts = [], r, restarts + 1
            step = beta * f_new
        x, f = x_new, f_new
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
def test_short_rows_iterates_match_the_reference(m, beta):
    # short rows; m = 3 wraps the ring buffer within the 14 iterations
    B, n, iters = 3, 40, 14
    g, x0 = problem(B, n)
    seen, res = iterates(g, x0, Broyden(m=m, beta=beta), iters)
    for i in range(B):
        ref, restarts = plain_broyden(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], iters, m, beta)
        assert restarts == res.n_restarts[i] == 0
        np.testing.assert_allclose(seen[i], ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["numpy", "torch", "torch-emulated"])
@pytest.mark.parametrize("m, beta", [(3, 1.0), (5, 0.6)])
def test_long_rows_iterates_match_the_reference(backend, m, beta):
    # n > SHORT_ROWS: NumPy's products per sample are BLAS calls; the emulated accelerator does them in PyTorch
    B, n, iters = 3, SHORT_ROWS + 904, 14
    g, x0 = problem(B, n, seed=1)
    seen, res = iterates(g, x0, Broyden(m=m, beta=beta), iters, backend)
    for i in range(B):
        ref, restarts = plain_broyden(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], iters, m, beta)
        assert restarts == res.n_restarts[i] == 0
        np.testing.assert_allclose(seen[i], ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n", [40, SHORT_ROWS + 4])
def test_restarts_match_the_reference(n):
    # an expanding map (rate 3 > 1): the steps overshoot, the residual grows and samples restart (growth 10),
    # some more often than others; the pairs a restart forgets must stay forgotten
    B, iters = 4, 25
    rng = np.random.default_rng(3)
    rates = np.array([[0.5], [2.0], [3.0], [4.0]])
    g = shift_tanh_map(rates, rng.standard_normal((B, n)))
    x0 = np.zeros((B, n))
    seen, res = iterates(g, x0, Broyden(m=4, restart_growth=10.0), iters)
    total = 0
    for i in range(B):
        ref, restarts = plain_broyden(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], iters, 4,
                                      restart_growth=10.0)
        assert restarts == res.n_restarts[i]
        total += restarts
        np.testing.assert_allclose(seen[i], ref, rtol=1e-7, atol=1e-9)
    assert total >= 3


@pytest.mark.parametrize("n", [40, SHORT_ROWS + 4])
def test_packed_samples_follow_the_reference(n):
    # samples stop at different iterations and leave the working arrays (compact): those left keep their
    # pairs and their small matrices
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
    # long rows, 4 samples stopping at different iterations (packed each time): from the third
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


@pytest.mark.parametrize("n", [5, 40, SHORT_ROWS + 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_sample_alone_is_bitwise_the_sample_in_a_batch(n, dtype):
    # one sample takes the host path in direct NumPy calls, a batch the batch path (packed as samples stop):
    # the same iterates to the bit, restarts included
    B = 4
    rng = np.random.default_rng(5)
    g = shift_tanh_map(np.array([[0.5], [0.9], [3.0], [1.1]]), rng.standard_normal((B, n)))

    def g_typed(z, rows=None):
        return g(z, rows).astype(dtype)

    method = Broyden(m=4, restart_growth=10.0)
    kw = dict(method=method, tol=1e-9, stop_mode="abs", max_iter=40)
    res = fixedpoint.solve(g_typed, np.zeros((B, n), dtype), batch=True, compact=True, **kw)
    assert res.n_restarts.sum() > 0 and len(set(res.n_iter.tolist())) > 1
    for i in range(B):
        alone = fixedpoint.solve(lambda z, i=i: g_typed(z[None], np.array([i]))[0], np.zeros(n, dtype), **kw)
        assert alone.n_iter == res.n_iter[i] and alone.n_restarts == res.n_restarts[i]
        np.testing.assert_array_equal(alone.x, res.x[i])


@pytest.mark.parametrize("one", [True, False], ids=["one sample", "batch"])
def test_secant_pairs_come_from_the_iterates_not_the_proposed_step(one):
    # a wrapper (a line search) replaces the proposed x_{k+1} = x_k + p_k by x_k + t_k p_k: the update must use
    # the pair actually taken (s = x_{k+1} − x_k), so the iterates are those of the definition with that pair
    n, m, iters = 30, 4, 16
    B = 1 if one else 3
    g, x0 = problem(B, n, seed=6)
    scales = [1.0, 0.5, 0.8, 1.0, 0.3] * 4
    state_cls = importlib.import_module("fixedpoint.broyden")._BroydenState
    step = state_cls.step

    def damped(self, x, gx, f, active, out):
        restarted = step(self, x, gx, f, active, out)
        t = scales[self.k - 1]
        out[...] = x + t * (out - x)
        return restarted

    seen, _ = [], None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state_cls, "step", damped)
        if one:
            fixedpoint.solve(lambda z: g(z[None])[0], x0[0], method=Broyden(m=m), tol=1e-300, stop_mode="abs",
                             max_iter=iters, callback=lambda info: seen.append(np.array(info.x, dtype=np.float64)))
            seen = np.stack(seen)[None]
        else:
            seen, _ = iterates(g, x0, Broyden(m=m), iters)
    for i in range(B):
        ref, _ = plain_broyden(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], iters, m,
                               step_scale=lambda k: scales[k])
        np.testing.assert_allclose(seen[i], ref, rtol=1e-9, atol=1e-11)


def test_hard_batch_converges_with_bounded_memory():
    # the robustness case of benchmarks/bench_broyden.py --problems hard, smaller: z = tanh(W z + u), W symmetric
    # with ‖W‖₂ = 0.99 (slow modes), float32, relative tol 1e-6; the defaults (m = 20) converge every sample
    rng = np.random.default_rng(0)
    n, B = 120, 4
    A = rng.standard_normal((n, n))
    W = (A + A.T) / 2
    W = (W * (0.99 / np.abs(np.linalg.eigvalsh(W)).max())).astype(np.float32)
    u = (0.01 * rng.standard_normal((B, n))).astype(np.float32)
    res = fixedpoint.solve(lambda z, rows: np.tanh(z @ W + u[rows]), np.zeros((B, n), np.float32),
                           method=Broyden(), batch=True, compact=True, tol=1e-6, max_iter=300)
    assert res.converged.all(), res.n_iter
    g64 = W.astype(np.float64)
    x = res.x.astype(np.float64)
    assert np.all(np.linalg.norm(np.tanh(x @ g64 + u) - x, axis=1) <= 1e-5 * np.linalg.norm(x, axis=1))


def test_the_loop_keeps_the_norms_observe_returned():
    """Long rows (per-sample blocks): the relative test's reference ‖f_0‖ is the array the first observe()
    returned, which the method must not change afterwards (it once became the restart reference, updated in
    place, and the batch's recorded residuals went wrong where the sample's alone did not)."""
    from fixedpoint.problems import poisson_jacobi

    p = poisson_jacobi(SHORT_ROWS + 4, 0.5)
    one = fixedpoint.solve(p.g, np.zeros((1, SHORT_ROWS + 4)), method="broyden", tol=1e-4, batch=True)
    two = fixedpoint.solve(p.g, np.zeros((2, SHORT_ROWS + 4)), method="broyden", tol=1e-4, batch=True)
    np.testing.assert_array_equal(two.residual_history[:, 0], one.residual_history[:, 0])
    np.testing.assert_array_equal(two.residual_history[:, 1], one.residual_history[:, 0])
