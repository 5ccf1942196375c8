"""Sharded solves with two real processes: mpiexec (PyPI's mpich + mpi4py) and torchrun (gloo).

The work is in tests/distributed_worker.py; each launch has a timeout, so a hang fails the test
instead of stalling CI.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
ROOT = WORKER.parent.parent
TIMEOUT = 120


def _mpiexec():
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install '.[mpi]')")
    exe = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec (pip install '.[mpi]' brings MPICH's)")
    return [exe, "-n", "2", sys.executable, "-m", "mpi4py"]


def _torchrun():
    pytest.importorskip("torch.distributed")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _launch(cmd, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([*cmd, str(WORKER), *args], capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          cwd=ROOT)


@pytest.mark.parametrize("engine", ["mpi", "torch"])
def test_sharded_solves_equal_the_single_process_solve(engine):
    proc = _launch(_mpiexec() if engine == "mpi" else _torchrun(), engine)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("all checks passed") == 2


@pytest.mark.parametrize("engine", ["mpi", "mpi-plain", "torch"])
def test_a_failing_process_ends_the_job_instead_of_hanging(engine):
    """Under torchrun, and under mpiexec with or without mpi4py's runner (-m mpi4py): without it the library
    itself calls MPI_Abort, since MPI has no timeouts and the other process would wait forever."""
    if engine == "torch":
        cmd = _torchrun()
    else:
        cmd = _mpiexec()
        if engine == "mpi-plain":
            cmd = cmd[:-2]  # drop "-m mpi4py"
    proc = _launch(cmd, engine.split("-")[0], "fail")  # TimeoutExpired = a hang
    assert proc.returncode != 0 and "g failed on purpose" in proc.stderr
    if engine == "mpi-plain":
        assert "calling MPI_Abort" in proc.stderr
