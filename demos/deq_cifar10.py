"""Train a Deep Equilibrium Model with forward iteration, Anderson acceleration and Broyden, and compare them.

The experiment of M. Al Dajani & D. Keyes, "Accelerating AI Performance using
Anderson Extrapolation on GPUs" (arXiv 2410.19460): the DEQ of the "Deep Implicit
Layers" tutorial (deq_model.py) trained on CIFAR-10, its implicit layer solved by
forward iteration or by Anderson (m = 5, β = 1.0, λ = 1e-5, tolerance 1e-2, at
most 1000 iterations), gradients by implicit differentiation; here also by
limited-memory Broyden, with samples that have converged leaving the batch
(``--compact``), with phantom or Jacobian-free gradients (``--gradient``) and with
Jacobian regularisation (``--jac-reg``).  The fixed-point solves run in
fixedpoint's NumPy solver for CPU tensors and its CuPy solver for CUDA tensors,
the model's tensors crossing over zero-copy through DLPack.

Examples
--------
    python -m demos.deq_cifar10 --dataset digits --solver both --epochs 5 --out out/deq-digits
    python -m demos.deq_cifar10 --dataset digits --solver forward anderson broyden --compact on --out out/deq-3
    python -m demos.deq_cifar10 --dataset digits --solver anderson --gradient phantom --jac-reg 0.1 --out out/deq-pg
    python -m demos.deq_cifar10 --dataset fashion-mnist --limit-train 5000 --epochs 3 --out out/deq-fmnist
    python -m demos.deq_cifar10 --dataset cifar10 --data-dir ~/data --device cuda --epochs 20
    torchrun --standalone --nproc_per_node=2 -m demos.deq_cifar10 --dataset digits --solver anderson --out out/deq-2

Under torchrun the demo trains data-parallel (DistributedDataParallel; gloo on the CPU,
NCCL with --device cuda): --batch-size is the global batch, each rank takes its share,
and rank 0 alone prints and writes (see demos/ddp.py and docs/distributed.md).

Ctrl-C or SIGTERM (what job schedulers send) saves a checkpoint and the metrics
so far; run the same command with ``--resume`` to continue: the resumed run
computes exactly what an uninterrupted one would.  An ``--out`` folder that holds
an earlier run is never overwritten unless ``--overwrite`` is given.  torch uses
as many threads as there are idle CPUs unless ``--threads`` says otherwise.
Errors in the data, the checkpoints or the flags are one line on stderr and exit
status 2.  See docs/deq.md for measured results.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shlex
import sys
import time

import torch

from demos.batches import Batches
from demos.cli import (
    EXIT_REFUSED,
    Refused,
    add_progress_flag,
    check_out_folder,
    progress_disabled,
    refuse,
    remove_outputs,
)
from demos.data import DATASETS, DataError, load_dataset
from demos.ddp import Ranks, add_distributed_flags
from demos.deq_report import OUTPUT_FILES, compare, comparison_table, machine_info, totals, write_outputs
from demos.deq_same_model import same_model_ratios, same_model_table, solve_same_model
from demos.deq_training import (
    COMPACT,
    SOLVERS,
    CheckpointError,
    Terminated,
    build_run,
    checkpoint_path,
    load_checkpoint,
    residual_curves,
    save_checkpoint,
    signals_held,
    sigterm_stops,
    train,
)
from fixedpoint.torch import solver_backend_for
from fixedpoint.torch.deq import PHANTOM_DAMPING, PHANTOM_STEPS
from tooling.timing import add_threads_flag, positive_float, positive_int, use_threads

#: Settings that must match for --resume to continue a run.
RESUME_KEYS = ("dataset", "limit_train", "limit_test", "batch_size", "lr", "weight_decay", "epochs", "channels",
               "inner_channels", "groups", "m", "beta", "lam", "lam_mode", "backward_lam_mode", "tol", "max_iter",
               "stop_mode", "whole_batch", "backward_tol", "backward_max_iter", "seed", "augment", "device",
               "solver_backend", "broyden_m", "compact", "gradient", "gradient_steps", "gradient_damping", "jac_reg",
               "jac_probes")

#: Exit status of a run stopped by a signal: 128 + the signal's number, as a shell reports it.
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def make_parser():
    """The command line of the demo (``--help`` shows every default once)."""
    p = argparse.ArgumentParser(prog="python -m demos.deq_cifar10", description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default="cifar10",
                   help="cifar10 (cifar-10-batches-py), fashion-mnist (IDX files) or digits (scikit-learn, built "
                        "in) (default: %(default)s)")
    d.add_argument("--data-dir", default=None,
                   help="cifar10: the folder holding cifar-10-batches-py/ (or that folder), default ./data; "
                        "fashion-mnist: the IDX folder, default /usr/share/datasets/fashion-mnist")
    d.add_argument("--no-download", action="store_true",
                   help="cifar10: never try torchvision's downloader when the folder is missing")
    d.add_argument("--limit-train", type=positive_int, default=None, metavar="N",
                   help="use the first N training images (default: all)")
    d.add_argument("--limit-test", type=positive_int, default=None, metavar="N",
                   help="use the first N test images (default: all)")
    d.add_argument("--augment", choices=("auto", "on", "off"), default="auto",
                   help="random crop (padding 4) and horizontal flip; auto: on for cifar10 only (default: "
                        "%(default)s)")
    s = p.add_argument_group("solver (defaults: arXiv 2410.19460)")
    s.add_argument("--solver", nargs="+", choices=(*SOLVERS, "both"), default=["both"], metavar="SOLVER",
                   help="fixed-point solvers, any of forward, anderson, broyden (both: forward and anderson); each "
                        "trains the same model from the same seed, compared side by side (default: both)")
    s.add_argument("--m", type=positive_int, default=5, help="Anderson window m (default: %(default)s)")
    s.add_argument("--beta", type=float, default=1.0, help="Anderson mixing beta in (0, 1] (default: %(default)s)")
    s.add_argument("--lam", type=float, default=1e-5, help="Anderson regularisation lambda (default: %(default)s)")
    s.add_argument("--broyden-m", type=positive_int, default=50,
                   help="Broyden: rank-one update pairs kept; more than fixedpoint's default of 20, so that a DEQ "
                        "solve to the tolerance rarely fills them (docs/deq.md) (default: %(default)s)")
    s.add_argument("--lam-mode", choices=("absolute", "relative"), default="absolute",
                   help="forward solve: lambda added as is (the paper) or scaled by the largest squared residual "
                        "(default: %(default)s)")
    s.add_argument("--backward-lam-mode", choices=("absolute", "relative"), default="relative",
                   help="the same for the adjoint solve, whose scale is the loss gradient's (tiny): an absolute "
                        "lambda would dominate its Gram matrix (default: %(default)s)")
    s.add_argument("--tol", type=positive_float, default=1e-2,
                   help="tolerance of the forward solve (default: %(default)s)")
    s.add_argument("--max-iter", type=positive_int, default=1000,
                   help="iteration cap of the forward solve (default: %(default)s)")
    s.add_argument("--stop-mode", choices=("rel", "abs"), default="rel",
                   help="rel: ||f(z)-z|| / (||f(z)|| + eps), per sample; abs: ||f(z)-z|| (default: %(default)s)")
    s.add_argument("--backward-tol", type=positive_float, default=None,
                   help="tolerance of the adjoint solve of --gradient implicit (default: the value of --tol)")
    s.add_argument("--backward-max-iter", type=positive_int, default=None,
                   help="iteration cap of the adjoint solve of --gradient implicit (default: the value of "
                        "--max-iter)")
    s.add_argument("--whole-batch", action="store_true",
                   help="stop when the residual of the whole batch, as one vector, is below --tol (the Deep "
                        "Implicit Layers tutorial's rule) instead of every sample's (default: per sample)")
    s.add_argument("--compact", choices=tuple(COMPACT), default="auto",
                   help="evaluate f only on the samples still iterating (forward and adjoint solves): on; off; auto: "
                        "once at most half the batch iterates (default: %(default)s)")
    s.add_argument("--solver-backend", choices=("auto", "numpy", "cupy", "torch"), default="auto",
                   help="library the solver runs in; auto: NumPy on CPU, CuPy on CUDA (zero-copy via DLPack) "
                        "(default: %(default)s)")
    g = p.add_argument_group("gradients and regularisation")
    g.add_argument("--gradient", choices=("implicit", "phantom", "jfb"), default="implicit",
                   help="implicit differentiation (an adjoint solve), phantom gradients (Geng et al. 2021) or "
                        "Jacobian-free backpropagation (Fung et al. 2022) (default: %(default)s)")
    g.add_argument("--gradient-steps", type=positive_int, default=None,
                   help=f"phantom gradients: unrolled steps k; with another --gradient it is refused (default: "
                        f"{PHANTOM_STEPS})")
    g.add_argument("--gradient-damping", type=float, default=None,
                   help=f"phantom gradients: damping lambda in (0, 1], 1 undamped; with another --gradient it is "
                        f"refused (default: {PHANTOM_DAMPING})")
    g.add_argument("--jac-reg", type=float, default=0.0, metavar="WEIGHT",
                   help="add WEIGHT times the batch mean of the Hutchinson estimate of ||df/dz||_F^2 at z* to the "
                        "loss (Bai, Koltun & Kolter 2021); 0: off (default: %(default)s)")
    g.add_argument("--jac-probes", type=positive_int, default=1,
                   help="probes of that estimate per training batch (default: %(default)s)")
    m = p.add_argument_group("model and training")
    m.add_argument("--epochs", type=positive_int, default=10, help="training epochs (default: %(default)s)")
    m.add_argument("--batch-size", type=positive_int, default=100,
                   help="images per training and test batch; under torchrun the global batch, shared by the ranks "
                        "(default: %(default)s)")
    m.add_argument("--lr", type=positive_float, default=1e-3,
                   help="Adam learning rate, with a cosine schedule (default: %(default)s)")
    m.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay (default: %(default)s)")
    m.add_argument("--channels", type=positive_int, default=48,
                   help="channels of the DEQ state z (default: %(default)s)")
    m.add_argument("--inner-channels", type=positive_int, default=64,
                   help="channels between the cell's two convolutions (default: %(default)s)")
    m.add_argument("--groups", type=positive_int, default=8, help="GroupNorm groups (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, batch order and augmentation (default: %(default)s)")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model's tensors live; cuda needs a usable GPU (default: %(default)s)")
    add_threads_flag(r)
    r.add_argument("--out", default="out/deq",
                   help="output folder: metrics, summary, plots, checkpoints (default: %(default)s)")
    again = r.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoints, keeping every solver's records")
    again.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in --out (its checkpoints, metrics and plots are deleted); "
                            "without --resume or --overwrite, a folder that holds one is refused")
    r.add_argument("--evals-per-epoch", type=positive_int, default=4, metavar="K",
                   help="test-set evaluations per epoch, evenly spread, the last at the epoch's end; the time to an "
                        "accuracy is read from them, and their cost is recorded apart from the training time "
                        "(default: %(default)s)")
    r.add_argument("--same-model-batches", type=int, default=5, metavar="N",
                   help="at the end, each final model solved by every solver that trained, on the first N test "
                        "batches (the report's \"same model\" table); 0: skipped (default: %(default)s)")
    r.add_argument("--fig-iters", type=positive_int, default=50,
                   help="iterations of the residual-curve solves on one fixed batch, Figure 1 (default: "
                        "%(default)s)")
    r.add_argument("--fig-tol", type=positive_float, default=1e-6,
                   help="tolerance of those solves (default: %(default)s)")
    r.add_argument("--blas-threads", type=positive_int, default=None, metavar="N",
                   help="NumPy BLAS threads while training (default: 1 with the NumPy solver, which otherwise "
                        "competes with torch's threads for the cores; unchanged otherwise)")
    add_progress_flag(r)
    add_distributed_flags(r)
    return p


def _resolve_device(args, parser):
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no usable CUDA device here (torch {torch.__version__}, built for CUDA "
                     f"{torch.version.cuda or 'none'}); use --device cpu")
    device = torch.device(args.device)
    if args.solver_backend == "cupy" and device.type != "cuda":
        parser.error("--solver-backend cupy needs --device cuda (CuPy solves on the GPU)")
    try:
        backend = solver_backend_for(args.solver_backend, device)
    except ImportError as exc:
        parser.error(f"--solver-backend {args.solver_backend}: {exc}")
    return device, backend


def _check_gradient_flags(args, parser):
    """Refuse flags of another gradient mode (the layer refuses them too), then fill in the phantom defaults.

    ``--gradient-steps`` and ``--gradient-damping`` belong to phantom gradients, ``--backward-tol`` and
    ``--backward-max-iter`` to the adjoint solve of implicit ones: given with another ``--gradient`` they would be
    ignored, and yet recorded in summary.json as if they had been used.
    """
    owners = (("--gradient-steps", "gradient_steps", "phantom"), ("--gradient-damping", "gradient_damping", "phantom"),
              ("--backward-tol", "backward_tol", "implicit"), ("--backward-max-iter", "backward_max_iter", "implicit"))
    for flag, key, mode in owners:
        if getattr(args, key) is not None and args.gradient != mode:
            parser.error(f"{flag} applies to --gradient {mode} only, not to --gradient {args.gradient}; leave it "
                         f"out or use --gradient {mode}")
    # The settings a run records (and --resume compares) keep the phantom defaults whatever the mode, as before.
    if args.gradient_steps is None:
        args.gradient_steps = PHANTOM_STEPS
    if args.gradient_damping is None:
        args.gradient_damping = PHANTOM_DAMPING


def _check_solver_values(args, parser):
    _check_gradient_flags(args, parser)
    if not 0.0 < args.beta <= 1.0:
        parser.error(f"--beta must be in (0, 1], got {args.beta}")
    if not 0 <= args.lam < float("inf"):
        parser.error(f"--lam must be a number >= 0, got {args.lam}")
    if not 0.0 < args.gradient_damping <= 1.0:
        parser.error(f"--gradient-damping must be in (0, 1], got {args.gradient_damping}")
    if not 0 <= args.jac_reg < float("inf"):
        parser.error(f"--jac-reg must be a number >= 0, got {args.jac_reg}")
    if args.whole_batch and args.compact == "on":
        parser.error("--compact on drops samples that have converged, which --whole-batch does not have; use "
                     "--compact off or auto with --whole-batch")
    if args.same_model_batches < 0:
        parser.error(f"--same-model-batches must be an integer >= 0, got {args.same_model_batches}")
    if not 0 <= args.weight_decay < float("inf"):
        parser.error(f"--weight-decay must be a number >= 0, got {args.weight_decay}")
    if args.channels % args.groups or args.inner_channels % args.groups:
        parser.error(f"--groups ({args.groups}) must divide --channels ({args.channels}) and --inner-channels "
                     f"({args.inner_channels})")


def _epoch_line(rec, epochs):
    return (f"{rec['solver']:>8} epoch {rec['epoch']}/{epochs}: train loss {rec['train_loss']:.3f} "
            f"acc {rec['train_acc']:.2%} | test loss {rec['test_loss']:.3f} acc {rec['test_acc']:.2%} | "
            f"time {rec['time_train']:.1f} s (forward solve {rec['time_forward_solve']:.1f}, backward pass "
            f"{rec['time_backward_pass']:.1f}, adjoint solve {rec['time_backward_solve']:.1f}) | f-evals/batch "
            f"forward {rec['fwd_fev_mean']:.1f} (max {rec['fwd_fev_max']}), adjoint {rec['bwd_fev_mean']:.1f} "
            f"(max {rec['bwd_fev_max']}) | rows of f forward / adjoint {rec['fwd_rows']} / {rec['bwd_rows']} | "
            f"iterations/sample {rec['fwd_iter_mean']:.1f} / {rec['bwd_iter_mean']:.1f} | converged "
            f"{rec['fwd_converged']:.1%} / {rec['bwd_converged']:.1%}"
            + (f" | jacobian {rec['jac_frobenius']:.3g}" if "jac_frobenius" in rec else ""))


def _curve_summary(curves, tol):
    out = {}
    for name, c in curves.items():
        hit = next((i for i, r in enumerate(c["residual"]) if r <= tol), None)
        out[name] = dict(iterations=len(c["residual"]), final_residual=c["residual"][-1], status=c["status"],
                         iterations_to_tol=None if hit is None else c["iteration"][hit],
                         time_to_tol=None if hit is None else c["time"][hit],
                         time_per_iteration=c["time"][-1] / len(c["time"]) if c["time"] else None)
    return out


def _curve_line(name, rc):
    c = rc[name]
    if c["iterations_to_tol"] is None:
        return f"{name}: not reached in {c['iterations']} iterations (residual {c['final_residual']:.2e})"
    return f"{name}: {c['iterations_to_tol']} iterations, {c['time_to_tol']:.3f} s"


def _blas_threads(args, backend):
    """Limit NumPy's BLAS threads (threadpoolctl, installed with scikit-learn) for the NumPy solver.

    On a CPU, torch's OpenMP threads and NumPy's OpenBLAS threads otherwise
    compete for the same cores after every evaluation of f: measured on 2 cores,
    Anderson's whole-batch (B = 1) Gram products took 27 ms instead of 8 ms per
    iteration.  Returns a context manager.
    """
    limit = args.blas_threads if args.blas_threads is not None else (1 if backend == "numpy" else None)
    if limit is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def _output_names():
    """The files of a run in its --out folder: the outputs (demos/deq_report.py) and every solver's checkpoint."""
    return set(OUTPUT_FILES) | {os.path.basename(checkpoint_path("", s)) for s in SOLVERS}


