"""The default Anderson stays on the physical root of Chandrasekhar's H-equation (issue 22, item 1).

The reference is the problem's own solution, Newton's method in float64 from H = 1 (independent of the
solvers under test); the root is also told by the moment test of ``problems.h_equation_root``.
"""

import numpy as np
import pytest

import fixedpoint
from fixedpoint import problems
from fixedpoint.anderson import SOLVE_DELAY

TOL = 1e-10

# formerly failing cases of the default Anderson (delay=0): N = 100, both rules at c = 0.9999, Gauss-Legendre 0.999
FORMERLY_NON_PHYSICAL = [("midpoint", 0.9999), ("gauss-legendre", 0.9999), ("gauss-legendre", 0.999)]


@pytest.mark.parametrize("rule, c", FORMERLY_NON_PHYSICAL)
def test_default_anderson_finds_the_physical_root(rule, c):
    p = problems.chandrasekhar(100, c, rule=rule)
    res = fixedpoint.solve(p.g, p.x0, tol=TOL, max_iter=1000)
    assert res.converged
    assert p.params["root"](res.x) == "physical"
    # near c = 1 the Jacobian at the root is nearly singular: the error is about the residual over sqrt(1 - c)
    np.testing.assert_allclose(res.x, p.solution, rtol=1e-6)


@pytest.mark.parametrize("rule, c", FORMERLY_NON_PHYSICAL)
def test_delay_zero_gives_the_old_non_physical_root(rule, c):
    """Switched off, the method converges, but to the other solution: the test above can fail."""
    p = problems.chandrasekhar(100, c, rule=rule)
    res = fixedpoint.solve(p.g, p.x0, method=fixedpoint.Anderson(delay=0), tol=TOL, max_iter=1000)
    assert res.converged
    assert p.params["root"](res.x) == "non-physical"
    assert np.max(np.abs(res.x - p.solution)) > 1e-2


def test_the_default_is_two_plain_steps():
    assert fixedpoint.Anderson().delay is None and SOLVE_DELAY == 2
    p = problems.chandrasekhar(100, 0.999, rule="midpoint")
    seen, seen2 = [], []
    fixedpoint.solve(p.g, p.x0, tol=TOL, callback=lambda info: seen.append(np.array(info.x)))
    fixedpoint.solve(p.g, p.x0, method=fixedpoint.Anderson(delay=2), tol=TOL,
                     callback=lambda info: seen2.append(np.array(info.x)))
    np.testing.assert_array_equal(np.array(seen), np.array(seen2))
    # x_1 = g(x_0), x_2 = g(x_1): plain steps
    np.testing.assert_allclose(seen[1], p.g(seen[0]), rtol=1e-15)
    np.testing.assert_allclose(seen[2], p.g(seen[1]), rtol=1e-15)


def test_batch_and_one_sample_paths_agree_to_the_bit():
    """Samples of different albedo solved together give the bits of their one-sample solves."""
    ps = [problems.chandrasekhar(50, c, rule="gauss-legendre") for c in (0.9, 0.9999)]

    def g(x):
        return np.stack([p.g(row) for p, row in zip(ps, x)])

    batch = fixedpoint.solve(g, np.ones((2, 50)), batch=True, tol=TOL)
    for i, p in enumerate(ps):
        one = fixedpoint.solve(p.g, p.x0, tol=TOL)
        np.testing.assert_array_equal(batch.x[i], one.x)
        assert p.params["root"](one.x) == "physical"
