"""No silent wrong answer and no unclear error: what user code may do to the solver, maps without a fixed
point, unconverged DEQ solves, and the inputs that used to fail deep inside (issue "Trust, round 3")."""

import warnings

import numpy as np
import pytest

import fixedpoint
from fixedpoint import Anderson, Broyden, ConvergenceError, ConvergenceWarning, ForwardIteration
from fixedpoint.iteration import REL_REDUCTION

torch = pytest.importorskip("torch")

METHODS = [ForwardIteration(), Anderson(), Broyden()]


# ---------------------------------------------------------------- callbacks may not change the solve

def _writes(field):
    def callback(info):
        getattr(info, field)[...] = 100.0 if field != "active" else True
    return callback


@pytest.mark.parametrize("field", ["x", "residual", "active"])
@pytest.mark.parametrize("lib, backend", [("numpy", None), ("numpy", "torch"), ("torch", None), ("torch", "numpy")])
@pytest.mark.parametrize("batch", [False, True])
def test_a_callback_writing_into_what_it_is_given_raises(field, lib, backend, batch):
    """The reported case: the callback overwrote x, and the solve returned x = 100 as "converged"."""
    x0 = np.zeros((2, 3) if batch else 3)
    g = np.cos
    if lib == "torch":
        x0, g = torch.from_numpy(x0), torch.cos
    with pytest.raises(ValueError, match="callback must not modify") as info:
        fixedpoint.solve(g, x0, tol=1e-10, batch=batch, backend=backend, callback=_writes(field))
    partial = info.value.fixedpoint_result
    assert partial.status == "error" and np.all(np.asarray(partial.n_iter) == 1)


def test_a_callback_after_samples_have_left_the_working_arrays_is_lent_them_too():
    rates = np.array([[0.1], [0.9]])
    seen = []

    def callback(info):
        seen.append(info.active.tolist())
        if not info.active[0]:  # sample 0 has stopped and left the working arrays
            info.x[0] = 5.0

    with pytest.raises(ValueError, match="callback must not modify"):
        fixedpoint.solve(lambda x: rates * x + 1, np.zeros((2, 4)), batch=True, method="forward", callback=callback)
    assert seen[-1] == [False, True]


def test_a_callback_that_only_reads_sees_the_iterates():
    xs = []
    res = fixedpoint.solve(np.cos, np.zeros(3), tol=1e-10, callback=lambda info: xs.append(np.array(info.x)))
    assert res.converged and len(xs) == res.n_fev
    np.testing.assert_array_equal(xs[-1], res.x)


# ---------------------------------------------------------------- a map with no fixed point never "converges"

@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("tol", [1e-5, 1e-2])
def test_a_map_without_a_fixed_point_does_not_end_converged(method, batch, tol):
    """g(x) = x + 1 + 0.1 sin x has ‖g(x) − x‖ >= 0.9·√3 everywhere; Anderson and Broyden used to say
    "converged" once |x| ≈ 1e8 made the relative residual small (and at 1e16, where x + 1 rounds to x)."""
    x0 = np.zeros((2, 3) if batch else 3)
    res = fixedpoint.solve(lambda x: x + 1 + 0.1 * np.sin(x), x0, method=method, tol=tol)
    assert not np.any(res.converged) and res.status != "converged", res
    f = (res.x + 1 + 0.1 * np.sin(res.x)) - res.x
    assert np.all(np.linalg.norm(np.atleast_2d(f), axis=-1) > 0.0)


