"""fixedpoint.root (F(x) = 0 on the driver loop) and the Backtracking line search, against independent references:
direct linear solves, closed forms and SciPy's own solvers; problems of SciPy's tests (benchmarks/peers_nonlin.py)."""

import numpy as np
import pytest

import fixedpoint
from benchmarks import peers_nonlin
from fixedpoint import Backtracking, ForwardIteration

PROBLEMS = {p.name: p for p in peers_nonlin.problems()}


def _norm_F(p, x):
    return float(np.linalg.norm(p.F(np.asarray(x))))


def test_a_linear_system_against_a_direct_solve():
    p = PROBLEMS["linear_20"]
    res = fixedpoint.root(p.F, p.x0, tol=1e-10)
    x_ref = np.linalg.solve(np.array([p.F(e) - p.F(np.zeros(20)) for e in np.eye(20)]).T, -p.F(np.zeros(20)))
    assert res.converged and res.n_fev < 40
    np.testing.assert_allclose(res.x, x_ref, rtol=0, atol=1e-8)


def test_the_tridiagonal_system_and_the_pipe_network_against_closed_forms():
    res = fixedpoint.root(PROBLEMS["F3"].F, PROBLEMS["F3"].x0, tol=1e-12)
    np.testing.assert_allclose(res.x, np.linalg.solve(peers_nonlin._A3, [1.0, 2.0, 3.0]), atol=1e-11)
    res = fixedpoint.root(PROBLEMS["F5"].F, PROBLEMS["F5"].x0, tol=1e-10)  # equal pipes: equal flows Q/4
    np.testing.assert_allclose(res.x, np.ones(4), atol=1e-9)


@pytest.mark.parametrize("name", ["F4_powell", "F6"])
def test_nonlinear_problems_against_scipy(name):
    optimize = pytest.importorskip("scipy.optimize")
    p = PROBLEMS[name]
    res = fixedpoint.root(p.F, p.x0, tol=1e-9)
    assert res.converged
    assert res.residual == pytest.approx(_norm_F(p, res.x), rel=1e-6)  # the reported residual is ‖F(x)‖₂
    ref = optimize.fsolve(p.F, np.asarray(res.x) * (1 + 1e-3), xtol=1e-13)  # MINPACK's hybrd, near our root
    np.testing.assert_allclose(res.x, ref, rtol=1e-6, atol=1e-8)
    assert _norm_F(p, res.x) <= 1e-9


def test_the_default_scaling_makes_powells_badly_scaled_function_converge():
    p = PROBLEMS["F4_powell"]
    assert fixedpoint.root(p.F, p.x0, tol=1e-2).converged
    plain = fixedpoint.root(p.F, p.x0, tol=1e-2, alpha=1.0, divtol=1e10, max_iter=200)  # no scaling: x + F(x)
    assert not plain.converged


def _atan(x):
    return np.arctan(5.0 * (x - 1.0))  # flat far from its root: full quasi-Newton steps overshoot


def test_the_line_search_makes_a_flat_problem_converge():
    x0 = np.full(3, 20.0)
    without = fixedpoint.root(_atan, x0, tol=1e-8, max_iter=120)
    with_ls = fixedpoint.root(_atan, x0, tol=1e-8, max_iter=120, line_search="armijo")
    assert not without.converged
    assert with_ls.converged
    np.testing.assert_allclose(with_ls.x, np.ones(3), atol=1e-8)
    assert with_ls.options["line_search"] == "armijo" and with_ls.method == "backtracking"


def test_the_line_search_around_forward_iteration_uses_its_own_residual_buffer():
    # x + alpha F(x) with a fixed, too long step: forward iteration oscillates without the search
    def F(x):
        return -(x - 3.0)

    res = fixedpoint.root(F, np.zeros(4), method=Backtracking(inner=ForwardIteration()), alpha=2.0, tol=1e-10,
                          max_iter=100)
    assert res.converged
    np.testing.assert_allclose(res.x, np.full(4, 3.0), atol=1e-9)
    assert not fixedpoint.root(F, np.zeros(4), method="forward", alpha=2.0, tol=1e-10, max_iter=100).converged


def _batch_F(X):
    return -(3.0 * X + 0.5 * np.roll(X, 1, axis=-1) + 0.1 * X**3) + np.array([0.3, -0.2, 0.1])


