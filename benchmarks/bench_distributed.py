"""Sharded solves (``comm=``): what crosses the network per iteration, and the time per iteration on 1 and 2 processes.

Three measurements, for Anderson (m=5), Broyden (m=5) and forward iteration, each made by a
*worker* started under a launcher (``mpiexec ... python -m mpi4py`` with NumPy arrays, or
``torchrun`` with PyTorch CPU tensors over gloo):

1. ``counts``: every call the solver makes to its :class:`fixedpoint.comm.Communicator` is
   logged by a counting subclass (:class:`CountingCommunicator`; the library is not changed),
   tagged with the number of evaluations of g made so far, so that the set-up collectives
   (before the first evaluation) are told apart from those of each iteration.  For several
   global vector lengths n and batch sizes B.  The payload is the number of bytes of the
   array each process hands to the allreduce (and gets back).
2. ``latency``: the median time of one ``Communicator.sum`` of k float64 numbers
   (k = 1 ... 2^20: the allreduce's latency and bandwidth, with the wrapper's own overhead),
   and of the neighbour exchange that the map below makes in g.
3. ``timing``: a sharded Jacobi sweep of the 1-D Poisson problem −u'' = 1
   (:func:`fixedpoint.problems.poisson_jacobi`, shift 0: no solve converges within the
   iterations timed) for global n = 1e3 ... 1e7.  Each process holds a contiguous block of
   about n/P entries and, inside g, exchanges one boundary value with each neighbour
   (MPI ``Isend``/``Irecv``, or ``torch.distributed`` ``isend``/``irecv``).  The time per
   iteration of one solve is the median of the intervals between consecutive callbacks, after
   the first m + 3 iterations (which first-touch the method's buffers), the larger of the
   processes' medians; each case is solved 3 times, the cases of one n taking turns, and the
   median of the 3 is kept.  With one process the solve is timed with ``comm`` and without it.
   Before the timings, a screened version of the same sharded map (shift 1) is solved and
   checked against the closed-form solution, so that the halo exchange is known to be right.

The cost model (:func:`cost_model`) is t(n, P) = c0 + L(n/P) + (α + b/β)⌈log2 P⌉ + τ: a fixed
cost per iteration c0 and the local work L (fitted to the 1-process times), the latency α and
bandwidth β of the allreduce of b bytes, and g's neighbour exchange τ (both measured with 2
processes).  It gives the sizes from which sharding over P processes pays.

The driver (no sub-command) launches the worker with P = 1 and 2 processes under both
launchers, fits the cost model of docs/distributed.md to the measurements and writes
``benchmarks/results/distributed.json`` (and prints the tables; ``--txt`` keeps a copy):

    python -m benchmarks.bench_distributed --txt benchmarks/results/distributed.txt   # about 4 min on 2 cores
    python -m benchmarks.bench_distributed --quick --out /tmp/quick.json              # small sizes, 30 s
    python -m benchmarks.bench_distributed --model-only       # refit the model of the JSON, print the tables

The worker alone, e.g. across nodes (see docs/distributed.md):

    mpiexec -n 2 python -m mpi4py -m benchmarks.bench_distributed worker --engine mpi --out w.json
    torchrun --standalone --nproc_per_node=2 -m benchmarks.bench_distributed worker --engine torch --out w.json

With two processes on a machine of two (shared) cores, the comparison of 1 and 2 processes
measures the overhead of the communication, not a parallel speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fixedpoint
from fixedpoint import Anderson, Broyden, ForwardIteration
from fixedpoint.comm import Communicator
from fixedpoint.problems import poisson_jacobi
from tooling import timing

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
M = 5
METHODS = {"anderson": Anderson(m=M), "broyden": Broyden(m=M), "forward": ForwardIteration()}
#: Iterations skipped before timing: the first m pushes write the ring buffers' pages for the first time.
SKIP = M + 3
SIZES = (1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6, 1e7)
QUICK_SIZES = (1e3, 1e4, 1e5)
#: (global n, B) pairs of the collective counts: n changes at B = 1, B changes at n = 1e4.
COUNT_CASES = ((1_000, 1), (10_000, 1), (1_000_000, 1), (10_000, 4), (10_000, 16))
QUICK_COUNT_CASES = ((1_000, 1), (10_000, 1), (10_000, 4))
COUNT_ITERS = 10
LATENCY_SIZES = tuple(4**k for k in range(11))  # 1 ... 2^20 float64 numbers (8 B ... 8 MiB)


# --- counting ------------------------------------------------------------------------------------

def _nbytes(a):
    """Bytes of a NumPy array or a tensor (what one process hands to the allreduce)."""
    if hasattr(a, "element_size"):
        return int(a.numel() * a.element_size())
    return int(a.nbytes)


class CountingCommunicator(Communicator):
    """A :class:`fixedpoint.comm.Communicator` that logs every collective: ``(phase, op, bytes)``.

    ``phase`` is set by the caller (here: the number of evaluations of g so far), so that the
    collectives of each iteration can be told apart.
    """

    def __init__(self, comm) -> None:
        super().__init__(comm)
        self.phase = 0
        self.log: list[tuple[int, str, int]] = []

    def sum(self, a):
        self.log.append((self.phase, "sum", _nbytes(a)))
        return super().sum(a)

    def max(self, a):
        self.log.append((self.phase, "max", _nbytes(a)))
        return super().max(a)


# --- the two engines -----------------------------------------------------------------------------

class MpiEngine:
    """mpi4py's COMM_WORLD, NumPy arrays."""

    name = "mpi"

    def __init__(self):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.lib = np

    def zeros(self, shape):
        return np.zeros(shape)

    def exchange(self, first, last):
        """The neighbours' boundary values: (the left one's last entry, the right one's first); zeros at the ends."""
        comm, left, right, reqs = self.comm, np.zeros_like(first), np.zeros_like(last), []
        if self.rank > 0:
            reqs += [comm.Irecv(left, source=self.rank - 1, tag=1), comm.Isend(first, dest=self.rank - 1, tag=0)]
        if self.rank < self.size - 1:
            reqs += [comm.Irecv(right, source=self.rank + 1, tag=0), comm.Isend(last, dest=self.rank + 1, tag=1)]
        self.MPI.Request.Waitall(reqs)
        return left, right

    def edges(self, u):
        return np.ascontiguousarray(u[..., :1]), np.ascontiguousarray(u[..., -1:])

    def barrier(self):
        self.comm.Barrier()

    def close(self):
        pass

    def info(self):
        return dict(mpi_library=self.MPI.Get_library_version().splitlines()[0].strip(),
                    mpi4py=__import__("mpi4py").__version__)


