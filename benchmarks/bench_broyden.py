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

Two problems:

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
   layer solves it (:func:`fixedpoint.torch.deq` calls ``fixedpoint.solve`` on CPU tensors
   with ``backend="numpy"``): ``solve(g, zeros, method, batch=True, compact=True)``
   with g(z, rows) = f(z, x[rows]), relative tolerance ``--deq-tol`` (default 1e-4: the
   randomly initialised cell is strongly contractive, and the demo's 1e-2 would stop
   every method within a few iterations), cap 1000.  Samples stop at different
   iterations, so the rows (and the pairs in use) shrink as the solve goes on.

Run from the repository root::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python benchmarks/bench_broyden.py --out benchmarks/results/broyden.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before NumPy is imported
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

if __package__ in (None, ""):  # run as a file: make the repository root (tooling/, demos/) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fixedpoint  # noqa: E402
from tooling import timing  # noqa: E402

METHODS = ("forward", "anderson", "broyden")
RHO = 0.999


class TimedMap:
    """A map that adds the seconds spent in it to ``seconds`` (NumPy and torch CPU: no synchronisation)."""

    def __init__(self, g):
        self.g, self.seconds = g, 0.0

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self.g(*args)
        finally:
            self.seconds += time.perf_counter() - t0


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=timing.positive_int, default=100, help="synthetic: samples (default 100)")
    p.add_argument("--n", type=timing.positive_int, default=37632, help="synthetic: entries per sample "
                   "(default 37632 = 48·28·28)")
    p.add_argument("--iters", type=timing.positive_int, default=40, help="synthetic: iterations (default 40)")
    p.add_argument("--deq-batch", type=timing.positive_int, default=100, help="deq: images (default 100)")
    p.add_argument("--deq-tol", type=timing.positive_float, default=1e-4, help="deq: relative tolerance "
                   "(default 1e-4)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--problems", nargs="+", choices=("synthetic", "deq"), default=["synthetic", "deq"])
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
                         machine=timing.machine_info(libs), synthetic={}, deq={})
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
    if args.out:
        print(f"wrote {timing.write_json(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
