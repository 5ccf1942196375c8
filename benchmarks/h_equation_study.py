"""Which Anderson finds the physical root of Chandrasekhar's H-equation, and at what cost (issue 22, item 1).

Run from the repository root: ``python -m benchmarks.h_equation_study`` (one thread: the BLAS thread
variables are set to 1 before NumPy is imported, unless already set).

The cases: Kelley's H-equation (:func:`fixedpoint.problems.chandrasekhar`), composite midpoint and
Gauss–Legendre rules, N ∈ {100, 1000}, c ∈ {0.5, 0.9, 0.99, 0.999, 0.9999} (20; issue 22's "16" are those
with c >= 0.9), x0 = ones, the relative test ‖g(x) − x‖ / ‖g(x)‖ <= 1e-10, max_iter 1000.  A wider grid
(N ∈ {20, 50, 200, 500}, c up to 1, 72 cases) counts the root each variant ends on.

For each case: fixedpoint's default ``Anderson()`` (evaluations of g, root by the moment test
``problem.params["root"]``), SciPy's ``optimize.anderson`` on F(x) = g(x) − x with its defaults (Armijo line
search, M = 5, w0 = 0.01) and fixedpoint's relative test through ``tol_norm``
(:class:`benchmarks.compare_peers.ScipyRelativeNorm`), evaluations counted by wrapping g, and the variants
studied: the options ``delay=0`` (the default before issue 22), ``delay=3``, ``beta=0.5``, ``beta=0.8``,
``m=3``/``m=10``/``lam=1e-3``/``lam_mode="relative_max"`` with ``delay=0``, and two safeguards written here on
top of :class:`fixedpoint.AndersonHistory` for the study (not in the library): a residual fallback (a step
whose residual norm grew is discarded and replaced by a plain step from the previous iterate) and an
expansion restart (history cleared when ⟨Δx, Δf⟩ > 0 between consecutive iterates).

Writes benchmarks/results/h_equation_study.txt and .json.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

import fixedpoint  # noqa: E402
from fixedpoint.anderson import AndersonHistory  # noqa: E402
from fixedpoint.problems import chandrasekhar  # noqa: E402
from tooling import timing  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RULES = ("midpoint", "gauss-legendre")
NS = (100, 1000)
CS = (0.5, 0.9, 0.99, 0.999, 0.9999)
TOL, MAX_ITER = 1e-10, 1000
WIDE_NS = (20, 50, 200, 500)
WIDE_CS = (0.9, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 0.99999, 1.0)


class ResidualFallbackHistory(AndersonHistory):
    """Study variant: when ‖f_{k+1}‖ > growth · ‖f_k‖, drop the newest pair and step plainly from x_k (B = 1, NumPy)."""

    growth = 1.0

    def weights(self, active: Any) -> tuple[Any, Any]:
        m, s, prev = self.m, (self.k - 1) % self.m, (self.k - 2) % self.m
        r_new = float(np.sqrt(self.G[0, s, s]))
        if self.k >= 2 and self.valid[0, prev] and r_new > self.growth * float(np.sqrt(self.G[0, prev, prev])):
            self.valid[0, s] = False
            alpha = np.zeros((1, m))
            alpha[0, prev] = 1.0
            return alpha, np.zeros(1, dtype=bool)
        return super().weights(active)


class ExpansionRestartHistory(AndersonHistory):
    """Study variant: restart (plain step, history cleared) when ⟨Δx, Δf⟩ > 0 for the newest two iterates."""

    def weights(self, active: Any) -> tuple[Any, Any]:
        m, s, prev = self.m, (self.k - 1) % self.m, (self.k - 2) % self.m
        if self.k >= 2 and self.valid[0, prev]:
            R = np.asarray(self.R)
            df = R[m + s, 0] - R[m + prev, 0]
            dx = (R[s, 0] - R[m + s, 0]) - (R[prev, 0] - R[m + prev, 0])
            if float(dx @ df) > 0.0:
                self.valid[0] = self.onehot_b[s]
                self.ref_r[0] = self.r[0]
                alpha = np.zeros((1, m))
                alpha[0, s] = 1.0
                return alpha, np.ones(1, dtype=bool)
        return super().weights(active)


@dataclasses.dataclass(frozen=True)
class _StudyAnderson(fixedpoint.Anderson):
    """An Anderson whose history is one of the study's variants (``history``: the class)."""

    history: type = AndersonHistory

    def init(self, kern: Any, B: int, n: int, dtype: Any) -> AndersonHistory:
        return self.history(kern, B, n, dtype, self)


#: name -> method object
VARIANTS: dict[str, fixedpoint.Anderson] = {
    "default": fixedpoint.Anderson(),
    "delay=0 (before)": fixedpoint.Anderson(delay=0),
    "delay=3": fixedpoint.Anderson(delay=3),
    "beta=0.5": fixedpoint.Anderson(beta=0.5, delay=0),
    "beta=0.8": fixedpoint.Anderson(beta=0.8, delay=0),
    "m=3": fixedpoint.Anderson(m=3, delay=0),
    "m=10": fixedpoint.Anderson(m=10, delay=0),
    "lam=1e-3": fixedpoint.Anderson(lam=1e-3, delay=0),
    "relative_max": fixedpoint.Anderson(lam_mode="relative_max", delay=0),
    "residual fallback": _StudyAnderson(delay=0, history=ResidualFallbackHistory),
    "expansion restart": _StudyAnderson(delay=0, history=ExpansionRestartHistory),
}