class TorchEngine:
    """torch.distributed's default group (gloo), PyTorch CPU tensors."""

    name = "torch"

    def __init__(self):
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
        self.torch, self.comm = torch, dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.lib = torch

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.torch.float64)

    def exchange(self, first, last):
        dist, left, right, reqs = self.comm, self.torch.zeros_like(first), self.torch.zeros_like(last), []
        if self.rank > 0:
            reqs += [dist.irecv(left, src=self.rank - 1, tag=1), dist.isend(first, dst=self.rank - 1, tag=0)]
        if self.rank < self.size - 1:
            reqs += [dist.irecv(right, src=self.rank + 1, tag=0), dist.isend(last, dst=self.rank + 1, tag=1)]
        for r in reqs:
            r.wait()
        return left, right

    def edges(self, u):
        return u[..., :1].clone(), u[..., -1:].clone()

    def barrier(self):
        self.comm.barrier()

    def close(self):
        self.comm.destroy_process_group()

    def info(self):
        return dict(torch_distributed_backend=self.comm.get_backend())


def shard(n, engine):
    """This process's block [lo, hi) of n entries."""
    return n * engine.rank // engine.size, n * (engine.rank + 1) // engine.size


def jacobi_map(engine, n, lo, hi, shift=0.0):
    """The sharded Jacobi sweep g(u)_i = (u_{i−1} + u_{i+1} + h²) / (2 + shift), u_0 = u_{n+1} = 0.

    Works on this process's entries lo..hi−1 (a vector, or a batch of them); the two neighbouring
    entries come from the neighbouring processes (one message each way per neighbour and per call).
    """
    h2, lib = 1.0 / (n + 1) ** 2, engine.lib
    if hi - lo < 2:
        raise ValueError("each process needs at least 2 entries")

    def g(u):
        left, right = engine.exchange(*engine.edges(u))
        out = lib.empty_like(u)
        lib.add(u[..., :-2], u[..., 2:], out=out[..., 1:-1])
        lib.add(left, u[..., 1:2], out=out[..., :1])
        lib.add(u[..., -2:-1], right, out=out[..., -1:])
        out += h2
        out /= 2.0 + shift
        return out

    return g