def _check_out(args):
    """Refuse an --out that is not a usable folder, or that holds an earlier run without --resume or --overwrite
    (the demos' one policy, :func:`demos.cli.check_out_folder`); returns the earlier run's files."""
    return check_out_folder(args.out, _output_names(), overwrite=args.overwrite, resume=args.resume,
                            can_resume=True)


def _recorded_solvers(out):
    """Solvers named in the records of folder ``out`` (metrics.jsonl, batches.csv); unreadable lines are skipped."""
    found = set()
    try:
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError, AttributeError):
                    found.add(json.loads(line).get("solver"))
    except OSError:
        pass
    try:
        with open(os.path.join(out, "batches.csv"), newline="", encoding="utf-8") as fh:
            found |= {row.get("solver") for row in csv.DictReader(fh)}
    except (OSError, csv.Error, UnicodeDecodeError):
        pass
    return found & set(SOLVERS)


def main(argv=None):
    """Run the demo with the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 when done; 2 for an error in the flags, the data, the --out folder or a checkpoint (one
    line on stderr); 130 after Ctrl-C and 143 after SIGTERM, with the checkpoint and the
    metrics so far written (continue with ``--resume``).
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    _check_solver_values(args, parser)
    device, backend = _resolve_device(args, parser)
    try:  # under torchrun: join the process group (None otherwise)
        ranks = Ranks.start(device, args.dist_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    lead = ranks is None or ranks.is_main  # the process that prints and writes
    with ranks.quiet() if ranks is not None else contextlib.nullcontext():
        print(use_threads(args.threads), flush=True)
        with sigterm_stops(), _blas_threads(args, backend):
            try:
                status = _main(args, device, backend, argv, ranks)
            except Refused as exc:
                message = str(exc)
                if ranks is not None and not ranks.agreed:  # tell the other ranks, which wait for this one
                    message = ranks.agree(message) or message
                status = refuse(message) if lead else EXIT_REFUSED
            except KeyboardInterrupt as exc:  # raised before training began (later ones are handled in _main)
                if lead:
                    print(f"\n{_signal_name(exc)}: stopped before training began; nothing was written",
                          file=sys.stderr)
                return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT
    if ranks is not None:  # not after an exception, which ends the job anyway
        ranks.close()
    return status


def _signal_name(exc):
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (SIGINT)"


def _methods(chosen):
    """The solvers of ``--solver``, in the order of :data:`SOLVERS` ("both": forward and anderson)."""
    wanted = set(chosen) | ({"forward", "anderson"} if "both" in chosen else set())
    return [s for s in SOLVERS if s in wanted]


def _main(args, device, backend, argv, ranks=None):
    lead = ranks is None or ranks.is_main
    earlier = _check_out(args)
    try:
        data = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    except DataError as exc:
        raise Refused(str(exc)) from None
    data = data.limited(args.limit_train, args.limit_test)
    augment = args.augment == "on" or (args.augment == "auto" and args.dataset == "cifar10")
    mean, std = data.channel_stats()
    share = {} if ranks is None else dict(rank=ranks.rank, world_size=ranks.world_size)
    train_batches = Batches(data.train_x, data.train_y, args.batch_size, mean, std, data.max_value, device,
                            shuffle=True, augment=augment, seed=args.seed, **share)
    test_batches = Batches(data.test_x, data.test_y, args.batch_size, mean, std, data.max_value, device,
                           shuffle=False, augment=False, seed=args.seed, **share)
    if ranks is not None and (short := ranks.check_shares(len(data.train_y), args.batch_size, "training")):
        raise Refused(short)
    out = args.out
    config = {k: getattr(args, k) for k in RESUME_KEYS}
    config.update(augment=augment, device=str(device), solver_backend=backend, n_train=int(len(data.train_y)),
                  n_test=int(len(data.test_y)), image_shape=list(data.shape))
    settings = dict(config, solver=" ".join(args.solver), data_source=data.source,
                    blas_threads=args.blas_threads or (1 if backend == "numpy" else "library default"),
                    command=shlex.join([*(["python"] if ranks is None else ranks.launcher()), "-m", "demos.deq_cifar10",
                                        *(sys.argv[1:] if argv is None else argv)]))
    methods = _methods(args.solver)

    # Every checkpoint is checked before anything is trained or written.  With --resume, the other
    # solver's checkpoint is read too, so that its records are kept in the outputs.
    runs = {}
    if args.resume:
        orphans = sorted(s for s in _recorded_solvers(out) if not os.path.exists(checkpoint_path(out, s)))
        if orphans:
            raise Refused(f"--resume: {out} holds records of the {' and '.join(orphans)} solver without "
                           f"{', '.join(os.path.basename(checkpoint_path(out, s)) for s in orphans)}, so they "
                           "could not be kept; use --overwrite or another --out")
    for method in SOLVERS:
        path = checkpoint_path(out, method)
        resumable = args.resume and os.path.exists(path)
        if method not in methods and not resumable:
            continue
        run = build_run(method, args, data.shape, len(data.classes), len(train_batches), device, backend)
        if resumable:
            try:
                load_checkpoint(run, path, config, len(train_batches))
            except CheckpointError as exc:
                raise Refused(str(exc)) from None
            where = (f"at epoch {run.epoch + 1}, batch {run.next_batch}" if run.epoch < args.epochs
                     else "(finished)")
            role = "resumed" if method in methods else "records kept"
            print(f"{method}: {role} from {path} {where}")
        elif args.resume:
            print(f"{method}: no checkpoint {path}; starting afresh")
        runs[method] = run
    if ranks is not None:  # every rank must start from the same checkpoints, which rank 0 alone will write
        where = {k: (r.epoch, r.next_batch, len(r.batches)) for k, r in runs.items()}
        refusal = ranks.agree(None, where, f"the ranks see different runs in {out}, which must be a folder every "
                                           "rank reads (a shared file system); solver: (epoch, next batch, records)")
        if refusal:
            raise Refused(refusal)
    if not lead:  # the other ranks write nothing
        earlier = []
    if args.overwrite:
        remove_outputs(out, earlier)
    try:
        if lead:
            os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise Refused(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None

    world_size = 1 if ranks is None else ranks.world_size  # processes training together (torchrun)
    summary = dict(settings=dict(settings, world_size=world_size), machine=machine_info(device), world_size=world_size)
    print(f"DEQ on {data.name}: {len(data.train_y)} training / {len(data.test_y)} test images of shape "
          f"{data.shape}, {device}, solver in {backend}; solvers: {', '.join(methods)}; output in {out}")
    progress = progress_disabled(args.no_progress) or not lead  # tqdm's disable: bars on a terminal only

    def on_epoch_end(run, rec):
        if ranks is not None:
            if not ranks.check_replicas(run) and lead:
                print(f"warning: the ranks' weights differ after epoch {run.epoch} of {run.solver} (summary.json, "
                      "distributed.replica_checks)", file=sys.stderr)
            summary["distributed"] = ranks.describe()
        if not lead:
            return
        save_checkpoint(run, checkpoint_path(out, run.solver), config)
        summary["totals"] = {k: totals(r) for k, r in runs.items()}
        write_outputs(out, runs, summary, plots=False)
        print(_epoch_line(rec, args.epochs), flush=True)

    current = None
    try:
        for method in methods:
            current = runs[method]
            if ranks is not None:
                ranks.prepare(current)
            train(current, train_batches, test_batches, args.epochs, device, on_epoch_end, progress, args.jac_reg,
                  args.jac_probes, ranks, args.evals_per_epoch)
        current = None
        if not lead:
            return 0
        fig_model = runs["anderson" if "anderson" in methods else methods[-1]].model
        images, _ = test_batches.whole().batch(0, 0)
        t0 = time.perf_counter()
        curves = residual_curves(fig_model, images, methods if len(methods) > 1 else ["forward", "anderson"],
                                 args, backend, device)
        summary.update(totals={k: totals(r) for k, r in runs.items()}, comparison=compare(runs),
                       residual_curves=dict(model=fig_model.deq.config.method.name, batch_size=int(images.shape[0]),
                                            seconds=time.perf_counter() - t0, **_curve_summary(curves, args.tol)))
        trained = [s for s in SOLVERS if s in runs and runs[s].epochs]
        if args.same_model_batches and ranks is None and len(trained) > 1:
            summary["same_model"] = {
                s: dict(measurements=(m := solve_same_model(runs[s].model, trained, args, backend, test_batches,
                                                            args.same_model_batches)),
                        ratios=same_model_ratios(m))
                for s in trained}
        write_outputs(out, runs, summary, curves, plots=True)
        print()
        print(comparison_table(runs, summary["comparison"]))
        if "same_model" in summary:
            print()
            print(same_model_table(summary["same_model"]))
        rc = summary["residual_curves"]
        print(f"\nOne fixed test batch of {rc['batch_size']}, relative residual to {args.tol:g} (Figure 1, "
              f"residuals.png): " + "; ".join(_curve_line(k, rc) for k in SOLVERS if k in rc))
        print(f"outputs: {out}/summary.json, metrics.jsonl, metrics.csv, batches.csv, residuals.csv, *.png")
    except BaseException as exc:
        if lead:
            _save_what_was_done(out, runs, current, config, summary, exc)
        if isinstance(exc, KeyboardInterrupt):
            if lead:
                print(f"\n{_signal_name(exc)}: checkpoint and metrics so far saved in {out}; run the same command "
                      "with --resume to continue", file=sys.stderr)
            return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT
        raise
    return 0


def _save_what_was_done(out, runs, current, config, summary, exc):
    """After an interruption or an error: the checkpoint of the run in training and every record so far.

    Further Ctrl-C or SIGTERM are ignored while this writes (it takes a moment); an error here
    is printed and never hides the original one.
    """
    with signals_held(deliver=False):
        try:
            if current is not None:  # the run is in the state after its last completed batch
                save_checkpoint(current, checkpoint_path(out, current.solver), config)
        except Exception as save_exc:
            print(f"(could not write the checkpoint of {current.solver}: {save_exc})", file=sys.stderr)
        summary.update(interrupted=type(exc).__name__, totals={k: totals(r) for k, r in runs.items()},
                       comparison=compare(runs))
        try:
            write_outputs(out, runs, summary, plots=True)
        except Exception as write_exc:  # never hide the original error behind a plotting one
            print(f"(could not write every output: {write_exc})", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