@pytest.mark.parametrize("line_search", [None, "armijo"])
def test_a_samples_answer_does_not_depend_on_its_batch(line_search):
    rng = np.random.default_rng(0)
    X0 = rng.standard_normal((5, 3)) * np.array([[0.1], [1.0], [2.0], [0.3], [0.5]])
    res = fixedpoint.root(_batch_F, X0, batch=True, tol=1e-10, line_search=line_search, max_iter=300)
    assert res.converged.all()
    for i in range(5):
        alone = fixedpoint.root(_batch_F, X0[i:i + 1], batch=True, tol=1e-10, line_search=line_search, max_iter=300)
        np.testing.assert_allclose(res.x[i], alone.x[0], rtol=1e-12, atol=1e-15)  # the loop's own batching rounding
        assert res.n_iter[i] == alone.n_iter[0]
    assert np.abs(_batch_F(res.x)).max() < 1e-9


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    p = PROBLEMS["F3"]
    A = torch.tensor(peers_nonlin._A3)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    res = fixedpoint.root(lambda x: A @ x - b, torch.tensor(p.x0), tol=1e-12)
    assert isinstance(res.x, torch.Tensor) and res.x.dtype == torch.float64
    np.testing.assert_allclose(res.x.numpy(), np.linalg.solve(peers_nonlin._A3, [1.0, 2.0, 3.0]), atol=1e-11)
    # a batch whose samples finish at different iterations: the line search's state is packed with the method's
    X0 = torch.tensor(np.random.default_rng(1).standard_normal((4, 3)) * [[0.1], [2.0], [0.5], [1.0]])
    res = fixedpoint.root(lambda X: torch.from_numpy(_batch_F(X.numpy())), X0, batch=True, tol=1e-10,
                          line_search="armijo")
    assert res.converged.all() and len(set(res.n_iter.tolist())) > 1
    assert float(torch.abs(torch.from_numpy(_batch_F(res.x.numpy()))).max()) < 1e-9


def test_a_list_x0_relative_stopping_and_the_callback_sees_x():
    first = []

    def callback(info):
        if info.iteration == 0:
            first.append(np.array(info.x))

    res = fixedpoint.root(PROBLEMS["F"].F, [1, 1, 1, 1, 1], stop_mode="rel", tol=1e-8, callback=callback)
    assert res.converged and res.residual_history[0] == pytest.approx(1.0)
    np.testing.assert_allclose(first[0], np.ones(5))
    assert _norm_F(PROBLEMS["F"], res.x) <= 1e-8 * _norm_F(PROBLEMS["F"], np.ones(5))


def test_a_root_at_x0_takes_one_evaluation():
    res = fixedpoint.root(PROBLEMS["F2_lucky"].F, PROBLEMS["F2_lucky"].x0)
    assert res.converged and res.n_fev == 1


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(line_search="wolfe"), ValueError, "line_search"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(stop_mode="max"), ValueError, "stop_mode"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(window=3), TypeError, "window"),
    (dict(method="newton"), ValueError, "newton"),
])
def test_bad_arguments_name_the_parameter(kwargs, error, name):
    with pytest.raises(error, match=name):
        fixedpoint.root(PROBLEMS["F3"].F, PROBLEMS["F3"].x0, **kwargs)


def test_bad_F_and_x0_and_line_search_options():
    with pytest.raises(TypeError, match="F"):
        fixedpoint.root(None, np.ones(3))
    with pytest.raises(TypeError, match="x0"):
        fixedpoint.root(np.sin, "abc")
    with pytest.raises(ValueError, match="F\\(x0\\)"):
        fixedpoint.root(lambda x: np.full_like(x, np.inf), np.ones(2))
    with pytest.raises(TypeError, match="inner"):
        Backtracking(inner="anderson")
    with pytest.raises(ValueError, match="sigma"):
        Backtracking(sigma=2.0)
    with pytest.raises(ValueError, match="max_backtracks"):
        Backtracking(max_backtracks=0)


def test_the_benchmark_reports_every_problem_quickly():
    rows = peers_nonlin.nonlin_rows(quick=True)
    targets = peers_nonlin.nonlin_targets(rows)
    assert set(targets) == set(PROBLEMS)
    for name, t in targets.items():
        if name != "linear_20_complex":
            assert t["converged"], name


def _dense_broyden_armijo(F, x0, n_eval, min_step=0.01, max_backtracks=8, sigma=1e-4):
    """Good Broyden with a dense inverse Jacobian (H_0 = −I) and Kelley's derivative-free Armijo search, written
    from the textbook (Kelley 1995, ch. 7-8): H is updated only at accepted points, with the pair from the last
    accepted point; a failed search takes the full step, evaluated anew and accepted.  Returns the evaluated points."""
    x = np.array(x0, dtype=float)
    f = F(x)
    points = [x]
    H = -np.eye(len(x))
    xb, fb, p, t, back, forced = x, f, -H @ f, 1.0, 0, False
    while len(points) < n_eval:
        x = xb + t * p
        f = F(x)
        points.append(x)
        nb, nx = np.linalg.norm(fb), np.linalg.norm(f)
        accept = forced or nx <= (1.0 - sigma * t) * nb
        lam = nb**2 * t * t / (nx**2 - nb**2 * (1.0 - 2.0 * t))  # the parabola's minimiser
        shorter = min(max(lam if np.isfinite(lam) and lam > 0 else 0.5 * t, 0.1 * t), 0.5 * t)
        if accept:
            s, y = x - xb, f - fb
            Hy = H @ y
            H = H + np.outer(s - Hy, s @ H) / (s @ Hy)
            xb, fb, p, t, back, forced = x, f, -H @ f, 1.0, 0, False
        elif back >= max_backtracks or shorter < min_step:
            t, back, forced = 1.0, back + 1, True
        else:
            t, back = shorter, back + 1
    return np.array(points)


