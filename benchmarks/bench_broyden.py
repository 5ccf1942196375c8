"""Broyden's own work per iteration at DEQ scale, against Anderson's and forward iteration's.

"Own work" is what a method costs besides the map: the wall time of one
``fixedpoint.solve`` minus the time spent inside the map (timed by a wrapper around
it), per iteration (evaluation of the map) and per row (one sample in one
evaluation, ``FixedPointResult.n_rows``).  Solver backend NumPy, float32, medians
of ``--repeats`` runs after ``--warmup`` untimed ones (:func:`tooling.timing.timed`).
The BLAS and OpenMP threads are pinned to one unless the environment already sets
them (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, set here
before NumPy is imported), and torch's CPU threads to ``--threads`` (default 1); the
JSON's ``machine`` record says what was used.

Three problems (``--problems``; synthetic and deq by default):

1. **synthetic** — B = ``--batch`` samples of n = ``--n`` (default 100 × 37,632, the
   state of a 48×28×28 DEQ), g_i(z) = tanh(ρ S z + u_i) with S the cyclic shift of the
   n entries (a permutation: a cheap map, four passes over the batch, whose Jacobian is
   orthogonal up to the tanh', so that no method converges fast), ρ = 0.999,
   u_i ~ 0.01 N(0, 1).  Every method runs exactly ``--iters`` iterations on the whole
   batch (tolerance 1e-30, absolute, ``compact=False``): the pairs Broyden keeps grow
   to its m = 20 after 21 iterations and stay there, Anderson's to its m = 5.
2. **deq** — the demo's DEQ (``demos/deq_model.py``: ``DEQClassifier(1, 28, 10)`` at
   random initialisation, seed ``--seed``) on ``--deq-batch`` random 1×28×28 images:
   its cell ``model.deq.f(z, x)`` with x = ``model.injection(images)``, solved as the
   DEQ layer solves it on the CPU (``fixedpoint.solve`` on the CPU tensors with
   ``backend="numpy"``): ``solve(g, zeros, method, batch=True, compact=True)`` with
   g(z, rows) = f(z, x[rows]), relative tolerance ``--deq-tol`` (default 1e-4: the
   randomly initialised cell is strongly contractive; at the demo's 1e-2 a sample
   takes about 11 iterations, too few for Broyden's pairs to fill), cap 1000.  Samples stop at different
   iterations, so the rows (and the pairs in use) shrink as the solve goes on.
3. **small** (issue 22, item 4) — the library's fixed cost per iteration: g(x) = tanh(A x) + b, n = 5, A a
   Gaussian matrix (seed 0) scaled to ‖A‖₂ = 0.95, b ~ N(0, 1), float64, one vector, x0 = 0, absolute
   tolerance 1e-12 on ‖g(x) − x‖₂: ``fixedpoint.solve(..., method="broyden")`` with its defaults against
   ``scipy.optimize.broyden1`` given F(x) = g(x) − x with ``f_tol`` = 1e-12, ``tol_norm`` the 2-norm and its
   defaults otherwise (``line_search="armijo"``).  Each timed run makes ``--small-inner`` solves; the two
   alternate over ``--repeats`` × 3 runs (interleaved), and the medians give µs per evaluation of g and per
   solve.
4. **hard** (iterations, not time) — the hard DEQ-like map of the Broyden robustness
   question: B = 10 samples of n = ``--hard-n``, g_i(z) = tanh(W z + u_i), W symmetric
   (a Gaussian matrix's symmetric part) scaled to ‖W‖₂ = 0.99, u_i ~ 0.01 N(0, 1) (so
   that tanh is nearly linear and the slow modes of W dominate), float32, relative
   tolerance 1e-6, cap 300: Anderson, and Broyden with its defaults (m = 20, ``restart_growth`` = 1e3),
   with ``restart_growth`` 10, with m = 10 and with memory for every iteration (m = 300);
   then a plain NumPy study of the limited memory (one sample at a time, float32
   vectors): the library's scheme (H = −βI + Σ u_i v_iᵀ, the oldest rank-one term
   dropped) against the consistent one (the last m secant pairs applied to −βI, the
   compact representation of Byrd, Nocedal & Schnabel 1994), each with
   ``restart_growth`` 10 and 1e3.

Run from the repository root::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python -m benchmarks.bench_broyden --out benchmarks/results/broyden_after.json
    python -m benchmarks.bench_broyden --problems hard --out benchmarks/results/broyden_hard.json
    python -m benchmarks.bench_broyden --problems small --out benchmarks/results/broyden_small.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before NumPy is imported
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import fixedpoint  # noqa: E402
from fixedpoint.torch.solving import TimedMap  # noqa: E402
from tooling import timing  # noqa: E402

METHODS = ("forward", "anderson", "broyden")
RHO = 0.999


def shift_map(batch: int, n: int, seed: int):
    """g(z) = tanh(ρ S z + u), S the cyclic shift of each sample's entries, with one preallocated buffer."""
    u = (0.01 * np.random.default_rng(seed).standard_normal((batch, n))).astype(np.float32)
    buf = np.empty((batch, n), dtype=np.float32)

    def g(z):
        buf[:, 1:] = z[:, :-1]
        buf[:, 0] = z[:, -1]
        np.multiply(buf, RHO, out=buf)
        np.add(buf, u, out=buf)
        return np.tanh(buf)

    return g


