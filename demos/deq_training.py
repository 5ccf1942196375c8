"""Training the DEQ classifier with one solver: per-batch solver statistics, resumable checkpoints.

A :class:`Run` holds the model, optimizer, schedule, random state and every
record so far; its checkpoint is written after every epoch and when the run is
interrupted (Ctrl-C, SIGTERM, or any exception), so that ``--resume`` continues
from the batch where it stopped.

A training batch is all or nothing: what an interrupted batch had already
changed (BatchNorm's running statistics and batch counts, the random state) is
undone, and the optimizer step and the batch's record are made with SIGINT and
SIGTERM held back, so a run is always in the state after its last completed
batch.  Batch b of epoch e is the same whenever it is drawn (see :mod:`batches`)
and evaluation changes no state, so an interrupted and resumed run computes
exactly what an uninterrupted one computes: the same losses and accuracies, bit
for bit, on the same machine with the same thread settings (tested).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

import fixedpoint
from demos.batches import Batches
from demos.data import load_dataset
from demos.deq_model import DEQClassifier
from tooling.timing import traced_solve

__all__ = ["Run", "build_run", "train", "evaluate", "evaluation_points", "save_checkpoint", "load_checkpoint",
           "residual_curves", "solver_options", "solve_record", "checkpoint_path", "CheckpointError", "Terminated",
           "sigterm_stops", "signals_held", "SOLVERS", "COMPACT", "TrainedRun", "non_finite_tensors"]

#: The solvers the demo trains, in the order of its outputs.
SOLVERS = ("forward", "anderson", "broyden")

#: ``--compact`` values and the layer's ``compact`` argument they stand for.
COMPACT = {"auto": "auto", "on": True, "off": False}

#: Signals that stop training after a checkpoint: Ctrl-C, and what schedulers send before they kill a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed: unreadable, of another solver or of another configuration (named)."""


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM within :func:`sigterm_stops`: training stops as on Ctrl-C (a KeyboardInterrupt)."""


def checkpoint_path(out, solver):
    """The checkpoint file of ``solver`` in output folder ``out``."""
    return os.path.join(out, f"checkpoint-{solver}.pt")


def solver_options(method, args, backend):
    """Keyword arguments of :class:`fixedpoint.torch.DEQ` for ``method`` from the command-line flags."""
    opts = dict(method=method, backend=backend, tol=args.tol, max_iter=args.max_iter, stop_mode=args.stop_mode,
                batch=not args.whole_batch, compact=COMPACT[args.compact] if not args.whole_batch else False,
                gradient=args.gradient)
    if args.gradient == "implicit":
        opts.update(backward_tol=args.backward_tol, backward_max_iter=args.backward_max_iter)
        if method == "anderson":
            opts.update(backward_options=dict(m=args.m, beta=args.beta, lam=args.lam, lam_mode=args.backward_lam_mode))
    elif args.gradient == "phantom":
        opts.update(gradient_steps=args.gradient_steps, gradient_damping=args.gradient_damping)
    if method == "anderson":
        opts.update(m=args.m, beta=args.beta, lam=args.lam, lam_mode=args.lam_mode)
    elif method == "broyden":
        opts.update(m=args.broyden_m)
    return opts


@dataclass
class Run:
    """Everything about training one model with one solver."""

    solver: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0            # epochs completed (training and evaluation)
    next_batch: int = 0       # next training batch of the current epoch
    epochs: list = field(default_factory=list)    # one record per completed epoch
    batches: list = field(default_factory=list)   # one record per training batch
    rng: dict = field(default_factory=dict)       # torch's random state after the last completed batch
    evaluations: list = field(default_factory=list)  # one record per test evaluation (several per epoch)
    net: torch.nn.Module | None = None  # what training calls: None (the model) or its DDP wrapper (demos/ddp.py)

    @property
    def train_time(self):
        """Training seconds so far (solves, backward pass, optimizer; evaluation excluded)."""
        return float(sum(b["time_total"] for b in self.batches))


def build_run(method, args, shape, n_classes, steps_per_epoch, device, backend):
    """A fresh model (seeded by ``args.seed``: every solver starts from the same weights), Adam, cosine schedule."""
    torch.manual_seed(args.seed)
    c, h, _ = shape
    model = DEQClassifier(c, h, n_classes, args.channels, args.inner_channels, args.groups,
                          deq_options=solver_options(method, args, backend)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs * steps_per_epoch))
    return Run(method, model, optimizer, scheduler, rng=_rng_state(device))


class TrainedRun:
    """A checkpoint of ``demos/deq_cifar10.py`` opened for study (``demos/deq_compaction.py``,
    ``deq_solvers.py``, ``deq_jacobian.py``): the run's settings, its data as the run had them, its
    batches, and its model with the trained weights under any DEQ options.

    Attributes
    ----------
    state : dict
        The checkpoint (:func:`save_checkpoint`), loaded on the CPU.
    cfg : argparse.Namespace
        The run's settings (``state["config"]``).
    solver : str
        The solver the model was trained with.
    data : demos.data.ImageData
        The run's images, limited as in the run.

    Raises
    ------
    CheckpointError
        When ``path`` is missing, is not a checkpoint of the demo (garbage, a truncated file, a
        pickle of anything but tensors and plain data: nothing in it is run), or holds
        non-finite weights; the one-line message names the file.
    demos.data.DataError
        When the run's data set cannot be loaded.
    """

    def __init__(self, path, data_dir=None):
        self.state = _read_checkpoint(path, "choose another checkpoint")
        missing = [k for k in ("config", "solver", "model") if k not in self.state]
        config = self.state.get("config")
        if not missing and isinstance(config, dict):
            missing = [k for k in STUDY_KEYS if k not in config]
        if missing or not isinstance(config, dict) or not isinstance(self.state["solver"], str):
            raise CheckpointError(f"{path} is not a checkpoint of demos/deq_cifar10.py (it lacks "
                                  f"{', '.join(missing) or 'a settings dictionary'})")
        _check_finite(path, self.state, "choose another checkpoint")
        self.path = path
        self.cfg = argparse.Namespace(**config)
        self.solver = self.state["solver"]
        self.data = load_dataset(self.cfg.dataset, data_dir).limited(self.cfg.limit_train, self.cfg.limit_test)
        self._stats = self.data.channel_stats()

    def batches(self, train):
        """The run's training batches (in the run's order, without augmentation) or its test batches, on the CPU."""
        x, y = (self.data.train_x, self.data.train_y) if train else (self.data.test_x, self.data.test_y)
        mean, std = self._stats
        return Batches(x, y, self.cfg.batch_size, mean, std, self.data.max_value, torch.device("cpu"),
                       shuffle=train, augment=False, seed=self.cfg.seed)

    def model(self, deq_options):
        """The run's model with the checkpoint's weights, its DEQ layer built with ``deq_options``."""
        c, h, _ = self.data.shape
        cfg = self.cfg
        model = DEQClassifier(c, h, len(self.data.classes), cfg.channels, cfg.inner_channels, cfg.groups,
                              deq_options=deq_options)
        try:
            model.load_state_dict(self.state["model"])
        except Exception as exc:  # shapes, keys or types that do not fit: torch raises several kinds
            raise CheckpointError(f"{self.path} does not fit the model of its own settings ({type(exc).__name__}: "
                                  f"{_first_line(exc)})") from None
        return model


def _rng_state(device):
    """torch's random state (CPU, and the GPUs when ``device`` is CUDA): dropout or random layers draw from it."""
    state = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(run, path, config):
    """Write ``run`` to ``path`` atomically (a temporary file, then a rename)."""
    state = dict(config=config, solver=run.solver, model=run.model.state_dict(),
                 optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(), epoch=run.epoch,
                 next_batch=run.next_batch, epochs=run.epochs, batches=run.batches, rng=run.rng,
                 evaluations=run.evaluations)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


