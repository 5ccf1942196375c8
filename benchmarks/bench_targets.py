"""The solver-overhead targets of issue 13, measured side by side in one process.

1. **Torch backend at NumPy's efficiency**: Anderson's own work per iteration (the
   history driven directly, as in bench_overhead.py: f = g − x, push, extrapolate;
   no map) on the same data held as NumPy arrays and as PyTorch CPU tensors,
   batch B = 32 of n = 65536 float32 (target: torch ≤ 1.3 × NumPy), and at
   B = 3906 × 256 and B = 1 × 1e6 for reference.
2. **Many small samples**: on the DEQ-like tanh layer with 3906 samples of 256
   (float32, batch mode), the time per Anderson iteration minus the time of one
   evaluation of g alone (target: ≤ 0.7 × g), and, since g inside a solve runs
   with caches the solver's own traffic has evicted, also Anderson's extra time
   over a forward iteration relative to that forward iteration.  Times per
   iteration of a solve are the difference between solves of 2N and N
   iterations, over N: the set-up cancels.
3. **Tiny problems**: time per iteration of Anderson and of forward iteration on the
   Poisson–Jacobi sweep with n = 100, iterations 300 to 600 (far from converged:
   no stagnation at rounding level; target: Anderson ≤ 1.6 × forward).

Timing: ``time.process_time`` (the CPU time of this process, which runs on one
thread: on an idle machine the wall time; on a shared one it leaves out the time
other processes held the core) around blocks of iterations, the configurations of a
target interleaved over ``--repeats`` rounds, medians reported with [min, max].
Threads: pin them (``OMP_NUM_THREADS=1`` etc.); torch is set to ``--threads``
(default 1).

Run from the repository root::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python -m benchmarks.bench_targets --out benchmarks/results/targets.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import fixedpoint
from fixedpoint import Anderson, problems
from fixedpoint.backend import resolve_namespace
from fixedpoint.kernels import Kernels
from tooling import timing

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _summary(times):
    return dict(median=statistics.median(times), min=min(times), max=max(times))


class HistoryLoop:
    """Anderson's own work per iteration on fixed (B, n) data in one library (no map)."""

    def __init__(self, lib, B, n, dtype="float32", m=5):
        xp = resolve_namespace(lib)
        self.kern = kern = Kernels(xp, "cpu" if lib == "numpy" else xp.empty(0).device)
        rng = np.random.default_rng(0)
        dt = getattr(xp, dtype)
        self.x = xp.asarray(rng.standard_normal((B, n)), dtype=dt)
        self.gx = xp.asarray(rng.standard_normal((B, n)), dtype=dt)
        self.out = xp.empty_like(self.x)
        self.h = Anderson(m=m).init(kern, B, n, dt)
        self.active = kern.sxp.ones((B,), dtype=kern.sxp.bool, device=kern.sdevice)
        self.run(m + 2)

    def run(self, count):
        h, kern = self.h, self.kern
        with kern.solver_context():
            for _ in range(count):
                f = h.residual_buffer()
                kern.sub(f, self.gx, self.x)
                h.push(self.gx, f, gnorm=True)
                h.extrapolate(self.active, self.out)


