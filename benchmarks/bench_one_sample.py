"""Why one sample has its own loop: time per iteration of the one-sample path against the batch loop at B = 1.

The driver loop (:mod:`fixedpoint.iteration`) runs a sample solved alone, with its small state on
the host, in a loop that keeps the per-sample bookkeeping in Python floats (``_run_one``); every
other solve runs the batch loop on one-element arrays.  Both give the same iterates to the bit
(tests/test_packing.py).  This measures what the separate path saves on the tiny problem of the
speed bars (Poisson–Jacobi, n = 100): the time per iteration as the difference of solves of 600 and
300 iterations over 300 (set-up cancels), CPU time, medians of ``--repeats`` interleaved rounds,
for both loops and each method.  The batch loop is forced by pointing ``_run_one`` at it.

Run from the repository root::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python -m benchmarks.bench_one_sample --out benchmarks/results/one_sample.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import fixedpoint
from fixedpoint import iteration, problems
from tooling import timing

METHODS = ("forward", "anderson", "broyden")


def per_iteration_us(method: str) -> float:
    p = problems.poisson_jacobi(100)
    times = []
    for k in (300, 600):
        t0 = time.process_time()
        fixedpoint.solve(p.g, p.x0, tol=1e-30, max_iter=k, divtol=None, method=method)
        times.append(time.process_time() - t0)
    return 1e6 * (times[1] - times[0]) / 300


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_one_sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    one_sample = iteration._Loop._run_one
    rounds: dict[str, dict[str, list[float]]] = {m: {"one_sample": [], "batch_loop": []} for m in METHODS}
    try:
        for _ in range(args.repeats):
            for method in METHODS:
                iteration._Loop._run_one = one_sample  # type: ignore[method-assign]
                rounds[method]["one_sample"].append(per_iteration_us(method))
                iteration._Loop._run_one = iteration._Loop._run_batch  # type: ignore[method-assign]
                rounds[method]["batch_loop"].append(per_iteration_us(method))
    finally:
        iteration._Loop._run_one = one_sample  # type: ignore[method-assign]
    res = dict(machine=timing.machine_info(()), repeats=args.repeats, methods={})
    for method, r in rounds.items():
        a, b = statistics.median(r["one_sample"]), statistics.median(r["batch_loop"])
        res["methods"][method] = dict(one_sample_us=a, batch_loop_us=b, ratio=b / a, rounds=r)
        print(f"{method:9s} one-sample path {a:6.1f} us, batch loop at B = 1 {b:6.1f} us per iteration: {b / a:.2f}x")
    if args.out:
        print(f"wrote {timing.write_json(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
