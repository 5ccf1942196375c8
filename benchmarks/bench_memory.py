"""Peak memory of one solve, in vectors of size n, for forward iteration, Anderson and Broyden.

What is measured: the peak of the memory in use during ``fixedpoint.solve`` minus
the memory in use just before it (x0 and the map already exist), divided by the
size of one vector (n · itemsize).  That counts everything the solve allocates:
the method's buffers, the loop's iterates and best iterate, the arrays ``g``
returns, and any temporary of size n.  The map is the Poisson–Jacobi sweep written
so that it allocates exactly one vector per call (its result): so one vector of the
count is g's own output and the rest is the solver's.

- NumPy: ``tracemalloc`` (NumPy reports its allocations to it);
- PyTorch CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
- CuPy: the default memory pool's ``used_bytes`` sampled by the callback after every
  iteration (CuPy has no peak counter; a temporary freed within an iteration is missed).
- PyTorch CPU has no allocation counter: not measured.

Targets (issues 10 and 13): forward iteration <= 4 vectors, Anderson <= 2m + 4,
Broyden <= 2m + 10 (with m its own window).  A target counts as met within
``SLACK`` (0.05) vectors: the O(1) state that is not a vector of size n (the
per-sample small state, and the 2**16-element block in which forward iteration
forms its residual norm) adds a few hundred kilobytes.  Broyden in its compact
form holds 2m + 3 vectors of its own (the m secant pairs, x_{k-1}, f_k and
f_{k-1}) and measures 2m + 7 here, g's output and the loop's vectors included
(the product form it replaced measured 2m + 8).

Run from the repository root, e.g.::

    python -m benchmarks.bench_memory --n 1e7 --iters 80
    python -m benchmarks.bench_memory --backend torch:cuda:0 --n 1e8 --dtype float32
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path

import numpy as np

import fixedpoint
from tooling import timing

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Vectors of size n by which a measurement may exceed its target (see the module docstring).
SLACK = 0.05


def one_vector_map(xp, n, dtype, device):
    """Jacobi sweep for −u'' = 1 (zero ends) that allocates only its result: g(u)_i = (u_{i−1} + u_{i+1} + h²)/2."""
    h2 = 1.0 / (n + 1) ** 2

    def g(u):
        out = xp.full(u.shape, h2, dtype=u.dtype, device=device)
        out[1:] += u[:-1]
        out[:-1] += u[1:]
        out *= 0.5
        return out

    return g


def measure(lib, device, dtype_name, n, method, iters):
    """Peak growth, in vectors of size n, of one solve of ``iters`` iterations; None where it cannot be measured."""
    xp, dev, sync = timing.setup_backend(lib, device)
    dtype = getattr(xp, dtype_name)
    itemsize = np.dtype(dtype_name).itemsize
    g = one_vector_map(xp, n, dtype, dev)
    x0 = xp.zeros((n,), dtype=dtype, device=dev)
    opts = dict(method=method, tol=1e-300, max_iter=iters, stop_mode="abs")
    fixedpoint.solve(g, x0, **dict(opts, max_iter=3))  # warm-up: lazy imports and library caches
    if lib == "numpy":
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            fixedpoint.solve(g, x0, **opts)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return (peak - base) / (n * itemsize)
    if lib == "torch" and dev.type == "cuda":
        import torch

        sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fixedpoint.solve(g, x0, **opts)
        sync()
        return (torch.cuda.max_memory_allocated(dev) - base) / (n * itemsize)
    if lib == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        sync()
        base, seen = pool.used_bytes(), [0]

        def sample(info):
            seen[0] = max(seen[0], pool.used_bytes())

        fixedpoint.solve(g, x0, callback=sample, **opts)
        return (seen[0] - base) / (n * itemsize)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", default="numpy", help="numpy, torch:cuda:0 or cupy (PyTorch CPU: not measurable)")
    ap.add_argument("--n", type=float, default=1e7, help="vector length")
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--iters", type=int, default=80, help="iterations per solve")
    ap.add_argument("--m", type=int, nargs="+", default=[5, 20], help="windows of Anderson and Broyden")
    ap.add_argument("--out", default=str(RESULTS_DIR / "memory.json"), help="JSON output path")
    args = ap.parse_args(argv)
    timing.refuse_unusable(ap, args.backend, f"--backend {args.backend}")
    lib, device = timing.parse_backend(args.backend)
    n = int(args.n)
    methods = [("forward", fixedpoint.ForwardIteration(), 4)]
    for m in args.m:
        methods += [(f"anderson m={m}", fixedpoint.Anderson(m=m), 2 * m + 4),
                    (f"broyden m={m}", fixedpoint.Broyden(m=m), 2 * m + 10)]
    rows = []
    for name, method, target in methods:
        vectors = measure(lib, device, args.dtype, n, method, args.iters)
        rows.append(dict(method=name, vectors=vectors, target=target,
                         meets_target=None if vectors is None else bool(vectors <= target + SLACK)))
        print(f"  {name:16s} {vectors if vectors is None else round(vectors, 2)} vectors (target <= {target})",
              file=sys.stderr, flush=True)
    print(f"\nPeak memory of one solve ({lib} on {device}, {args.dtype}, n = {n:.0e}, {args.iters} iterations),\n"
          f"in vectors of size n; g allocates one vector per call (counted)\n")
    timing.print_table(rows, [("method", "method", "{}"), ("vectors", "vectors", "{:.3f}"),
                              ("target", "target <=", "{}"), ("meets_target", "meets", "{}")])
    path = timing.write_json(args.out, dict(
        benchmark="bench_memory", command=timing.run_command("benchmarks.bench_memory"),
        machine=timing.machine_info({lib}),
        backend=lib, device=device, dtype=args.dtype, n=n, iters=args.iters, rows=rows))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
