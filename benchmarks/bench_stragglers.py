"""What a batch costs once most of its samples have stopped: the solve loop on the active rows only.

Two measurements, NumPy, float32, medians of ``--repeats`` runs after one warm-up run; pin
the BLAS threads to one (below; the machine record in the JSON says what was set):

1. **Stragglers** — B = 2,000 samples of n = 256, g_i(z) = tanh(s_i · W z + u_i), W symmetric
   with eigenvalues evenly spread over [−0.5, 1] (so ‖W‖₂ = 1 and forward iteration converges at a
   rate close to s_i on the slow samples):
   1,996 easy samples (s_i = 0.3, u_i ~ N(0, 1)) and 4 slow ones (s_i = 0.92, 0.95, 0.96, 0.97,
   u_i ~ 0.01 N(0, 1), so that tanh is nearly linear and the rate is close to s_i), tolerance 1e-6
   (relative).  Total time of one ``solve(..., batch=True)`` with ``compact=False`` and
   ``compact=True``, against the ideal: the 1,996 easy samples solved alone plus the 4 slow ones
   solved alone.  Target: compact=True ≤ 1.3 × ideal for forward iteration, Anderson and Broyden.
2. **DEQ-sized** — B = 100 samples of n = 37,632 (a 48×28×28 DEQ state), g_i(z) = 0.2 tanh(z) +
   u_i for 99 samples (converged in a few iterations) and g_i(z) = roll(z) + u_i for one (a
   permutation: it never converges nor diverges, for every method), ``compact=True``, tolerance
   1e-6: the time per iteration once only that sample is left, from two solves capped at K₁ and
   K₂ iterations (both past the point where the others stopped): (T(K₂) − T(K₁)) / (K₂ − K₁),
   against the same for that sample solved alone (B = 1).  Target: ≤ 1.5.

g's rows are matrix products here, whose rounding depends on how many rows there are, so the
batch's answers match the samples solved alone only to the tolerance; tests/test_packing.py checks
the bitwise guarantee on maps whose rows do not depend on the batch.

Run from the repository root::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python -m benchmarks.bench_stragglers --out benchmarks/results/stragglers.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import fixedpoint
from tooling import timing

METHODS = ("forward", "anderson", "broyden")
SLOW_RATES = (0.92, 0.95, 0.96, 0.97)


def straggler_problem(batch: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(W, s, u, slow): the map's matrix (‖W‖₂ = 1), per-sample scales and offsets, and the slow samples' rows."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    W = ((Q * np.linspace(-0.5, 1.0, n)) @ Q.T).astype(np.float32)
    s = np.full((batch, 1), 0.3, dtype=np.float32)
    u = rng.standard_normal((batch, n)).astype(np.float32)
    slow = np.linspace(0, batch - 1, len(SLOW_RATES)).astype(int)[::-1]  # spread over the batch
    s[slow, 0] = SLOW_RATES
    u[slow] *= 0.01
    return W, s, u, np.sort(slow)


def straggler_solve(method: str, W: np.ndarray, s: np.ndarray, u: np.ndarray, compact: bool) -> Any:
    """One solve of the stragglers batch (``s``, ``u`` select the samples)."""
    WT = np.ascontiguousarray(W.T)

    def g(z, rows=None):
        if rows is None:
            return np.tanh(s * (z @ WT) + u)
        return np.tanh(s[rows] * (z @ WT) + u[rows])

    return fixedpoint.solve(g, np.zeros_like(u), method=method, batch=True, compact=compact, tol=1e-6,
                            max_iter=2000)


def median_time(fn, repeats: int) -> tuple[float, Any]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up run; and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def stragglers(method: str, batch: int, n: int, repeats: int) -> dict:
    """Measurement 1 for one method."""
    W, s, u, slow = straggler_problem(batch, n)
    easy = np.setdiff1d(np.arange(batch), slow)
    t_off, r_off = median_time(lambda: straggler_solve(method, W, s, u, False), repeats)
    t_on, r_on = median_time(lambda: straggler_solve(method, W, s, u, True), repeats)
    t_easy, r_easy = median_time(lambda: straggler_solve(method, W, s[easy], u[easy], True), repeats)
    t_slow, r_slow = median_time(lambda: straggler_solve(method, W, s[slow], u[slow], True), repeats)
    ideal = t_easy + t_slow
    return dict(compact_false_ms=1e3 * t_off, compact_true_ms=1e3 * t_on, easy_alone_ms=1e3 * t_easy,
                slow_alone_ms=1e3 * t_slow, ideal_ms=1e3 * ideal, ratio=t_on / ideal,
                converged=bool(np.all(r_on.converged) and np.all(r_off.converged)),
                easy_iterations_max=int(np.max(r_easy.n_iter)), slow_iterations=np.asarray(r_slow.n_iter).tolist(),
                slow_iterations_in_batch=np.asarray(r_on.n_iter)[slow].tolist(),
                max_x_difference_compact=float(np.abs(r_on.x - r_off.x).max()))


def deq_sized(method: str, batch: int, n: int, repeats: int, k1: int, k2: int) -> dict:
    """Measurement 2 for one method."""
    rng = np.random.default_rng(1)
    u = rng.standard_normal((batch, n)).astype(np.float32)
    slow = np.zeros(batch, dtype=bool)
    slow[batch // 2] = True

    def solve(rows_u, rows_slow, cap):
        def g(z, rows):
            y = 0.2 * np.tanh(z) + rows_u[rows]
            for i in np.nonzero(rows_slow[rows])[0]:  # never converges, never diverges: z_i -> roll(z_i) + u_i
                y[i] = np.roll(z[i], 1) + rows_u[rows[i]]
            return y

        return fixedpoint.solve(g, np.zeros_like(rows_u), method=method, batch=True, compact=True, tol=1e-6,
                                divtol=None, max_iter=cap)

    one = slice(batch // 2, batch // 2 + 1)
    per_iter = {}
    for name, uu, ss in (("batch", u, slow), ("alone", u[one], slow[one])):
        t1, r1 = median_time(lambda uu=uu, ss=ss: solve(uu, ss, k1), repeats)
        t2, r2 = median_time(lambda uu=uu, ss=ss: solve(uu, ss, k2), repeats)
        per_iter[name] = (t2 - t1) / (k2 - k1)
        assert int(np.sum(r1.converged)) == uu.shape[0] - 1 and r2.n_iter[np.nonzero(ss)[0][0]] == k2
    return dict(batch_ms_per_iteration=1e3 * per_iter["batch"], alone_ms_per_iteration=1e3 * per_iter["alone"],
                ratio=per_iter["batch"] / per_iter["alone"], k1=k1, k2=k2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_stragglers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2000, help="stragglers batch size (default 2000)")
    p.add_argument("--n", type=int, default=256, help="stragglers sample length (default 256)")
    p.add_argument("--deq-batch", type=int, default=100, help="DEQ-sized batch (default 100)")
    p.add_argument("--deq-n", type=int, default=37632, help="DEQ-sized sample length (default 37632)")
    p.add_argument("--k1", type=int, default=50, help="DEQ-sized: first iteration cap (default 50)")
    p.add_argument("--k2", type=int, default=450, help="DEQ-sized: second iteration cap (default 450)")
    p.add_argument("--parts", nargs="+", default=["stragglers", "deq"], choices=["stragglers", "deq"],
                   help="which measurements (default both)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    results: dict[str, Any] = dict(settings=vars(args) | {"out": str(args.out)}, machine=timing.machine_info(()),
                                   stragglers={}, deq_sized={})
    print(f"1. stragglers: B = {args.batch} x n = {args.n}, 4 slow samples; target compact=True <= 1.3 x ideal")
    for method in args.methods if "stragglers" in args.parts else ():
        r = results["stragglers"][method] = stragglers(method, args.batch, args.n, args.repeats)
        print(f"   {method:9s} compact=False {r['compact_false_ms']:8.1f} ms, compact=True {r['compact_true_ms']:7.1f}"
              f" ms, easy alone + slow alone {r['easy_alone_ms']:6.1f} + {r['slow_alone_ms']:6.1f} ms: "
              f"ratio {r['ratio']:.2f} (iterations: easy <= {r['easy_iterations_max']}, slow "
              f"{r['slow_iterations']})", flush=True)
    print(f"2. DEQ-sized: B = {args.deq_batch} x n = {args.deq_n}, one sample left; target <= 1.5 x alone")
    for method in args.methods if "deq" in args.parts else ():
        r = results["deq_sized"][method] = deq_sized(method, args.deq_batch, args.deq_n, args.repeats, args.k1,
                                                     args.k2)
        print(f"   {method:9s} {r['batch_ms_per_iteration']:.3f} ms per iteration in the batch, "
              f"{r['alone_ms_per_iteration']:.3f} ms alone: ratio {r['ratio']:.2f}", flush=True)
    if args.out:
        print(f"wrote {timing.write_json(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