#: Settings of a run that :class:`TrainedRun` reads (the data, the model and :func:`solver_options`).
STUDY_KEYS = ("dataset", "limit_train", "limit_test", "batch_size", "seed", "channels", "inner_channels", "groups",
              "tol", "max_iter", "stop_mode", "whole_batch", "compact", "gradient", "m", "beta", "lam", "lam_mode",
              "backward_lam_mode", "backward_tol", "backward_max_iter", "broyden_m", "gradient_steps",
              "gradient_damping")

CHECKPOINT_KEYS = ("config", "solver", "model", "optimizer", "scheduler", "epoch", "next_batch", "epochs", "batches",
                   "rng")


def load_checkpoint(run, path, config, steps_per_epoch):
    """Restore ``run`` from ``path``; the run must have been made with the same solver and ``config``.

    Parameters
    ----------
    run : Run
        A fresh run of the solver the checkpoint must hold.
    path : str
    config : dict
        The settings that must match (``--resume`` refuses to mix two experiments).
    steps_per_epoch : int
        Training batches per epoch, to check the checkpoint's position against.

    Raises
    ------
    CheckpointError
        When the file is not a checkpoint of this demo, holds another solver, was made with
        another setting (named in the message) or does not fit the model; ``run`` is then unchanged.
    """
    state = _read_checkpoint(path, "delete it, or use --overwrite or another --out")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this demo (it lacks {', '.join(missing)}); delete it, "
                              "or use --overwrite or another --out")
    if state["solver"] != run.solver:
        raise CheckpointError(f"{path} holds a run of the {state['solver']!r} solver, expected {run.solver!r} "
                              f"(checkpoint-{run.solver}.pt); use --overwrite or another --out")
    old_config = state["config"] if isinstance(state["config"], dict) else {}
    for key, value in config.items():
        old = old_config.get(key)
        if old != value:
            raise CheckpointError(f"--resume: {path} was made with {key}={old!r}, this run has {key}={value!r}; "
                                  f"use the same settings, or --overwrite, or another --out")
    epoch, next_batch, epochs, batches = state["epoch"], state["next_batch"], state["epochs"], state["batches"]
    consistent = (isinstance(epoch, int) and isinstance(next_batch, int) and isinstance(epochs, list)
                  and isinstance(batches, list) and len(epochs) == epoch and 0 <= next_batch <= steps_per_epoch
                  and len(batches) == epoch * steps_per_epoch + next_batch)
    if not consistent:
        raise CheckpointError(f"{path} is inconsistent (epoch {epoch!r}, next batch {next_batch!r}, "
                              f"{len(batches) if isinstance(batches, list) else '?'} batch records); delete it, or "
                              "use --overwrite or another --out")
    evaluations = state.get("evaluations", [])  # absent from checkpoints written before the evaluation points
    if not (isinstance(evaluations, list) and all(isinstance(e, dict) for e in evaluations)):
        raise CheckpointError(f"{path} holds evaluation records that are not a list of records; delete it, or use "
                              "--overwrite or another --out")
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        raise CheckpointError(f"{path} holds no random state; delete it, or use --overwrite or another --out")
    _check_finite(path, state, "use --overwrite or another --out")
    before = _copy_state((run.model.state_dict(), run.optimizer.state_dict(), run.scheduler.state_dict()))
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
    except Exception as exc:  # shapes, keys or types that do not fit: torch raises several kinds
        run.model.load_state_dict(before[0])
        run.optimizer.load_state_dict(before[1])
        run.scheduler.load_state_dict(before[2])
        raise CheckpointError(f"{path} does not fit this model ({type(exc).__name__}: {_first_line(exc)}); use "
                              "--overwrite or another --out") from None
    run.rng = rng
    run.epoch, run.next_batch = epoch, next_batch
    run.epochs, run.batches = epochs, batches
    run.evaluations = evaluations


