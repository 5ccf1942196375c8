"""``python -m fixedpoint``: the H-equation comparison a newcomer runs first."""

import re
import subprocess
import sys

import pytest

from fixedpoint.__main__ import main


def test_runs_and_finds_the_physical_root(capsys):
    assert main(["--n", "100", "--c", "0.9999"]) == 0
    out = capsys.readouterr().out
    assert "non-physical" not in out and out.count("physical") == 3
    ratios = [float(r) for r in re.findall(r"([0-9.]+)x fewer evaluations", out)]
    assert len(ratios) == 2 and min(ratios) > 5  # the H-equation near c = 1: acceleration pays


def test_float32_backend_gets_a_tolerance_it_can_reach(capsys):
    pytest.importorskip("torch")
    assert main(["--n", "100", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "dtype float32; relative tolerance 1e-05" in out and "max_iter" not in out
    assert main(["--n", "50", "--backend", "torch", "--tol", "1e-10", "--max-iter", "50"]) == 1
    out = capsys.readouterr().out
    assert "below float32's resolution" in out and "no comparison" in out


@pytest.mark.parametrize("argv, word", [(["--c", "1.5"], "--c"), (["--c", "x"], "--c"), (["--n", "0"], "--n"),
                                        (["--tol", "-1"], "--tol"), (["--backend", "jax"], "--backend")])
def test_bad_arguments_are_argparse_errors_not_tracebacks(argv, word):
    proc = subprocess.run([sys.executable, "-m", "fixedpoint", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and word in proc.stderr and "Traceback" not in proc.stderr


def test_help_prints_each_default_once():
    proc = subprocess.run([sys.executable, "-m", "fixedpoint", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    # one entry per option: the lines from its flag to the next flag, joined
    entries = re.split(r"\n  (?=-)", proc.stdout.split("options:", 1)[1])
    defaults = {e.split()[0]: " ".join(e.split()).count("(default:") for e in entries if e.strip()}
    assert defaults["--tol"] == 1 and "1e-10 in float64, 1e-5 in float32)" in " ".join(proc.stdout.split())
    assert all(count <= 1 for count in defaults.values()), defaults
    assert "(default: None)" not in proc.stdout
    assert all(defaults[flag] == 1 for flag in ("--n", "--c", "--tol", "--m", "--max-iter", "--backend", "--dtype",
                                                "--device")), defaults
