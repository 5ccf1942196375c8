"""The DEQ demo under torchrun: data-parallel training (DistributedDataParallel), one process per rank.

``torchrun --standalone --nproc_per_node=N -m demos.deq_cifar10 ...`` starts N processes
and tells each its place through the environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``); :meth:`Ranks.start` reads it and joins the process group: gloo for a
CPU run, NCCL for ``--device cuda`` (each process on the GPU of its ``LOCAL_RANK``).
Without those variables the demo runs in one process, exactly as before, and nothing
here is used.

What every rank does, for each solver:

- **Batches.** ``--batch-size`` is the *global* batch, so that runs on any number of
  ranks train the same model.  Every rank draws the same global batch (the same seeded
  order and augmentation, :mod:`demos.batches`) and keeps the rows ``rank``,
  ``rank + N``, ``rank + 2N``, ... (strided: shares differ by at most one row).
- **Loss.** A rank's cross entropy is summed over its rows and divided by the global
  batch size, times N; DDP averages the ranks' gradients, so the step is the gradient
  of the global batch's mean loss, also when the shares differ in size (the last batch).
- **BatchNorm** (outside the DEQ) normalises with the statistics of the global batch
  (:class:`GlobalBatchNorm`), as one process would; ``torch.nn.SyncBatchNorm`` does the
  same on GPUs only.  The DEQ's solves are per sample (each sample its own stopping
  test, Anderson weights and iteration count) and its cell's GroupNorm is per sample,
  so a rank's solves are those of its rows in the one-process run up to rounding.
  Together: N ranks compute the one-process training up to rounding, which the solves
  amplify (measured with N = 2: the first loss agrees to 2e-7, the first gradient to
  2.7e-5 relative, as closely as one process agrees with itself when only the order of
  BatchNorm's sums changes, 3.3e-5; tested on the losses).  Not the same as one process: ``--whole-batch``
  stops each rank's share on its own residual, and the Jacobian regulariser's probes
  are drawn per rank.
- **Records.** Each training batch's record is reduced over the ranks before it is
  kept, by the rules of :func:`batch_rule` (sums of counts and CPU seconds, maxima of
  wall times and evaluations, sample-weighted means); evaluation sums the ranks' losses,
  correct answers and images (:meth:`Ranks.sum`), never averages of averages.  Every
  rank thus holds the same records; rank 0 alone prints them and writes metrics,
  checkpoints, plots and ``summary.json``.
- **Checks.** Before anything is written the ranks agree (:meth:`Ranks.agree`): an
  error on any rank (flags, data, checkpoints) stops every rank with exit status 2,
  rank 0 printing it.  After every epoch the ranks compare a digest of their weights
  and buffers (:meth:`Ranks.check_replicas`), recorded in ``summary.json``.
- **Failures.** Every collective fails after ``--dist-timeout`` seconds instead of
  waiting forever.  When a rank fails, rank 0's next collective fails at once (the
  connection closes) or torchrun stops it (SIGTERM); either way it writes the checkpoint
  of its last completed batch, which every rank completed, so that ``--resume`` under
  torchrun continues the run exactly (tested).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import shlex
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fixedpoint.comm import Communicator

__all__ = ["ENVIRONMENT", "DEFAULT_TIMEOUT", "Ranks", "GlobalBatchNorm", "global_batch_norm", "batch_rule",
           "add_distributed_flags"]

#: The variables torchrun sets in every process it starts; the demo is data-parallel when they are set.
ENVIRONMENT = ("WORLD_SIZE", "RANK", "LOCAL_RANK")

#: Seconds a collective waits for the other ranks before it fails (``--dist-timeout``): torch's own default for gloo,
#: long enough for one rank to solve its share of a batch to the iteration cap while another waits.
DEFAULT_TIMEOUT = 1800.0

#: Batch-record fields that name the batch: equal on every rank, kept as they are.
IDENTITY_FIELDS = ("solver", "epoch", "batch", "step")


def add_distributed_flags(parser) -> None:
    """Add ``--dist-timeout`` to an argparse parser or group."""
    from tooling.timing import positive_float

    parser.add_argument("--dist-timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="under torchrun: a collective that waits longer than this for another rank fails, so "
                             "that a stuck rank cannot hold the others forever (default: %(default)g)")


def batch_rule(field: str) -> str:
    """How a field of a training batch's record is combined over the ranks.

    - ``"same"``: :data:`IDENTITY_FIELDS` (solver, epoch, batch, step).
    - ``"sum"``: counts and costs: ``size`` and ``correct``, rows (``*_rows``: samples f or
      J_fᵀu was evaluated on) and CPU seconds (``cpu_*``: the job's CPU time).
    - ``"max"``: wall times (``time_*``: the ranks wait for the slowest in the gradient
      all-reduce) and per-rank extremes (``*_fev``, ``*_max``).  ``fwd_fev``, the calls of f,
      is then the count that one process solving the whole global batch makes: each of its
      calls serves every sample still iterating, so it calls f as often as the slowest
      rank does.
    - ``"mean"``: per-sample means and fractions (``loss``, ``*_mean``, ``*_converged``,
      ``jac_frobenius``), weighted by the ranks' ``size``.

    Raises
    ------
    KeyError
        For a field without a rule (a new field must be given one here).
    """
    if field in IDENTITY_FIELDS:
        return "same"
    if field in ("size", "correct") or field.endswith("_rows") or field.startswith("cpu_"):
        return "sum"
    if field.startswith("time_") or field.endswith(("_fev", "_max")):
        return "max"
    if field in ("loss", "jac_frobenius") or field.endswith(("_mean", "_converged")):
        return "mean"
    raise KeyError(f"batch record field {field!r} has no rule for combining it over the ranks (demos/ddp.py, "
                   "batch_rule)")


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; in the backward pass, the sum of the ranks' gradients (each rank's
    loss depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, t):
        total = t.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


class GlobalBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, summed over the ranks.

    In training mode the per-channel sums of x and x² (float64) and the count of values
    are added over the process group by one all-reduce, differentiable (its backward is
    the all-reduce of the gradients), so that each rank normalises its share as one process
    would normalise the whole batch, and the running statistics, updated from the global
    statistics, stay the same on every rank.  In eval mode it is BatchNorm2d.  Unlike
    ``torch.nn.SyncBatchNorm``, which needs a GPU, it runs on CPU tensors with gloo too.
    The parameters, buffers and state-dict keys are BatchNorm2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape (B, C, H, W), B this rank's share (it may be 0)."""
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        wide = x.to(torch.float64)
        local = torch.cat([wide.sum(dims), wide.square().sum(dims), wide.new_tensor([x.numel() // max(c, 1)])])
        total = _SumOverRanks.apply(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean.square()).clamp_min(0.0)
        running_mean, running_var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        if self.track_running_stats and running_mean is not None and running_var is not None and tracked is not None:
            with torch.no_grad():
                tracked.add_(1)
                factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
                running_mean.lerp_(mean.to(running_mean.dtype), factor)
                running_var.lerp_((var * n / (n - 1).clamp_min(1.0)).to(running_var.dtype), factor)
        shape = (1, c) + (1,) * (x.dim() - 2)
        out = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def global_batch_norm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm2d inside ``module`` by a :class:`GlobalBatchNorm` holding the same tensors.

    The parameters and buffers are the same objects, not copies, so that an optimizer made
    before keeps updating them.  Returns ``module``, changed in place.
    """
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            norm = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            for key, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(norm, key, tensor)
            norm.train(child.training)
            setattr(module, name, norm)
        else:
            global_batch_norm(child)
    return module


class Ranks:
    """This process's place in a torchrun job, and the collectives of the data-parallel demo.

    Parameters
    ----------
    rank, world_size, local_rank : int
        From torchrun's environment (:data:`ENVIRONMENT`).
    backend : str
        The process group's: "gloo" or "nccl".
    timeout : float
        Seconds before a waiting collective fails.

    Attributes
    ----------
    is_main : bool
        Rank 0: the one that prints and writes.
    agreed : bool
        Whether :meth:`agree` has been called (it must be, once, on every rank).
    replicas : list of dict
        One entry per :meth:`check_replicas`: solver, epoch, identical.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, backend: str, timeout: float) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend, self.timeout = backend, timeout
        self.is_main = rank == 0
        self.agreed = False
        self.replicas: list[dict[str, Any]] = []
        self.comm = Communicator(dist)  # sums and maxima of small host arrays, on the GPU for NCCL

    # --- start and stop --------------------------------------------------------------------------

    @staticmethod
    def requested(environ=os.environ) -> bool:
        """Whether this process was started by torchrun (any of :data:`ENVIRONMENT` is set)."""
        return any(k in environ for k in ENVIRONMENT)

    @classmethod
    def start(cls, device: torch.device, timeout: float = DEFAULT_TIMEOUT, environ=os.environ) -> Ranks | None:
        """Join torchrun's process group; None when the process was not started by torchrun.

        gloo for a CPU ``device``, NCCL for CUDA, after choosing the GPU of ``LOCAL_RANK``
        (so that ``torch.device("cuda")`` is this rank's GPU).

        Raises
        ------
        ValueError
            When only some of :data:`ENVIRONMENT` are set or are not numbers, when torch
            has no distributed support, or when ``LOCAL_RANK`` names no GPU of this machine.
        """
        if not cls.requested(environ):
            return None
        try:
            world_size, rank, local_rank = (int(environ[k]) for k in ENVIRONMENT)
        except (KeyError, ValueError):
            found = ", ".join(f"{k}={environ.get(k)!r}" for k in ENVIRONMENT)
            raise ValueError(f"torchrun's environment is incomplete ({found}); start the demo with torchrun, or "
                             "unset these variables for a single process") from None
        if not dist.is_available():
            raise ValueError("this torch has no torch.distributed: run the demo without torchrun")
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPU(s) here: start at "
                                 "most one process per GPU (--nproc_per_node)")
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        return cls(rank, world_size, local_rank, backend, timeout)

    def close(self) -> None:
        """Leave the process group (after a run that ended normally), every rank together: the others wait
        in a barrier while rank 0 writes the outputs, since a rank that tore down its gloo connections and
        exited while rank 0 still held them was seen to abort ("terminate called without an active
        exception"), which made torchrun stop rank 0 before it had written everything."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def quiet(self):
        """A context in which this process prints nothing to stdout unless it is rank 0."""
        if self.is_main:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        return stack

    def launcher(self) -> list[str]:
        """The torchrun command line that starts a job of this shape, for the records."""
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        if per_node == self.world_size:
            return ["torchrun", "--standalone", f"--nproc_per_node={per_node}"]
        return ["torchrun", f"--nnodes={self.world_size // max(per_node, 1)}", f"--nproc_per_node={per_node}"]

    def describe(self) -> dict[str, Any]:
        """The job's shape and rules, for ``summary.json``."""
        return dict(world_size=self.world_size, backend=self.backend, timeout_s=self.timeout,
                    command_prefix=shlex.join(self.launcher()),
                    batch_share="global batch of --batch-size; rank r keeps rows r, r + N, r + 2N, ...",
                    batch_norm="statistics of the global batch (demos.ddp.GlobalBatchNorm)"
                               if self.world_size > 1 else "BatchNorm2d (one rank)",
                    reductions="batch records: sums of counts, rows and CPU seconds; maxima of wall times and "
                               "evaluations per batch; sample-weighted means; evaluation: sums of losses, correct "
                               "answers and images over the ranks",
                    replicas_identical=all(r["identical"] for r in self.replicas) if self.replicas else None,
                    replica_checks=self.replicas)

    # --- agreement -------------------------------------------------------------------------------

    def agree(self, error: str | None = None, state: Any = None,
              disagreement: str = "the ranks disagree") -> str | None:
        """Gather every rank's ``error`` (or None) and ``state``; the message every rank should stop with, or None.

        Call it once on every rank at the same point (a collective), also on a rank that has
        failed before it (with its error), so that no rank waits for one that has given up.
        The message is the lowest rank's error (prefixed with its rank unless rank 0), or,
        when the states differ, ``disagreement`` followed by rank 0's state and the first
        that differs from it.
        """
        self.agreed = True
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (error, state))
        for r, (err, _) in enumerate(gathered):
            if err is not None:
                return err if r == 0 else f"rank {r}: {err}"
        differ = [r for r, (_, s) in enumerate(gathered) if s != gathered[0][1]]
        if differ:
            return f"{disagreement}: rank 0 has {gathered[0][1]!r}, rank {differ[0]} has {gathered[differ[0]][1]!r}"
        return None

    def check_shares(self, images: int, batch_size: int, what: str) -> str | None:
        """An error message when some batch of ``images`` would leave a rank without images, else None."""
        smallest = images % batch_size or batch_size  # the last batch
        if smallest >= self.world_size:
            return None
        return (f"--batch-size {batch_size} with {images} {what} images leaves a batch of {smallest}, fewer than the "
                f"{self.world_size} ranks; every rank needs a share of every training batch: choose a --batch-size "
                f"or --limit-train that leaves at least {self.world_size} images in the last batch")

    # --- training --------------------------------------------------------------------------------

    def prepare(self, run) -> None:
        """Make ``run`` (a :class:`demos.deq_training.Run`) data-parallel: ``run.net``, its model wrapped in DDP.

        With more than one rank, BatchNorm2d layers become :class:`GlobalBatchNorm` first (the
        same tensors).  DDP starts every rank from rank 0's weights and buffers.
        """
        if run.net is not None:
            return
        if self.world_size > 1:
            global_batch_norm(run.model)
        device_ids = [self.local_rank] if self.backend == "nccl" else None
        run.net = torch.nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids)
        # With one input channel (digits, Fashion-MNIST) the stem's weight gradient has another stride along its
        # size-1 axis than the weight: the same layout, which DDP nevertheless reports once per process.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)

    def loss_scale(self, rows: int, global_rows: int) -> float:
        """Factor of a rank's mean loss over its ``rows`` so that DDP's average is the global batch's mean loss."""
        return rows * self.world_size / global_rows

    def sum(self, values) -> list:
        """The sums over the ranks of a sequence of numbers (ints stay ints)."""
        return self._reduce(values, self.comm.sum)

    def max(self, values) -> list:
        """The maxima over the ranks of a sequence of numbers (ints stay ints)."""
        return self._reduce(values, self.comm.max)

    @staticmethod
    def _reduce(values, op) -> list:
        values = list(values)
        if not values:
            return []
        out = op(np.asarray(values, dtype=np.float64))
        return [int(round(v)) if isinstance(x, (int, np.integer)) else float(v) for x, v in zip(values, out)]

    def reduce_batch(self, record: dict) -> dict:
        """A training batch's record for the whole global batch, from every rank's own (:func:`batch_rule`)."""
        rules = {k: batch_rule(k) for k in record}
        summed = [k for k in record if rules[k] in ("sum", "mean")]
        largest = [k for k in record if rules[k] == "max"]
        size = record["size"]
        sums = self.comm.sum(np.array([record[k] * (size if rules[k] == "mean" else 1) for k in summed],
                                      dtype=np.float64))
        maxima = self.comm.max(np.array([record[k] for k in largest], dtype=np.float64))
        total = sums[summed.index("size")]
        out = dict(record)
        for k, v in [*zip(summed, sums), *zip(largest, maxima)]:
            if rules[k] == "mean":
                out[k] = float(v / total)
            else:
                out[k] = int(round(v)) if isinstance(record[k], (int, np.integer)) else float(v)
        return out

    def check_replicas(self, run) -> bool:
        """Whether every rank holds the same weights and buffers as this one (a digest compared); recorded."""
        digest = hashlib.sha256()
        for key, tensor in run.model.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        try:
            self.comm.check_same("weights", digest.hexdigest())
            same = True
        except ValueError:
            same = False
        self.replicas.append(dict(solver=run.solver, epoch=run.epoch, identical=same))
        return same