def _global_max(engine, value):
    return float(Communicator(engine.comm).max(np.array([value], dtype=np.float64))[0])


# --- the three measurements ------------------------------------------------------------------------

def check_solution(engine, n=10_000):
    """Solve the screened map (shift 1) sharded and compare with the closed form: max error over the processes."""
    lo, hi = shard(n, engine)
    res = fixedpoint.solve(jacobi_map(engine, n, lo, hi, shift=1.0), engine.zeros(hi - lo), tol=1e-13,
                           comm=engine.comm)
    exact = poisson_jacobi(n, shift=1.0).solution[lo:hi]
    x = res.x.numpy() if hasattr(res.x, "numpy") else res.x
    err = _global_max(engine, float(np.max(np.abs(x - exact)) / np.max(np.abs(exact))))
    if not (res.converged and err < 1e-10):
        raise AssertionError(f"the sharded Jacobi solve is wrong: {res.status}, relative error {err:.3g}")
    return dict(n=n, n_iter=res.n_iter, max_relative_error=err)


def count_collectives(engine, cases, iters=COUNT_ITERS):
    """Per method and (n, B): the collectives before the first evaluation of g and in each iteration."""
    rows = []
    for name, method in METHODS.items():
        for n, B in cases:
            lo, hi = shard(n, engine)
            comm = CountingCommunicator(engine.comm)
            g = jacobi_map(engine, n, lo, hi)

            def counted(u, g=g, comm=comm):
                comm.phase += 1  # collectives logged from here on belong to this evaluation's iteration
                return g(u)

            x0 = engine.zeros((B, hi - lo) if B > 1 else (hi - lo,))
            res = fixedpoint.solve(counted, x0, method=method, batch=B > 1, tol=1e-15, max_iter=iters, comm=comm)
            if int(np.max(res.n_iter)) != iters:
                raise AssertionError(f"{name}: expected {iters} iterations, got {res.n_iter}")
            setup = [(op, nb) for phase, op, nb in comm.log if phase == 0]
            per_iter = [[(op, nb) for phase, op, nb in comm.log if phase == k] for k in range(1, iters + 1)]
            rows.append(dict(method=name, n=n, B=B, iterations=iters, setup_collectives=len(setup),
                             setup_bytes=sum(nb for _, nb in setup),
                             collectives_per_iteration=[len(c) for c in per_iter],
                             bytes_per_iteration=[sum(nb for _, nb in c) for c in per_iter],
                             ops=sorted({op for c in per_iter for op, _ in c})))
    return rows


def _time_calls(fn, engine, target=0.2):
    """Median over 5 rounds of the mean time of one call of ``fn`` (rounds of ~target/5 s), max over processes."""
    for _ in range(3):
        fn()
    engine.barrier()
    t0 = time.perf_counter()
    fn()
    once = _global_max(engine, time.perf_counter() - t0)
    reps = int(max(1, min(2000, target / 5 / max(once, 1e-7))))
    rounds = []
    for _ in range(5):
        engine.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps)
    return _global_max(engine, statistics.median(rounds)), reps