def _read_checkpoint(path, advice):
    """The dictionary in checkpoint file ``path``, read with ``weights_only=True``: tensors and plain data only,
    so that a malicious pickle runs nothing.

    Raises
    ------
    CheckpointError
        When the file is missing or unreadable, or holds something else than a dictionary; the
        message names the file, says what was wrong and ends with ``advice``.
    """
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a truncated, foreign or malicious file
        raise CheckpointError(f"{path} is not a readable checkpoint of demos/deq_cifar10.py ({type(exc).__name__}: "
                              f"{_first_line(exc)}); {advice}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint of demos/deq_cifar10.py (it holds a "
                              f"{type(state).__name__}, not a dictionary); {advice}")
    return state


def non_finite_tensors(state):
    """Names of the floating-point tensors holding NaN or inf in ``state`` (nested dicts and lists), sorted."""
    found = []

    def visit(value, name):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                if not bool(torch.isfinite(value).all()):
                    found.append(name)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{name}[{i}]")

    visit(state, "")
    return sorted(found)


def _check_finite(path, state, advice):
    """Refuse a checkpoint whose weights, buffers or optimizer state hold NaN or inf (a run that diverged, or a
    damaged file): resuming or studying it would only write NaN and inf into the outputs."""
    for part, what in (("model", "weights"), ("optimizer", "optimizer state")):
        bad = non_finite_tensors(state.get(part, {}))
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise CheckpointError(f"{path} holds non-finite {what} (NaN or inf in {shown}): the run diverged or "
                                  f"the file is damaged; {advice}")


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def _copy_state(state):
    """A deep copy of (model, optimizer, scheduler) state dicts: tensors are cloned, not shared."""
    return copy.deepcopy(state)