def _flat3(x):
    return np.array([np.arctan(5.0 * (x[0] - 1.0)) + 0.1 * x[1], np.arctan(3.0 * (x[1] + 0.5)) + 0.2 * x[0] ** 2,
                     np.arctan(x[2] - 2.0) + 0.1 * x[0] * x[1]])


def _root_points(F, x0, inner, n_eval):
    points = []
    fixedpoint.root(F, x0, method=Backtracking(inner=inner), alpha=1.0, tol=1e-14, max_iter=n_eval,
                    callback=lambda info: points.append(np.array(info.x)))
    return np.array(points)


def test_a_rejected_trial_point_is_not_learnt_from():
    # alpha=1: root iterates x itself with F as the residual, Broyden's H_0 = −I; no pair dropped, no restart
    x0, n_eval = np.array([6.0, -4.0, 9.0]), 30
    ref = _dense_broyden_armijo(_flat3, x0, n_eval)
    inner = fixedpoint.Broyden(m=100, restart_growth=float("inf"), degenerate_tol=0.0)
    ours = _root_points(_flat3, x0, inner, n_eval)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)
    # the search backtracked and failed on the way (the reference's full steps are repeated points)
    norms = np.linalg.norm([_flat3(x) for x in ref], axis=1)
    assert (np.diff(norms) > 0).sum() >= 3 and any((ref[i] == ref[j]).all() for i in range(5, n_eval)
                                                    for j in range(1, i))

    class LearnsEverything(fixedpoint.Broyden):  # the same method without hold(): it learns from trial points
        def init(self, kern, B, n, dtype):
            state = super().init(kern, B, n, dtype)
            state.hold = lambda held: None
            return state

    everything = _root_points(_flat3, x0, LearnsEverything(m=100, restart_growth=float("inf"), degenerate_tol=0.0),
                              n_eval)
    assert np.abs(everything - ref).max() > 1e-3


@pytest.mark.parametrize("name, options, most", [
    ("F4_powell", {}, 200),                                          # badly scaled: Anderson (root's m=25)
    ("F4_powell", {"method": "broyden"}, 250),
    ("linear_20", {"m": 50}, 120),                                   # the 20x20 system: a window of 50
    ("linear_20", {"method": "broyden", "m": 200}, 250),
    ("linear_20_complex", {"m": 50}, 120),
])
def test_the_line_search_converges_where_scipys_does(name, options, most):
    p = PROBLEMS[name]
    res = fixedpoint.root(p.F, p.x0, tol=p.tol, line_search="armijo", **options)
    assert res.converged and res.n_fev <= most
    assert _norm_F(p, res.x) <= p.tol
    if name.startswith("linear"):
        zero = np.zeros_like(p.x0)
        A = np.array([p.F(e) - p.F(zero) for e in np.eye(len(p.x0), dtype=p.x0.dtype)]).T
        np.testing.assert_allclose(res.x, np.linalg.solve(A, -p.F(zero)), rtol=0, atol=1e-5)


def _rowwise_F(X):  # each row's values by elementwise operations only: the same bits whatever the batch
    return -(3.0 * X + 0.5 * np.roll(X, 1, axis=-1) + 0.1 * X * X * X) + np.array([0.3, -0.2, 0.1])


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_the_line_search_keeps_each_samples_answer_independent_of_its_batch(method):
    X0 = np.random.default_rng(3).standard_normal((5, 3)) * np.array([[0.1], [3.0], [0.5], [8.0], [1.0]])
    batch = fixedpoint.root(_rowwise_F, X0, method=method, batch=True, tol=1e-12, line_search="armijo")
    assert batch.converged.all() and len(set(batch.n_iter.tolist())) > 1
    assert batch.n_restarts[3] > 0  # sample 3 (the farthest) failed a search, the others did not all
    # the same samples with other companions, in another order: the same iterates to the bit
    order = [3, 0, 4]
    other = fixedpoint.root(_rowwise_F, np.concatenate([X0[order], -X0[:2]]), method=method, batch=True, tol=1e-12,
                            line_search="armijo")
    for j, i in enumerate(order):
        assert other.n_iter[j] == batch.n_iter[i] and other.n_restarts[j] == batch.n_restarts[i]
        np.testing.assert_array_equal(other.x[j], batch.x[i])
        alone = fixedpoint.root(_rowwise_F, X0[i], method=method, tol=1e-12, line_search="armijo")  # host path
        assert alone.converged
        np.testing.assert_allclose(alone.x, batch.x[i], rtol=0, atol=1e-10)