def measure_latency(engine, sizes=LATENCY_SIZES):
    """Time of one Communicator.sum of k float64 numbers (NumPy arrays: the solver's small state on the host),
    and of the neighbour exchange of one number each way."""
    comm, rows = Communicator(engine.comm), []
    for k in sizes:
        buf = np.zeros(k)  # zeros: repeated in-place sums stay finite
        t, reps = _time_calls(lambda buf=buf: comm.sum(buf), engine)
        rows.append(dict(numbers=k, bytes=8 * k, seconds=t, reps=reps))
    one = engine.zeros((1,))
    t_halo, _ = _time_calls(lambda: engine.exchange(one, one), engine)
    return dict(allreduce=rows, halo_exchange_seconds=t_halo)


def time_iterations(engine, sizes, with_none, repeats):
    """Seconds per iteration of each method on the sharded Jacobi sweep, per global n (and comm=None on 1 process).

    Each case is solved ``repeats`` times, the cases of one n taking turns, so that a slow spell of a shared
    machine spoils one round rather than every solve of one case; the median over the rounds is kept."""
    rows = []
    for n in sizes:
        n = int(n)
        lo, hi = shard(n, engine)
        measured = 60 if n <= 100_000 else 24 if n <= 1_000_000 else 10
        cases = [(name, use_comm) for name in METHODS for use_comm in ((True, False) if with_none else (True,))]
        rounds: dict = {case: [] for case in cases}
        restarts = dict.fromkeys(cases, 0)
        for _ in range(repeats):
            for name, use_comm in cases:
                stamps = []
                g = jacobi_map(engine, n, lo, hi)
                engine.barrier()
                res = fixedpoint.solve(g, engine.zeros(hi - lo), method=METHODS[name], tol=1e-15,
                                       max_iter=SKIP + measured, comm=engine.comm if use_comm else None,
                                       callback=lambda info, stamps=stamps: stamps.append(time.perf_counter()))
                if res.n_iter != SKIP + measured:
                    raise AssertionError(f"{name} n={n}: {res.status} after {res.n_iter} iterations")
                rounds[(name, use_comm)].append(_global_max(engine, statistics.median(np.diff(stamps[SKIP:]))))
                restarts[(name, use_comm)] = max(restarts[(name, use_comm)], res.n_restarts)
                del res, g
        for (name, use_comm), times in rounds.items():
            rows.append(dict(method=name, n=n, comm=use_comm, local_n=hi - lo, iterations_timed=measured - 1,
                             restarts=restarts[(name, use_comm)], rounds=times,
                             seconds_per_iteration=statistics.median(times)))
    return rows


def worker(args):
    engine = MpiEngine() if args.engine == "mpi" else TorchEngine()
    out = dict(engine=engine.name, processes=engine.size, **engine.info())
    sizes = QUICK_SIZES if args.quick else tuple(args.sizes)
    try:
        if "check" in args.parts:
            out["check"] = check_solution(engine)
        if "counts" in args.parts:
            out["counts"] = count_collectives(engine, QUICK_COUNT_CASES if args.quick else COUNT_CASES)
        if "latency" in args.parts:
            out["latency"] = measure_latency(engine, LATENCY_SIZES[:6] if args.quick else LATENCY_SIZES)
        if "timing" in args.parts:
            out["timing"] = time_iterations(engine, sizes, with_none=engine.size == 1,
                                            repeats=1 if args.quick else args.repeats)
    finally:
        engine.close()
    if engine.rank == 0:
        timing.write_json(args.out, out)


# --- the driver: launches, cost model, tables -----------------------------------------------------