def measure(make_solve, repeats: int, warmup: int) -> dict:
    """Median wall time, time in the map and own time (their difference) of ``make_solve()`` runs.

    ``make_solve()`` returns ``(solve_once, timed_map)``: the solve to time and the map wrapper it calls.
    """
    maps: list[float] = []

    def once():
        run, tmap = make_solve()
        res = run()
        maps.append(tmap.seconds)
        return res

    t = timing.timed(once, repeats=repeats, warmup=warmup)
    res = t.pop("last")
    totals, in_map = t["times"], maps[-repeats:]
    own = timing.summarize([a - b for a, b in zip(totals, in_map)])
    iters, rows = int(res.n_fev), int(res.n_rows)
    per_sample = np.atleast_1d(res.n_iter)
    return dict(total=t, map=timing.summarize(in_map), own=own, n_fev=iters, n_rows=rows,
                own_us_per_iter=1e6 * own["median"] / iters, own_us_per_row=1e6 * own["median"] / rows,
                map_us_per_row=1e6 * statistics.median(in_map) / rows,
                iterations_mean=float(per_sample.mean()), iterations_max=int(per_sample.max()),
                converged=float(np.mean(res.converged)), restarts=int(np.sum(res.n_restarts)))


def synthetic(method: str, batch: int, n: int, iters: int, seed: int, repeats: int, warmup: int) -> dict:
    """Item 1: every method for exactly ``iters`` iterations on the whole batch."""
    g = shift_map(batch, n, seed)
    x0 = np.zeros((batch, n), dtype=np.float32)

    def make():
        tmap = TimedMap(g)
        return (lambda: fixedpoint.solve(tmap, x0, method=method, batch=True, tol=1e-30, stop_mode="abs",
                                         max_iter=iters)), tmap

    return measure(make, repeats, warmup)


def demo_deq(batch: int, seed: int):
    """(f, x): the demo DEQ's cell at random initialisation and its input for ``batch`` random images."""
    import torch

    from demos.deq_model import DEQClassifier

    torch.manual_seed(seed)
    model = DEQClassifier(1, 28, 10).eval()
    images = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        x = model.injection(images)
    return model.deq.f, x


def deq(method: str, f, x, tol: float, repeats: int, warmup: int) -> dict:
    """Item 2: the layer's solve of z = f(z, x) with compaction, as fixedpoint.torch.deq calls it."""
    import torch

    def g(z, rows):
        return f(z, x if rows.shape[0] == x.shape[0] else x.index_select(0, rows))

    z0 = torch.zeros_like(x)

    def make():
        tmap = TimedMap(g)

        def run():
            with torch.no_grad():
                return fixedpoint.solve(tmap, z0, method=method, tol=tol, max_iter=1000, batch=True, compact=True,
                                        backend="numpy")
        return run, tmap

    return measure(make, repeats, warmup)