@pytest.mark.parametrize("tol", [1e-5, 1e-2])
def test_the_relative_test_still_finds_a_fixed_point_far_beyond_the_starting_scale(tol):
    """x* = 1e4 from x0 = 0, where ‖g(x0)‖ = 1 (like Jacobi on a Poisson problem, whose g(0) is tiny): the
    growth of ‖g(x)‖ is credited once the residual has fallen to REL_REDUCTION of ‖f0‖, so the fixed point
    is reported converged, at the plain relative test's iteration count (forward iteration, by hand)."""
    assert REL_REDUCTION == 0.5
    for method in (Anderson(), Broyden()):
        res = fixedpoint.solve(lambda x: 0.9999 * x + 1.0, np.zeros(4), method=method, tol=tol)
        gx = 0.9999 * res.x + 1.0
        assert res.converged and np.linalg.norm(gx - res.x) <= tol * np.linalg.norm(gx), res
        assert res.x.min() > 1e3  # far beyond the starting scale ‖g(x0)‖ = 2
    res = fixedpoint.solve(lambda x: 0.99 * x + 1.0, np.zeros(4), method="forward", tol=tol)
    x, k = np.zeros(4), 0
    while True:
        gx, k = 0.99 * x + 1.0, k + 1
        if np.linalg.norm(gx - x) / (np.linalg.norm(gx) + 1e-12) <= tol:
            break
        x = gx
    assert res.converged and res.n_iter == k


