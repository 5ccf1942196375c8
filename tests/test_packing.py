"""Samples that stop leave every working array: a sample's iterates do not depend on how it was batched,
and a batch costs what its samples still iterating cost."""

import dataclasses

import numpy as np
import pytest
from test_methods import _docs_method

import fixedpoint
from fixedpoint import Anderson, Broyden, ForwardIteration
from fixedpoint.anderson import AndersonHistory

RATES = np.array([0.3, 0.99, 0.5, 0.9, 0.2, 0.95, 0.7, 0.97, 0.4, 0.8, 0.6, 0.98])


def row_map(rates, u):
    """g_i(z) = r_i tanh(z + ½ roll(z)) / 2 + u_i: every entry of a row computed from that row alone, elementwise,
    so that g's rows are the same to the bit however many rows it is given (unlike a matrix product)."""
    def g(z, rows=None):
        r, uu = (rates, u) if rows is None else (rates[rows], u[rows])
        return r * np.tanh(z + 0.5 * np.roll(z, 1, axis=-1)) * 0.5 + uu

    return g


def methods():
    return [ForwardIteration(), Anderson(), Anderson(m=8, beta=0.7, lam_mode="absolute", lam=1e-12), Broyden(m=6),
            _docs_method()()]


@pytest.mark.parametrize("dtype, n, B", [(np.float64, 40, 12), (np.float32, 40, 12), (np.float32, 40, 40),
                                         (np.float64, 4100, 4)])