def launcher(engine, processes):
    """The command that starts ``processes`` workers of ``engine`` on this machine."""
    if engine == "mpi":
        exe = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
        if exe is None:
            raise SystemExit("no mpiexec: pip install '.[mpi]' (MPICH and mpi4py)")
        return [exe, "-n", str(processes), sys.executable, "-m", "mpi4py"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def payload_bytes(counts, method):
    """The bytes one iteration of ``method`` reduces at B = 1 once its memory is full (the last iteration's:
    the first iteration's also carry the 24-byte agreement on g's first evaluation)."""
    return max(r["bytes_per_iteration"][-1] for r in counts if r["method"] == method and r["B"] == 1)


#: Largest size of the fit of the in-cache per-entry cost (Anderson's (2m + 6)·n float64 stay within the
#: 32 MiB L3 cache of the machine in docs/distributed.md up to n ≈ 2.6e5).
CACHE_N = 100_000


def fit_local(rows, n_max=CACHE_N):
    """t1(n) = c0 + w·n fitted (in relative error) to one process's times without comm at n <= n_max:
    (c0 seconds per iteration, w seconds per entry)."""
    pts = [(r["n"], r["seconds_per_iteration"]) for r in rows if r["n"] <= n_max]
    n, t = np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts])
    c0, w = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1) / t[:, None], np.ones_like(t), rcond=None)[0]
    return max(float(c0), 0.0), float(w)


def link(latency):
    """Latency α (the median time of the sums of at most 1024 numbers: all latency-bound), bandwidth β (from the
    largest sum, bytes per second past α) and the neighbour exchange τ, from a ``measure_latency`` result."""
    rows = latency["allreduce"]
    alpha = statistics.median(r["seconds"] for r in rows if r["numbers"] <= 1024)
    big = rows[-1]
    return dict(alpha=alpha, bytes_per_second=big["bytes"] / max(big["seconds"] - alpha, 1e-12),
                tau=latency["halo_exchange_seconds"])


#: Processes for which break-even sizes are given.
PROCESSES = (2, 4, 16, 64, 256, 1024)
#: Small-message latencies (seconds) for the break-even sizes of networks not measured here: assumptions.
ASSUMED_LATENCIES = (2e-6, 2e-5, 1e-4)


_GRID = np.logspace(2, 11, 1801)  # global sizes searched for the break-even points


def local_work(base, c0, w):
    """L(n), one process's work per iteration beyond the fixed cost c0: w·n up to :data:`CACHE_N` (the fit),
    above it the measured t1(n) − c0, made non-decreasing and interpolated in log-log, proportional to n
    beyond the largest size measured."""
    pts = [(float(CACHE_N), w * CACHE_N)]
    for r in base:
        if r["n"] > CACHE_N:
            pts.append((float(r["n"]), max(r["seconds_per_iteration"] - c0, pts[-1][1])))
    ln, lt = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])

    def L(n):
        n = np.asarray(n, dtype=float)
        mid = np.exp(np.interp(np.log(np.maximum(n, 1.0)), ln, lt))
        return np.where(n <= CACHE_N, w * n, np.where(n > pts[-1][0], pts[-1][1] * n / pts[-1][0], mid))

    return L


def _from(ok):
    """The smallest grid size from which ``ok`` holds for every larger one (None if it fails at the largest)."""
    bad = np.nonzero(~ok)[0]
    if not bad.size:
        return float(_GRID[0])
    return None if bad[-1] == len(_GRID) - 1 else float(_GRID[bad[-1] + 1])


def breakeven(c0, L, comm_seconds):
    """Global sizes from which sharding over P processes pays, under t(n, P) = c0 + L(n/P) + C(P):
    ``pays_from_n``: t(n, P) < t(n, 1); ``half_efficiency_from_n``: t(n, 1) / (P t(n, P)) >= 1/2."""
    out, t1 = {}, c0 + L(_GRID)
    for P in PROCESSES:
        C = comm_seconds(P)
        tP = c0 + L(_GRID / P) + C
        out[P] = dict(comm_seconds=C, pays_from_n=_from(tP < t1), half_efficiency_from_n=_from(2 * t1 >= P * tP))
    return out