def test_within_the_starting_scale_the_test_is_the_plain_relative_one():
    """Forward iteration written out by hand with the plain test ‖g(x) − x‖ / (‖g(x)‖ + 1e-12) <= tol stops
    at the same iteration, for every sample of a DEQ-like batch."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((20, 20))
    W *= 0.9 / np.linalg.norm(W, 2)
    u = rng.standard_normal((5, 20))

    def g(z):
        return np.tanh(z @ W.T + u)

    res = fixedpoint.solve(g, np.zeros((5, 20)), method="forward", batch=True, tol=1e-8)
    for i in range(5):
        z, k = np.zeros(20), 0
        while True:
            gz = g(np.broadcast_to(z, (5, 20)))[i]
            k += 1
            if np.linalg.norm(gz - z) / (np.linalg.norm(gz) + 1e-12) <= 1e-8:
                break
            z = gz
        assert res.n_iter[i] == k
    assert res.converged.all()


# ---------------------------------------------------------------- options: strict booleans and choices

@pytest.mark.parametrize("value", [0, 1, "yes", None, 0.0])
def test_compact_takes_only_its_choices(value):
    with pytest.raises(ValueError, match="compact must be one of False, True, 'auto'"):
        fixedpoint.solve(lambda x, rows: np.cos(x), np.zeros((2, 3)), batch=True, compact=value)


def test_numpy_booleans_are_booleans():
    res = fixedpoint.solve(np.cos, np.zeros((2, 3)), batch=np.True_, compact=np.False_, tol=1e-10)
    assert res.converged.all() and res.options["compact"] is False and res.options["batch"] is True


@pytest.mark.parametrize("value", [0, 1, "True"])
def test_batch_takes_only_booleans(value):
    with pytest.raises(TypeError, match="batch must be True or False"):
        fixedpoint.solve(np.cos, np.zeros(3), batch=value)


@pytest.mark.parametrize("g", [np.cos, lambda x: np.cos(x)], ids=["ufunc", "one-argument"])
def test_compact_with_a_one_argument_map_is_explained(g):
    with pytest.raises(TypeError, match=r"compact=True calls g\(x_rows, rows\)"):
        fixedpoint.solve(g, np.zeros((2, 3)), batch=True, compact=True)


def test_compact_with_a_builtin_one_argument_map_is_explained():
    with pytest.raises(TypeError, match=r"compact='auto' calls g\(x_rows, rows\).*cos\(\) takes 1"):
        fixedpoint.solve(torch.cos, torch.zeros(2, 3), batch=True, compact="auto")


def test_a_method_refuses_an_unknown_option_with_the_valid_ones():
    with pytest.raises(TypeError, match=r"Anderson\(\) got an unknown option 'window'\. Valid options: .*\bm\b"):
        Anderson(window=5)
    with pytest.raises(TypeError, match="did you mean 'damping'"):
        ForwardIteration(dampin=0.5)


# ---------------------------------------------------------------- inputs that failed deep inside

@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_matrix_is_refused_by_name():
    with pytest.raises(TypeError, match="numpy.matrix"):
        fixedpoint.solve(np.cos, np.matrix(np.zeros(3)))
    with pytest.raises(TypeError, match="g must return a numpy.ndarray, got a numpy.matrix"):
        fixedpoint.solve(lambda x: np.asmatrix(np.cos(x)), np.zeros((1, 3)))


def test_a_meta_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match="'meta' device"):
        fixedpoint.solve(torch.cos, torch.zeros(3, device="meta"))


@pytest.mark.parametrize("method", [Anderson(m=10**7), Broyden(m=10**7)], ids=["anderson", "broyden"])
def test_a_window_too_large_for_memory_names_the_window(method):
    with pytest.raises(MemoryError, match="window m=10000000"):
        fixedpoint.solve(np.cos, np.zeros(3), method=method)


def test_half_precision_with_a_tolerance_below_its_epsilon_warns():
    with pytest.warns(ConvergenceWarning, match="below the machine epsilon of x0's dtype torch.float16"):
        res = fixedpoint.solve(torch.cos, torch.zeros(3, dtype=torch.float16))
    assert res.status in ("max_iter", "converged")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fixedpoint.solve(torch.cos, torch.zeros(3, dtype=torch.float16), tol=1e-2).converged
        fixedpoint.solve(np.cos, np.zeros(3, np.float32), tol=1e-12)  # deliberate: no warning in float32


# ---------------------------------------------------------------- DEQ: an unconverged solve is signalled

def _layer(scale, **kw):
    from fixedpoint.torch import DEQ

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(scale / torch.linalg.matrix_norm(lin.weight, 2))
    return DEQ(lambda z, x: torch.tanh(lin(z) + x), **kw)


def test_an_unconverged_forward_solve_warns_and_can_raise():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(ConvergenceWarning, match="DEQ forward solve ended unconverged"):
        _layer(8.0, method="forward", max_iter=3, tol=1e-8)(x)
    layer = _layer(8.0, method="forward", max_iter=3, tol=1e-8, unconverged="raise")
    with pytest.raises(ConvergenceError, match="forward solve ended unconverged") as info:
        layer(x)
    assert info.value.stats.converged_fraction < 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _layer(8.0, method="forward", max_iter=3, tol=1e-8, unconverged="ignore")(x)
        _layer(0.5, tol=1e-8)(x).sum().backward()  # converged both ways: silent


def test_an_unconverged_adjoint_solve_warns_at_backward():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    layer = _layer(0.95, tol=1e-10, max_iter=500, backward_max_iter=2)
    z = layer(x)
    with pytest.warns(ConvergenceWarning, match="DEQ adjoint solve ended unconverged"):
        z.sum().backward()
    layer = _layer(0.95, tol=1e-10, max_iter=500, backward_max_iter=2, unconverged="raise")
    with pytest.raises(ConvergenceError, match="adjoint solve"):
        layer(x).sum().backward()


def test_the_unconverged_option_is_checked():
    with pytest.raises(ValueError, match="unconverged must be one of 'warn', 'raise', 'ignore'"):
        _layer(0.5, unconverged=True)


@pytest.mark.parametrize("kind", ["batchnorm", "dropout"])
def test_a_closure_over_a_training_mode_layer_is_refused_before_it_runs(kind):
    from fixedpoint.torch import DEQ

    mod = torch.nn.BatchNorm1d(4) if kind == "batchnorm" else torch.nn.Dropout(0.5)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    layer = DEQ(lambda z, x: torch.tanh(0.5 * mod(z) + x))
    with pytest.raises(ValueError, match=f"a module called by f is a {type(mod).__name__} in training mode"):
        layer(torch.randn(8, 4))
    for key, value in mod.state_dict().items():
        assert torch.equal(value, before[key]), key
    mod.eval()
    assert layer(torch.randn(8, 4)).shape == (8, 4)  # in eval mode it is a fixed map


def test_a_wrong_shaped_f_is_reported_as_f():
    from fixedpoint.torch import DEQ

    with pytest.raises(ValueError, match=r"^f must return an array of the input's shape \(8, 4\), got shape"):
        DEQ(lambda z, x: z[:, :2])(torch.randn(8, 4))
