"""``python -m fixedpoint``: solve Chandrasekhar's H-equation by forward iteration, Anderson and Broyden, and compare.

Prints, per method: status, evaluations of g, wall time, final residual, the
error against the independent Newton reference and which root was found; then
how many times fewer evaluations and how much less time each accelerated method
needed than forward iteration.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import numpy as np

from . import Anderson, Broyden, ForwardIteration, backends, problems, solve
from .backend import namespace_of
from .interop import to_numpy
from .problems import Problem
from .result import FixedPointResult

#: Default tolerance per dtype: well above each one's resolution (float32: eps = 1.2e-7).
DEFAULT_TOL = {"float64": 1e-10, "float32": 1e-5}


def _albedo(text: str) -> float:
    try:
        c = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < c <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (the H-equation has no solution for c > 1), got {c:g}")
    return c


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__} > 0, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


class _OneDefault(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an option's help unless the help already says what its default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def compare(prob: Problem, tol: float, m: int = 5, max_iter: int = 10000) -> dict[str, FixedPointResult]:
    """Solve ``prob`` by forward iteration, Anderson (window ``m``, its default delay) and Broyden: {name: result}.

    The settings of ``python -m fixedpoint``; ``tooling/doc_figures.py`` uses them for the README's figure.
    Anderson's default two plain steps first keep it on the physical root near c = 1.
    """
    methods: dict[str, ForwardIteration | Anderson | Broyden] = {
        "forward": ForwardIteration(), "anderson": Anderson(m=m), "broyden": Broyden()}
    return {name: solve(prob.g, prob.x0, method=method, tol=tol, max_iter=max_iter)
            for name, method in methods.items()}


def make_parser() -> argparse.ArgumentParser:
    """Build the command line (``--help`` prints each default once)."""
    parser = argparse.ArgumentParser(prog="python -m fixedpoint", description=(__doc__ or "").splitlines()[0],
                                     formatter_class=_OneDefault)
    parser.add_argument("--n", type=_positive(int), default=400, help="quadrature nodes")
    parser.add_argument("--c", type=_albedo, default=0.99, help="albedo c in (0, 1]")
    parser.add_argument("--tol", type=_positive(float), default=None,
                        help="relative residual tolerance (default: 1e-10 in float64, 1e-5 in float32)")
    parser.add_argument("--m", type=_positive(int), default=5, help="Anderson window m")
    parser.add_argument("--max-iter", type=_positive(int), default=10000, help="iteration limit")
    parser.add_argument("--backend", default="numpy", choices=("numpy", "torch", "cupy", "array_api_strict"),
                        help="array library (torch and cupy: float32 unless --dtype float64)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float64"),
                        help="dtype (default: the library's default float)")
    parser.add_argument("--device", default=None, help="device for torch, e.g. cuda (default: the library's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison of ``python -m fixedpoint`` with the arguments ``argv``; return the exit status.

    0 when every method converged, else 1.
    """
    parser = make_parser()
    args = parser.parse_args(argv)

    print("usable backends:", ", ".join(f"{b.library}:{b.device}" for b in backends(usable_only=True)))
    try:
        prob = problems.chandrasekhar(args.n, args.c, backend=args.backend, dtype=args.dtype, device=args.device)
    except ImportError as exc:
        parser.error(str(exc))
    assert prob.solution is not None  # chandrasekhar() always has its Newton reference
    exact = to_numpy(prob.solution)
    dtype = str(prob.x0.dtype).rpartition(".")[2]
    tol = args.tol if args.tol is not None else DEFAULT_TOL.get(dtype, 1e-5)
    eps = float(namespace_of(prob.x0).finfo(prob.x0.dtype).eps)
    print(f"problem: {prob.name}, {args.backend}, dtype {dtype}; relative tolerance {tol:g}"
          + (f"  (below {dtype}'s resolution {eps:.1e}: it may not be reached)" if tol < 10 * eps else ""))
    runs = compare(prob, tol, m=args.m, max_iter=args.max_iter)
    print(f"\n{'method':<10}{'status':<11}{'g evals':>8}{'time [s]':>11}{'residual':>11}{'max error':>11}  root")
    for name, res in runs.items():
        err = np.max(np.abs(to_numpy(res.x).astype(np.float64) - exact))
        print(f"{name:<10}{res.status:<11}{res.n_fev:>8}{res.wall_time:>11.4f}{res.residual:>11.2e}{err:>11.2e}"
              f"  {prob.params['root'](res.x)}")
    fw = runs["forward"]
    for name in ("anderson", "broyden"):
        res = runs[name]
        if fw.converged and res.converged:
            print(f"{name} vs forward iteration: {fw.n_fev / res.n_fev:.1f}x fewer evaluations of g, "
                  f"{fw.wall_time / res.wall_time:.1f}x less time")
        else:
            print(f"{name} vs forward iteration: no comparison, "
                  + " and ".join(f"{k} ended with status {r.status!r}" for k, r in (("forward", fw), (name, res))
                                 if not r.converged))
    mu1 = prob.params["evaluate"](to_numpy(runs["anderson"].x).astype(np.float64), [1.0])[0]
    print(f"H(1) from the Anderson solution: {mu1:.6f}" + ("  (closed form at c = 1: 2.90781)" if args.c == 1 else ""))
    return 0 if all(r.converged for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
