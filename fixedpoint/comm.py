"""Communicators for sharded solves: every reduction summed across processes, every decision shared.

A solve with ``comm=`` treats ``x0`` as this process's shard of one large vector (or
batch of vectors): the map g maps the local shard (any exchange between shards is
g's business), and every inner product and norm a method needs is the sum of the
local partial sums over the processes.  :class:`Communicator` wraps what the solvers
need of an mpi4py communicator or a torch.distributed process group: a sum and a
maximum over processes of small arrays, in place.  Nothing of size n crosses the
network: per iteration, one allreduce of O(B·m) numbers.

Neither mpi4py nor torch is imported here unless such a communicator is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["Communicator", "agreed", "as_communicator"]


class Communicator:
    """Sums and maxima of small arrays over the processes of an mpi4py communicator or a torch process group.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, torch.distributed.ProcessGroup, or the module ``torch.distributed``
        The processes that hold the shards.  ``torch.distributed`` (the module) means its
        default group, which must be initialised.
    abort_on_error : bool, default True
        With MPI and more than one process: when a solve fails on this process (g or the
        callback raised), print the traceback and call ``MPI_Abort`` so that the other
        processes, which wait in their next collective, end too instead of waiting forever
        (MPI has no timeouts).  False: raise, as without a communicator, and leave ending the
        job to the caller.  torch.distributed has no abort: there the exception is raised,
        and the other processes fail when this one exits (or at the process group's timeout).

    Raises
    ------
    TypeError
        For anything else (the message names the accepted kinds).
    RuntimeError
        For ``torch.distributed`` before ``init_process_group``.

    Attributes
    ----------
    rank, size : int
        This process's rank and the number of processes.
    kind : str
        "mpi" or "torch".
    """

    def __init__(self, comm: Any, *, abort_on_error: bool = True) -> None:
        self.comm = comm
        self.abort_on_error = abort_on_error
        self._device = None  # where torch collectives of host arrays run (a CUDA device for NCCL)
        module = type(comm).__module__.split(".")[0]
        if module == "mpi4py" and hasattr(comm, "Allreduce"):
            self.kind = "mpi"
            self._mpi = importlib.import_module("mpi4py.MPI")
            self.rank, self.size = comm.Get_rank(), comm.Get_size()
            return
        dist = _torch_distributed(comm)
        if dist is not None:
            if not dist.is_initialized():
                raise RuntimeError("comm=torch.distributed needs torch.distributed.init_process_group() first")
            self.kind = "torch"
            self._dist = dist
            self._group = None if comm is dist else comm
            self.rank = dist.get_rank(self._group)
            self.size = dist.get_world_size(self._group)
            if str(dist.get_backend(self._group)).lower() == "nccl":  # NCCL reduces device tensors only
                torch = importlib.import_module("torch")
                self._device = torch.device("cuda", torch.cuda.current_device())
            return
        raise TypeError("comm must be an mpi4py communicator (e.g. mpi4py.MPI.COMM_WORLD), a torch.distributed "
                        f"process group, or the module torch.distributed (its default group); got {comm!r}")

    # --- collectives on small arrays -----------------------------------------------------------

    def _reduce(self, a: Any, op: str) -> Any:
        module = type(a).__module__.split(".")[0]
        if self.kind == "mpi":
            if module == "numpy":
                buf = np.ascontiguousarray(a)
            elif module == "torch" and a.device.type == "cpu":  # mpi4py reads host tensors through NumPy views
                buf = a.contiguous().numpy()
            else:  # device arrays: a CUDA-aware MPI reads them through __cuda_array_interface__ / DLPack
                buf = a
            self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM if op == "sum" else self._mpi.MAX)
            if module == "torch" and a.device.type == "cpu":
                return importlib.import_module("torch").from_numpy(buf)
            return buf
        torch = importlib.import_module("torch")
        if module == "numpy":
            buf = np.ascontiguousarray(a)
            t = torch.from_numpy(buf)
        elif module == "torch":
            t = a.contiguous()
        else:  # e.g. CuPy small state: handed to torch through DLPack, without a copy
            t = torch.from_dlpack(a)
        moved = self._device is not None and t.device.type == "cpu"
        work = t.to(self._device) if moved else t
        # complex sums as their real and imaginary parts (a view), which every backend reduces (gloo: no complex)
        parts = torch.view_as_real(work) if work.is_complex() and op == "sum" else work
        self._dist.all_reduce(parts, op=self._dist.ReduceOp.SUM if op == "sum" else self._dist.ReduceOp.MAX,
                              group=self._group)
        if moved:
            t.copy_(work)
        if module == "numpy":
            return buf
        return t if module == "torch" else a

    def abort(self, exc: BaseException) -> None:
        """After a failed solve on this process: end every process of an MPI job (see ``abort_on_error``)."""
        if self.kind != "mpi" or self.size < 2 or not self.abort_on_error:
            return
        import sys
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print(f"fixedpoint: the solve failed on rank {self.rank} of {self.size}; calling MPI_Abort so that the "
              "other processes, waiting in their next collective, end too (Communicator(comm, "
              "abort_on_error=False) raises instead)", file=sys.stderr, flush=True)
        self.comm.Abort(1)

    def sum(self, a: Any) -> Any:
        """Return the elementwise sum of ``a`` over the processes (a NumPy array, or a tensor/array of the device)."""
        return self._reduce(a, "sum")

    def max(self, a: Any) -> Any:
        """Return the elementwise maximum of ``a`` over the processes."""
        return self._reduce(a, "max")

    def agree(self, exc: BaseException | None, what: str = "", description: str = "") -> None:
        """Raise on every process if ``exc`` is not None on any, or if their ``description`` differs.

        One collective of three numbers when all is well (one more, of a thousand, when a process
        failed).  A failure is raised everywhere as the failing process's exception type where that is
        a ``ValueError``, ``TypeError``, ``MemoryError``, ``ImportError`` or ``RuntimeError`` (else
        ``RuntimeError``), with its message and rank (the lowest failing rank's); it carries
        ``fixedpoint_agreed = True``, so that the solver does not also abort the job for it.  Differing
        descriptions (a hash of each is compared) raise ``ValueError`` naming ``what`` everywhere.
        """
        digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:6], "little")
        failed = float(self.size - self.rank) if exc is not None else 0.0
        got = self.max(np.array([failed, digest, -digest], dtype=np.float64))  # 48-bit integers: exact
        if got[0] != 0:
            self._raise_failure(exc, self.size - int(got[0]))
        if got[1] != digest or -got[2] != digest:
            raise ValueError(f"the processes of comm disagree on {what}: this one (rank {self.rank}) has "
                             f"{description}; every process must call the solver with the same settings")

    def check_same(self, what: str, description: str) -> None:
        """Raise ``ValueError`` on every process unless ``description`` is the same on all of them.

        One small collective (:meth:`agree` with nothing failed), so that processes whose settings differ stop
        with a clear error instead of waiting in mismatched collectives.
        """
        self.agree(None, what, description)

    def _raise_failure(self, exc: BaseException | None, first: int) -> None:
        """Raise, on every process, the error of process ``first`` (one collective of its message)."""
        kinds = (ValueError, TypeError, MemoryError, ImportError, RuntimeError)
        buf = np.zeros(2 + _MESSAGE_BYTES, dtype=np.float64)
        if self.rank == first and exc is not None:
            text = str(exc).encode("utf-8", "replace")[:_MESSAGE_BYTES]
            buf[0] = next((i for i, kind in enumerate(kinds) if isinstance(exc, kind)), len(kinds) - 1)
            buf[1] = len(text)
            buf[2:2 + len(text)] = np.frombuffer(text, dtype=np.uint8)
        buf = self.sum(buf)
        message = bytes(buf[2:2 + int(buf[1])].astype(np.uint8)).decode("utf-8", "replace")
        error: Exception = kinds[int(buf[0])](f"{message} (on process {first} of {self.size})")
        error.fixedpoint_agreed = True  # type: ignore[attr-defined]
        if exc is not None:
            raise error from exc
        raise error

    def __repr__(self) -> str:
        """Return the kind, rank and size, e.g. ``Communicator(mpi, rank=0, size=4)``."""
        return f"Communicator({self.kind}, rank={self.rank}, size={self.size})"


#: Longest error message (UTF-8 bytes) that :meth:`Communicator.agree` passes to the other processes.
_MESSAGE_BYTES = 1000


class _Agreement:
    """What a block run under :func:`agreed` wants compared across the processes besides its outcome."""

    def __init__(self) -> None:
        self.what, self.description = "", ""

    def compare(self, what: str, description: str) -> None:
        """Also raise on every process unless ``description`` (of ``what``) is the same on all."""
        self.what, self.description = what, description


@contextlib.contextmanager
def agreed(comm: Communicator | None) -> Iterator[_Agreement]:
    """Run a block of per-process checks so that, with ``comm``, they fail on every process or on none.

    Without ``comm`` an exception of the block propagates unchanged.  With it, every process calls
    :meth:`Communicator.agree` when the block ends (one collective), so the block must not itself run
    collectives that a failing process would skip.  The block may call ``compare(what, description)``
    on the object it is given to have its settings compared in the same collective.
    """
    agreement = _Agreement()
    if comm is None:
        yield agreement
        return
    try:
        yield agreement
    except Exception as exc:  # noqa: BLE001 - every failure is shared, then raised
        comm.agree(exc)
        raise
    comm.agree(None, agreement.what, agreement.description)


def _torch_distributed(comm: Any) -> Any:
    """torch.distributed if ``comm`` is that module or one of its process groups, else None."""
    name = getattr(comm, "__name__", "") if isinstance(comm, type(np)) else type(comm).__module__
    if not name.startswith("torch"):
        return None
    dist = importlib.import_module("torch.distributed")
    if comm is dist or isinstance(comm, dist.ProcessGroup):
        return dist
    return None


def as_communicator(comm: Any) -> Communicator | None:
    """None for None, a :class:`Communicator` as is, else ``Communicator(comm)`` (which says what is accepted)."""
    if comm is None or isinstance(comm, Communicator):
        return comm
    return Communicator(comm)
