"""CPU vs GPU: time to tolerance of forward iteration and Anderson, across problem sizes and array libraries.

For each built-in problem (the cheap O(n) Jacobi map, the DEQ-like tanh layer, the
H-equation and, with torch, the DEQ demo's convolutional cell solved through the
``fixedpoint.torch`` DEQ layer), each size n and each usable backend (NumPy,
PyTorch CPU, CuPy, PyTorch CUDA), both methods are timed to tolerance with
warm-up, device synchronisation and repeats (medians and quartiles).  Reported
per row: evaluations of g, time, time per evaluation, the time of one evaluation
of g alone (timed separately, 10 calls per repeat) and the solver's own overhead
per iteration (time per evaluation minus that; measurement noise can make it
slightly negative when g dominates); then the speed-up of Anderson over forward
iteration, of the GPU over the fastest CPU backend, and the crossover size from
which the GPU wins.  A second run at one size records relative residual against
wall time per iteration (the Figure 1 of Al Dajani & Keyes, arXiv 2410.19460),
showing the crossover point and the "mixing penalty" (Anderson's dearer
iterations).

Examples::

    python -m demos.cpu_vs_gpu                          # default sweep: a few minutes on 2 CPU cores
    python -m demos.cpu_vs_gpu --quick --out /tmp/cvg   # seconds (used by the tests)
    python -m demos.cpu_vs_gpu --backends numpy cupy torch:cuda:0 --max-n 1e7

The sizes swept are the decades from 1e3 to ``--max-n`` (1e6 by default) unless
``--sizes`` lists them.  torch uses as many threads as there are idle CPUs unless
``--threads`` says otherwise.  Writes ``rows.csv``, ``results.json`` (rows, ratios,
crossovers, machine), ``time_vs_n.png`` and ``residual_vs_time.png`` under ``--out``
(default ``out/cpu_vs_gpu``); ``rows.csv`` is rewritten after every configuration, so
that a sweep stopped part way keeps the rows it measured.  A folder that holds an earlier
run is refused unless ``--overwrite`` is given, and a backend named in ``--backends`` that
cannot run here is an error (one line on stderr, exit status 2); without ``--backends``
the unusable ones are left out, and said so.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import fixedpoint
from demos.cli import (
    Refused,
    add_overwrite_flag,
    add_progress_flag,
    check_out_folder,
    make_out_folder,
    progress_disabled,
    refuse,
)
from fixedpoint import problems
from tooling import timing
from tooling.timing import add_threads_flag, positive_float, positive_int, use_threads

METHODS = ("forward", "anderson")
#: The files the demo writes into --out.
OUTPUT_FILES = ("rows.csv", "results.json", "time_vs_n.png", "residual_vs_time.png")
PROBLEMS = ("jacobi", "tanh", "h-equation", "conv")


def make_problem(name, n, lib, device, dtype):
    """(problem, solve options) of size about ``n`` for ``name``, in dtype ``dtype`` ("float32" or "float64")."""
    kw = dict(backend=lib, dtype=dtype, device=device)
    if name == "jacobi":
        return problems.poisson_jacobi(n, shift=0.1, **kw), {}
    if name == "tanh":
        d = 256
        return problems.tanh_layer(d=d, batch=max(1, n // d), rho=0.95, **kw), {"batch": True}
    if name == "h-equation":
        return problems.chandrasekhar(n, 0.99, **kw), {}
    if name == "conv":
        return conv_deq(n, lib, device, dtype), {"batch": True, "backend": lib}
    raise ValueError(f"unknown problem {name!r}")


class ConvDEQ:
    """The DEQ demo's convolutional cell (demos/deq_model.py) on a batch of random inputs, solved by
    :func:`fixedpoint.torch.deq_fixed_point`: the forward solve of the ``fixedpoint.torch.DEQ`` layer.

    The tensors are torch tensors on the CPU for the "numpy" and "torch" backends and on the GPU for
    "cupy" and "torch:cuda"; the backend names the library the solver runs in (NumPy and CuPy
    through DLPack, zero-copy).  16 channels of 16×16, inner width 32, 8 groups, conv weights drawn
    from N(0, 0.02²) (twice the tutorial's spread, so that forward iteration needs about 60
    iterations to 1e-5 instead of about 35).
    """

    def __init__(self, n, solver, device, dtype, channels=16, inner=32, side=16, init_std=0.02):
        import torch

        from demos.deq_model import ResidualCell

        torch.manual_seed(0)
        self.batch = max(1, n // (channels * side * side))
        self.name = f"conv DEQ ({self.batch}x{channels}x{side}x{side})"
        self.solver, self.torch = solver, torch
        self.cell = ResidualCell(channels, inner, groups=8, init_std=init_std).to(device=device, dtype=dtype)
        self.x = torch.randn(self.batch, channels, side, side, device=device, dtype=dtype)
        self.x0 = torch.zeros_like(self.x)

    def g(self, z):
        with self.torch.no_grad():
            return self.cell(z, self.x)

    def solve(self, method, tol, max_iter):
        """A :class:`fixedpoint.FixedPointResult`-like summary of one DEQ forward solve."""
        from fixedpoint.torch import deq_fixed_point

        with self.torch.no_grad():
            _, stats = deq_fixed_point(self.cell, self.x, method=method, backend=self.solver, tol=tol,
                                       max_iter=max_iter, unconverged="ignore")  # convergence is reported
        st = stats.forward
        return SimpleNamespace(n_fev=st.n_fev, converged=st.converged_fraction == 1.0,
                               residual_history=st.residual_history)


def conv_deq(n, lib, device, dtype):
    """:class:`ConvDEQ` for backend ``lib`` on ``device``: tensors on the CPU, or on the GPU the backend uses."""
    import torch

    tensor_device = torch.device("cuda", device.id) if lib == "cupy" else torch.device(device)
    return ConvDEQ(n, lib, tensor_device, getattr(torch, dtype))


def run_solve(p, method, args, opts):
    """One solve of problem ``p`` to ``args.tol``: through the DEQ layer for the conv problem."""
    if isinstance(p, ConvDEQ):
        return p.solve(method, args.tol, args.max_iter)
    return fixedpoint.solve(p.g, p.x0, method=method, tol=args.tol, max_iter=args.max_iter, **opts)


def sizes_for(name, args):
    """The sizes swept for problem ``name``: the dense O(n²) H-equation has its own list."""
    return args.dense_sizes if name == "h-equation" else args.sizes


def measure(name, n, spec, args):
    """Rows (one per method) for one problem, size and backend."""
    lib, dev = timing.parse_backend(spec)
    _, device, sync = timing.setup_backend(lib, dev)
    p, opts = make_problem(name, n, lib, device, args.dtype)
    size = int(np.prod(p.x0.shape))

    def ten_g():  # each output is dropped before the next call, as in the solver loop
        for _ in range(10):
            p.g(p.x0)

    t_g = timing.timed(ten_g, repeats=max(args.repeats, 5), warmup=2, sync=sync)["median"] / 10
    rows = []
    for method in METHODS:
        t = timing.timed(lambda method=method: run_solve(p, method, args, opts), repeats=args.repeats, warmup=1,
                         sync=sync)
        res = t["last"]
        per_iter = t["median"] / res.n_fev
        rows.append(dict(problem=name, n=size, backend=spec, method=method, n_fev=res.n_fev,
                         converged=bool(np.all(res.converged)), time=t["median"], time_q1=t["q1"], time_q3=t["q3"],
                         time_per_iter=per_iter, g_time=t_g, overhead_per_iter=per_iter - t_g))
    return rows


def ratios(rows):
    """Speed-up of Anderson over forward (per problem, n, backend) and of GPUs over the fastest CPU backend."""
    key = {(r["problem"], r["n"], r["backend"], r["method"]): r for r in rows}
    out = []
    for (prob, n, spec, method), r in key.items():
        if method != "anderson" or (prob, n, spec, "forward") not in key:
            continue
        fw = key[(prob, n, spec, "forward")]
        out.append(dict(problem=prob, n=n, backend=spec, aa_speedup=fw["time"] / r["time"],
                        fev_ratio=fw["n_fev"] / r["n_fev"]))
    for r in rows:
        cpu = [c["time"] for c in rows if (c["problem"], c["n"], c["method"]) == (r["problem"], r["n"], r["method"])
               and not is_gpu(c["backend"])]
        r["gpu_speedup"] = (min(cpu) / r["time"]) if is_gpu(r["backend"]) and cpu else None
    return out


def is_gpu(spec):
    return spec.startswith("cupy") or ":cuda" in spec


def crossovers(rows):
    """Per problem, method and GPU backend: the smallest n from which the GPU beats every CPU backend."""
    out = []
    for prob in sorted({r["problem"] for r in rows}):
        for method in METHODS:
            for spec in sorted({r["backend"] for r in rows if is_gpu(r["backend"])}):
                pts = sorted((r["n"], r["gpu_speedup"]) for r in rows if (r["problem"], r["method"], r["backend"])
                             == (prob, method, spec) and r["gpu_speedup"] is not None)
                wins = [n for i, (n, s) in enumerate(pts) if all(s2 > 1 for _, s2 in pts[i:])]
                out.append(dict(problem=prob, method=method, backend=spec, crossover_n=wins[0] if wins else None))
    return out


def residual_trace(name, n, spec, args):
    """Relative residual against iteration and wall time (device synchronised each iteration) for both methods."""
    lib, dev = timing.parse_backend(spec)
    _, device, sync = timing.setup_backend(lib, dev)
    p, opts = make_problem(name, n, lib, device, args.dtype)
    traces = {}
    for method in METHODS:
        solve_opts = dict(opts, method=method, tol=args.tol, max_iter=args.max_iter)
        fixedpoint.solve(p.g, p.x0, **solve_opts)  # warm-up
        res, times = timing.traced_solve(p.g, p.x0, sync=sync, **solve_opts)
        hist = res.residual_history if res.residual_history.ndim == 1 else np.nanmax(res.residual_history, axis=1)
        traces[method] = dict(time=times, residual=hist.tolist())
    fw, aa = traces["forward"], traces["anderson"]
    f_at = np.interp(aa["time"], fw["time"], fw["residual"], right=fw["residual"][-1])
    behind = np.nonzero(np.array(aa["residual"]) >= f_at)[0]
    cross = behind[-1] + 1 if behind.size else 0
    penalty = (aa["time"][-1] / len(aa["time"])) / (fw["time"][-1] / len(fw["time"]))
    return dict(problem=name, n=int(np.prod(p.x0.shape)), backend=spec, traces=traces, mixing_penalty=penalty,
                crossover_time=aa["time"][cross] if cross < len(aa["time"]) else None)


def n_label(n):
    """Short label of a size n with an SI prefix: 250, 768, 4.096k, 1M, 10M."""
    from matplotlib.ticker import EngFormatter

    return EngFormatter(sep="")(n)


def plot_time_vs_n(rows):
    """Time to tolerance against n, one panel per problem; returns the figure.

    The x ticks are the powers of ten within a panel's sizes, or the sizes swept when fewer than
    two powers of ten fall within them (the H-equation's 250 ... 4000), labelled 250, 1k, 10M."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    probs = sorted({r["problem"] for r in rows})
    fig, axes = plt.subplots(1, len(probs), figsize=(4.2 * len(probs), 3.6), squeeze=False)
    for ax, prob in zip(axes[0], probs):
        for spec in sorted({r["backend"] for r in rows if r["problem"] == prob}):
            for method, style in zip(METHODS, ("--", "-")):
                pts = sorted((r["n"], r["time"]) for r in rows if (r["problem"], r["backend"], r["method"])
                             == (prob, spec, method))
                if pts:
                    ax.loglog(*zip(*pts), style, marker="o", ms=3, label=f"{spec} {method}")
        ns = sorted({r["n"] for r in rows if r["problem"] == prob})
        decades = [10**k for k in range(64) if ns[0] <= 10**k <= ns[-1]]
        ticks = decades if len(decades) >= 2 else ns  # a panel within about a decade: label the sizes swept
        ax.set_xticks(ticks, [n_label(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=prob, xlabel="n (values in the iterate)", ylabel="time to tolerance [s]")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_trace(trace):
    """Relative residual against iteration and against wall time of the residual trace; returns the figure."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, style in zip(METHODS, ("--", "-")):
        tr = trace["traces"][method]
        a1.semilogy(range(1, len(tr["residual"]) + 1), tr["residual"], style, label=method)
        a2.semilogy(tr["time"], tr["residual"], style, label=method)
    if trace["crossover_time"] is not None:
        a2.axvline(trace["crossover_time"], color="grey", lw=0.8)
        a2.annotate(" crossover", (trace["crossover_time"], a2.get_ylim()[1]), va="top", fontsize=8)
    a1.set(xlabel="iteration", ylabel="relative residual")
    a2.set(xlabel="wall time [s]", title=f"mixing penalty: {trace['mixing_penalty']:.2f}x time per iteration")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
        a.legend()
    fig.suptitle(f"{trace['problem']}, n={trace['n']:,}, {trace['backend']}", fontsize=9)
    fig.tight_layout()
    return fig


def plot(rows, trace, out):
    """Write time_vs_n.png and residual_vs_time.png into folder ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for fig, name in ((plot_time_vs_n(rows), "time_vs_n.png"), (plot_trace(trace), "residual_vs_time.png")):
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def _decades(max_n):
    """1e3, 1e4, ... up to ``max_n``."""
    return [10**k for k in range(3, 64) if 10**k <= max_n]


def make_parser():
    """The command line of the demo (``--help`` shows every default once)."""
    ap = argparse.ArgumentParser(prog="python -m demos.cpu_vs_gpu", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS), metavar="PROBLEM",
                    help=f"any of {', '.join(PROBLEMS)}; conv needs torch (default: all)")
    ap.add_argument("--backends", nargs="+", default=None, metavar="BACKEND",
                    help="numpy, torch, torch:cuda:0, cupy, cupy:cuda:1, ... (default: every usable one)")
    ap.add_argument("--sizes", nargs="+", type=positive_float, default=None, metavar="N",
                    help="sizes n swept, except for the H-equation (default: the decades from 1e3 to --max-n)")
    ap.add_argument("--max-n", type=positive_float, default=1e6, metavar="N",
                    help="largest n swept; larger --sizes are left out, with a note (default: 1e6)")
    ap.add_argument("--dense-sizes", nargs="+", type=positive_float, default=[250, 500, 1000, 2000, 4000],
                    metavar="N", help="sizes n of the H-equation, whose g costs O(n^2) (default: 250 500 1000 2000 "
                                      "4000)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="floating-point type of the iterates (default: %(default)s)")
    ap.add_argument("--tol", type=positive_float, default=1e-5,
                    help="relative residual tolerance (default: %(default)s)")
    ap.add_argument("--max-iter", type=positive_int, default=1000,
                    help="iteration cap of every solve (default: %(default)s)")
    ap.add_argument("--repeats", type=positive_int, default=3,
                    help="timed repeats after one warm-up (default: %(default)s)")
    ap.add_argument("--trace", default=None, metavar="PROBLEM:N",
                    help="problem and n of the residual-vs-time run (default: conv:1e5, the DEQ cell; jacobi:1e5 "
                         "without torch)")
    add_threads_flag(ap)
    ap.add_argument("--out", default="out/cpu_vs_gpu",
                    help="output folder; one that holds an earlier run is refused unless --overwrite is given "
                         "(default: %(default)s)")
    add_overwrite_flag(ap, "an earlier run in --out (its rows.csv, results.json and plots are deleted first)")
    add_progress_flag(ap)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sweep for tests: sizes 1e3 and 4e3 (H-equation 250, 500), no conv, 1 repeat")
    return ap


def _check_args(args, ap):
    """Resolve the sizes, the backends and the trace; parser errors name the flag."""
    if args.quick:
        args.sizes, args.dense_sizes, args.repeats, args.trace = [1e3, 4e3], [250, 500], 1, "jacobi:4e3"
        args.problems = [p for p in args.problems if p != "conv"]
    sizes = _decades(args.max_n) if args.sizes is None else args.sizes
    dropped = [s for s in sizes if s > args.max_n]
    if dropped:
        print(f"--sizes {' '.join(f'{s:g}' for s in dropped)} left out: above --max-n {args.max_n:g}")
    args.sizes = [int(s) for s in sizes if s <= args.max_n]
    args.dense_sizes = [int(s) for s in args.dense_sizes]
    if not args.sizes and set(args.problems) - {"h-equation"}:
        ap.error(f"no size left to sweep: every --sizes is above --max-n {args.max_n:g}")
    found = fixedpoint.backends() if args.backends else []
    for spec in args.backends or ():
        try:
            timing.parse_backend(spec)
        except ValueError as exc:
            ap.error(f"--backends: {exc}")
        why = timing.unusable_reason(spec, found)
        if why:
            ap.error(f"--backends {spec}: {why}; leave --backends out to time every usable backend")
    has_torch = importlib.util.find_spec("torch") is not None
    if "conv" in args.problems and not has_torch:
        args.problems.remove("conv")
    if args.trace is None:
        args.trace = "conv:1e5" if has_torch else "jacobi:1e5"
    prob, _, n = args.trace.partition(":")
    try:
        n_ok = float(n) >= 1
    except ValueError:
        n_ok = False
    if prob not in PROBLEMS or not n_ok or (prob == "conv" and not has_torch):
        ap.error(f"--trace must be PROBLEM:N with PROBLEM one of {', '.join(PROBLEMS)} (conv needs torch) and "
                 f"N >= 1, got {args.trace!r}")


def main(argv=None):
    ap = make_parser()
    args = ap.parse_args(argv)
    _check_args(args, ap)
    out = Path(args.out)
    specs = args.backends or timing.usable_backends()
    try:
        earlier = check_out_folder(out, OUTPUT_FILES, overwrite=args.overwrite)
        print(use_threads(args.threads))
        make_out_folder(out, earlier if args.overwrite else ())
    except Refused as exc:
        return refuse(exc)
    gpus = [s for s in specs if is_gpu(s)]
    print("backends:", ", ".join(specs), "" if gpus else "\nno GPU found: CPU rows only")

    from tqdm import tqdm

    jobs = [(prob, n, spec) for prob in args.problems for n in sizes_for(prob, args) for spec in specs]
    rows = []
    for prob, n, spec in tqdm(jobs, desc="sweep", unit="config", disable=progress_disabled(args.no_progress)):
        rows += measure(prob, n, spec, args)
        timing.write_csv(out / "rows.csv", rows)  # after each configuration: a stopped sweep keeps its rows
    rat = ratios(rows)
    cross = crossovers(rows)
    tprob, _, tn = args.trace.partition(":")
    trace = residual_trace(tprob, int(float(tn)), gpus[0] if gpus else specs[0], args)

    timing.print_table(rows, [("problem", "problem", "{}"), ("n", "n", "{:,}"), ("backend", "backend", "{}"),
                              ("method", "method", "{}"), ("n_fev", "g evals", "{}"), ("converged", "conv", "{}"),
                              ("time", "time [s]", "{:.4f}"), ("time_per_iter", "s/iter", "{:.2e}"),
                              ("g_time", "g [s]", "{:.2e}"), ("overhead_per_iter", "overhead/iter", "{:.2e}"),
                              ("gpu_speedup", "GPU/CPU", "{:.1f}")])
    print()
    timing.print_table(rat, [("problem", "problem", "{}"), ("n", "n", "{:,}"), ("backend", "backend", "{}"),
                             ("fev_ratio", "g evals fw/AA", "{:.2f}"), ("aa_speedup", "time fw/AA", "{:.2f}")])
    if gpus:
        print()
        timing.print_table(cross, [("problem", "problem", "{}"), ("method", "method", "{}"),
                                   ("backend", "GPU", "{}"), ("crossover_n", "GPU wins from n", "{:,}")])
    print(f"\nresidual trace ({trace['problem']}, n={trace['n']:,}, {trace['backend']}): mixing penalty "
          f"{trace['mixing_penalty']:.2f}x per iteration, crossover at "
          + (f"{trace['crossover_time']:.4f} s" if trace["crossover_time"] is not None else "none"))

    timing.write_csv(out / "rows.csv", rows)
    timing.write_json(out / "results.json", dict(
        command=timing.run_command("demos.cpu_vs_gpu"),
        machine=timing.machine_info({timing.parse_backend(s)[0] for s in specs}), options=vars(args), rows=rows,
        ratios=rat, crossovers=cross, trace=trace))
    plot(rows, trace, out)
    print(f"wrote {out}/rows.csv, results.json, time_vs_n.png, residual_vs_time.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