def ours(p: Any, method: fixedpoint.Anderson) -> dict[str, Any]:
    res = fixedpoint.solve(p.g, p.x0, method=method, tol=TOL, max_iter=MAX_ITER)
    return dict(n_fev=res.n_fev, status=res.status, root=p.params["root"](res.x))


def scipy_anderson(p: Any) -> dict[str, Any]:
    from scipy import optimize

    from benchmarks.compare_peers import Counted, ScipyRelativeNorm

    g = Counted(p.g)
    norm = ScipyRelativeNorm(g, tuple(p.x0.shape), 1)
    try:
        x = optimize.anderson(norm.residual, p.x0, f_tol=TOL, tol_norm=norm, maxiter=MAX_ITER)
        status = "converged"
    except optimize.NoConvergence as exc:
        x, status = exc.args[0], "max_iter"
    return dict(n_fev=g.calls, status=status, root=p.params["root"](x))


def cases(rules: tuple[str, ...], ns: tuple[int, ...], cs: tuple[float, ...]) -> list[tuple[str, int, float]]:
    return [(rule, n, c) for rule in rules for n in ns for c in cs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-wide", action="store_true", help="skip the 72-case grid")
    parser.add_argument("--out", default=str(RESULTS_DIR / "h_equation_study.json"), help="JSON output")
    args = parser.parse_args(argv)
    rows, lines = [], []
    names = list(VARIANTS)
    head = f"{'rule':15s} {'N':>5s} {'c':>7s} | {'scipy':>10s} | " + " | ".join(f"{k[:17]:>17s}" for k in names)
    lines += ["Evaluations of g and root (p: physical, N: non-physical, *: not converged); tol 1e-10 relative",
              head, "-" * len(head)]
    for rule, n, c in cases(RULES, NS, CS):
        p = chandrasekhar(n, c, rule=rule)
        row: dict[str, Any] = dict(rule=rule, n=n, c=c, in_16=c >= 0.9, scipy=scipy_anderson(p))
        row["variants"] = {name: ours(p, method) for name, method in VARIANTS.items()}
        rows.append(row)
        cells = [_cell(row["scipy"])] + [_cell(row["variants"][k]) for k in names]
        lines.append(f"{rule:15s} {n:5d} {c:7g} | " + " | ".join(f"{v:>10s}" if i == 0 else f"{v:>17s}"
                                                                for i, v in enumerate(cells)))
        print(lines[-1], file=sys.stderr, flush=True)
    summary = _summary(rows, names)
    lines += ["", "Over the 16 cases c >= 0.9 (and all 20): physical root; evaluations <= scipy.optimize.anderson's"]
    lines += [f"  {k:18s} physical {v['physical_16']:2d}/16 ({v['physical_20']:2d}/20), "
              f"evaluations <= scipy in {v['le_scipy_16']:2d}/16 ({v['le_scipy_20']:2d}/20), "
              f"total evaluations over the 16: {v['fev_16']}" for k, v in summary.items()]
    wide = None if args.no_wide else _wide(names)
    if wide is not None:
        lines += ["", f"Wider grid ({wide['cases']} cases: both rules, N in {WIDE_NS}, c in {WIDE_CS}): "
                  "non-physical or not converged"]
        lines += [f"  {k:18s} {len(v):2d}" for k, v in wide["failures"].items()]
    out = dict(benchmark="h_equation_study", command=timing.run_command("benchmarks.h_equation_study", argv),
               machine=timing.machine_info(), tol=TOL, max_iter=MAX_ITER, stop_mode="rel", x0="ones",
               variants={k: repr(v) for k, v in VARIANTS.items()}, cases=rows, summary=summary, wide=wide)
    path = timing.write_json(args.out, out)
    Path(path).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {path} and {Path(path).with_suffix('.txt')}")
    return 0


def _cell(r: dict[str, Any]) -> str:
    return f"{r['n_fev']}{'p' if r['root'] == 'physical' else 'N'}{'' if r['status'] == 'converged' else '*'}"


def _summary(rows: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for name in ["scipy", *names]:
        def get(row: dict[str, Any], name: str = name) -> dict[str, Any]:
            return row["scipy"] if name == "scipy" else row["variants"][name]

        def ok(row: dict[str, Any]) -> bool:
            return bool(get(row)["root"] == "physical" and get(row)["status"] == "converged")

        sixteen = [r for r in rows if r["in_16"]]
        out[name] = dict(physical_16=sum(ok(r) for r in sixteen), physical_20=sum(ok(r) for r in rows),
                         le_scipy_16=sum(get(r)["n_fev"] <= r["scipy"]["n_fev"] for r in sixteen),
                         le_scipy_20=sum(get(r)["n_fev"] <= r["scipy"]["n_fev"] for r in rows),
                         fev_16=sum(get(r)["n_fev"] for r in sixteen))
    return out


def _wide(names: list[str]) -> dict[str, Any]:
    grid = cases(RULES, WIDE_NS, WIDE_CS)
    failures: dict[str, list[Any]] = {k: [] for k in names}
    for rule, n, c in grid:
        p = chandrasekhar(n, c, rule=rule)
        for name in names:
            r = ours(p, VARIANTS[name])
            if r["root"] != "physical" or r["status"] != "converged":
                failures[name].append([rule, n, c, r["n_fev"], r["status"]])
    return dict(cases=len(grid), failures=failures)


if __name__ == "__main__":
    sys.exit(main())
