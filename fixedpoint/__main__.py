"""``python -m fixedpoint``: solve Chandrasekhar's H-equation by forward iteration and by Anderson, and compare.

Prints, per method: status, evaluations of g, wall time, final residual and the
error against the independent Newton reference; then the speed-up of Anderson.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import backends, problems, solve
from .interop import to_numpy


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fixedpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="quadrature nodes (default 400)")
    parser.add_argument("--c", type=float, default=0.99, help="albedo c in (0, 1] (default 0.99)")
    parser.add_argument("--tol", type=float, default=1e-10, help="relative residual tolerance (default 1e-10)")
    parser.add_argument("--m", type=int, default=5, help="Anderson window m (default 5)")
    parser.add_argument("--max-iter", type=int, default=10000, help="iteration limit (default 10000)")
    parser.add_argument("--backend", default="numpy", help="numpy, torch, cupy or array_api_strict (default numpy)")
    parser.add_argument("--device", default=None, help="device for torch, e.g. cuda (default: the library's)")
    args = parser.parse_args(argv)

    print("usable backends:", ", ".join(f"{b.library}:{b.device}" for b in backends(usable_only=True)))
    prob = problems.chandrasekhar(args.n, args.c, backend=args.backend, device=args.device)
    exact = to_numpy(prob.solution)
    print(f"problem: {prob.name}, {args.backend}, dtype {prob.x0.dtype}; tol {args.tol:g}\n")
    print(f"{'method':<10}{'status':<11}{'g evals':>8}{'time [s]':>11}{'residual':>11}{'max error':>11}")
    runs = {}
    for method, opts in (("forward", {}), ("anderson", {"m": args.m})):
        res = solve(prob.g, prob.x0, method=method, tol=args.tol, max_iter=args.max_iter, **opts)
        err = np.max(np.abs(to_numpy(res.x) - exact))
        runs[method] = res
        print(f"{method:<10}{res.status:<11}{res.n_fev:>8}{res.wall_time:>11.4f}{res.residual:>11.2e}{err:>11.2e}")
    fw, aa = runs["forward"], runs["anderson"]
    print(f"\nAnderson vs forward iteration: {fw.n_fev / aa.n_fev:.1f}x fewer evaluations of g, "
          f"{fw.wall_time / aa.wall_time:.1f}x less time")
    mu1 = prob.params["evaluate"](to_numpy(aa.x), [1.0])[0]
    print(f"H(1) from the Anderson solution: {mu1:.6f}" + ("  (closed form at c = 1: 2.90781)" if args.c == 1 else ""))
    return 0 if aa.converged else 1


if __name__ == "__main__":
    raise SystemExit(main())
