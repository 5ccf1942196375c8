"""SciPy's own nonlinear test problems through :func:`fixedpoint.root` (defaults) and SciPy's nonlinear solvers.

The problems are those of SciPy's test suite (scipy/optimize/tests/test_nonlin.py, SciPy 1.17: ``F``, ``F2``,
``F2_lucky``, ``F3``, ``F4_powell``, ``F5`` (the pipe network ``pressure_network`` of test_minpack.py with four
pipes, k = 0.5, Q = 4), ``F6``, and the 20×20 linear system of ``TestLinear``, real and complex, drawn as there
from ``numpy.random.default_rng(123)``), written here from their mathematical definitions.  As in SciPy's tests:

* the seven nonlinear problems are solved to ``f_tol = 1e-2`` by every SciPy solver the test applies to them
  (``broyden1``, ``broyden2``, ``anderson``, ``newton_krylov``, ``linearmixing``, ``excitingmixing``,
  ``diagbroyden``, less the problem's ``KNOWN_BAD`` ones), with their default options (Armijo line search);
* the linear systems to ``f_tol = 1e-6`` by ``broyden1``/``broyden2`` (alpha = 1), ``anderson`` (M = 50,
  alpha = 1) and ``newton_krylov`` (inner_m = 10), without line search.

Both sides stop on the same test, ‖F(x)‖₂ ≤ f_tol (SciPy's ``tol_norm`` set to the 2-norm, fixedpoint's
``stop_mode="abs"``); SciPy runs at most 200 iterations (its tests' ``maxiter``), fixedpoint at most 1000
evaluations.  Evaluations are counted by wrapping F (every call, F(x0) included; newton_krylov's finite
differences included).  ``fixedpoint.root`` runs with its defaults and nothing else but ``tol``.

Run from the repository root::

    python -m benchmarks.peers_nonlin --out benchmarks/results/nonlin.json

(BLAS and OpenMP pools limited to one thread with threadpoolctl.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import fixedpoint
from benchmarks.compare_peers import Counted
from tooling import timing

#: Target of issue 22: converged, with at most this many times the best SciPy solver's evaluations.
TARGET_RATIO = 1.2


@dataclass
class Problem:
    """One test problem: F, x0, the tolerance of SciPy's test, and the SciPy solvers (name -> options) it runs."""

    name: str
    F: Callable[[np.ndarray], np.ndarray]
    x0: np.ndarray
    tol: float
    scipy: dict[str, dict[str, Any]] = field(default_factory=dict)


_NONLIN = ("broyden1", "broyden2", "anderson", "newton_krylov", "linearmixing", "excitingmixing", "diagbroyden")


