"""Every case of the issue "Trust, round 3", rerun and counted: silent wrong answers, hangs, tracebacks.

Each case is the reported reproduction, run as a user would run it; its outcome is classed as

- ``ok``: the solver said what happened (a status other than "converged" for a wrong answer, a
  warning, or one clear error; for a multi-process case, every process ended in time with the
  same one-line error or the same stop);
- ``silent``: a wrong answer with nothing to say so (the defect);
- ``hang``: a process still running at the timeout (the defect);
- ``traceback``: a demo's command line printed a Python traceback (the defect).

Usage::

    python -m benchmarks.trust_cases                       # about 1 minute on 2 cores
    python -m benchmarks.trust_cases --txt benchmarks/results/trust_cases.txt

The demo cases that need a trained checkpoint or a full run (a NaN checkpoint resumed, a second run
into the same folder) are in tests/test_demo_outputs.py, which builds them at tiny sizes.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 90  # seconds for each multi-process or demo case


# ----------------------------------------------------------------------------- in-process cases

def _error(fn, kind, words):
    """("ok", message) when fn raises ``kind`` with ``words`` in its one-line message, else what happened."""
    try:
        out = fn()
    except kind as exc:
        text = str(exc)
        return ("ok" if words in text and "\n" not in text else "unclear"), text
    except Exception as exc:  # noqa: BLE001 - any other exception is the finding
        return "unclear", f"{type(exc).__name__}: {exc}"
    return "silent", f"no error: {out!r}"[:200].replace("\n", " ")


def _not_converged(res):
    return ("ok" if not np.any(res.converged) else "silent"), f"status {res.status!r}, n_fev {res.n_fev}"


def library_cases():
    import torch

    import fixedpoint
    from fixedpoint import Anderson
    from fixedpoint.torch import DEQ

    warned = getattr(fixedpoint, "ConvergenceWarning", ())  # (): an older fixedpoint, without the signal

    def overwrite(info):
        info.x[...] = 100.0

    cases = []
    for name, g, x0, backend in (("numpy", np.cos, np.zeros(3), None), ("torch", torch.cos, torch.zeros(3), None),
                                 ("numpy, backend torch", np.cos, np.zeros(3), "torch"),
                                 ("torch, backend numpy", torch.cos, torch.zeros(3), "numpy")):
        cases.append(("silent wrong answer", f"callback writes into info.x ({name})",
                      _error(lambda g=g, x0=x0, b=backend: fixedpoint.solve(g, x0, tol=1e-10, backend=b,
                                                                            callback=overwrite),
                             ValueError, "callback must not modify")))
    for method in ("anderson", "broyden", "forward"):
        res = fixedpoint.solve(lambda x: x + 1 + 0.1 * np.sin(x), np.zeros(3), method=method)
        cases.append(("silent wrong answer", f"no fixed point, x + 1 + 0.1 sin x ({method})", _not_converged(res)))

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(8.0 / torch.linalg.matrix_norm(lin.weight, 2))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for which, kw in (("forward", dict(method="forward", max_iter=3, tol=1e-8)),
                      ("adjoint", dict(tol=1e-10, max_iter=500, backward_max_iter=2))):
        cell = lin if which == "forward" else torch.nn.Linear(4, 4, dtype=torch.float64)
        if which == "adjoint":
            with torch.no_grad():
                cell.weight.mul_(0.95 / torch.linalg.matrix_norm(cell.weight, 2))
        layer = DEQ(lambda z, x, cell=cell: torch.tanh(cell(z) + x), **kw)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            layer(x).sum().backward()
        said = [w for w in seen if issubclass(w.category, warned) and which in str(w.message)]
        cases.append(("silent wrong answer", f"DEQ {which} solve unconverged",
                      ("ok" if said else "silent", str(said[0].message)[:90] if said else "no warning")))

    bn = torch.nn.BatchNorm1d(4)
    unclear = [
        ("compact=0", lambda: fixedpoint.solve(lambda x: np.cos(x), np.zeros((2, 3)), batch=True, compact=0),
         ValueError, "compact must be one of"),
        ("compact=np.False_ (taken as False)", None, None, None),
        ("one-argument g with compact=True", lambda: fixedpoint.solve(lambda x: np.cos(x), np.zeros((2, 3)),
                                                                      batch=True, compact=True),
         TypeError, "compact=True calls g(x_rows, rows)"),
        ("np.cos with compact=True", lambda: fixedpoint.solve(np.cos, np.zeros((2, 3)), batch=True, compact=True),
         TypeError, "would take rows as its output array"),
        ("np.matrix x0", lambda: fixedpoint.solve(np.cos, np.matrix(np.zeros(3))), TypeError, "numpy.matrix"),
        ("np.matrix from g", lambda: fixedpoint.solve(lambda v: np.asmatrix(np.cos(v)), np.zeros((1, 3))),
         TypeError, "numpy.matrix"),
        ("meta tensor x0", lambda: fixedpoint.solve(torch.cos, torch.zeros(3, device="meta")), ValueError,
         "'meta' device"),
        ("m=10**7", lambda: fixedpoint.solve(np.cos, np.zeros(3), m=10**7), MemoryError, "window m=10000000"),
        ("Anderson(window=5)", lambda: Anderson(window=5), TypeError, "Valid options"),
        ("BatchNorm closure in a DEQ", lambda: DEQ(lambda z, x: torch.tanh(0.5 * bn(z) + x))(torch.randn(8, 4)),
         ValueError, "BatchNorm1d in training mode"),
        ("wrong-shaped f in a DEQ", lambda: DEQ(lambda z, x: z[:, :2])(torch.randn(8, 4)), ValueError,
         "f must return"),
    ]
    for name, fn, kind, words in unclear:
        if fn is None:
            try:
                res = fixedpoint.solve(np.cos, np.zeros((2, 3)), batch=True, compact=np.False_, tol=1e-10)
                outcome = ("ok" if res.options["compact"] is False and res.converged.all() else "silent",
                           f"compact={res.options['compact']!r}")
            except Exception as exc:  # noqa: BLE001 - the finding
                outcome = ("unclear", f"{type(exc).__name__}: {exc}")
        else:
            outcome = _error(fn, kind, words)
        cases.append(("unclear error", name, outcome))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = fixedpoint.solve(torch.cos, torch.zeros(3, dtype=torch.float16))
    said = [w for w in seen if issubclass(w.category, warned)]
    cases.append(("silent wrong answer", "float16 with the default tol",
                  ("ok" if said or res.converged else "silent", f"status {res.status!r}, warned: {bool(said)}")))
    return cases


# ----------------------------------------------------------------------------- multi-process cases

def worker(engine):
    """One process of the multi-process cases (started by mpiexec or torchrun): one line per case in the file
    ``rank<r>.txt`` of the folder ``$TRUST_CASES_DIR`` (the processes' stdout lines can interleave)."""
    import fixedpoint

    if engine == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    else:
        import torch.distributed as comm

        comm.init_process_group("gloo")
        rank, size = comm.get_rank(), comm.get_world_size()
    last = rank == size - 1
    n = 4  # per process
    record = Path(os.environ["TRUST_CASES_DIR"]) / f"rank{rank}.txt"

    def attempt(name, **kwargs):
        x0 = kwargs.pop("x0", np.zeros(n))
        try:
            res = fixedpoint.solve(lambda x: 0.5 * x + 1.0, x0, comm=comm, **kwargs)
            outcome = f"status {res.status} n_iter {res.n_iter}"
        except Exception as exc:  # noqa: BLE001 - the outcome is the record
            outcome = f"{type(exc).__name__}: {exc}"
        with open(record, "a") as out:
            out.write(f"{name} | {outcome}\n")

    attempt("callback True on one rank only", method="forward", tol=1e-14,
            callback=lambda info: last and info.iteration == 2)
    attempt("invalid option on one rank only (m=0)", m=0 if last else 5)
    attempt("empty shard on one rank", x0=np.zeros(0 if last else n))
    if engine == "torch":
        comm.destroy_process_group()


def launchers():
    out = []
    exe = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if exe is not None:
        out.append(("mpi", [exe, "-n", "2", sys.executable, "-m", "mpi4py"]))
    out.append(("torch", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]))
    return out


