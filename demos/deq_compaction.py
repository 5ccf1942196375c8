"""What compaction saves on real batches of a trained DEQ: rows of f and CPU seconds, per setting.

Loads a checkpoint of ``demos/deq_cifar10.py`` (its model and settings), and for a few of
its training batches runs the forward and backward pass of one training step (no optimizer
step, so every setting sees the same weights and batch) with each setting of the layer:

- ``off``: ``compact=False``, f evaluated on the whole batch until its slowest sample stops;
- ``auto``: ``compact="auto"`` (from half the batch on, :data:`fixedpoint.iteration.COMPACT_AUTO`);
- ``on/ρ``: ``compact=True``, the adjoint's graph of f rebuilt on the active rows once they are at
  most ρ of the rows of the graph in use (the layer's ``rebuild_fraction`` option, default
  :data:`fixedpoint.torch.deq.REBUILD_FRACTION`; ρ = 0 never rebuilds: every product runs on the
  whole graph).

Reported per batch and setting: CPU seconds of this process (``time.process_time``, which
other processes on a shared machine inflate less than wall time) for the forward pass (the
solve) and the backward pass (the adjoint solve and the products), the part of the solves'
wall time spent in f or the products, and the rows: of f in the forward solve, of the
products in the adjoint solve, and of f re-evaluated to rebuild the adjoint's graph.
Settings are interleaved batch by batch so that a change of load affects them alike.

Example::

    python -m demos.deq_compaction out/deq-fmnist/checkpoint-forward.pt --batches 4 --out compaction.json
"""

from __future__ import annotations

import argparse
import json
import time

from torch.nn import functional as F

from demos.cli import Refused, add_overwrite_flag, check_out_file, refuse, write_text_replacing
from demos.data import DataError
from demos.deq_training import CheckpointError, TrainedRun, solver_options
from tooling.timing import add_threads_flag, positive_int, run_command, use_threads

#: (name, --compact value, the layer's rebuild_fraction) of each setting measured.
SETTINGS = (("off", "off", 0.5), ("auto", "auto", 0.5), ("on/0", "on", 0.0), ("on/0.25", "on", 0.25),
            ("on/0.5", "on", 0.5), ("on/1", "on", 1.0))


def make_parser():
    p = argparse.ArgumentParser(prog="python -m demos.deq_compaction", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint-SOLVER.pt written by demos/deq_cifar10.py")
    p.add_argument("--batches", type=positive_int, default=3, help="training batches measured (default: %(default)s)")
    p.add_argument("--first", type=int, default=0, help="index of the first batch (default: %(default)s)")
    p.add_argument("--epoch", type=int, default=1, help="epoch whose batch order is used (default: %(default)s)")
    p.add_argument("--settings", nargs="+", default=[s[0] for s in SETTINGS], choices=[s[0] for s in SETTINGS],
                   help="settings measured (default: all)")
    p.add_argument("--data-dir", default=None, help="as for demos/deq_cifar10.py")
    p.add_argument("--out", default=None,
                   help="also write the measurements as JSON to this file; an existing file is refused unless "
                        "--overwrite is given (default: printed only)")
    add_overwrite_flag(p, "the file --out names")
    add_threads_flag(p)
    return p


def main(argv=None):
    """Measure with the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 when done; 2 for an error in the flags, the checkpoint, the data or ``--out`` (one line on stderr).
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.first < 0 or args.epoch < 0:
        parser.error(f"--first and --epoch must be >= 0, got {args.first} and {args.epoch}")
    try:
        if args.out:  # before any measurement: a refusal costs nothing
            check_out_file(args.out, overwrite=args.overwrite, inputs=[args.checkpoint])
        print(use_threads(args.threads), flush=True)
        try:
            run = TrainedRun(args.checkpoint, args.data_dir)
            batches = run.batches(train=True)
            if args.first + args.batches > len(batches):
                raise Refused(f"--first {args.first} --batches {args.batches}: the run has {len(batches)} training "
                              "batches")
            models = {}
            for name, compact, rebuild in SETTINGS:
                if name not in args.settings:
                    continue
                opts = solver_options(run.solver, argparse.Namespace(**dict(vars(run.cfg), compact=compact)),
                                      "numpy")
                models[name] = run.model(dict(opts, rebuild_fraction=rebuild)).train()
        except (CheckpointError, DataError) as exc:
            raise Refused(exc) from None
    except Refused as exc:
        return refuse(exc)
    try:
        from threadpoolctl import threadpool_limits

        blas = threadpool_limits(limits=1, user_api="blas")
    except ImportError:
        blas = None
    rows = []
    try:
        for b in range(args.first, args.first + args.batches):
            images, labels = batches.batch(args.epoch, b)
            for name, model in models.items():  # in the order of SETTINGS
                buffers = {k: v.clone() for k, v in model.state_dict().items()}
                c0 = time.process_time()
                loss = F.cross_entropy(model(images), labels)
                c1 = time.process_time()
                loss.backward()
                c2 = time.process_time()
                model.load_state_dict(buffers)  # BatchNorm's statistics: every setting sees the same model
                model.zero_grad(set_to_none=True)
                st = model.deq.stats
                fw, bw = st.forward, st.backward
                rec = dict(batch=b, setting=name, cpu_forward=c1 - c0, cpu_backward=c2 - c1,
                           fwd_fev=fw.n_fev, fwd_rows=fw.n_rows, fwd_iter_max=fw.n_iter_max,
                           bwd_fev=bw.n_fev, bwd_rows=bw.n_rows, bwd_rebuilt_rows=bw.n_graph_rows,
                           bwd_iter_max=bw.n_iter_max, wall_forward_solve=fw.wall_time, wall_forward_f=fw.map_time,
                           wall_adjoint_solve=bw.wall_time, wall_adjoint_products=bw.map_time)
                rows.append(rec)
                print(f"batch {b} {name:16s} CPU forward {rec['cpu_forward']:7.2f} s, backward "
                      f"{rec['cpu_backward']:7.2f} s | rows of f {fw.n_rows:6d} ({fw.n_fev} evaluations), "
                      f"of products {bw.n_rows:6d} ({bw.n_fev}), rebuilt {bw.n_graph_rows:4d} | wall in f "
                      f"{fw.map_time:6.2f} of {fw.wall_time:6.2f} s, in products {bw.map_time:6.2f} of "
                      f"{bw.wall_time:6.2f} s", flush=True)
    finally:
        if blas is not None:
            blas.unregister()
    print("\ntotals over the batches: CPU seconds forward / backward, rows of f / products / rebuilt")
    for name in models:
        mine = [r for r in rows if r["setting"] == name]
        print(f"  {name:16s} {sum(r['cpu_forward'] for r in mine):8.2f} / {sum(r['cpu_backward'] for r in mine):8.2f}"
              f"   {sum(r['fwd_rows'] for r in mine):7d} / {sum(r['bwd_rows'] for r in mine):7d} / "
              f"{sum(r['bwd_rebuilt_rows'] for r in mine):5d}")
    if args.out:
        command = " ".join(run_command("demos.deq_compaction", argv))
        record = dict(command=command, checkpoint=str(args.checkpoint), solver=run.solver, settings=run.state["config"],
                      measurements=rows)
        write_text_replacing(args.out, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