def cost_model(runs):
    """The cost model t(n, P) = c0 + L(n/P) + C(P), C(P) = (α + b/β) ⌈log2 P⌉ + τ, fitted to the measurements.

    c0 and w: one process without comm, t1(n) = c0 + w n fitted at n <= :data:`CACHE_N`
    (:func:`fit_local`); L: the local work, w·n in cache and the measured t1 − c0 above
    (:func:`local_work`; w_mem, the per-entry cost between the two largest sizes, is reported).
    α, β, τ: the two-process latency measurement (b: the bytes of the iteration's allreduce;
    τ: g's neighbour exchange, 0 for a map without one).  Gives the 2-process time predicted at each
    measured n beside the measured one, and the break-even sizes (:func:`breakeven`) for P processes
    with the measured α and τ (one machine) and with assumed network latencies
    (:data:`ASSUMED_LATENCIES`, τ = α: one message each way, sent at once).  On separate machines each
    process has its own caches and memory bandwidth, as the model assumes; P processes on one machine
    share them."""
    model: dict = dict(links={}, methods=[], assumed=[])
    for engine in ("mpi", "torch"):
        one, two = runs.get((engine, 1)), runs.get((engine, 2))
        if not one or not two:
            continue
        lk = model["links"][engine] = link(two["latency"])
        for method in METHODS:
            base = sorted((r for r in one["timing"] if r["method"] == method and not r["comm"]), key=lambda r: r["n"])
            c0, w = fit_local(base)
            L = local_work(base, c0, w)
            w_mem = ((base[-1]["seconds_per_iteration"] - base[-2]["seconds_per_iteration"])
                     / (base[-1]["n"] - base[-2]["n"]))
            nbytes = payload_bytes(two["counts"], method)
            reduce = lk["alpha"] + nbytes / lk["bytes_per_second"]
            rows = []
            for r in (r for r in two["timing"] if r["method"] == method):
                t1 = next(b["seconds_per_iteration"] for b in base if b["n"] == r["n"])
                t2_model = c0 + float(L(r["n"] / 2)) + reduce + lk["tau"]
                rows.append(dict(n=r["n"], t1=t1, t1_model=c0 + float(L(r["n"])),
                                 t2_measured=r["seconds_per_iteration"], t2_model=t2_model))
            model["methods"].append(dict(
                engine=engine, method=method, c0_seconds=c0, w_seconds_per_entry=w, w_mem_seconds_per_entry=w_mem,
                payload_bytes=nbytes, allreduce_seconds=reduce, sizes=rows,
                breakeven=breakeven(c0, L, lambda P, a=reduce, t=lk["tau"]: a * math.ceil(math.log2(P)) + t)))
            if engine == "mpi":
                for a in ASSUMED_LATENCIES:
                    model["assumed"].append(dict(method=method, latency=a, breakeven=breakeven(
                        c0, L, lambda P, a=a: a * (math.ceil(math.log2(P)) + 1))))
    return model