def _solvers(known_bad: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    return {name: {} for name in _NONLIN if name not in known_bad}


def _f(x: np.ndarray) -> np.ndarray:
    """F: −D x − 0.01 (xᵀx) x, D = diag(3, 2, 1.5, 1, 0.5)."""
    return -np.array([3.0, 2.0, 1.5, 1.0, 0.5]) * x - 0.01 * float(x @ x) * x


def _identity(x: np.ndarray) -> np.ndarray:
    """F2 and F2_lucky: F(x) = x."""
    return np.array(x, copy=True)


_A3 = np.array([[-2.0, 1.0, 0.0], [1.0, -2.0, 1.0], [0.0, 1.0, -2.0]])


def _f3(x: np.ndarray) -> np.ndarray:
    """F3: the tridiagonal system A x − (1, 2, 3)."""
    return _A3 @ x - np.array([1.0, 2.0, 3.0])


def _powell(x: np.ndarray) -> np.ndarray:
    """F4_powell: Powell's badly scaled function, (1e4 x₀x₁ − 1, e^{−x₀} + e^{−x₁} − (1 + 1e-4))."""
    return np.array([1e4 * x[0] * x[1] - 1.0, np.exp(-x[0]) + np.exp(-x[1]) - 1.0001])


def _pipes(x: np.ndarray) -> np.ndarray:
    """F5: four parallel pipes, pressures P = k Q² equal (k = 0.5) and flows summing to Q = 4."""
    p = 0.5 * x * x
    return np.concatenate([p[1:] - p[0], [x.sum() - 4.0]])


_J0 = np.array([[-4.256, 14.7], [0.8394989, 0.59964207]])


def _f6(x: np.ndarray) -> np.ndarray:
    """F6: −J0⁻¹ v(x), v = ((x₁ + 3)(x₂⁵ − 7) + 18, sin(x₂ e^{x₁} − 1))."""
    v = np.array([(x[0] + 3.0) * (x[1] ** 5 - 7.0) + 18.0, np.sin(x[1] * np.exp(x[0]) - 1.0)])
    return -np.linalg.solve(_J0, v)


def _linear(complex_: bool) -> Callable[[np.ndarray], np.ndarray]:
    """TestLinear's F(x) = A x − b, A and b standard normal (complex: plus i times standard normal), seed 123."""
    rng = np.random.default_rng(123)
    A = rng.standard_normal((20, 20))
    if complex_:
        A = A + 1j * rng.standard_normal((20, 20))
    b = rng.standard_normal(20)
    if complex_:
        b = b + 1j * rng.standard_normal(20)
    return lambda x: A @ x - b


_LINEAR_SCIPY: dict[str, dict[str, Any]] = {
    "broyden1": {"alpha": 1.0, "line_search": None}, "broyden2": {"alpha": 1.0, "line_search": None},
    "anderson": {"M": 50, "alpha": 1.0, "line_search": None}, "newton_krylov": {"inner_m": 10, "line_search": None}}


def problems() -> list[Problem]:
    """The nine problems, with SciPy's x0, tolerance and solvers (module docstring)."""
    bad = ("linearmixing", "excitingmixing", "diagbroyden")
    return [
        Problem("F", _f, np.ones(5), 1e-2, _solvers()),
        Problem("F2", _identity, np.arange(1.0, 7.0), 1e-2, _solvers(("linearmixing", "excitingmixing"))),
        Problem("F2_lucky", _identity, np.zeros(6), 1e-2, _solvers()),
        Problem("F3", _f3, np.array([1.0, 2.0, 3.0]), 1e-2, _solvers()),
        Problem("F4_powell", _powell, np.array([-1.0, -2.0]), 1e-2, _solvers(bad)),
        Problem("F5", _pipes, np.array([2.0, 0.0, 2.0, 0.0]), 1e-2, _solvers(bad)),
        Problem("F6", _f6, np.array([-0.5, 1.4]), 1e-2, _solvers(bad)),
        Problem("linear_20", _linear(False), np.zeros(20), 1e-6, dict(_LINEAR_SCIPY)),
        Problem("linear_20_complex", _linear(True), np.zeros(20, dtype=complex), 1e-6, dict(_LINEAR_SCIPY)),
    ]


def _ours(p: Problem) -> dict[str, Any]:
    F = Counted(p.F)
    try:
        res = fixedpoint.root(F, p.x0, tol=p.tol)
    except (TypeError, ValueError) as exc:  # complex dtypes not (yet) taken by every method
        if np.iscomplexobj(p.x0):
            return dict(converged=False, n_fev=F.calls, residual=float("nan"),
                        note=f"complex refused: {type(exc).__name__}: {exc}")
        raise
    residual = float(np.linalg.norm(p.F(np.asarray(res.x))))
    assert res.n_fev == F.calls, (res.n_fev, F.calls)
    return dict(converged=bool(res.converged) and residual <= p.tol, n_fev=F.calls, residual=residual,
                method=res.method, n_restarts=int(res.n_restarts))


def _scipy(p: Problem, solver: str, options: dict[str, Any]) -> dict[str, Any]:
    from scipy import optimize

    F = Counted(p.F)
    try:
        x = getattr(optimize, solver)(F, p.x0, f_tol=p.tol, tol_norm=np.linalg.norm, maxiter=200, **options)
    except optimize.NoConvergence as exc:
        x = np.asarray(exc.args[0])
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
        return dict(converged=False, n_fev=F.calls, residual=float("nan"), note=repr(exc))
    residual = float(np.linalg.norm(p.F(np.asarray(x))))
    return dict(converged=residual <= p.tol, n_fev=F.calls, residual=residual)


def _timed(fn: Callable[[], dict[str, Any]], repeats: int, warmup: int) -> dict[str, Any]:
    t = timing.timed(fn, repeats=repeats, warmup=warmup)
    out = dict(t["last"])
    out["time_s"] = {k: t[k] for k in ("median", "q1", "q3")}
    return out


def nonlin_rows(repeats: int = 3, warmup: int = 1, quick: bool = False) -> list[dict[str, Any]]:
    """Solve every problem with ``fixedpoint.root``'s defaults and with each SciPy solver of SciPy's test.

    Parameters
    ----------
    repeats, warmup : int
        Timed and untimed runs of each solve (the counts are the same every run).
    quick : bool
        One timed run, no warm-up (for tests).

    Returns
    -------
    list of dict
        One row per (problem, solver): ``problem``, ``solver`` ("fixedpoint" or "scipy"), ``method``,
        ``converged`` (‖F(x)‖₂ ≤ tol checked on the returned x), ``n_fev``, ``time_s`` (median, q1, q3 in
        seconds), ``residual`` (final ‖F‖₂), ``tol``, and ``note`` where a solve was refused.
    """
    if quick:
        repeats, warmup = 1, 0
    rows: list[dict[str, Any]] = []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy's overflow and convergence warnings on its KNOWN_BAD-adjacent cases
        for p in problems():
            ours = _timed(lambda p=p: _ours(p), repeats, warmup)  # type: ignore[misc]
            rows.append(dict(problem=p.name, solver="fixedpoint", tol=p.tol, **{"method": "root defaults", **ours}))
            for solver, options in p.scipy.items():
                row = _timed(lambda p=p, s=solver, o=options: _scipy(p, s, o), repeats, warmup)  # type: ignore[misc]
                rows.append(dict(problem=p.name, solver="scipy", method=solver, tol=p.tol, **row))
    return rows


def nonlin_targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per problem: ours converged and n_fev, the best converged SciPy solver's n_fev, their ratio, the target met.

    The target (issue 22): converged and n_fev <= 1.2 x the best SciPy solver's (the fewest evaluations among
    the SciPy solvers that converged).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["problem"] for r in rows):
        ours = next(r for r in rows if r["problem"] == name and r["solver"] == "fixedpoint")
        peers = [r for r in rows if r["problem"] == name and r["solver"] == "scipy" and r["converged"]]
        best = min(peers, key=lambda r: r["n_fev"]) if peers else None
        ratio = ours["n_fev"] / best["n_fev"] if best else None
        out[name] = dict(converged=ours["converged"], n_fev=ours["n_fev"],
                         best_scipy=best["method"] if best else None, best_scipy_n_fev=best["n_fev"] if best else None,
                         ratio=ratio, note=ours.get("note"),
                         target=bool(ours["converged"]
                                     and (best is None or ours["n_fev"] <= TARGET_RATIO * best["n_fev"])))
    return out


