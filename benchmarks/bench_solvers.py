"""Forward iteration, Anderson and Broyden on the built-in problems: evaluations of g, time and memory to tolerance.

For every backend and problem, the three methods solve to ``tol=1e-8`` (relative
residual, float64, default options: AA with m=5, beta=1, lam=1e-5 relative; Broyden
with m=20).  With NumPy, one more untimed run of each measures the peak memory of
the solve above what was in use before it (tracemalloc), in vectors of the problem's
size (g's own temporaries included).
Reported per solve: status, n_fev (calls of g), final residual, error against the
problem's reference solution where it has one, wall time of the whole
``fixedpoint.solve`` call (median and min/max over ``--repeats`` runs after one
warm-up run each; the two methods' runs alternate, and the device is
synchronised around each) and time per iteration; per problem, the ratios
forward/AA and forward/Broyden of n_fev and of time (of the medians and of the minima).  A ratio is
marked ">=" when forward iteration stopped at max_iter (Poisson-Jacobi: forward
needs far more than the bound), so the true ratio is larger.

Problems: Chandrasekhar H-equation n=500 with c=0.9 and c=0.99; linear
contraction n=1000, rho=0.95; tanh layer d=256, batch=64 (batch=True);
1-D Poisson Jacobi sweep n=1000 (max_iter bounded by --poisson-max-iter).

Run from the repository root (on a small shared VM, pin the BLAS/OpenMP pools to
one thread, e.g. ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1``;
see docs/benchmarks.md):

    python -m benchmarks.bench_solvers                       # every usable backend
    python -m benchmarks.bench_solvers --backends numpy torch --repeats 5 \\
        --out benchmarks/results/solvers_cpu.json
    python -m benchmarks.bench_solvers --backends torch:cuda:0 cupy   # on a GPU machine
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path

import numpy as np

import fixedpoint
from fixedpoint.interop import to_numpy
from fixedpoint.problems import chandrasekhar, linear_contraction, poisson_jacobi, tanh_layer
from tooling import timing

RESULTS_DIR = Path(__file__).resolve().parent / "results"

TOL = 1e-8
MAX_ITER = 10_000

#: (name, constructor taking backend/dtype/device, batch mode, bounded max_iter or None)
PROBLEMS = [
    ("chandrasekhar n=500 c=0.9", lambda **kw: chandrasekhar(500, 0.9, **kw), False, None),
    ("chandrasekhar n=500 c=0.99", lambda **kw: chandrasekhar(500, 0.99, **kw), False, None),
    ("linear n=1000 rho=0.95", lambda **kw: linear_contraction(1000, 0.95, **kw), False, None),
    ("tanh d=256 batch=64", lambda **kw: tanh_layer(256, 64, **kw), True, None),
    ("poisson-jacobi n=1000", lambda **kw: poisson_jacobi(1000, **kw), False, "poisson"),
]


def rel_error(x, solution):
    if solution is None:
        return None
    x, s = to_numpy(x).astype(np.float64), to_numpy(solution).astype(np.float64)
    return float(np.max(np.abs(x - s)) / np.max(np.abs(s)))


METHODS = ("forward", "anderson", "broyden")


def peak_vectors(solve, n, itemsize):
    """Peak memory of one ``solve()`` above what was in use before it, in vectors of n values (tracemalloc: NumPy)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        solve()
        return (tracemalloc.get_traced_memory()[1] - base) / (n * itemsize)
    finally:
        tracemalloc.stop()


def bench_one(spec, args):
    lib, dev = timing.parse_backend(spec)
    xp, device, sync = timing.setup_backend(lib, dev)
    timing.set_threads(lib, args.threads)
    runs = []
    for name, make, batch, bounded in PROBLEMS:
        p = make(backend=lib, dtype=xp.float64, device=device)
        max_iter = args.poisson_max_iter if bounded == "poisson" else MAX_ITER
        solves = {method: (lambda method=method, p=p, max_iter=max_iter, batch=batch: fixedpoint.solve(
                      p.g, p.x0, method=method, tol=TOL, max_iter=max_iter, batch=batch))
                  for method in METHODS}
        last = {method: fn() for method, fn in solves.items()}  # warm-up
        times: dict[str, list[float]] = {method: [] for method in solves}
        for _ in range(args.repeats):  # the methods alternate, so a slow spell hits them all
            for method, fn in solves.items():
                t = timing.timed(fn, repeats=1, warmup=0, sync=sync)
                times[method].append(t["median"])
                last[method] = t["last"]
        size = int(np.prod(p.x0.shape))
        for method, res in last.items():
            t = timing.summarize(times[method])
            memory = peak_vectors(solves[method], size, 8) if lib == "numpy" else None
            runs.append(dict(
                backend=spec, problem=name, method=method, status=res.status, n_fev=res.n_fev, max_iter=max_iter,
                residual=float(np.max(res.residual)), rel_error=rel_error(res.x, p.solution),
                n_restarts=int(np.sum(res.n_restarts)), time_s=t, peak_vectors=memory,
                ms_per_iter=1e3 * t["median"] / res.n_fev, solver_wall_time_s=res.wall_time))
            print(f"  {spec:12s} {name:28s} {method:8s} {res.status:9s} n_fev={res.n_fev:6d} "
                  f"time={1e3 * t['median']:9.2f} ms", file=sys.stderr, flush=True)
    return runs