def target_torch_vs_numpy(repeats, shapes):
    rows = []
    for B, n in shapes:
        loops = {lib: HistoryLoop(lib, B, n) for lib in ("numpy", "torch")}
        count = max(2, int(2e7 // (B * n)))
        times = {lib: [] for lib in loops}
        for _ in range(repeats):
            for lib, loop in loops.items():
                t0 = time.process_time()
                loop.run(count)
                times[lib].append((time.process_time() - t0) / count)
        np_t, th_t = _summary(times["numpy"]), _summary(times["torch"])
        rows.append(dict(B=B, n=n, numpy_ms=1e3 * np_t["median"], torch_ms=1e3 * th_t["median"],
                         numpy=np_t, torch=th_t, ratio=th_t["median"] / np_t["median"]))
        print(f"  torch vs numpy, B={B} n={n}: {1e3 * np_t['median']:.3f} / {1e3 * th_t['median']:.3f} ms "
              f"-> {rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
    return rows


def _solve_time(g, x0, count, **opts):
    """Seconds per iteration of a solve: the time of ``2 count`` iterations minus that of ``count``, over
    ``count`` (so the set-up of the solve, its allocations and first, shorter windows cancel out)."""
    times = []
    for k in (count, 2 * count):
        t0 = time.process_time()
        fixedpoint.solve(g, x0, tol=1e-30, max_iter=k, divtol=None, **opts)
        times.append(time.process_time() - t0)
    return (times[1] - times[0]) / count


def target_many_samples(repeats):
    p = problems.tanh_layer(d=256, batch=3906, rho=0.95, dtype="float32")
    fixedpoint.solve(p.g, p.x0, batch=True, max_iter=3)
    z = fixedpoint.solve(p.g, p.x0, batch=True, method="forward", max_iter=5).x  # a point like the iterates
    t_g, t_aa, t_fw = [], [], []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(5):
            p.g(z)
        t_g.append((time.process_time() - t0) / 5)
        t_aa.append(_solve_time(p.g, p.x0, 20, batch=True))
        t_fw.append(_solve_time(p.g, p.x0, 20, batch=True, method="forward"))
    g, aa, fw = statistics.median(t_g), statistics.median(t_aa), statistics.median(t_fw)
    row = dict(B=3906, n=256, g_ms=1e3 * g, anderson_iter_ms=1e3 * aa, forward_iter_ms=1e3 * fw,
               anderson_own_ms=1e3 * (aa - g), ratio_own_to_g=(aa - g) / g,
               anderson_extra_ms=1e3 * (aa - fw), ratio_extra_to_forward=(aa - fw) / fw, g=_summary(t_g),
               anderson=_summary(t_aa), forward=_summary(t_fw))
    print(f"  many samples: g {row['g_ms']:.2f} ms alone, forward {row['forward_iter_ms']:.2f} and Anderson "
          f"{row['anderson_iter_ms']:.2f} ms per iteration -> own work {row['ratio_own_to_g']:.2f} x g, extra over "
          f"forward {row['ratio_extra_to_forward']:.2f} x a forward iteration", file=sys.stderr, flush=True)
    return row


def target_tiny(repeats):
    p = problems.poisson_jacobi(100)  # unshifted: far from converged after 600 iterations, so no stagnation phase
    times = {"forward": [], "anderson": [], "broyden": []}
    for _ in range(repeats):
        for method in times:
            times[method].append(_solve_time(p.g, p.x0, 300, method=method))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = dict(n=100, **{f"{k}_us": 1e6 * v for k, v in med.items()}, ratio=med["anderson"] / med["forward"],
               **{k: _summary(v) for k, v in times.items()})
    print(f"  tiny: forward {row['forward_us']:.1f} us, Anderson {row['anderson_us']:.1f} us -> "
          f"{row['ratio']:.2f}", file=sys.stderr, flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_targets", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds per target")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=str(RESULTS_DIR / "targets.json"), help="JSON output path")
    args = ap.parse_args(argv)
    timing.set_threads("torch", args.threads)
    shapes = [(32, 65536), (3906, 256), (1, 1_000_000)]
    torch_rows = target_torch_vs_numpy(args.repeats, shapes)
    many = target_many_samples(args.repeats)
    tiny = target_tiny(args.repeats)
    print("\nissue 13 targets (medians of interleaved rounds)\n")
    timing.print_table(torch_rows, [("B", "B", "{}"), ("n", "n", "{}"), ("numpy_ms", "NumPy ms/iter", "{:.3f}"),
                                    ("torch_ms", "torch ms/iter", "{:.3f}"), ("ratio", "torch/NumPy", "{:.2f}")])
    print(f"\n1. torch / NumPy at B=32 n=65536 float32: {torch_rows[0]['ratio']:.2f} (target <= 1.3)")
    print(f"2. Anderson's own work / g, tanh 3906 x 256: {many['ratio_own_to_g']:.2f} (target <= 0.7; g alone "
          f"{many['g_ms']:.2f} ms, Anderson iteration {many['anderson_iter_ms']:.2f} ms); Anderson's extra over a "
          f"forward iteration (g inside the loop): {many['ratio_extra_to_forward']:.2f} x "
          f"({many['anderson_extra_ms']:.2f} ms over {many['forward_iter_ms']:.2f} ms)")
    print(f"3. Anderson / forward per iteration at n = 100: {tiny['ratio']:.2f} (target <= 1.6; "
          f"{tiny['anderson_us']:.1f} vs {tiny['forward_us']:.1f} us)")
    path = timing.write_json(args.out, dict(benchmark="bench_targets",
                                            command=timing.run_command("benchmarks.bench_targets"),
                                            machine=timing.machine_info({"torch"}), threads=args.threads,
                                            repeats=args.repeats, torch_vs_numpy=torch_rows, many_samples=many,
                                            tiny=tiny))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
