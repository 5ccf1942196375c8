"""Every solver on the same trained DEQ, from checkpoints: per-sample iterations, rows of f and CPU time.

The training demo measures this at the end of its run (its "same model" table); this script does it
for checkpoints (``checkpoint-SOLVER.pt`` of ``demos/deq_cifar10.py``): the DEQ of each is solved on
the first ``--batches`` test batches with every solver in ``--solvers``, with the run's solver
settings and compaction on (:mod:`demos.deq_same_model`, which says what is measured).

Example::

    python -m demos.deq_solvers out/deq-fmnist/checkpoint-forward.pt out/deq-fmnist/checkpoint-anderson.pt \\
        --batches 5 --out solvers.json
"""

from __future__ import annotations

import argparse
import json
import shlex

from demos.cli import Refused, add_overwrite_flag, check_out_file, refuse, write_text_replacing
from demos.data import DataError
from demos.deq_same_model import same_model_ratios, same_model_table, solve_same_model
from demos.deq_training import CheckpointError, TrainedRun, solver_options
from tooling.timing import add_threads_flag, positive_int, run_command, use_threads

SOLVERS = ("forward", "anderson", "broyden")


def make_parser():
    p = argparse.ArgumentParser(prog="python -m demos.deq_solvers", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint-SOLVER.pt files written by demos/deq_cifar10.py")
    p.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(SOLVERS),
                   help="solvers run on each model (default: all)")
    p.add_argument("--batches", type=positive_int, default=5, help="test batches solved (default: %(default)s)")
    p.add_argument("--broyden-m", type=positive_int, default=None,
                   help="Broyden's update pairs (default: the run's own setting)")
    p.add_argument("--data-dir", default=None, help="as for demos/deq_cifar10.py")
    p.add_argument("--out", default=None,
                   help="also write the measurements as JSON to this file; an existing file is refused unless "
                        "--overwrite is given (default: printed only)")
    add_overwrite_flag(p, "the file --out names")
    add_threads_flag(p)
    return p


def solvers_on_model(path, solvers, batches, data_dir=None, broyden_m=None):
    """{checkpoint, trained_with, measurements, ratios} for the model of checkpoint ``path`` on its first
    ``batches`` test batches (:func:`demos.deq_same_model.solve_same_model`), Broyden with ``broyden_m``
    pairs (None: the run's setting)."""
    run = TrainedRun(path, data_dir)
    model = run.model(solver_options(run.solver, run.cfg, "numpy"))
    cfg = argparse.Namespace(**dict(vars(run.cfg), **({} if broyden_m is None else dict(broyden_m=broyden_m))))
    out = solve_same_model(model, solvers, cfg, "numpy", run.batches(train=False), batches)
    return dict(checkpoint=str(path), trained_with=run.solver, measurements=out, ratios=same_model_ratios(out))


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
                res = solvers_on_model(path, args.solvers, args.batches, args.data_dir, args.broyden_m)
            except (CheckpointError, DataError) as exc:
                raise Refused(exc) from None
            results.append(res)
            print(f"{path}:", flush=True)
            print(same_model_table({res["trained_with"]: res}), flush=True)
        if args.out:
            command = shlex.join(run_command("demos.deq_solvers", argv))
            write_text_replacing(args.out, json.dumps(dict(command=command, results=results), indent=1) + "\n")
    except Refused as exc:
        return refuse(exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