#: The alternatives measured for the choice of root's defaults (docs/root.md): method, window and line search
#: (with a line search the window counts the rejected trial points too, hence the longer ones).
VARIANTS: dict[str, dict[str, Any]] = {
    "anderson (defaults)": {},
    "anderson + armijo": {"line_search": "armijo"},
    "anderson m=50 + armijo": {"m": 50, "line_search": "armijo"},
    "anderson + armijo, fallback current": {"method": fixedpoint.Backtracking(
        inner=fixedpoint.Anderson(m=25, lam=1e-12, beta=0.7, delay=0), fallback="current", min_step=0.0)},
    "anderson m=5": {"m": 5, "lam": 1e-5, "beta": 1.0},
    "broyden": {"method": "broyden"},
    "broyden + armijo": {"method": "broyden", "line_search": "armijo"},
    "broyden m=200 + armijo": {"method": "broyden", "m": 200, "line_search": "armijo"},
}


def variant_counts() -> dict[str, dict[str, str]]:
    """Evaluations of ``fixedpoint.root`` per problem for each of :data:`VARIANTS` ("n" converged, "-" not)."""
    out: dict[str, dict[str, str]] = {}
    for label, options in VARIANTS.items():
        out[label] = {}
        for p in problems():
            F = Counted(p.F)
            try:
                res = fixedpoint.root(F, p.x0, tol=p.tol, **options)
            except TypeError:  # complex x0 refused by the method
                out[label][p.name] = "refused"
                continue
            ok = bool(res.converged) and float(np.linalg.norm(p.F(np.asarray(res.x)))) <= p.tol
            out[label][p.name] = str(F.calls) if ok else f"- ({F.calls})"
    return out


def _table(targets: dict[str, dict[str, Any]]) -> str:
    lines = ["| problem | fixedpoint.root | evaluations | best SciPy (evaluations) | ratio | target |",
             "|---|---|---|---|---|---|"]
    for name, t in targets.items():
        ratio = f"{t['ratio']:.2f}" if t["ratio"] is not None else "-"
        conv = "converged" if t["converged"] else (t["note"] or "not converged").split(":")[0]
        lines.append(f"| {name} | {conv} | {t['n_fev']} | {t['best_scipy']} ({t['best_scipy_n_fev']}) | {ratio} | "
                     f"{'met' if t['target'] else 'missed'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file of the rows, the targets and the machine")
    parser.add_argument("--repeats", type=timing.positive_int, default=5)
    parser.add_argument("--quick", action="store_true", help="one run of each solve, no warm-up")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        rows = nonlin_rows(repeats=args.repeats, quick=args.quick)
    targets = nonlin_targets(rows)
    variants = variant_counts()
    for r in rows:
        print(f"{r['problem']:18s} {r['solver']:10s} {r['method']:14s} conv={r['converged']!s:5s} "
              f"n_fev={r['n_fev']:5d} median={1e3 * r['time_s']['median']:8.3f} ms residual={r['residual']:.2e}")
    print(_table(targets))
    met = sum(t["target"] for t in targets.values())
    print(f"targets met: {met}/{len(targets)}")
    names = list(next(iter(variants.values())))
    print("| root variant | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, counts in variants.items():
        print(f"| {label} | " + " | ".join(counts[n] for n in names) + " |")
    if args.out:
        data = dict(command=timing.run_command("benchmarks.peers_nonlin", argv), machine=timing.machine_info(()),
                    rows=rows, targets=targets, table=_table(targets), variants=variants)
        print(f"wrote {timing.write_json(args.out, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