def ratios(runs):
    """Per backend and problem: forward iteration over each accelerated method (evaluations and time)."""
    out = []
    for i in range(0, len(runs), len(METHODS)):
        by = {r["method"]: r for r in runs[i:i + len(METHODS)]}
        fw = by["forward"]
        for method in METHODS[1:]:
            acc = by[method]
            fw_ok, acc_ok = fw["status"] == "converged", acc["status"] == "converged"
            row = dict(backend=acc["backend"], problem=acc["problem"], method=method,
                       bound=">=" if acc_ok and not fw_ok else "<=" if fw_ok and not acc_ok else "",
                       fev_ratio=None, time_ratio=None)
            if acc_ok or fw_ok:  # neither converged: no ratio to tolerance
                row.update(fev_ratio=fw["n_fev"] / acc["n_fev"],
                           time_ratio=fw["time_s"]["median"] / acc["time_s"]["median"],
                           time_ratio_min=fw["time_s"]["min"] / acc["time_s"]["min"])
            out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_solvers", description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=None,
                    help="numpy, torch, torch:cuda:0, cupy, cupy:cuda:0 (default: every usable one)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per solve, after one warm-up run (default 5)")
    ap.add_argument("--poisson-max-iter", type=int, default=20_000, help="max_iter of the Poisson-Jacobi solves")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "solvers.json"), help="JSON output path")
    args = ap.parse_args(argv)
    specs = args.backends or timing.usable_backends()
    runs = [r for spec in specs for r in bench_one(spec, args)]
    rat = ratios(runs)

    print(f"\nSolves to tol={TOL:g} (relative), float64; time = median of {args.repeats} runs [min, max]\n")
    for r in runs:
        t = r["time_s"]
        r["_t"], r["_range"] = 1e3 * t["median"], f"[{1e3 * t['min']:.2f}, {1e3 * t['max']:.2f}]"
    timing.print_table(runs, [
        ("backend", "backend", "{}"), ("problem", "problem", "{}"), ("method", "method", "{}"),
        ("status", "status", "{}"), ("n_fev", "n_fev", "{}"), ("residual", "residual", "{:.2e}"),
        ("rel_error", "rel. error", "{:.1e}"), ("_t", "time ms", "{:.2f}"), ("_range", "[min, max] ms", "{}"),
        ("ms_per_iter", "ms/iter", "{:.4f}"), ("peak_vectors", "peak (vectors)", "{:.1f}")])
    print("\nForward iteration / each method (>= : forward hit max_iter, the true ratio is larger; - : neither "
          "converged)\n")
    for r in rat:
        if r["fev_ratio"] is not None:
            r["_fev"], r["_time"] = f"{r['bound']}{r['fev_ratio']:.2f}", f"{r['bound']}{r['time_ratio']:.2f}"
            r["_tmin"] = f"{r['bound']}{r['time_ratio_min']:.2f}"
    timing.print_table(rat, [("backend", "backend", "{}"), ("problem", "problem", "{}"), ("method", "method", "{}"),
                             ("_fev", "n_fev ratio", "{}"), ("_time", "time ratio (medians)", "{}"),
                             ("_tmin", "time ratio (minima)", "{}")])
    for r in runs + rat:
        for k in [k for k in r if k.startswith("_")]:
            del r[k]

    libs = {timing.parse_backend(s)[0] for s in specs}
    path = timing.write_json(args.out, dict(
        benchmark="bench_solvers", command=timing.run_command("benchmarks.bench_solvers"),
        machine=timing.machine_info(libs),
        settings=dict(tol=TOL, stop_mode="rel", dtype="float64", max_iter=MAX_ITER,
                      poisson_max_iter=args.poisson_max_iter, repeats=args.repeats, warmup=1, threads=args.threads,
                      anderson=fixedpoint.Anderson().options(), broyden=fixedpoint.Broyden().options()),
        runs=runs, ratios=rat))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