@pytest.mark.parametrize("method", methods(), ids=lambda m: m.name + ("" if m.name != "anderson" else f"-m{m.m}"))
def test_a_sample_iterates_alike_alone_in_a_batch_and_compacted(method, dtype, n, B):
    # n = 4100 takes the products of long rows (one gemv per sample); m = 8 the LAPACK small solve; B = 40 the
    # small solve vectorised over the batch (kernels.LDL_SCALAR_BELOW) until fewer samples are left
    rng = np.random.default_rng(0)
    rates = np.resize(RATES, B)[:, None].astype(dtype) * (1.0 - 0.002 * np.arange(B)[:, None] / B).astype(dtype)
    u = rng.standard_normal((B, n)).astype(dtype)
    g = row_map(rates, u)
    x0 = np.zeros((B, n), dtype=dtype)
    kw = dict(method=method, tol=1e-5 if dtype == np.float32 else 1e-11, max_iter=3000)
    whole = fixedpoint.solve(g, x0, batch=True, **kw)
    assert whole.converged.all()
    for compact in (True, "auto"):
        res = fixedpoint.solve(g, x0, batch=True, compact=compact, **kw)
        np.testing.assert_array_equal(res.x, whole.x)
        np.testing.assert_array_equal(res.residual_history, whole.residual_history)
        np.testing.assert_array_equal(res.n_restarts, whole.n_restarts)
        assert res.n_rows < whole.n_rows
    for i in range(0, B, 1 + B // 12):  # samples alone, without and with a batch axis
        alone = row_map(rates[i], u[i])
        one = fixedpoint.solve(alone, x0[i], **kw)
        np.testing.assert_array_equal(one.x, whole.x[i])
        np.testing.assert_array_equal(one.residual_history, whole.residual_history[: one.n_iter, i])
        one_b = fixedpoint.solve(row_map(rates[i:i + 1], u[i:i + 1]), x0[i:i + 1], batch=True, **kw)
        np.testing.assert_array_equal(one_b.x[0], whole.x[i])
    halves = [fixedpoint.solve(row_map(rates[s], u[s]), x0[s], batch=True, **kw) for s in (slice(0, B // 2),
                                                                                             slice(B // 2, B))]
    np.testing.assert_array_equal(np.concatenate([h.x for h in halves]), whole.x)


@dataclasses.dataclass(frozen=True)
class RecordingAnderson(Anderson):
    """Anderson whose state notes how many rows each step works on."""

    def init(self, kern, B, n, dtype):
        state = _Recording(kern, B, n, dtype, self)
        state.seen = []
        return state


class _Recording(AndersonHistory):
    def step(self, x, gx, f, active, out):
        self.seen.append((x.shape[0], gx.shape[0], f.shape[0], out.shape[0], self.R.shape[1]))
        return super().step(x, gx, f, active, out)


@dataclasses.dataclass(frozen=True)
class Unpacked(Anderson):
    """Anderson whose state cannot pack (as a user-written state without pack)."""

    def init(self, kern, B, n, dtype):
        state = _NoPack(kern, B, n, dtype, self)
        state.seen = []
        return state


class _NoPack(AndersonHistory):
    def pack(self, keep):
        return False

    def step(self, x, gx, f, active, out):
        self.seen.append(x.shape[0])
        return super().step(x, gx, f, active, out)


def _states(monkeypatch):
    """Capture the method states the solve loop makes."""
    import fixedpoint.iteration as iteration

    made = []
    real = iteration._Loop.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        made.append(self.state)

    monkeypatch.setattr(iteration._Loop, "__init__", spy)
    return made


@pytest.mark.parametrize("compact", [False, True])
def test_the_method_and_the_loop_work_on_the_samples_still_iterating(monkeypatch, compact):
    made = _states(monkeypatch)
    rng = np.random.default_rng(1)
    B, n = len(RATES), 30
    g = row_map(RATES[:, None], rng.standard_normal((B, n)))
    res = fixedpoint.solve(g, np.zeros((B, n)), method=RecordingAnderson(), batch=True, compact=compact, tol=1e-10)
    assert res.converged.all()
    ran = np.isfinite(res.residual_history)
    # every array of a step has as many rows as samples were still iterating before it (check_every = 1)
    for k, shapes in enumerate(made[0].seen):
        assert set(shapes) == {int(ran[k].sum())}, (k, shapes)
    if compact:
        assert res.n_rows == int(ran.sum())
    else:
        assert res.n_rows == B * res.n_fev


def test_a_state_that_cannot_pack_keeps_the_whole_batch_with_the_same_answers(monkeypatch):
    made = _states(monkeypatch)
    rng = np.random.default_rng(2)
    B, n = len(RATES), 20
    rates, u = RATES[:, None], rng.standard_normal((B, n))
    calls = []

    def g(z, rows):
        calls.append(len(rows))
        return row_map(rates, u)(z, rows)

    ref = fixedpoint.solve(row_map(rates, u), np.zeros((B, n)), batch=True, tol=1e-10)
    res = fixedpoint.solve(g, np.zeros((B, n)), method=Unpacked(), batch=True, compact=True, tol=1e-10)
    np.testing.assert_array_equal(res.x, ref.x)
    np.testing.assert_array_equal(res.residual_history, ref.residual_history)
    assert set(made[-1].seen) == {B}  # the state saw the whole batch every time
    ran = np.isfinite(res.residual_history)
    assert calls[1:] == ran.sum(axis=1)[1:].tolist()  # g itself only the samples still iterating


def test_the_callback_sees_the_whole_batch_after_packing():
    B, n = len(RATES), 10
    u = np.random.default_rng(3).standard_normal((B, n))
    seen = []

    def callback(info):
        seen.append((info.x.shape, np.array(info.residual), np.array(info.active), np.array(info.x)))

    res = fixedpoint.solve(row_map(RATES[:, None], u), np.zeros((B, n)), method="anderson", batch=True,
                           tol=1e-10, callback=callback)
    assert all(shape == (B, n) for shape, *_ in seen)
    hist = res.residual_history
    for k, (_, r, active, x) in enumerate(seen):
        on = np.isfinite(hist[k])
        np.testing.assert_array_equal(r[on], hist[k, on])  # the residuals of the samples evaluated
        stopped_before = ~on
        np.testing.assert_array_equal(x[stopped_before], res.x[stopped_before])  # their results, unchanged
        assert not active[stopped_before].any()
    assert not seen[-1][2].any()


def test_an_error_midway_keeps_the_finished_samples_results():
    B, n = len(RATES), 10
    u = np.random.default_rng(4).standard_normal((B, n))
    good = row_map(RATES[:, None], u)
    ref = fixedpoint.solve(good, np.zeros((B, n)), batch=True, compact=True, tol=1e-10)
    late = int(ref.n_iter.max()) - 3  # g fails at evaluation late + 2, with most samples stopped
    count = [0]

    def g(z, rows):
        count[0] += 1
        if count[0] > late + 1:
            raise RuntimeError("g failed")
        return good(z, rows)

    with pytest.raises(RuntimeError, match="g failed") as info:
        fixedpoint.solve(g, np.zeros((B, n)), batch=True, compact=True, tol=1e-10)
    part = info.value.fixedpoint_result
    done = ref.n_iter <= late + 1
    assert 0 < (~done).sum() < B // 2 and (part.converged == done).all()
    np.testing.assert_array_equal(part.x[done], ref.x[done])
    np.testing.assert_array_equal(part.residual[done], ref.residual[done])
    assert np.isfinite(part.x[~done]).all() and (part.n_iter[~done] == late + 1).all()
    np.testing.assert_array_equal(part.residual_history, ref.residual_history[: late + 1])


def test_packing_allocates_nothing_of_size_n_in_the_iterations():
    # once packed, an iteration allocates no array of size n (tracemalloc's peak over the tail of a solve)
    import tracemalloc

    B, n = 8, 200_000
    rates = np.array([0.1] * 7 + [0.995])[:, None]

    def g(z, rows):
        out = np.multiply(np.tanh(z), rates[rows])  # g's own result: one array of k rows
        return out

    for method in ("anderson", "broyden", "forward"):
        kw = dict(method=method, batch=True, compact=True, tol=1e-8, stop_mode="abs")
        fixedpoint.solve(g, np.ones((B, n)), max_iter=30, **kw)  # warm caches
        tracemalloc.start()
        fixedpoint.solve(g, np.ones((B, n)), max_iter=20, **kw)
        _, short = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fixedpoint.solve(g, np.ones((B, n)), max_iter=120, **kw)
        _, long = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert long - short < 8 * n, (method, long, short)  # more iterations, no more memory


@pytest.mark.parametrize("method", ["forward", "anderson", "broyden"])
def test_packing_on_the_device_paths(method):
    # the accelerator code paths (vector work and small state in PyTorch, host checks every 10 iterations),
    # emulated on CPU tensors: the answers of the host paths, the samples packed at the host checks
    torch = pytest.importorskip("torch")
    from fixedpoint.backend import emulate_accelerator

    B, n = len(RATES), 16
    u = np.random.default_rng(5).standard_normal((B, n))
    host = fixedpoint.solve(row_map(RATES[:, None], u), np.zeros((B, n)), method=method, batch=True, tol=1e-10)
    rates_t, u_t = torch.from_numpy(RATES[:, None]), torch.from_numpy(u)

    def g(z, rows):
        return rates_t[rows] * torch.tanh(z + 0.5 * torch.roll(z, 1, dims=-1)) * 0.5 + u_t[rows]

    with emulate_accelerator():
        res = fixedpoint.solve(g, torch.zeros(B, n, dtype=torch.float64), method=method, batch=True, compact=True,
                               tol=1e-10)
    assert res.converged.all() and (res.n_iter == host.n_iter).all()
    torch.testing.assert_close(res.x, torch.from_numpy(host.x), rtol=1e-10, atol=1e-12)
    ran = np.isfinite(res.residual_history)
    assert res.n_rows < B * res.n_fev and res.n_rows >= ran.sum()  # packed at host checks (every 10 iterations)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_pack_rows_and_stacks_move_exactly_the_kept_rows(lib):
    # in place, runs moved directly or through the scratch block, rows of one entry or longer than the block
    from fixedpoint.backend import resolve_namespace
    from fixedpoint.kernels import Kernels

    xp = resolve_namespace(lib)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        wrap = torch.from_numpy
    else:
        wrap = np.asarray
    kern = Kernels(xp, "cpu")
    rng = np.random.default_rng(0)
    for _ in range(60):
        B, n = int(rng.integers(1, 40)), int(rng.choice([1, 3, 700, 70_000]))
        keep = np.sort(rng.choice(B, size=int(rng.integers(1, B + 1)), replace=False))
        a = rng.standard_normal((B, n))
        ref = a.copy()
        kern.pack_rows(wrap(a), keep)
        np.testing.assert_array_equal(a[: keep.size], ref[keep])
        s = int(rng.integers(1, 5))
        flat = rng.standard_normal(s * B * n)
        stack = flat.reshape(s, B, n).copy()
        out = kern.pack_stack(wrap(flat), (s, B, n), keep)
        np.testing.assert_array_equal(np.asarray(out), stack[:, keep])


@pytest.mark.parametrize("method, vectors", [("forward", 5), ("anderson", 15), ("broyden", 49)])
def test_peak_memory_is_within_what_compaction_used_before(method, vectors):
    # Peak traced memory of a compacted solve in units of B·n vectors: the iterate, next and best iterates, the
    # finished samples' results and g's value (5), plus the method's stacks (Anderson m = 5: 10; Broyden m = 20:
    # 44).  Before the loop packed its samples the same solves peaked at 5.6, 15.3 and 49.3 (a gather buffer and
    # g's values of every sample, 2 vectors, instead of the results' 1).
    import tracemalloc

    B, n = 10, 20_000
    rates = np.array([0.1] * 7 + [0.9] * 3)[:, None]

    def g(z, rows):
        return np.multiply(np.tanh(z), rates[rows])

    x0 = np.ones((B, n))
    kw = dict(method=method, batch=True, compact=True, tol=1e-8, stop_mode="abs", max_iter=60)
    fixedpoint.solve(g, x0, **kw)
    tracemalloc.start()
    res = fixedpoint.solve(g, x0, **kw)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.n_iter.min() < res.n_iter.max()  # samples stopped at different times: the record was packed
    block = 8 * 2 ** 16  # the kernels' scratch block (norms, packing), whatever n
    assert peak <= (vectors + 0.1) * B * n * 8 + block, peak / (B * n * 8)
