"""Compaction target of issue 11: rows of the map evaluated with and without compaction.

The batch: B samples of n, half of which contract 20 times faster (per decade of
the residual, under forward iteration) than the other half, so that under forward
iteration the fast half stops after about a twentieth of the slow half's
iterations.  Target: with compaction the map sees at most 60 % of the rows it sees
without.

1. ``fixedpoint.solve(..., batch=True, compact=True)`` on the batch map
   g_i(x) = 1 + r_i Q (x_i − 1) (Q a fixed orthogonal matrix, so every method needs
   several iterations), r_i = 0.1 for the fast half and 0.1 ** 0.05 for the slow one,
   absolute tolerance 1e-9.
2. The DEQ layer, :func:`fixedpoint.torch.deq_fixed_point` with ``compact=True``
   against ``compact=False``, on the cell f(z, x) = x ⊙ tanh(z Qᵀ) + 0.05 (x holds
   r_i in every entry of row i; z stays small, so tanh is close to linear), relative
   tolerance 1e-8, loss Σ z: rows of f in the forward solve and of J_fᵀ u in the
   adjoint solve.

Rows are counts, not timings: the same on every machine.  CPU seconds of this
process (``time.process_time``, one thread) are printed beside them, one run each,
for orientation only.

Run from the repository root::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python -m benchmarks.bench_compaction --out benchmarks/results/compaction.json
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
FAST, SLOW = 0.1, 0.1 ** 0.05  # 1 and 20 forward iterations per decade of the residual


def rates(batch: int) -> np.ndarray:
    """r_i: the first half of the batch fast, the second slow."""
    return np.where(np.arange(batch) < batch // 2, FAST, SLOW)


def orthogonal(n: int, seed: int) -> np.ndarray:
    """A random orthogonal n×n matrix (QR of a Gaussian one)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def generic(method: str, batch: int, n: int, seed: int) -> dict:
    """Rows of g in fixedpoint.solve with and without compaction (item 1)."""
    r, Q = rates(batch)[:, None], orthogonal(n, seed)
    out: dict[str, dict[str, Any]] = {}
    for compact in (False, True):
        def g(x, rows=None):
            rr = r if rows is None else r[rows]
            return 1.0 + rr * ((x - 1.0) @ Q.T)

        c0 = time.process_time()
        res = fixedpoint.solve(g, np.zeros((batch, n)), method=method, batch=True, compact=compact, tol=1e-9,
                               stop_mode="abs", max_iter=5000)
        out["on" if compact else "off"] = dict(rows=int(res.n_rows), n_fev=int(res.n_fev),
                                               converged=bool(np.all(res.converged)),
                                               cpu_s=time.process_time() - c0, x=res.x)
    err = float(np.abs(out["on"].pop("x") - out["off"].pop("x")).max())
    return dict(off=out["off"], on=out["on"], ratio=out["on"]["rows"] / out["off"]["rows"], max_x_difference=err)


def layer(method: str, batch: int, n: int, seed: int) -> dict:
    """Rows of f and of J_f^T u in the DEQ layer with and without compaction (item 2)."""
    import torch

    from fixedpoint.torch import deq_fixed_point

    Q = torch.as_tensor(orthogonal(n, seed))
    x = torch.as_tensor(np.repeat(rates(batch)[:, None], n, axis=1)).requires_grad_()

    def f(z, xx):
        return xx * torch.tanh(z @ Q.T) + 0.05

    out = {}
    for compact in (False, True):
        c0 = time.process_time()
        z, stats = deq_fixed_point(f, x, method=method, compact=compact, tol=1e-8, max_iter=5000)
        (grad,) = torch.autograd.grad(z.sum(), x)
        fw, bw = stats.forward, stats.backward
        assert bw is not None  # z.sum() was differentiated: the adjoint ran
        out["on" if compact else "off"] = dict(
            forward_rows=int(fw.n_rows), adjoint_rows=int(bw.n_rows), adjoint_rebuilt_rows=int(bw.n_graph_rows),
            converged=[fw.converged_fraction, bw.converged_fraction], cpu_s=time.process_time() - c0,
            z=z.detach().numpy().copy(), grad=grad.numpy().copy())
    on, off = out["on"], out["off"]
    return dict(off={k: v for k, v in off.items() if k not in ("z", "grad")},
                on={k: v for k, v in on.items() if k not in ("z", "grad")},
                forward_ratio=on["forward_rows"] / off["forward_rows"],
                adjoint_ratio=on["adjoint_rows"] / off["adjoint_rows"],
                max_z_difference=float(np.abs(on["z"] - off["z"]).max()),
                max_grad_relative_difference=float(np.abs(on["grad"] - off["grad"]).max()
                                                   / np.abs(off["grad"]).max()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_compaction", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=100, help="samples (default 100)")
    p.add_argument("--n", type=int, default=256, help="entries per sample (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-layer", action="store_true", help="skip the DEQ layer (item 2; needs torch)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    timing.add_threads_flag(p)  # torch CPU threads for the layer
    args = p.parse_args(argv)
    if not args.no_layer:
        print(timing.use_threads(args.threads))
    results = dict(settings=dict(batch=args.batch, n=args.n, seed=args.seed, fast_rate=FAST, slow_rate=SLOW),
                   machine=timing.machine_info(() if args.no_layer else ("torch",)), generic={}, layer={})
    print(f"batch {args.batch} x {args.n}, half at rate {FAST}, half at {SLOW:.4f}; target: rows with compaction "
          "<= 0.6 x without")
    for method in METHODS:
        r = results["generic"][method] = generic(method, args.batch, args.n, args.seed)
        print(f"solve  {method:9s} rows {r['on']['rows']:7d} / {r['off']['rows']:7d} = {r['ratio']:.3f} "
              f"(CPU {r['on']['cpu_s']:.2f} / {r['off']['cpu_s']:.2f} s; max |x difference| "
              f"{r['max_x_difference']:.1e})")
    if not args.no_layer:
        for method in METHODS:
            r = results["layer"][method] = layer(method, args.batch, args.n, args.seed)
            print(f"layer  {method:9s} rows of f {r['on']['forward_rows']:7d} / {r['off']['forward_rows']:7d} = "
                  f"{r['forward_ratio']:.3f}, of J^T u {r['on']['adjoint_rows']:7d} / {r['off']['adjoint_rows']:7d}"
                  f" = {r['adjoint_ratio']:.3f} (CPU {r['on']['cpu_s']:.2f} / {r['off']['cpu_s']:.2f} s; max |z "
                  f"difference| {r['max_z_difference']:.1e}, gradient {r['max_grad_relative_difference']:.1e})")
    if args.out:
        print(f"wrote {timing.write_json(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