def print_tables(result):
    runs = {(r["engine"], r["processes"]): r for r in result["runs"]}
    print("\nCollectives per iteration (set-up: before the first evaluation of g)")
    rows = []
    for r in runs.get(("mpi", 2), next(iter(runs.values()))).get("counts", []):
        per, nb = r["collectives_per_iteration"], r["bytes_per_iteration"]
        rows.append(dict(method=r["method"], n=r["n"], B=r["B"],
                         setup=f"{r['setup_collectives']} ({r['setup_bytes']} B)",
                         coll=f"{min(per)}..{max(per)}" if min(per) != max(per) else str(per[0]),
                         first=nb[0], steady=nb[-1], most=max(nb)))
    timing.print_table(rows, [("method", "method", "{}"), ("n", "n", "{:.0e}"), ("B", "B", "{}"),
                              ("setup", "set-up", "{}"), ("coll", "per iteration", "{}"),
                              ("first", "bytes (1st)", "{}"), ("steady", "bytes (last)", "{}"),
                              ("most", "bytes (max)", "{}")])
    for engine in ("mpi", "torch"):
        for P in (1, 2):
            run = runs.get((engine, P))
            if not run or "latency" not in run:
                continue
            print(f"\n{engine}, {P} process(es): one Communicator.sum of k float64 numbers; "
                  f"neighbour exchange {run['latency']['halo_exchange_seconds'] * 1e6:.1f} us")
            timing.print_table(run["latency"]["allreduce"], [("numbers", "k", "{}"), ("bytes", "bytes", "{}"),
                                                             ("seconds", "seconds", "{:.2e}")])
    print("\nSeconds per iteration, sharded Jacobi sweep (1 process: without comm / with comm; 2 processes: with comm)")
    rows = []
    for engine in ("mpi", "torch"):
        one, two = runs.get((engine, 1)), runs.get((engine, 2))
        if not one or not two:
            continue
        for r in two["timing"]:
            def pick(run, comm, r=r):
                return next(x["seconds_per_iteration"] for x in run["timing"]
                            if x["method"] == r["method"] and x["n"] == r["n"] and x["comm"] == comm)
            rows.append(dict(engine=engine, method=r["method"], n=r["n"], none=pick(one, False), p1=pick(one, True),
                             p2=r["seconds_per_iteration"], ratio=r["seconds_per_iteration"] / pick(one, False)))
    timing.print_table(rows, [("engine", "engine", "{}"), ("method", "method", "{}"), ("n", "n", "{:.0e}"),
                              ("none", "1 proc, no comm", "{:.2e}"), ("p1", "1 proc, comm", "{:.2e}"),
                              ("p2", "2 procs", "{:.2e}"), ("ratio", "2 procs / 1", "{:.2f}")])
    model = result["model"]
    print("\nLinks at 2 processes: alpha (latency of a small sum), beta (bandwidth of large sums), tau (g's exchange)")
    timing.print_table([dict(engine=e, **v) for e, v in model["links"].items()],
                       [("engine", "engine", "{}"), ("alpha", "alpha [s]", "{:.1e}"),
                        ("bytes_per_second", "beta [B/s]", "{:.2e}"), ("tau", "tau [s]", "{:.1e}")])
    print("\nCost model t(n, P) = c0 + L(n/P) + (alpha + b/beta) ceil(log2 P) + tau at P = 1, 2, and measured times")
    rows = []
    for m in model["methods"]:
        for r in m["sizes"]:
            rows.append(dict(engine=m["engine"], method=m["method"], n=r["n"], t1=r["t1"], m1=r["t1_model"],
                             t2=r["t2_measured"], model=r["t2_model"]))
    timing.print_table(rows, [("engine", "engine", "{}"), ("method", "method", "{}"), ("n", "n", "{:.0e}"),
                              ("t1", "1 proc [s]", "{:.2e}"), ("m1", "model [s]", "{:.2e}"),
                              ("t2", "2 procs [s]", "{:.2e}"), ("model", "model [s]", "{:.2e}")])
    print("\nSharding pays (t(n, P) < t(n, 1)) from n* (global entries); measured links")
    rows = [dict(engine=m["engine"], method=m["method"], c0=m["c0_seconds"], w=m["w_seconds_per_entry"],
                 wm=m["w_mem_seconds_per_entry"], b=m["payload_bytes"],
                 **{f"P{P}": m["breakeven"][P]["pays_from_n"] for P in PROCESSES})
            for m in model["methods"]]
    timing.print_table(rows, [("engine", "engine", "{}"), ("method", "method", "{}"), ("c0", "c0 [s]", "{:.1e}"),
                              ("w", "w [s/entry]", "{:.2e}"), ("wm", "w_mem", "{:.2e}"), ("b", "bytes", "{}")]
                       + [(f"P{P}", f"P={P}", "{:.1e}") for P in PROCESSES])
    print("\nHalf the ideal speed-up (t(n, 1) / (P t(n, P)) >= 1/2) from n; measured links")
    rows = [dict(engine=m["engine"], method=m["method"],
                 **{f"P{P}": m["breakeven"][P]["half_efficiency_from_n"] for P in PROCESSES})
            for m in model["methods"]]
    timing.print_table(rows, [("engine", "engine", "{}"), ("method", "method", "{}")]
                       + [(f"P{P}", f"P={P}", "{:.1e}") for P in PROCESSES])
    print("\nSharding pays from n* with assumed latencies alpha = tau (local work of the NumPy runs)")
    rows = [dict(method=a["method"], latency=a["latency"], **{f"P{P}": a["breakeven"][P]["pays_from_n"]
                                                                for P in PROCESSES}) for a in model["assumed"]]
    timing.print_table(rows, [("method", "method", "{}"), ("latency", "alpha [s]", "{:.0e}")]
                       + [(f"P{P}", f"P={P}", "{:.1e}") for P in PROCESSES])


