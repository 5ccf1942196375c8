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
