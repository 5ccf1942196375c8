"""The Cole–Hopf reference of the Burgers PINN demo (demos/burgers_reference.py).

Checked against properties it must have and a published value: the initial and boundary
conditions, odd symmetry in x, the PDE itself by finite differences, agreement with a brute-force
integral, and the benchmark's steepest slope |u_x(t, 0)| = 152.00516 at t = 1.6037/π (Basdevant et
al., Computers & Fluids 14, 1986).
"""

import numpy as np
import pytest

from demos.burgers_reference import NU, burgers_exact


def test_initial_and_boundary_conditions():
    x = np.linspace(-1, 1, 101)
    np.testing.assert_allclose(burgers_exact(0.0, x), -np.sin(np.pi * x), atol=1e-15)
    t = np.linspace(0, 1, 41)
    np.testing.assert_allclose(burgers_exact(t, 1.0), 0.0, atol=1e-12)
    np.testing.assert_allclose(burgers_exact(t, -1.0), 0.0, atol=1e-12)


def test_odd_symmetry():
    t, x = np.meshgrid(np.linspace(0.05, 1, 20), np.linspace(0, 1, 57), indexing="ij")
    np.testing.assert_allclose(burgers_exact(t, -x), -burgers_exact(t, x), atol=1e-12)


def test_satisfies_the_pde_by_finite_differences():
    h, k = 1e-4, 1e-4
    t, x = np.meshgrid(np.linspace(0.1, 0.95, 9), np.linspace(-0.9, -0.15, 16), indexing="ij")
    u = burgers_exact(t, x)
    u_t = (burgers_exact(t + k, x) - burgers_exact(t - k, x)) / (2 * k)
    u_x = (burgers_exact(t, x + h) - burgers_exact(t, x - h)) / (2 * h)
    u_xx = (burgers_exact(t, x + h) - 2 * u + burgers_exact(t, x - h)) / h**2
    residual = u_t + u * u_x - NU * u_xx
    scale = np.abs(u_t) + np.abs(u * u_x)
    assert np.max(np.abs(residual)) < 1e-5 * np.max(scale)
    # and a wrong viscosity does not satisfy it
    assert np.max(np.abs(u_t + u * u_x - 2 * NU * u_xx)) > 1e-3 * np.max(scale)


def test_steepest_slope_matches_the_benchmark_value():
    def slope(t, h=1e-7):
        return (burgers_exact(t, h) - burgers_exact(t, -h)) / (2 * h)

    t_star = 1.6037 / np.pi
    assert -slope(t_star) == pytest.approx(152.00516, abs=2e-3)
    assert -slope(t_star - 0.01) < 152.0 and -slope(t_star + 0.01) < 152.0


def test_agrees_with_brute_force_integration():
    def brute(t, x):
        eta = np.linspace(-1, 1, 200001) * 12 * np.sqrt(4 * NU * t)
        y = x - eta
        e = -np.cos(np.pi * y) / (2 * np.pi * NU) - eta**2 / (4 * NU * t)
        w = np.exp(e - e.max())
        return -np.trapezoid(np.sin(np.pi * y) * w, eta) / np.trapezoid(w, eta)

    for t, x in [(0.1, 0.3), (0.5, -0.01), (1.0, 0.002), (1.0, 0.5), (0.3, -0.9)]:
        assert burgers_exact(t, x) == pytest.approx(brute(t, x), abs=1e-9)
    grid = np.linspace(-1, 1, 65)
    np.testing.assert_allclose(burgers_exact(1.0, grid, n_nodes=100), burgers_exact(1.0, grid, n_nodes=300),
                               atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(nu=0.0), "nu must be"),
    (dict(n_nodes=1), "n_nodes must be"),
    (dict(n_nodes=400), "n_nodes must be"),
    (dict(n_nodes=2.5), "n_nodes must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        burgers_exact(0.5, 0.0, **kwargs)
    with pytest.raises(ValueError, match="t must be"):
        burgers_exact(-0.1, 0.0)
