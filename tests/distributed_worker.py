"""One process of the sharded-solve tests (tests/test_distributed.py), started by mpiexec or torchrun.

    mpiexec -n 2 python -m mpi4py tests/distributed_worker.py mpi
    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py torch

Each scenario solves a problem sharded over the processes and checks it against the single-process
solve of the whole vector, computed by every process itself (the data are small and seeded).  The
process exits with status 0 when every check passed; a failed check raises.
"""

from __future__ import annotations

import sys

import numpy as np

import fixedpoint
from fixedpoint import Anderson, Broyden, ForwardIteration


def setup(engine):
    if engine == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD

        def allgather(v):
            parts = comm.allgather(np.asarray(v))
            return np.concatenate(parts, axis=-1)

        return comm, comm.Get_rank(), comm.Get_size(), allgather
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()

    def allgather(v):
        parts = [None] * size
        dist.all_gather_object(parts, np.asarray(v))
        return np.concatenate(parts, axis=-1)

    torch.set_num_threads(1)
    return dist, rank, size, allgather


def shards(n, size):
    """Uneven shards: process r holds [start(r), start(r + 1))."""
    cuts = np.linspace(0, n, size + 1).astype(int)
    cuts[1:-1] += 3  # not equal sizes
    return cuts


def linear_problem(n, seed=0, batch=None):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    A *= 0.95 / np.linalg.norm(A, 2)
    b = rng.standard_normal(n if batch is None else (batch, n))
    return A, b