@contextlib.contextmanager
def sigterm_stops():
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), as SIGINT (Ctrl-C) does.

    Schedulers send SIGTERM before they kill a job; the demo then writes its checkpoint and
    exits as on Ctrl-C.  The previous handler is restored afterwards; outside the main
    thread (where Python cannot set handlers) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_held(deliver=True):
    """Hold back SIGINT and SIGTERM until the block ends, so that what it does is never half done.

    With ``deliver`` (the default) a signal that arrived meanwhile is raised again at the end,
    to the handlers that were in place; without it, it is dropped (used while the checkpoint of
    a run that is already stopping is written).  Outside the main thread nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if deliver:
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- training and evaluation

def solve_record(stats):
    """The per-batch record of one call's :class:`fixedpoint.torch.DEQStats` (after its backward pass).

    ``fwd_*``: the forward solve (``fwd_fev`` evaluations of f, each on the samples still
    iterating, ``fwd_rows`` samples in all).  ``bwd_*``: the backward pass's products through
    f besides the one that carries the gradient to x and the parameters: the adjoint solve
    (implicit gradients: ``bwd_fev`` products, ``bwd_rows`` samples, per-sample iterations,
    convergence) or the unrolled steps (phantom: ``gradient_steps``; JFB: none), for which
    convergence does not apply (NaN).  ``graph_rows``: samples f was evaluated on with
    autograd (after the solve, and again in the adjoint solve with compaction).
    ``cpu_*``: CPU seconds of this process (a cost that other processes on a shared
    machine do not inflate, unlike the wall times ``time_*``).  ``time_*_map``: the part
    of a solve's time spent in its map (f, or the products), the rest being the solver's
    own work (CPU only, else NaN).  ``time_backward_layer``: the layer's whole backward
    pass.
    """
    fwd, bwd = stats.forward, stats.backward
    rec = dict(fwd_fev=fwd.n_fev, fwd_rows=fwd.n_rows, fwd_iter_mean=fwd.n_iter_mean, fwd_iter_max=fwd.n_iter_max,
               fwd_converged=fwd.converged_fraction, fwd_residual_max=fwd.residual_max)
    size = fwd.batch_size
    if bwd is not None:
        rec.update(bwd_fev=bwd.n_fev, bwd_rows=bwd.n_rows, bwd_iter_mean=bwd.n_iter_mean, bwd_iter_max=bwd.n_iter_max,
                   bwd_converged=bwd.converged_fraction, bwd_residual_max=bwd.residual_max,
                   graph_rows=size * stats.graph_evals + bwd.n_graph_rows)
    else:  # phantom gradients or JFB: k - 1 products through the unrolled steps besides the last
        k = (stats.backward_vjps or 1) - 1
        rec.update(bwd_fev=k, bwd_rows=k * size, bwd_iter_mean=float(k), bwd_iter_max=k, bwd_converged=float("nan"),
                   bwd_residual_max=float("nan"), graph_rows=size * stats.graph_evals)
    nan = float("nan")
    rec.update(cpu_forward_solve=fwd.cpu_time, cpu_backward_solve=bwd.cpu_time if bwd is not None else 0.0,
               time_forward_solve=fwd.wall_time, time_forward_map=nan if fwd.map_time is None else fwd.map_time,
               time_backward_solve=bwd.wall_time if bwd is not None else 0.0,
               time_backward_map=(nan if bwd.map_time is None else bwd.map_time) if bwd is not None else 0.0,
               time_backward_layer=nan if stats.backward_time is None else stats.backward_time)
    return rec


def _train_batch(run, images, labels, device, jac_reg=0.0, jac_probes=1, ranks=None, global_rows=None):
    """One optimizer step on one batch, all or nothing.

    If the batch does not complete (Ctrl-C, SIGTERM, an error), everything it changed is
    restored: the model's buffers (BatchNorm's running statistics and batch counts, updated by
    the forward pass), and the parameters, optimizer and schedule should an error strike inside
    the step; the random state is the run's.  The step, the schedule and the record are made with
    the stop signals held back.  Data-parallel (``ranks``, :class:`demos.ddp.Ranks`): ``images``
    are this rank's share of a global batch of ``global_rows``, the loss is scaled so that DDP's
    average of the gradients is the global batch's (:meth:`demos.ddp.Ranks.loss_scale`), and the
    record is that of the global batch (:meth:`demos.ddp.Ranks.reduce_batch`).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    before = _copy_state((run.model.state_dict(), run.optimizer.state_dict(), run.scheduler.state_dict()))
    committed = False
    try:
        run.model.train()
        net = run.model if run.net is None else run.net
        if jac_reg:
            logits, jac = net(images, jacobian_probes=jac_probes)
            jac_mean = jac.mean()
            loss = F.cross_entropy(logits, labels)
            total = loss + jac_reg * jac_mean
        else:
            logits, jac_mean = net(images), None
            total = loss = F.cross_entropy(logits, labels)
        if ranks is not None:
            total = total * ranks.loss_scale(int(labels.shape[0]), global_rows)
        run.optimizer.zero_grad(set_to_none=True)
        t_back = time.perf_counter()
        total.backward()
        _sync(device)
        t_back = time.perf_counter() - t_back
        stats = run.model.deq.stats
        with signals_held():
            run.optimizer.step()
            run.scheduler.step()
            _sync(device)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            rec = dict(solver=run.solver, epoch=run.epoch + 1, batch=run.next_batch, step=len(run.batches) + 1,
                       size=int(labels.shape[0]), loss=float(loss.detach()),
                       correct=int((logits.argmax(1) == labels).sum()), **solve_record(stats),
                       time_backward_pass=t_back, time_total=elapsed, cpu_total=cpu)
            if jac_mean is not None:
                rec["jac_frobenius"] = float(jac_mean.detach())
            if ranks is not None:
                rec = ranks.reduce_batch(rec)
            rng = _rng_state(device)
            run.batches.append(rec)
            run.next_batch += 1
            run.rng = rng
            committed = True
    except BaseException:
        if not committed:
            with signals_held(deliver=False):
                run.model.load_state_dict(before[0])
                run.optimizer.load_state_dict(before[1])
                run.scheduler.load_state_dict(before[2])
                _set_rng_state(run.rng)
        raise
    return rec


