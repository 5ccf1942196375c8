"""benchmarks/bench_distributed.py's collective counts: one allreduce per iteration, of a size set by B and m, not n.

The worker runs as a single process (mpi4py initialises MPI as a singleton, without mpiexec), which
is enough to log every call the solver makes to its communicator; the 2-process runs are in
tests/test_distributed.py.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE = "benchmarks.bench_distributed"  # run as python -m from the repository root
M = 5  # the benchmark's window for Anderson and Broyden


def test_one_allreduce_per_iteration_whose_size_does_not_depend_on_n(tmp_path):
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install '.[mpi]')")
    out = tmp_path / "counts.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", MODULE, "worker", "--engine", "mpi", "--quick", "--parts", "check",
                           "counts", "--out", str(out)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["check"]["max_relative_error"] < 1e-10  # the benchmark's sharded map solves the right problem
    rows = result["counts"]
    assert {r["method"] for r in rows} == {"anderson", "broyden", "forward"}
    assert len({r["n"] for r in rows}) >= 2 and len({r["B"] for r in rows}) >= 2
    for r in rows:
        B, nbytes = r["B"], r["bytes_per_iteration"]
        # set-up: one collective agrees on every process's checks (x0 finite, options valid, memory allocated)
        # and compares their settings (three numbers); the first evaluation of g is agreed on the same way
        assert (r["setup_collectives"], r["setup_bytes"]) == (1, 24), r
        assert r["collectives_per_iteration"] == [2] + [1] * (r["iterations"] - 1), r
        assert r["ops"] == ["max", "sum"], r  # the maximum: the first evaluation agreed on
        nbytes = [nbytes[0] - 24] + nbytes[1:]
        if r["method"] == "anderson":    # Gram row <F, f_k> (m numbers) and |g|^2, per sample
            assert nbytes == [8 * B * (M + 1)] * r["iterations"], r
        elif r["method"] == "forward":   # |g - x|^2 and |g|^2
            assert nbytes == [8 * B * 2] * r["iterations"], r
        else:  # |f|^2, |g|^2; then S^T f, [Y S]^T s and S^T y over the pairs in use (4u + 1 products) and |g|^2
            assert nbytes[0] == 8 * B * 2 and nbytes[-1] == 8 * B * (4 * M + 2), r
            assert nbytes == sorted(nbytes), r
    by_case = {}
    for r in rows:  # the same bytes for every n at a given method and B
        by_case.setdefault((r["method"], r["B"]), set()).add(tuple(r["bytes_per_iteration"]))
    assert all(len(v) == 1 for v in by_case.values()), by_case
