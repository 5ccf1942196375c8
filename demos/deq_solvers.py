"""Every solver on the same trained DEQ: per-sample iterations, rows of f and CPU time of the forward solves.

A training run compares solvers on different models: each solver's gradients train a model of its own,
and how many iterations a solve needs depends on the model as much as on the solver.  This script
takes checkpoints (``checkpoint-SOLVER.pt`` of ``demos/deq_cifar10.py``) and solves the DEQ of each
on the first ``--batches`` test batches with every solver in ``--solvers``, with the run's solver
settings (tolerance, cap, Anderson's m, β, λ and its mode, Broyden's m) and compaction on; the model
is in eval mode, so the solves change nothing.  Printed per checkpoint and solver: mean, median and
largest per-sample iterations, the rows of f evaluated, the fraction converged, and the CPU seconds of
the solves (``time.process_time``).

Example::

    python demos/deq_solvers.py out/deq-fmnist/checkpoint-forward.pt out/deq-fmnist/checkpoint-anderson.pt \\
        --batches 5 --out solvers.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from demos.cli import Refused, add_overwrite_flag, check_out_file, refuse, write_text_replacing  # noqa: E402
from demos.data import DataError  # noqa: E402
from demos.deq_training import CheckpointError, TrainedRun, solver_options  # noqa: E402
from tooling.timing import add_threads_flag, positive_int, use_threads  # noqa: E402

SOLVERS = ("forward", "anderson", "broyden")


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint-SOLVER.pt files written by demos/deq_cifar10.py")
    p.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(SOLVERS),
                   help="solvers run on each model (default: all)")
    p.add_argument("--batches", type=positive_int, default=5, help="test batches solved (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="as for demos/deq_cifar10.py")
    p.add_argument("--out", default=None,
                   help="also write the measurements as JSON to this file; an existing file is refused unless "
                        "--overwrite is given (default: printed only)")
    add_overwrite_flag(p, "the file --out names")
    add_threads_flag(p)
    return p


def solvers_on_model(path, solvers, batches, data_dir=None):
    """{solver: measurements} for the model of checkpoint ``path`` on its first ``batches`` test batches."""
    run = TrainedRun(path, data_dir)
    cfg = argparse.Namespace(**dict(vars(run.cfg), compact="on", gradient="implicit"))
    test = run.batches(train=False)
    out = {}
    for solver in solvers:
        model = run.model(solver_options(solver, cfg, "numpy"))
        model.eval()
        iters, rows, conv, cpu = [], 0, [], 0.0
        for b, (_, images, _) in enumerate(test.epoch(0)):
            if b == batches:
                break
            with torch.no_grad():
                x = model.injection(images)
                c0 = time.process_time()
                model.deq(x)
                cpu += time.process_time() - c0
            st = model.deq.stats.forward
            iters.append(np.isfinite(st.residual_history).sum(axis=0))
            rows += st.n_rows
            conv.append(st.converged_fraction * images.shape[0])
        it = np.concatenate(iters)
        out[solver] = dict(samples=int(it.size), iterations_mean=float(it.mean()),
                           iterations_median=float(np.median(it)), iterations_max=int(it.max()), rows=int(rows),
                           converged=float(sum(conv) / it.size), cpu_s=cpu)
    return dict(checkpoint=str(path), trained_with=run.solver, measurements=out)


def main(argv=None):
    """Run the study with the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 when done; 2 for an error in the flags, a checkpoint, the data or ``--out`` (one line on stderr).
    """
    args = make_parser().parse_args(argv)
    try:
        if args.out:  # before any solve: a refusal costs nothing
            check_out_file(args.out, overwrite=args.overwrite, inputs=args.checkpoints)
        print(use_threads(args.threads), flush=True)
        results = []
        for path in args.checkpoints:
            try:
                res = solvers_on_model(path, args.solvers, args.batches, args.data_dir)
            except (CheckpointError, DataError) as exc:
                raise Refused(exc) from None
            results.append(res)
            print(f"{path} (trained with {res['trained_with']}):", flush=True)
            for solver, r in res["measurements"].items():
                print(f"  {solver:9s} iterations per sample mean {r['iterations_mean']:6.1f} median "
                      f"{r['iterations_median']:5.0f} max {r['iterations_max']:5d} | rows of f {r['rows']:7d} | "
                      f"converged {100 * r['converged']:5.1f}% | CPU {r['cpu_s']:6.1f} s ({r['samples']} samples)",
                      flush=True)
        if args.out:
            command = shlex.join(["python", "demos/deq_solvers.py", *(sys.argv[1:] if argv is None else argv)])
            write_text_replacing(args.out, json.dumps(dict(command=command, results=results), indent=1) + "\n")
    except Refused as exc:
        return refuse(exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