def evaluate(model, batches, device, ranks=None):
    """Test loss, accuracy and forward-solve statistics, in eval mode without autograd.

    ``test_count`` is the number of test images.  Data-parallel (``ranks``): each rank
    evaluates its share of every batch, and the losses, correct answers, images, rows and
    converged samples are summed over the ranks, the evaluations per batch and the time are
    their maxima (:class:`demos.ddp.Ranks`).
    """
    model.eval()
    t0, c0 = time.perf_counter(), time.process_time()
    loss_sum, correct, count, fevs, rows, conv = 0.0, 0, 0, [], [], []
    with torch.no_grad():
        for _, images, labels in batches.epoch(0):
            if labels.shape[0] == 0:  # this rank's share of a batch smaller than the ranks
                fevs.append(0)
                continue
            logits = model(images)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            count += int(labels.shape[0])
            st = model.deq.stats.forward
            fevs.append(st.n_fev)
            rows.append(st.n_rows)
            conv.append(st.converged_fraction * labels.shape[0])
    _sync(device)
    elapsed, n_rows, n_converged = time.perf_counter() - t0, int(np.sum(rows)), np.sum(conv)
    cpu = time.process_time() - c0
    if ranks is not None:
        loss_sum, correct, count, n_rows, n_converged, cpu = ranks.sum([loss_sum, correct, count, n_rows, n_converged,
                                                                        cpu])
        fevs, (elapsed,) = ranks.max(fevs), ranks.max([elapsed])
    return dict(test_loss=loss_sum / count, test_acc=correct / count, test_count=count, time_eval=elapsed,
                cpu_eval=cpu,
                test_fwd_fev_mean=float(np.mean(fevs)), test_fwd_fev_max=int(np.max(fevs)),
                test_fwd_rows=n_rows, test_fwd_converged=float(n_converged / count))


