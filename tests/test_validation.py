"""Bad input gets a clear error naming the parameter (examples and hypothesis)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedpoint


def half(x):
    return 0.5 * x


@pytest.mark.parametrize(
    "option, value, kind",
    [
        ("m", 0, ValueError), ("m", 2.5, TypeError), ("m", True, TypeError),
        ("beta", 0.0, ValueError), ("beta", 1.5, ValueError), ("beta", float("nan"), TypeError),
        ("lam", -1e-3, ValueError), ("tol", 0.0, ValueError), ("tol", -1.0, ValueError),
        ("max_iter", 0, ValueError), ("stop_mode", "max", ValueError), ("lam_mode", "scaled", ValueError),
        ("delay", -1, ValueError), ("check_every", 0, ValueError), ("callback", 3, TypeError),
        ("restart_growth", 0.5, ValueError), ("batch", "yes", TypeError),
    ],
)
def test_bad_anderson_option_names_the_parameter(option, value, kind):
    with pytest.raises(kind, match=option):
        fixedpoint.solve(half, np.ones(3), **{option: value})


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01])
def test_bad_damping(value):
    with pytest.raises(ValueError, match="damping"):
        fixedpoint.solve(half, np.ones(3), method="forward", damping=value)


def test_unknown_option_is_an_error_with_a_suggestion():
    with pytest.raises(TypeError, match="'mm'.*did you mean 'm'"):
        fixedpoint.solve(half, np.ones(3), mm=3)
    with pytest.raises(TypeError, match="'damping'"):
        fixedpoint.solve(half, np.ones(3), method="anderson", damping=0.5)
    with pytest.raises(ValueError, match="method"):
        fixedpoint.solve(half, np.ones(3), method="newton")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_x0(bad):
    with pytest.raises(ValueError, match="x0"):
        fixedpoint.solve(half, np.array([1.0, bad]))


def test_x0_must_be_a_nonempty_array():  # complex x0: tests/test_complex.py
    with pytest.raises(TypeError):
        fixedpoint.solve(half, [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        fixedpoint.solve(half, np.ones(0))
    with pytest.raises(TypeError, match="g must be callable"):
        fixedpoint.solve(3, np.ones(2))


@pytest.mark.parametrize(
    "g, kind, word",
    [
        (lambda x: x[:-1], ValueError, "shape"),
        (lambda x: (0.5 * x).astype(np.float32), TypeError, "dtype"),
        (lambda x: list(x), TypeError, "library"),
    ],
)
def test_g_returning_something_else(g, kind, word):
    with pytest.raises(kind, match=word):
        fixedpoint.solve(g, np.ones(3))


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_g_returning_another_library():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="library"):
        fixedpoint.solve(lambda x: torch.from_numpy(x), np.ones(3))


def test_g_returning_another_device():
    strict = pytest.importorskip("array_api_strict")
    x0 = strict.ones(3, device=strict.Device("device1"))
    with pytest.raises(ValueError, match="device"):
        fixedpoint.solve(lambda x: strict.ones(3), x0)


@settings(max_examples=40, deadline=None)
@given(
    option=st.sampled_from(["m", "max_iter", "tol", "beta", "lam"]),
    value=st.one_of(st.integers(-5, 0), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)),
)
def test_malformed_values_never_pass_silently(option, value):
    valid = {
        "m": lambda v: isinstance(v, int) and v >= 1,
        "max_iter": lambda v: isinstance(v, int) and v >= 1,
        "tol": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
        "beta": lambda v: isinstance(v, (int, float)) and 0 < v <= 1,
        "lam": lambda v: isinstance(v, (int, float)) and 0 <= v < math.inf,  # an infinite λ is refused
    }[option]
    if valid(value):
        res = fixedpoint.solve(half, np.ones(2), **{option: value})
        assert res.n_fev >= 1
    else:
        with pytest.raises((TypeError, ValueError), match=option):
            fixedpoint.solve(half, np.ones(2), **{option: value})


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    norm=st.floats(0.0, 0.9),
    m=st.integers(1, 8),
    beta=st.floats(0.3, 1.0),
)
def test_random_contractions_reach_the_direct_solution(n, seed, norm, m, beta):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    a *= norm / max(np.linalg.norm(a, 2), 1e-300)
    b = rng.standard_normal(n)
    x_ref = np.linalg.solve(np.eye(n) - a, b)
    res = fixedpoint.anderson(lambda x: a @ x + b, np.zeros(n), m=m, beta=beta, tol=1e-11, stop_mode="abs",
                              max_iter=3000)
    assert res.converged, res
    np.testing.assert_allclose(res.x, x_ref, atol=1e-9 * (1 + np.abs(x_ref).max()) / (1 - norm))
    fw = fixedpoint.forward_iteration(lambda x: a @ x + b, np.zeros(n), tol=1e-11, stop_mode="abs", max_iter=3000)
    assert fw.converged