def multiprocess_cases():
    cases = []
    for engine, cmd in launchers():
        folder = Path(tempfile.mkdtemp(prefix="trust-ranks-"))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TRUST_CASES_DIR=str(folder))
        try:
            proc = subprocess.run([*cmd, "-m", "benchmarks.trust_cases", "worker", engine], capture_output=True,
                                  text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            proc = None
        by_case: dict[str, list[str]] = {}
        for path in sorted(folder.glob("rank*.txt")):
            for line in path.read_text().splitlines():
                name, outcome = (part.strip() for part in line.split("|", 1))
                by_case.setdefault(name, []).append(outcome)
        shutil.rmtree(folder, ignore_errors=True)
        for name in ("callback True on one rank only", "invalid option on one rank only (m=0)",
                     "empty shard on one rank"):
            got = by_case.get(name, [])
            if proc is None or len(got) < 2:
                cases.append(("hang", f"{name} ({engine})", ("hang", f"{len(got)} of 2 processes ended")))
            elif len(set(got)) == 1:
                cases.append(("hang", f"{name} ({engine})", ("ok", got[0][:110])))
            else:
                cases.append(("hang", f"{name} ({engine})", ("unclear", " / ".join(got)[:110])))
    return cases


# ----------------------------------------------------------------------------- demo command lines

class _Pickled:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def demo_cases():
    tmp = Path(tempfile.mkdtemp(prefix="trust-"))
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    malicious = tmp / "malicious.pt"
    malicious.write_bytes(pickle.dumps(_Pickled()))
    runs = [
        ("deq_solvers, missing checkpoint", ["demos.deq_solvers", str(tmp / "missing.pt"), "--threads", "1"]),
        ("deq_solvers, garbage checkpoint", ["demos.deq_solvers", str(garbage), "--threads", "1"]),
        ("deq_solvers, malicious checkpoint", ["demos.deq_solvers", str(malicious), "--threads", "1"]),
        ("deq_cifar10 --gradient-steps 3 (implicit)", ["demos.deq_cifar10", "--dataset", "digits",
                                                       "--gradient-steps", "3", "--out", str(tmp / "deq")]),
        ("cpu_vs_gpu --backends cupy", ["demos.cpu_vs_gpu", "--backends", "numpy", "cupy", "--out",
                                        str(tmp / "cvg")]),
    ]
    cases = []
    for name, argv in runs:
        try:
            proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                                  timeout=TIMEOUT,
                                  cwd=tmp, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        except subprocess.TimeoutExpired:
            cases.append(("traceback", name, ("hang", f"still running after {TIMEOUT} s")))
            continue
        text = (proc.stdout + proc.stderr).strip()
        if "Traceback" in text:
            outcome = "traceback"
        elif proc.returncode == 0:
            outcome = "silent"
        else:
            outcome = "ok"
        if (tmp / "pwned").exists():
            outcome = "silent"
        last = text.splitlines()[-1] if text else ""
        cases.append(("traceback", name, (outcome, f"exit {proc.returncode}: {last[:100]}")))
    shutil.rmtree(tmp, ignore_errors=True)
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trust_cases", description=__doc__.split("\n")[0])
    parser.add_argument("--txt", help="also write the table to this file")
    args = parser.parse_args(argv)
    cases = library_cases() + multiprocess_cases() + demo_cases()
    lines = [f"{'kind':<20} {'case':<48} {'outcome':<9} observed", "-" * 120]
    lines += [f"{kind:<20} {name:<48} {outcome:<9} {seen}" for kind, name, (outcome, seen) in cases]
    counts = {k: sum(1 for *_, (o, _) in cases if o == k) for k in ("ok", "silent", "hang", "traceback", "unclear")}
    lines += ["", f"{len(cases)} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
    text = "\n".join(lines)
    print(text)
    if args.txt:
        Path(args.txt).write_text(text + "\n")
    return 0 if counts["ok"] == len(cases) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker(sys.argv[2])
    else:
        sys.exit(main())