def _epoch_record(run, test):
    mine = [b for b in run.batches if b["epoch"] == run.epoch + 1]
    n = sum(b["size"] for b in mine)

    def mean(key):
        return float(np.mean([b[key] for b in mine]))

    def weighted(key):
        return float(sum(b[key] * b["size"] for b in mine) / n)

    def total(key):
        return int(sum(b.get(key, 0) for b in mine))

    t_train = sum(b["time_total"] for b in mine)
    t_fwd = sum(b["time_forward_solve"] for b in mine)
    t_bwd = sum(b["time_backward_solve"] for b in mine)
    rec = dict(solver=run.solver, epoch=run.epoch + 1, lr=run.optimizer.param_groups[0]["lr"],
               train_loss=weighted("loss"), train_acc=sum(b["correct"] for b in mine) / n, **test,
               time_train=t_train, time_forward_solve=t_fwd, time_backward_solve=t_bwd,
               time_rest=t_train - t_fwd - t_bwd, time_cumulative=run.train_time,
               fwd_fev_mean=mean("fwd_fev"), fwd_fev_max=int(max(b["fwd_fev"] for b in mine)),
               fwd_iter_mean=mean("fwd_iter_mean"), fwd_iter_max=int(max(b["fwd_iter_max"] for b in mine)),
               fwd_converged=weighted("fwd_converged"),
               bwd_fev_mean=mean("bwd_fev"), bwd_fev_max=int(max(b["bwd_fev"] for b in mine)),
               bwd_iter_mean=mean("bwd_iter_mean"), bwd_iter_max=int(max(b["bwd_iter_max"] for b in mine)),
               bwd_converged=weighted("bwd_converged"),
               fwd_rows=total("fwd_rows"), bwd_rows=total("bwd_rows"), graph_rows=total("graph_rows"),
               time_backward_pass=float(sum(b["time_backward_pass"] for b in mine)),
               cpu_train=float(sum(b["cpu_total"] for b in mine)),
               cpu_cumulative=float(sum(b["cpu_total"] for b in run.batches)),
               fwd_fev_cumulative=int(sum(b["fwd_fev"] for b in run.batches)),
               bwd_fev_cumulative=int(sum(b["bwd_fev"] for b in run.batches)))
    if all("jac_frobenius" in b for b in mine):
        rec["jac_frobenius"] = mean("jac_frobenius")
    return rec