def drive(args):
    if args.model_only:  # the cost model and the tables again, from a result file
        result = json.loads(Path(args.out).read_text())
        result["model"] = cost_model({(r["engine"], r["processes"]): r for r in result["runs"]})
        timing.write_json(args.out, result)
        print_tables(result)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    runs, commands = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            for P in (1, 2):
                out = Path(tmp) / f"{engine}{P}.json"
                parts = ["check", "latency", "timing"] + (["counts"] if P == 2 else [])
                cmd = [*launcher(engine, P), "-m", "benchmarks.bench_distributed", "worker", "--engine", engine,
                       "--out", str(out), "--parts", *parts]
                cmd += ["--quick"] if args.quick else ["--sizes", *map(str, args.sizes)]
                shown = " ".join([Path(cmd[0]).name, *cmd[1:]]).replace(sys.executable, "python")
                shown = shown.replace(str(ROOT) + "/", "")
                shown = shown.replace(str(out), f"{engine}{P}.json")
                print("$", shown, flush=True)
                commands.append(shown)
                t0, load_before = time.perf_counter(), os.getloadavg()[0]
                proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
                if proc.returncode != 0:
                    raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                     f"{proc.stderr[-3000:]}")
                runs[(engine, P)] = json.loads(out.read_text())
                runs[(engine, P)].update(seconds=time.perf_counter() - t0,
                                         load_average_before_after=[load_before, os.getloadavg()[0]])
                print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    result = dict(machine=timing.machine_info(libs=("torch",) if "torch" in args.engines else ()), quick=args.quick,
                  commands=commands, env={"OMP_NUM_THREADS": "1"},
                  note="2 processes on 2 shared cores measure the overhead of communication, not scaling",
                  runs=list(runs.values()), model=cost_model(runs))
    timing.write_json(args.out, result)
    print_tables(result)
    print(f"\nwrote {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")
    ap.add_argument("--engines", nargs="+", default=["mpi", "torch"], choices=("mpi", "torch"))
    ap.add_argument("--sizes", nargs="+", type=float, default=list(SIZES), help="global vector lengths n")
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer cases (a smoke test)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed to each launch")
    ap.add_argument("--out", default=str(RESULTS_DIR / "distributed.json"))
    ap.add_argument("--model-only", action="store_true", help="refit the cost model of --out and print the tables")
    ap.add_argument("--txt", default=None, help="also write what is printed to this file")
    w = sub.add_parser("worker", help="one process of a measurement (started by mpiexec or torchrun)")
    w.add_argument("--engine", required=True, choices=("mpi", "torch"))
    w.add_argument("--out", required=True)
    w.add_argument("--parts", nargs="+", default=["check", "counts", "latency", "timing"],
                   choices=("check", "counts", "latency", "timing"))
    w.add_argument("--sizes", nargs="+", type=float, default=list(SIZES))
    w.add_argument("--quick", action="store_true")
    w.add_argument("--repeats", type=int, default=3, help="solves per case (median kept)")
    args = ap.parse_args(argv)
    if args.command == "worker":
        worker(args)
    elif args.txt:
        with open(args.txt, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(_Tee(sys.stdout, fh)):
            drive(args)
    else:
        drive(args)


class _Tee:
    """Writes to several streams (the terminal and the --txt file)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)

    def flush(self):
        for s in self.streams:
            s.flush()


if __name__ == "__main__":
    main()