def hard_map(n: int, batch: int, seed: int):
    """g(z) = tanh(z W + u) in float32: W symmetric with ‖W‖₂ = 0.99, u ~ 0.01 N(0, 1) per sample."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    W = (A + A.T) / 2
    W = (W * (0.99 / np.abs(np.linalg.eigvalsh(W)).max())).astype(np.float32)
    u = (0.01 * rng.standard_normal((batch, n))).astype(np.float32)

    def g(z, rows=None):
        return np.tanh(z @ W + (u if rows is None else u[rows]))

    return g, np.zeros((batch, n), dtype=np.float32)


def plain_broyden(g, x0, m: int, consistent: bool, growth: float, tol=1e-6, max_iter=300, beta=1.0):
    """Limited-memory good Broyden on one sample, plainly (float32 vectors, float64 small algebra): evaluations,
    restarts, converged.  ``consistent=False``: the library's scheme, H = −βI + Σ u_i v_iᵀ with the oldest term
    dropped; True: H = the good Broyden updates of the last m secant pairs (s_i, y_i) applied to −βI,
    H = −βI + (S + βY) M⁻¹ (−β Sᵀ), M = −β SᵀY − tril₋₁(SᵀS).  A restart (memory cleared, the step β f) when
    ‖f‖ exceeds ``growth`` times its smallest value since the last restart or the update's denominator is 0."""
    x = np.array(x0, dtype=np.float32)
    S: list = []
    Y: list = []
    pairs: list = []

    def H(v, transpose=False):
        if consistent:
            if not S:
                return -beta * v
            Sm, Ym = np.array(S, dtype=np.float64), np.array(Y, dtype=np.float64)
            M = -beta * Sm @ Ym.T - np.tril(Sm @ Sm.T, -1)
            return -beta * v + (Sm + beta * Ym).T @ np.linalg.solve(M, -beta * (Sm @ v))
        out = -beta * v
        for a, b in pairs:
            out = out + (b * (a @ v) if transpose else a * (b @ v))
        return out

    gx = g(x)
    f = (gx - x).astype(np.float64)
    ref, restarts, p = np.linalg.norm(f), 0, beta * f
    for it in range(1, max_iter):
        x_new = (x + p).astype(np.float32)
        gx = g(x_new)
        f_new = (gx - x_new).astype(np.float64)
        r = np.linalg.norm(f_new)
        if r <= tol * (np.linalg.norm(gx) + 1e-12):
            return it + 1, restarts, True
        if not np.isfinite(r):
            return it + 1, restarts, False
        s, y = (x_new - x).astype(np.float64), f_new - f
        hy = H(y)
        ok = r <= growth * ref and abs(s @ hy) > 0
        if ok and consistent:
            S, Y = (S + [s])[-m:], (Y + [y])[-m:]
        elif ok:
            pairs = (pairs + [((s - hy) / (s @ hy), H(s, transpose=True))])[-m:]
        else:
            S, Y, pairs, restarts = [], [], [], restarts + 1
        ref = min(ref, r) if ok else r
        p = -H(f_new) if ok else beta * f_new
        x, f = x_new, f_new
    return max_iter, restarts, False