def evaluation_points(steps_per_epoch, per_epoch):
    """The batches of an epoch after which the test set is evaluated: ``per_epoch`` points evenly spread,
    the last one the epoch's end (a sorted tuple of batch counts in 1..``steps_per_epoch``; fewer points
    when the epoch has fewer batches)."""
    return tuple(sorted({max(1, -(-j * steps_per_epoch // per_epoch)) for j in range(1, per_epoch + 1)}))


def _evaluation_record(run, test, steps_per_epoch):
    """The record of a test evaluation made after ``run.next_batch`` batches of epoch ``run.epoch + 1``."""
    mine = run.batches
    return dict(solver=run.solver, epoch=run.epoch + 1, batch=run.next_batch, step=len(mine),
                epoch_progress=run.epoch + run.next_batch / steps_per_epoch,
                time_cumulative=run.train_time, cpu_cumulative=float(sum(b["cpu_total"] for b in mine)),
                **{k: test[k] for k in ("test_loss", "test_acc", "time_eval", "cpu_eval")})


def _due(run, points, steps_per_epoch):
    """True when the test set is to be evaluated now: after a point of the epoch other than its end (which
    the epoch's own evaluation covers), unless this point's evaluation is already recorded (a resumed run)."""
    if run.next_batch not in points or run.next_batch == steps_per_epoch:
        return False
    last = run.evaluations[-1] if run.evaluations else None
    return not (last and last["epoch"] == run.epoch + 1 and last["batch"] == run.next_batch)


def train(run, train_batches, test_batches, epochs, device, on_epoch_end, progress=None, jac_reg=0.0, jac_probes=1,
          ranks=None, evals_per_epoch=1):
    """Train ``run`` until ``epochs`` epochs are complete, evaluating ``evals_per_epoch`` times per epoch.

    The test set is evaluated after the batches :func:`evaluation_points` gives, the last time at the
    epoch's end; each evaluation appends a record to ``run.evaluations`` (the training time and CPU
    time so far, the test loss and accuracy, and the evaluation's own cost, which is not training
    time), from which :mod:`demos.deq_report` computes the time to an accuracy.
    ``on_epoch_end(run, record)`` is called after each epoch (it writes the
    checkpoint and the metrics).  On any exception, Ctrl-C and SIGTERM included,
    the run is left in the state after its last completed batch (see
    :func:`_train_batch`), so that the caller can checkpoint it; the interrupted
    batch, or the interrupted evaluation, is redone on resume.  torch's random
    state is the run's own while it trains.  With ``jac_reg`` > 0 the loss is the cross entropy
    plus ``jac_reg`` times the batch mean of the DEQ's estimate of ‖∂f/∂z‖²_F at z* with
    ``jac_probes`` probes (Bai, Koltun & Kolter, ICML 2021).  Data-parallel training: ``ranks``
    (:class:`demos.ddp.Ranks`), batches of this rank's shares, ``run.net`` the DDP wrapper.
    """
    n = len(train_batches)
    points = evaluation_points(n, evals_per_epoch)

    def evaluate_now():
        rec = _evaluation_record(run, evaluate(run.model, test_batches, device, ranks), n)
        with signals_held():
            run.evaluations.append(rec)

    _set_rng_state(run.rng)
    while run.epoch < epochs:
        if _due(run, points, n):  # resumed after a batch whose evaluation had not been made
            evaluate_now()
        bar = tqdm(total=n, initial=run.next_batch, desc=f"{run.solver} epoch {run.epoch + 1}/{epochs}",
                   unit="batch", disable=progress, leave=False, dynamic_ncols=True)
        with bar:
            for index, images, labels in train_batches.epoch(run.epoch, start=run.next_batch):
                rec = _train_batch(run, images, labels, device, jac_reg, jac_probes, ranks, train_batches.rows(index))
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['correct'] / rec['size']:.3f}",
                                fwd_it=rec["fwd_fev"], bwd_it=rec["bwd_fev"])
                if _due(run, points, n):
                    evaluate_now()
        test = evaluate(run.model, test_batches, device, ranks)
        record = _epoch_record(run, test)
        point = _evaluation_record(run, test, n)
        with signals_held():
            run.epochs.append(record)
            run.evaluations.append(point)
            run.epoch += 1
            run.next_batch = 0
        on_epoch_end(run, record)
    return run


# ---------------------------------------------------------------- the paper's Figure 1

def residual_curves(model, images, methods, args, backend, device):
    """Relative residual against iteration and wall time for one fixed batch (arXiv 2410.19460, Figure 1).

    The DEQ's map z ↦ f(z, x) at the batch's injection x is solved by each method
    from z = 0 to ``args.fig_tol`` or ``args.fig_iters`` iterations, the whole
    batch as one vector (the paper's ‖f(z) − z‖ / (‖f(z)‖ + ε) over the batch).

    Returns
    -------
    dict
        method -> {"iteration": [...], "residual": [...], "time": [...]} (time in
        seconds since the solve began, taken after each evaluation of f).
    """
    model.eval()
    f = model.deq.f
    out = {}
    with torch.no_grad():
        x = model.injection(images)
        z0 = torch.zeros_like(x)
        for method in methods:
            opts = solver_options(method, args, backend)
            own = {k: opts[k] for k in ("m", "beta", "lam", "lam_mode") if k in opts}  # Anderson's or Broyden's
            run_opts = dict(method=method, tol=args.fig_tol, stop_mode="rel", batch=False,
                            backend=opts["backend"], **own)
            fixedpoint.solve(lambda z: f(z, x), z0, max_iter=3, **run_opts)  # warm-up: lazy initialisation
            res, times = traced_solve(lambda z: f(z, x), z0, sync=lambda: _sync(device), max_iter=args.fig_iters,
                                      **run_opts)
            hist = np.asarray(res.residual_history, dtype=float).reshape(-1)
            out[method] = dict(iteration=list(range(1, len(hist) + 1)), residual=hist.tolist(),
                               time=times[:len(hist)], status=res.status)
    return out
