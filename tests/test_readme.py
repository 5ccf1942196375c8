"""README.md as a newcomer uses it: every Python block runs as written, in order, in one namespace (the tour);
the quick start installs a CPU-only torch into a new environment before the package; the MPI example prints
what the README shows; the figure quoted from ``python -m fixedpoint`` is what it prints."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _text():
    return README.read_text(encoding="utf-8")


def _blocks(lang="python"):
    return re.findall(rf"```{lang}\n(.*?)```", _text(), re.S)


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 2


def test_every_readme_block_runs(capsys):
    namespace: dict = {}
    for i, block in enumerate(_blocks()):
        if "import torch" in block:
            pytest.importorskip("torch")
        exec(compile(block, f"README.md, python block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "diverged" in printed
    assert namespace["res"].converged.all() and namespace["layer"].stats.backward.converged_fraction == 1.0
    # the batch=True warning: the joint solve says "converged" with the small sample 81 % off
    wrong, right = namespace["wrong"], namespace["right"]
    assert "converged 0.0019 [ True  True] 0.0100" in printed
    off = abs(wrong.x[1, 0] - right.x[1, 0]) / abs(right.x[1, 0])
    assert wrong.status == "converged" and right.converged.all() and f"{100 * off:.0f} % off" in _text()


def test_quick_start_installs_cpu_torch_in_a_new_environment_first():
    quick = _text().split("## Quick start", 1)[1].split("## A short tour", 1)[0]
    install = re.search(r"```bash\n(.*?)```", quick, re.S)[1]
    lines = [line.split("#")[0].strip() for line in install.splitlines()]
    venv = next(i for i, line in enumerate(lines) if line.startswith("python -m venv"))
    cpu = next(i for i, line in enumerate(lines) if "download.pytorch.org/whl/cpu" in line)
    pkg = next(i for i, line in enumerate(lines) if line.startswith("pip install -e"))
    assert venv < cpu < pkg and lines[cpu].startswith("pip install torch --index-url")
    extras = set(re.search(r'"\.\[([a-z0-9,]+)\]"', lines[pkg])[1].split(","))
    cfg = (ROOT / "setup.cfg").read_text()
    assert all(re.search(rf"^{e} =$", cfg, re.M) for e in extras), extras
    assert "cuda12" in quick and "cuda13" in quick  # the GPU alternative next to it


def test_claim_is_what_python_m_fixedpoint_prints(capsys):
    from fixedpoint.__main__ import main

    claim = re.search(r"<!-- figures:readme-cli -->(.*?)<!--", _text(), re.S)[1]
    ratio, fw, aa = re.search(r"([0-9.]+)× .*?(\d+) against (\d+) evaluations", claim).groups()
    assert main([]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^forward +converged +{fw} ", out, re.M)
    assert re.search(rf"^anderson +converged +{aa} ", out, re.M)
    assert f"anderson vs forward iteration: {ratio}x fewer evaluations" in out


def test_mpi_example_prints_what_the_readme_shows(tmp_path):
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install '.[mpi]')")
    bindir = str(Path(sys.executable).parent)
    if not (shutil.which("mpiexec", path=bindir) or shutil.which("mpiexec")):
        pytest.skip("no mpiexec (pip install '.[mpi]' brings MPICH's)")
    section = _text().split("A script `solve_sharded.py`:", 1)[1]
    script = re.search(r"```py\n(.*?)```", section, re.S)[1]
    command = re.search(r"```bash\n(mpiexec[^\n]*)\n```", section)[1]
    expected = re.search(r"```text\n(.*?)```", section, re.S)[1]
    (tmp_path / "solve_sharded.py").write_text(script)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout == expected