def small_map():
    """g(x) = tanh(A x) + b, n = 5, ‖A‖₂ = 0.95 (A Gaussian, seed 0), b ~ N(0, 1), float64, and x0 = 0."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    a *= 0.95 / np.linalg.norm(a, 2)
    b = rng.standard_normal(5)
    at = np.ascontiguousarray(a.T)

    def g(x):
        return np.tanh(x @ at) + b

    return g, np.zeros(5)


def small(repeats: int, inner: int) -> dict:
    """Item 4: µs per evaluation and per solve, ours (defaults) against scipy.optimize.broyden1 (interleaved)."""
    import time

    from scipy import optimize

    g, x0 = small_map()
    calls = [0]

    def counted(x):
        calls[0] += 1
        return g(x)

    def ours():
        return fixedpoint.solve(counted, x0, method="broyden", tol=1e-12, stop_mode="abs", max_iter=100)

    def scipy_broyden1():
        return optimize.broyden1(lambda x: counted(x) - x, x0, f_tol=1e-12, tol_norm=lambda v: float(np.linalg.norm(v)),
                                 maxiter=100)

    runs = {"fixedpoint broyden": ours, "scipy.optimize.broyden1": scipy_broyden1}
    times: dict = {k: [] for k in runs}
    evals: dict = {}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(3 * repeats):
        for name, fn in runs.items():
            calls[0] = 0
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t) / inner)
            evals[name] = calls[0] // inner
    out: dict = {}
    for name in runs:
        med = statistics.median(times[name])
        out[name] = dict(n_fev=evals[name], us_per_solve=1e6 * med, us_per_eval=1e6 * med / evals[name],
                         q1_q3_us_per_solve=[1e6 * q for q in statistics.quantiles(times[name], n=4)[::2]])
    ours_r, sp_r = out["fixedpoint broyden"], out["scipy.optimize.broyden1"]
    out["ratio_per_eval"] = ours_r["us_per_eval"] / sp_r["us_per_eval"]
    out["ratio_per_solve"] = ours_r["us_per_solve"] / sp_r["us_per_solve"]
    return out


def hard(n: int, seed: int) -> dict:
    """Item 3: iterations of the library's methods and of the plain limited-memory variants on the hard map."""
    g, x0 = hard_map(n, 10, seed)
    out: dict = {}
    for name, method in (("anderson", fixedpoint.Anderson()), ("broyden (defaults)", fixedpoint.Broyden()),
                         ("broyden restart_growth=10", fixedpoint.Broyden(restart_growth=10.0)),
                         ("broyden m=10", fixedpoint.Broyden(m=10)),
                         ("broyden m=300", fixedpoint.Broyden(m=300))):
        res = fixedpoint.solve(g, x0, method=method, batch=True, tol=1e-6, max_iter=300)
        out[name] = dict(converged=int(np.sum(res.converged)), iterations_mean=float(np.mean(res.n_iter)),
                         iterations_max=int(np.max(res.n_iter)), restarts=int(np.sum(res.n_restarts)))
    for consistent in (False, True):
        for growth in (10.0, 1e3):
            runs = [plain_broyden(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], 20, consistent, growth)
                    for i in range(x0.shape[0])]
            its = np.array([r[0] for r in runs])
            name = f"plain m=20 {'consistent' if consistent else 'drop-oldest'} growth={growth:g}"
            out[name] = dict(converged=sum(r[2] for r in runs), iterations_mean=float(its.mean()),
                             iterations_max=int(its.max()), restarts=sum(r[1] for r in runs))
    return out


COLUMNS = [("method", "method", "{}"), ("n_fev", "iters", "{:d}"), ("n_rows", "rows", "{:d}"),
           ("own_us_per_iter", "own µs/iter", "{:.0f}"), ("own_us_per_row", "own µs/row", "{:.1f}"),
           ("map_us_per_row", "map µs/row", "{:.1f}"), ("vs_anderson", "own/Anderson's (per row)", "{:.2f}"),
           ("iterations_mean", "iters/sample", "{:.1f}"), ("restarts", "restarts", "{:d}")]


