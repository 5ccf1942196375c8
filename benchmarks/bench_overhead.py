"""Anderson acceleration's own cost per iteration versus vector length n and window m, with no map g.

Drives :class:`fixedpoint.AndersonHistory` directly (B=1, beta=1, lam=1e-5
relative, the library's default safeguards) on preallocated gx, x, out arrays.
One iteration is exactly what the solver loop does with the history:

    f = h.residual_buffer(); kern.sub(f, gx, x); h.push(gx, f); h.extrapolate(active, out)

(the loop's own residual norm, best-iterate copy and stopping test are not
included).  gx and x stay fixed, so every residual is the same vector; the work
per iteration does not depend on the values (the weights are computed without
branches), and the run checks that no safeguard restart happened.

Timing: for each n, one history per window m is built and given at least m+2
warm-up iterations (window full).  Then ``--repeats`` rounds go over the
windows in turn, each timing a block of K iterations between device
synchronisations (K chosen so that a block moves about 2 GB by the model below,
1 <= K <= 200), so that a slow spell of a shared machine spoils one round of
several windows rather than every repeat of one.  Per-iteration time: median
(and min, max) over the rounds, divided by K.  The weights alone (h.weights:
the m x m solve of the normal equations and safeguards, no O(n) work) are timed apart.

Bytes-moved model for beta=1, per iteration: (2m + 6) n itemsize
  sub f = gx - x (read 2n, write n), copy gx into the ring (read n, write n),
  Gram row <F, f_k> (read the m residuals), combination sum_j alpha_j g_j
  (read the m map values, write n).
Achieved bandwidth = model bytes / time.  It is compared with the copy
bandwidth measured in the same run, before and after the sweep (one large
out-of-place copy in the same library, read + write bytes counted; the larger
of the two is the reference), and with a copy of one n-vector (copy@n).

Nothing is skipped by default (the largest ring buffer, m=20 at n=1e7 in float64,
is 3.2 GB; all windows of one n are alive at once, about 7 GB peak).  On the
2-core VM of docs/benchmarks.md the default sweep took about 25 s per dtype
(numpy) and about 40 s per dtype (torch).  Run from the repository root:

    python -m benchmarks.bench_overhead --backend numpy --out benchmarks/results/overhead_numpy.json
    python -m benchmarks.bench_overhead --backend torch --threads 1 --dtype float32 float64
    python -m benchmarks.bench_overhead --backend cupy --device cuda:0 --sizes 1e5 1e6 1e7 1e8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fixedpoint import Anderson
from fixedpoint.interop import to_numpy
from fixedpoint.kernels import Kernels
from tooling import timing

RESULTS_DIR = Path(__file__).resolve().parent / "results"

BLOCK_BYTES = 2e9


def bytes_model(m, n, itemsize):
    return (2 * m + 6) * n * itemsize


class Case:
    """One AndersonHistory with its preallocated gx, x, out; ``run(count)`` does ``count`` iterations."""

    def __init__(self, xp, device, dtype, itemsize, n, m):
        self.kern = kern = Kernels(xp, device)
        self.n, self.m = n, m
        self.h = Anderson(m=m).init(kern, 1, n, dtype)
        self.restarted = kern.sxp.zeros((1,), dtype=kern.sxp.bool, device=kern.sdevice)  # any restart so far
        rng = np.random.default_rng(0)
        self.x = xp.asarray(rng.standard_normal((1, n)), dtype=dtype, device=device)
        self.gx = xp.asarray(rng.standard_normal((1, n)), dtype=dtype, device=device)
        self.out = xp.empty_like(self.x)
        self.active = kern.sxp.ones((1,), dtype=kern.sxp.bool, device=kern.sdevice)
        self.bytes = bytes_model(m, n, itemsize)
        self.block = int(min(200, max(1, round(BLOCK_BYTES / self.bytes))))
        self.times = []

    def run(self, count):
        h, kern, gx, x = self.h, self.kern, self.gx, self.x
        for _ in range(count):
            f = h.residual_buffer()
            kern.sub(f, gx, x)
            h.push(gx, f)
            self.restarted = self.restarted | h.extrapolate(self.active, self.out)


def bench_size(xp, device, sync, dtype, itemsize, n, windows, repeats):
    """Rows for one n and every window m, repeats interleaved across the windows."""
    cases = [Case(xp, device, dtype, itemsize, n, m) for m in windows]
    for c in cases:
        c.run(max(c.m + 2, c.block))  # warm-up: window full, pages touched
    for _ in range(repeats):
        for c in cases:
            sync()
            t0 = time.perf_counter()
            c.run(c.block)
            sync()
            c.times.append((time.perf_counter() - t0) / c.block)
    rows = []
    for c in cases:
        w = timing.timed(lambda c=c: c.h.weights(c.active), repeats=max(5, min(50, c.block)), warmup=2, sync=sync)
        t = timing.summarize(c.times)
        rows.append(dict(n=n, m=c.m, bytes_per_iter=c.bytes, block=c.block, repeats=repeats,
                         time_per_iter_s=t["median"], time_min_s=t["min"], time_max_s=t["max"],
                         weights_time_s=w["median"], ns_per_mn=1e9 * t["median"] / (c.m * n),
                         achieved_gbs=c.bytes / t["median"] / 1e9, n_restarts=int(to_numpy(c.restarted).sum())))
    return rows


def fit(rows):
    """Least squares (relative errors) t = c0 + c1 n + c2 m n over the rows of one dtype (None: too few points)."""
    t = np.array([r["time_per_iter_s"] for r in rows])
    a = np.array([[1.0, r["n"], r["m"] * r["n"]] for r in rows])
    if len(rows) < 3 or np.linalg.matrix_rank(a / t[:, None]) < 3:
        return None
    c, *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    return dict(c0_us=1e6 * c[0], c1_ns_per_n=1e9 * c[1], c2_ns_per_mn=1e9 * c[2],
                max_rel_misfit=float(np.max(np.abs(a @ c / t - 1))))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy", choices=("numpy", "torch", "cupy"))
    ap.add_argument("--device", default=None, help="cpu (default for numpy/torch) or cuda:<i>")
    ap.add_argument("--dtype", nargs="+", default=["float64"], choices=("float32", "float64"))
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    ap.add_argument("--windows", nargs="+", type=int, default=[1, 2, 5, 10, 20])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration (default 5)")
    ap.add_argument("--max-history-gb", type=float, default=4.0,
                    help="skip windows whose ring buffer (2 m n itemsize bytes) exceeds this (default 4)")
    ap.add_argument("--copy-bytes", type=float, default=8e8, help="array size of the copy-bandwidth test")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "overhead.json"), help="JSON output path")
    args = ap.parse_args(argv)
    spec = args.backend + (":" + args.device if args.device else "")
    timing.refuse_unusable(ap, spec, f"--backend {args.backend} --device {args.device or 'default'}")
    lib, dev = timing.parse_backend(spec)
    xp, device, sync = timing.setup_backend(lib, dev)
    timing.set_threads(lib, args.threads)

    copy_before = timing.copy_bandwidth(xp, device, sync, nbytes=args.copy_bytes)
    rows, skipped, fits = [], [], {}
    for dname in args.dtype:
        dtype, itemsize = timing.dtype_of(xp, dname), np.dtype(dname).itemsize
        drows = []
        for n in map(int, args.sizes):
            windows = [m for m in args.windows if 2 * m * n * itemsize <= args.max_history_gb * 1e9]
            skipped += [dict(dtype=dname, n=n, m=m, reason=f"ring buffer > {args.max_history_gb:g} GB")
                        for m in args.windows if m not in windows]
            copy_n = timing.copy_bandwidth(xp, device, sync, nbytes=n * itemsize)[0]
            for r in bench_size(xp, device, sync, dtype, itemsize, n, windows, args.repeats):
                drows.append(dict(dtype=dname, **r, copy_gbs_at_n=copy_n / 1e9))
                print(f"  {dname} n={n:.0e} m={r['m']:2d}: {1e6 * r['time_per_iter_s']:10.1f} us/iter",
                      file=sys.stderr, flush=True)
        fits[dname] = fit(drows)
        rows += drows
    copy_after = timing.copy_bandwidth(xp, device, sync, nbytes=args.copy_bytes)
    copy_bw = max(copy_before[0], copy_after[0])
    for r in rows:
        r["fraction_of_copy_bw"] = r["achieved_gbs"] * 1e9 / copy_bw

    print(f"\nAndersonHistory per iteration ({lib} on {dev}, B=1, beta=1); bytes model (2m+6)*n*itemsize\n"
          f"copy bandwidth ({args.copy_bytes / 1e6:.0f} MB arrays, read+write) before/after the sweep: "
          f"{copy_before[0] / 1e9:.1f} / {copy_after[0] / 1e9:.1f} GB/s\n"
          f"(/copy: achieved over the larger of the two; copy@n: a copy of one n-vector, same counting)\n")
    for r in rows:
        r["_t"], r["_w"], r["_mb"] = 1e6 * r["time_per_iter_s"], 1e6 * r["weights_time_s"], r["bytes_per_iter"] / 1e6
        r["_range"] = f"[{1e6 * r['time_min_s']:.1f}, {1e6 * r['time_max_s']:.1f}]"
    timing.print_table(rows, [
        ("dtype", "dtype", "{}"), ("n", "n", "{:.0e}"), ("m", "m", "{}"), ("_t", "us/iter", "{:.1f}"),
        ("_range", "[min, max]", "{}"), ("_w", "weights us", "{:.1f}"), ("ns_per_mn", "ns/(m*n)", "{:.3f}"),
        ("_mb", "MB/iter", "{:.2f}"), ("achieved_gbs", "GB/s", "{:.2f}"), ("fraction_of_copy_bw", "/copy", "{:.2f}"),
        ("copy_gbs_at_n", "copy@n GB/s", "{:.1f}"), ("n_restarts", "restarts", "{}")])
    for r in rows:
        for key in ("_t", "_w", "_mb", "_range"):
            del r[key]
    for dname, f in ((d, f) for d, f in fits.items() if f):
        print(f"\nfit {dname}: t = {f['c0_us']:.1f} us + {f['c1_ns_per_n']:.3f} ns * n"
              f" + {f['c2_ns_per_mn']:.3f} ns * m*n"
              f"   (largest relative misfit {f['max_rel_misfit']:.2f})")
    for s in skipped:
        print(f"skipped {s['dtype']} n={s['n']:.0e} m={s['m']}: {s['reason']}")

    path = timing.write_json(args.out, dict(
        benchmark="bench_overhead", command=timing.run_command("benchmarks.bench_overhead"),
        machine=timing.machine_info({lib}),
        backend=lib, device=dev, bytes_model="(2*m + 6) * n * itemsize per iteration (beta=1)",
        copy_bytes=int(args.copy_bytes), copy_gbs_before=copy_before[0] / 1e9, copy_gbs_after=copy_after[0] / 1e9,
        copy_time_before_s=copy_before[1], copy_time_after_s=copy_after[1],
        settings=dict(B=1, beta=1.0, lam=1e-5, lam_mode="relative", delay=0, restart_growth=1e4, restart_weight=1e6,
                      repeats=args.repeats, block_bytes=BLOCK_BYTES, threads=args.threads),
        results=rows, fits=fits, skipped=skipped))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
