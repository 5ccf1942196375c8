"""Train a Deep Equilibrium Model with forward iteration and with Anderson acceleration, and compare them.

The experiment of M. Al Dajani & D. Keyes, "Accelerating AI Performance using
Anderson Extrapolation on GPUs" (arXiv 2410.19460): the DEQ of the "Deep Implicit
Layers" tutorial (deq_model.py) trained on CIFAR-10, its implicit layer solved by
forward iteration or by Anderson (m = 5, β = 1.0, λ = 1e-5, tolerance 1e-2, at
most 1000 iterations), gradients by implicit differentiation.  The fixed-point
solves run in fixedpoint's NumPy solver for CPU tensors and its CuPy solver for
CUDA tensors, the model's tensors crossing over zero-copy through DLPack.

Examples
--------
    python demos/deq_cifar10.py --dataset digits --solver both --epochs 5 --out out/deq-digits
    python demos/deq_cifar10.py --dataset fashion-mnist --limit-train 5000 --epochs 3 --out out/deq-fmnist
    python demos/deq_cifar10.py --dataset cifar10 --data-dir ~/data --device cuda --epochs 20

Ctrl-C saves a checkpoint and the metrics so far; run the same command with
``--resume`` to continue.  See docs/deq.md for measured results.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root (demos/, benchmarks/, tooling/) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from demos.batches import Batches  # noqa: E402
from demos.data import DATASETS, DataError, load_dataset  # noqa: E402
from demos.deq_report import compare, comparison_table, machine_info, totals, write_outputs  # noqa: E402
from demos.deq_training import build_run, load_checkpoint, residual_curves, save_checkpoint, train  # noqa: E402
from fixedpoint.torch import solver_backend_for  # noqa: E402

#: Settings that must match for --resume to continue a run.
RESUME_KEYS = ("dataset", "limit_train", "limit_test", "batch_size", "lr", "weight_decay", "epochs", "channels",
               "inner_channels", "groups", "m", "beta", "lam", "lam_mode", "backward_lam_mode", "tol", "max_iter",
               "stop_mode", "whole_batch", "backward_tol", "backward_max_iter", "seed", "augment", "device",
               "solver_backend")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default="cifar10",
                   help="cifar10 (cifar-10-batches-py), fashion-mnist (IDX files) or digits (scikit-learn, built in)")
    d.add_argument("--data-dir", default=None,
                   help="cifar10: the folder holding cifar-10-batches-py/ (or that folder), default ./data; "
                        "fashion-mnist: the IDX folder, default /usr/share/datasets/fashion-mnist")
    d.add_argument("--no-download", action="store_true",
                   help="cifar10: never try torchvision's downloader when the folder is missing")
    d.add_argument("--limit-train", type=_positive_int, default=None, help="use the first N training images")
    d.add_argument("--limit-test", type=_positive_int, default=None, help="use the first N test images")
    d.add_argument("--augment", choices=("auto", "on", "off"), default="auto",
                   help="random crop (padding 4) and horizontal flip; auto: on for cifar10 only")
    s = p.add_argument_group("solver (defaults: arXiv 2410.19460)")
    s.add_argument("--solver", choices=("forward", "anderson", "both"), default="both",
                   help="fixed-point solver; both trains the same model from the same seed with each")
    s.add_argument("--m", type=_positive_int, default=5, help="Anderson window m")
    s.add_argument("--beta", type=float, default=1.0, help="Anderson mixing beta in (0, 1]")
    s.add_argument("--lam", type=float, default=1e-5, help="Anderson regularisation lambda")
    s.add_argument("--lam-mode", choices=("absolute", "relative"), default="absolute",
                   help="forward solve: lambda added as is (the paper) or scaled by the largest squared residual")
    s.add_argument("--backward-lam-mode", choices=("absolute", "relative"), default="relative",
                   help="the same for the adjoint solve, whose scale is the loss gradient's (tiny): an absolute "
                        "lambda would dominate its Gram matrix")
    s.add_argument("--tol", type=_positive_float, default=1e-2, help="tolerance of the forward solve")
    s.add_argument("--max-iter", type=_positive_int, default=1000, help="iteration cap of the forward solve")
    s.add_argument("--stop-mode", choices=("rel", "abs"), default="rel",
                   help="rel: ||f(z)-z|| / (||f(z)|| + eps), per sample; abs: ||f(z)-z||")
    s.add_argument("--backward-tol", type=_positive_float, default=None,
                   help="tolerance of the adjoint solve (default: --tol)")
    s.add_argument("--backward-max-iter", type=_positive_int, default=None,
                   help="iteration cap of the adjoint solve (default: --max-iter)")
    s.add_argument("--whole-batch", action="store_true",
                   help="stop when the residual of the whole batch, as one vector, is below --tol (the Deep "
                        "Implicit Layers tutorial's rule) instead of every sample's (default: per sample)")
    s.add_argument("--solver-backend", choices=("auto", "numpy", "cupy", "torch"), default="auto",
                   help="library the solver runs in; auto: NumPy on CPU, CuPy on CUDA (zero-copy via DLPack)")
    m = p.add_argument_group("model and training")
    m.add_argument("--epochs", type=_positive_int, default=10)
    m.add_argument("--batch-size", type=_positive_int, default=100)
    m.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (cosine schedule)")
    m.add_argument("--weight-decay", type=float, default=0.0)
    m.add_argument("--channels", type=_positive_int, default=48, help="channels of the DEQ state z")
    m.add_argument("--inner-channels", type=_positive_int, default=64)
    m.add_argument("--groups", type=_positive_int, default=8, help="GroupNorm groups")
    m.add_argument("--seed", type=int, default=0, help="seed of the weights, batch order and augmentation")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    r.add_argument("--out", default="out/deq", help="output folder (metrics, summary, plots, checkpoints)")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    r.add_argument("--fig-iters", type=_positive_int, default=50,
                   help="iterations of the residual-curve solves on one fixed batch (Figure 1)")
    r.add_argument("--fig-tol", type=_positive_float, default=1e-6, help="tolerance of those solves")
    r.add_argument("--blas-threads", type=_positive_int, default=None,
                   help="NumPy BLAS threads while training (default: 1 with the NumPy solver, which otherwise "
                        "competes with torch's threads for the cores; unchanged otherwise)")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bars (default: on a terminal)")
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


def _check_solver_values(args, parser):
    if not 0.0 < args.beta <= 1.0:
        parser.error(f"--beta must be in (0, 1], got {args.beta}")
    if args.lam < 0:
        parser.error(f"--lam must be >= 0, got {args.lam}")
    if args.weight_decay < 0:
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.channels % args.groups or args.inner_channels % args.groups:
        parser.error(f"--groups ({args.groups}) must divide --channels ({args.channels}) and --inner-channels "
                     f"({args.inner_channels})")


def _epoch_line(rec, epochs):
    return (f"{rec['solver']:>8} epoch {rec['epoch']}/{epochs}: train loss {rec['train_loss']:.3f} "
            f"acc {rec['train_acc']:.2%} | test loss {rec['test_loss']:.3f} acc {rec['test_acc']:.2%} | "
            f"time {rec['time_train']:.1f} s (forward solve {rec['time_forward_solve']:.1f}, backward solve "
            f"{rec['time_backward_solve']:.1f}, rest {rec['time_rest']:.1f}) | f-evals/batch forward "
            f"{rec['fwd_fev_mean']:.1f} (max {rec['fwd_fev_max']}), adjoint {rec['bwd_fev_mean']:.1f} "
            f"(max {rec['bwd_fev_max']}) | iterations/sample {rec['fwd_iter_mean']:.1f} / {rec['bwd_iter_mean']:.1f}"
            f" | converged {rec['fwd_converged']:.1%} / {rec['bwd_converged']:.1%}")


def _curve_summary(curves, tol):
    out = {}
    for name, c in curves.items():
        hit = next((i for i, r in enumerate(c["residual"]) if r <= tol), None)
        out[name] = dict(iterations=len(c["residual"]), final_residual=c["residual"][-1], status=c["status"],
                         iterations_to_tol=None if hit is None else c["iteration"][hit],
                         time_to_tol=None if hit is None else c["time"][hit],
                         time_per_iteration=c["time"][-1] / len(c["time"]) if c["time"] else None)
    return out


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


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    _check_solver_values(args, parser)
    device, backend = _resolve_device(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    with _blas_threads(args, backend):
        return _main(args, device, backend, argv)


def _main(args, device, backend, argv):
    try:
        data = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = data.limited(args.limit_train, args.limit_test)
    augment = args.augment == "on" or (args.augment == "auto" and args.dataset == "cifar10")
    mean, std = data.channel_stats()
    train_batches = Batches(data.train_x, data.train_y, args.batch_size, mean, std, data.max_value, device,
                            shuffle=True, augment=augment, seed=args.seed)
    test_batches = Batches(data.test_x, data.test_y, args.batch_size, mean, std, data.max_value, device,
                           shuffle=False, augment=False, seed=args.seed)
    out = args.out
    os.makedirs(out, exist_ok=True)
    config = {k: getattr(args, k) for k in RESUME_KEYS}
    config.update(augment=augment, device=str(device), solver_backend=backend)
    settings = dict(config, solver=args.solver, data_source=data.source, image_shape=list(data.shape),
                    n_train=int(len(data.train_y)), n_test=int(len(data.test_y)),
                    blas_threads=args.blas_threads or (1 if backend == "numpy" else "library default"),
                    command=shlex.join(["python", "demos/deq_cifar10.py", *(sys.argv[1:] if argv is None else argv)]))
    summary = dict(settings=settings, machine=machine_info(device))
    methods = ["forward", "anderson"] if args.solver == "both" else [args.solver]
    progress = True if args.no_progress else None
    print(f"DEQ on {data.name}: {len(data.train_y)} training / {len(data.test_y)} test images of shape "
          f"{data.shape}, {device}, solver in {backend}; solvers: {', '.join(methods)}; output in {out}")

    def ckpt_path(method):
        return os.path.join(out, f"checkpoint-{method}.pt")

    runs = {}
    for method in methods:  # every checkpoint is checked before anything is trained or written
        run = build_run(method, args, data.shape, len(data.classes), len(train_batches), device, backend)
        path = ckpt_path(method)
        if args.resume and os.path.exists(path):
            load_checkpoint(run, path, config)
            print(f"{method}: resumed from {path} at epoch {run.epoch + 1}, batch {run.next_batch}")
        elif args.resume:
            print(f"{method}: no checkpoint {path}; starting afresh")
        elif os.path.exists(path):
            os.remove(path)  # a fresh run: an old checkpoint must not be resumed by mistake later
        runs[method] = run

    def on_epoch_end(run, rec):
        save_checkpoint(run, ckpt_path(run.solver), config)
        summary["totals"] = {k: totals(r) for k, r in runs.items()}
        write_outputs(out, runs, summary, plots=False)
        print(_epoch_line(rec, args.epochs), flush=True)

    current = None
    try:
        for run in runs.values():
            current = run
            train(run, train_batches, test_batches, args.epochs, device, on_epoch_end, progress)
        current = None
    except BaseException as exc:
        if current is not None:
            save_checkpoint(current, ckpt_path(current.solver), config)
        summary.update(interrupted=type(exc).__name__, totals={k: totals(r) for k, r in runs.items()},
                       comparison=compare(runs))
        try:
            write_outputs(out, runs, summary, plots=True)
        except Exception as plot_exc:  # never hide the original error behind a plotting one
            print(f"(could not write every output: {plot_exc})", file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt):
            print(f"\ninterrupted: checkpoint and metrics so far saved in {out}; run the same command with "
                  "--resume to continue", file=sys.stderr)
            return 130
        raise

    fig_model = runs["anderson" if "anderson" in runs else methods[-1]].model
    images, _ = test_batches.batch(0, 0)
    t0 = time.perf_counter()
    curves = residual_curves(fig_model, images, methods if len(methods) > 1 else ["forward", "anderson"], args,
                             backend, device)
    summary.update(totals={k: totals(r) for k, r in runs.items()}, comparison=compare(runs),
                   residual_curves=dict(model=fig_model.deq.config.method.name, batch_size=int(images.shape[0]),
                                        seconds=time.perf_counter() - t0, **_curve_summary(curves, args.tol)))
    write_outputs(out, runs, summary, curves, plots=True)
    print()
    print(comparison_table(runs, summary["comparison"]))
    rc = summary["residual_curves"]
    print(f"\nOne fixed test batch of {rc['batch_size']}, relative residual to {args.tol:g} (Figure 1, "
          f"residuals.png): " + "; ".join(
              f"{k}: {rc[k]['iterations_to_tol']} iterations, {rc[k]['time_to_tol'] or float('nan'):.3f} s"
              for k in ("forward", "anderson") if k in rc))
    print(f"outputs: {out}/summary.json, metrics.jsonl, metrics.csv, batches.csv, residuals.csv, *.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