def table(rows: dict) -> None:
    base = rows.get("anderson", {}).get("own_us_per_row")
    lines = []
    for method, r in rows.items():
        r["vs_anderson"] = r["own_us_per_row"] / base if base else None
        lines.append(dict(r, method=method))
    timing.print_table(lines, COLUMNS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_broyden", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=timing.positive_int, default=100, help="synthetic: samples (default 100)")
    p.add_argument("--n", type=timing.positive_int, default=37632, help="synthetic: entries per sample "
                   "(default 37632 = 48·28·28)")
    p.add_argument("--iters", type=timing.positive_int, default=40, help="synthetic: iterations (default 40)")
    p.add_argument("--deq-batch", type=timing.positive_int, default=100, help="deq: images (default 100)")
    p.add_argument("--deq-tol", type=timing.positive_float, default=1e-4, help="deq: relative tolerance "
                   "(default 1e-4)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--hard-n", type=timing.positive_int, default=400, help="hard: entries per sample (default 400)")
    p.add_argument("--problems", nargs="+", choices=("synthetic", "deq", "small", "hard"),
                   default=["synthetic", "deq"], help="default: synthetic deq (hard counts iterations only)")
    p.add_argument("--small-inner", type=timing.positive_int, default=50, help="small: solves per timed run "
                   "(default 50)")
    p.add_argument("--repeats", type=timing.positive_int, default=5, help="timed runs (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=timing.positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--label", default="", help="a note stored with the results (e.g. 'before')")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    libs = ("torch",) if "deq" in args.problems else ()
    if libs:
        timing.set_threads("torch", args.threads)
    results: dict = dict(settings=dict(vars(args), out=str(args.out), rho=RHO, dtype="float32", backend="numpy"),
                         machine=timing.machine_info(libs), synthetic={}, deq={}, small={}, hard={})
    env = results["machine"]["thread_env"]
    print(f"threads: {env}" + (f", torch {results['machine'].get('torch_threads')}" if libs else ""))
    if "synthetic" in args.problems:
        print(f"synthetic: B = {args.batch}, n = {args.n}, float32, {args.iters} iterations, "
              f"g(z) = tanh({RHO} shift(z) + u); medians of {args.repeats}")
        for method in args.methods:
            results["synthetic"][method] = synthetic(method, args.batch, args.n, args.iters, args.seed,
                                                     args.repeats, args.warmup)
        table(results["synthetic"])
    if "deq" in args.problems:
        f, x = demo_deq(args.deq_batch, args.seed)
        print(f"deq: demo DEQClassifier(1, 28, 10) at random init, B = {args.deq_batch}, state {tuple(x.shape[1:])}, "
              f"tol {args.deq_tol:g} (rel), compact=True; medians of {args.repeats}")
        for method in args.methods:
            results["deq"][method] = deq(method, f, x, args.deq_tol, args.repeats, args.warmup)
        table(results["deq"])
    if "small" in args.problems:
        print("small: g(x) = tanh(A x) + b, n = 5, ||A||_2 = 0.95, float64, tol 1e-12 (absolute 2-norm); "
              f"medians of {3 * args.repeats} interleaved runs of {args.small_inner} solves")
        results["small"] = s = small(args.repeats, args.small_inner)
        timing.print_table([dict(r, method=k) for k, r in s.items() if isinstance(r, dict)],
                           [("method", "solver", "{}"), ("n_fev", "evaluations", "{:d}"),
                            ("us_per_eval", "µs/evaluation", "{:.1f}"), ("us_per_solve", "µs/solve", "{:.0f}")])
        print(f"ours/SciPy: {s['ratio_per_eval']:.2f} per evaluation, {s['ratio_per_solve']:.2f} per solve")
    if "hard" in args.problems:
        print(f"hard: B = 10, n = {args.hard_n}, g(z) = tanh(W z + u), ||W|| = 0.99, u ~ 0.01 N(0, 1), float32, "
              "tol 1e-6 (rel), cap 300")
        results["hard"] = hard(args.hard_n, args.seed)
        timing.print_table([dict(r, method=k) for k, r in results["hard"].items()],
                           [("method", "method", "{}"), ("converged", "converged /10", "{:d}"),
                            ("iterations_mean", "iters mean", "{:.0f}"), ("iterations_max", "iters max", "{:d}"),
                            ("restarts", "restarts", "{:d}")])
    if args.out:
        print(f"wrote {timing.write_json(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
