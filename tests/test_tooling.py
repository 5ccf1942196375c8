"""tooling/timing.py: the thread count the demos choose, and what the records say about fixedpoint's origin."""

import os
import subprocess
from pathlib import Path

import pytest

import fixedpoint
from tooling import timing

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def machine(monkeypatch):
    """A machine with 4 usable CPUs whose load average the test sets; OMP_NUM_THREADS unset."""
    load = [0.0]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    return load


def test_default_threads_leave_busy_cores_alone(machine, monkeypatch):
    for load, threads in ((0.0, 4), (0.4, 4), (1.6, 2), (3.7, 1), (12.0, 1)):
        machine[0] = load
        got, reason = timing.default_threads()
        assert got == threads, load
        assert "4 usable" in reason and f"{load:.1f}" in reason
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own choice wins
    assert timing.default_threads() == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: ignored
    assert timing.default_threads()[0] == 1


def test_use_threads_sets_torch_and_says_how_many(machine, one_torch_thread):
    torch = pytest.importorskip("torch")
    machine[0] = 2.2
    line = timing.use_threads(None)
    assert torch.get_num_threads() == 2 and line.startswith("torch threads: 2 (") and "--threads" in line
    line = timing.use_threads(3)
    assert torch.get_num_threads() == 3 and line.startswith("torch threads: 3 (--threads")


def test_machine_info_names_fixedpoints_origin_and_its_commit(monkeypatch, tmp_path):
    info = timing.machine_info()
    here = Path(fixedpoint.__file__).resolve().parent
    assert info["fixedpoint_path"] == str(here)
    if here == ROOT / "fixedpoint" and (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        assert info["git_commit"] == head and isinstance(info["fixedpoint_uncommitted_changes"], bool)

    # an installed copy outside any git work tree: the commit and the changes are unknown, not "none"
    copy = tmp_path / "site-packages" / "fixedpoint"
    copy.mkdir(parents=True)
    (copy / "__init__.py").write_text("")
    monkeypatch.setattr(fixedpoint, "__file__", str(copy / "__init__.py"))
    info = timing.machine_info()
    assert info["fixedpoint_path"] == str(copy.resolve())
    assert info["git_commit"] == "unknown" and info["fixedpoint_uncommitted_changes"] == "unknown"
    assert "installed copy" in info["git_unknown_because"]

    # a copy inside a git work tree that does not track it (a virtual environment in a checkout)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    info = timing.machine_info()
    assert info["git_commit"] == "unknown" and info["fixedpoint_uncommitted_changes"] == "unknown"
    assert "not tracked" in info["git_unknown_because"]


@pytest.mark.parametrize("script, argv, spec", [
    ("bench_overhead", ["--backend", "torch", "--device", "cuda"], "torch:cuda"),
    ("bench_memory", ["--backend", "torch:cuda:0"], "torch:cuda:0"),
    ("bench_memory", ["--backend", "cupy"], "cupy"),
    ("bench_overhead", ["--backend", "numpy", "--device", "gpu"], None),
])
def test_benchmarks_refuse_a_backend_that_is_not_here_in_one_line(script, argv, spec, capsys):
    if spec is not None and timing.unusable_reason(spec) is None:
        pytest.skip(f"{spec} is usable here")
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and ": error: --backend" in err[-1], err
    assert "Traceback" not in "\n".join(err)