def _gather_objects(obj, size):
    import torch.distributed as dist

    parts = [None] * size
    dist.all_gather_object(parts, obj)
    return parts


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main(engine):
    comm, rank, size, allgather = setup(engine)
    n = 60
    cut = shards(n, size)
    lo, hi = cut[rank], cut[rank + 1]

    # 1. one vector, every method: same iterations as the single-process solve, the same shard of x
    A, b = linear_problem(n)
    for method in (Anderson(), Anderson(beta=0.7, m=3), Broyden(m=6), ForwardIteration(damping=0.9)):
        ref = fixedpoint.solve(lambda x: A @ x + b, np.zeros(n), method=method, tol=1e-10, max_iter=3000)

        def g(x_local):
            return A[lo:hi] @ allgather(x_local) + b[lo:hi]

        res = fixedpoint.solve(g, np.zeros(hi - lo), method=method, tol=1e-10, max_iter=3000, comm=comm)
        check(res.converged and res.n_iter == ref.n_iter, f"{method}: {res} vs {ref}")
        np.testing.assert_allclose(res.x, ref.x[lo:hi], rtol=1e-9, atol=1e-12)
        # the residuals end near 5e-11 with entries of x near 1: the rounding of f = g(x) - x alone is ~1e-16 / 5e-11,
        # about 2e-6 of the residual, and the reordered sums of the all-reduce change it by that much
        check(abs(res.residual - ref.residual) <= 1e-4 * ref.residual,
              f"residuals {method}: {res.residual} vs {ref.residual}")

    # 2. batch mode: B samples, each sharded the same way; the samples stop at different iterations, so the
    # working arrays are packed on every process alike.  With and without compaction, every method: the
    # single-process answers, and each sample's iterates those of its sharded solve alone, to the bit (g's
    # rows are computed one at a time, so they do not depend on the batch either)
    rates = np.array([0.3, 0.9, 0.6])
    Ab, bb = linear_problem(n, seed=1, batch=3)

    def gb_full(x, rows=None):
        rows = np.arange(3) if rows is None else rows
        return rates[rows, None] * (x @ Ab.T) + bb[rows]

    def sharded(take):
        def gb(x_local, rows=None):
            rows = np.arange(len(take)) if rows is None else np.asarray(rows)
            full = allgather(x_local)
            return np.stack([rates[take[r]] * (Ab[lo:hi] @ full[i]) + bb[take[r], lo:hi] for i, r in enumerate(rows)])
        return gb

    for method in (ForwardIteration(), Anderson(), Broyden(m=6)):
        ref = fixedpoint.solve(gb_full, np.zeros((3, n)), batch=True, tol=1e-10, method=method, max_iter=3000)
        for compact in (False, True):
            res = fixedpoint.solve(sharded([0, 1, 2]), np.zeros((3, hi - lo)), batch=True, compact=compact, tol=1e-10,
                                   method=method, max_iter=3000, comm=comm)
            check(res.converged.all() and (res.n_iter == ref.n_iter).all(), f"batch {method}: {res.n_iter} vs "
                                                                            f"{ref.n_iter}")
            check(len(set(res.n_iter.tolist())) == 3, f"the samples stop at different iterations: {res.n_iter}")
            np.testing.assert_allclose(res.x, ref.x[:, lo:hi], rtol=1e-9, atol=1e-12)
            for i in range(3):
                one = fixedpoint.solve(sharded([i]), np.zeros((1, hi - lo)), batch=True, tol=1e-10, method=method,
                                       max_iter=3000, comm=comm)
                np.testing.assert_array_equal(one.x[0], res.x[i])
                np.testing.assert_array_equal(one.residual_history[:, 0], res.residual_history[: one.n_iter[0], i])

    # 3. processes with other options, or another dtype: a clear error on every process, no hang
    for kwargs, x0 in ((dict(method=Anderson(m=5 + rank)), np.zeros(hi - lo)),
                       (dict(), np.zeros(hi - lo, dtype=np.float32 if rank else np.float64)),
                       (dict(tol=1e-5 * (1 + rank)), np.zeros(hi - lo))):
        try:
            fixedpoint.solve(lambda x: 0.5 * x, x0, comm=comm, **kwargs)
        except ValueError as exc:
            check("disagree" in str(exc), str(exc))
        else:
            raise AssertionError(f"no error for {kwargs}")
    # x0 with a NaN on one process only: every process raises
    x0 = np.zeros(hi - lo)
    if rank == size - 1:
        x0[0] = np.nan
    try:
        fixedpoint.solve(lambda x: 0.5 * x, x0, comm=comm)
    except ValueError as exc:
        check("NaN" in str(exc), str(exc))
    else:
        raise AssertionError("no error for a NaN on one process")
    # the wrong kind of comm
    try:
        fixedpoint.solve(lambda x: 0.5 * x, np.zeros(3), comm="world")
    except TypeError as exc:
        check("mpi4py" in str(exc) and "torch.distributed" in str(exc), str(exc))
    else:
        raise AssertionError("no TypeError for comm='world'")

    # 3b. a decision one process alone would take is taken by every process: the same one-line error everywhere
    #     (an invalid option, an empty shard, a map returning another shape), the same stop (a callback)
    last = rank == size - 1

    def same_error_everywhere(kind, words, **kwargs):
        x0 = kwargs.pop("x0", np.zeros(hi - lo))
        g = kwargs.pop("g", lambda x: 0.5 * x)
        try:
            fixedpoint.solve(g, x0, comm=comm, **kwargs)
        except kind as exc:
            message = str(exc)
            check(words in message and f"(on process {size - 1} of {size})" in message, message)
        else:
            raise AssertionError(f"no {kind.__name__} for {words}")
        messages = comm.allgather(message) if engine == "mpi" else _gather_objects(message, size)
        check(len(set(messages)) == 1, f"different errors: {messages}")

    same_error_everywhere(ValueError, "m must be", m=0 if last else 5)
    same_error_everywhere(TypeError, "unknown option", **({"windw": 3} if last else {}))
    same_error_everywhere(ValueError, "every process must hold at least one element",
                          x0=np.zeros(0 if last else hi - lo))
    same_error_everywhere(ValueError, "g must return an array of the input's shape",
                          g=lambda x: np.zeros(x.shape[0] + 1) if last else 0.5 * x)
    calls = [0]

    def stop_on_last(info):
        calls[0] += 1
        return last and info.iteration == 2

    res = fixedpoint.solve(lambda x: 0.5 * x + 1.0, np.zeros(hi - lo), method="forward", tol=1e-14, comm=comm,
                           callback=stop_on_last)
    check(res.status == "stopped" and res.n_iter == 3 and calls[0] == 3, f"callback stop: {res}, {calls}")

    # 4. torch tensors over the same engine (torch CPU over gloo, or over MPI through NumPy views)
    import torch

    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    ref = fixedpoint.solve(lambda x: At @ x + bt, torch.zeros(n, dtype=torch.float64), tol=1e-10)

    def gt(x_local):
        return At[lo:hi] @ torch.from_numpy(allgather(x_local.numpy())) + bt[lo:hi]

    res = fixedpoint.solve(gt, torch.zeros(hi - lo, dtype=torch.float64), tol=1e-10, comm=comm)
    check(res.converged and res.n_iter == ref.n_iter and isinstance(res.x, torch.Tensor), f"torch: {res}")
    torch.testing.assert_close(res.x, ref.x[lo:hi], rtol=1e-9, atol=1e-12)
    print(f"rank {rank}: all checks passed", flush=True)
    if engine == "torch":
        comm.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 2:
    main(sys.argv[1])


def fail(engine):
    """g raises on the last process only, at the third evaluation: the job must end, not hang."""
    comm, rank, size, allgather = setup(engine)
    count = [0]

    def g(x):
        count[0] += 1
        if rank == size - 1 and count[0] == 3:
            raise RuntimeError("g failed on purpose")
        return 0.5 * x + 1.0

    fixedpoint.solve(g, np.zeros(10), method="forward", tol=1e-12, comm=comm)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[2] == "fail":
    fail(sys.argv[1])
