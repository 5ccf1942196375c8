"""The demos' command lines against bad input (issue 21): one output policy, checked checkpoints, one-line errors.

Every failure is one line on stderr and a nonzero exit status, never a traceback; nothing on disk is lost
without --overwrite.  The runs are tiny (a DEQ on 100 digits, one epoch; a few optimizer steps; the quick
CPU-vs-GPU sweep on one problem), so that each test takes seconds.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from demos import cli, cpu_vs_gpu, deq_cifar10, deq_compaction, deq_jacobian, deq_solvers, stable_anderson  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent

#: What tqdm draws: carriage returns, block characters, and its counter and clock ("3/8 [00:01<00:02").
BAR_MARKS = re.compile(r"\r|\u2588|\d+/\d+ \[\d\d:\d\d")


def tiny_deq(out, *extra, solver="anderson"):
    return ["--dataset", "digits", "--solver", solver, "--epochs", "1", "--limit-train", "100", "--limit-test", "50",
            "--batch-size", "50", "--max-iter", "20", "--fig-iters", "3", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


def quick_anderson(out, *extra):
    return ["--quick", "--problems", "mlp_diabetes", "--steps", "2", "--threads", "1", "--out", str(out), *extra]


def quick_sweep(out, *extra):
    return ["--quick", "--backends", "numpy", "--problems", "jacobi", "--threads", "1", "--out", str(out), *extra]


def folder_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir()) if p.is_file()}


def one_error_line(capsys):
    """The one line a refused command printed on stderr (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: "), err
    return err


def parser_error(capsys):
    """argparse's error line (after its usage lines), with no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny DEQ run (forward iteration): its folder, read-only for the tests (copy to change it)."""
    out = tmp_path_factory.mktemp("deq") / "run"
    threads = torch.get_num_threads()
    try:
        assert deq_cifar10.main(tiny_deq(out, solver="forward")) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def copy_run(src, dst):
    dst.mkdir()
    for name, data in folder_bytes(src).items():
        (dst / name).write_bytes(data)
    return dst


# --- one output policy -----------------------------------------------------------------------------------

@pytest.mark.parametrize("demo, argv", [(stable_anderson, quick_anderson), (cpu_vs_gpu, quick_sweep)],
                         ids=["stable_anderson", "cpu_vs_gpu"])
def test_a_second_run_into_the_same_out_is_refused_unless_overwrite(tmp_path, capsys, demo, argv):
    out = tmp_path / "out"
    assert demo.main(argv(out, "--no-progress")) == 0
    (out / "notes.txt").write_text("mine")  # a file the demo does not write: never touched
    before = folder_bytes(out)
    capsys.readouterr()
    assert demo.main(argv(out, "--no-progress")) == 2
    err = one_error_line(capsys)
    assert str(out) in err and "--overwrite" in err
    assert folder_bytes(out) == before  # byte for byte: nothing rewritten, truncated or deleted
    assert demo.main(argv(out, "--no-progress", "--overwrite")) == 0
    assert "--overwrite: deleted the earlier run's" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine" and set(folder_bytes(out)) == set(before)


def test_an_out_that_is_a_file_is_refused_by_every_folder_demo(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("mine")
    for demo, argv in ((stable_anderson, quick_anderson), (cpu_vs_gpu, quick_sweep)):
        assert demo.main(argv(a_file, "--no-progress")) == 2
        assert "is a file" in one_error_line(capsys) and a_file.read_text() == "mine"


def test_the_deq_demo_uses_the_shared_policy(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert deq_cifar10.main(tiny_deq(out)) == 2
    err = one_error_line(capsys)
    assert "summary.json" in err and "--resume" in err and "--overwrite" in err
    assert (out / "summary.json").read_text() == "{}"


@pytest.mark.parametrize("study", ["deq_solvers", "deq_compaction"])
def test_a_study_never_replaces_an_existing_file(trained, tmp_path, capsys, study):
    run = copy_run(trained, tmp_path / "run")
    before = folder_bytes(run)
    demo = {"deq_solvers": deq_solvers, "deq_compaction": deq_compaction}[study]
    checkpoint = str(run / "checkpoint-forward.pt")
    fast = ["--batches", "1", "--threads", "1"] + (["--settings", "off"] if study == "deq_compaction" else
                                                   ["--solvers", "forward"])
    for target in ("summary.json", "metrics.csv"):  # a training run's own files
        assert demo.main([checkpoint, *fast, "--out", str(run / target)]) == 2
        err = one_error_line(capsys)
        assert target in err and "--overwrite" in err
    assert demo.main([checkpoint, *fast, "--out", checkpoint, "--overwrite"]) == 2  # never the checkpoint it reads
    assert "input" in one_error_line(capsys)
    assert folder_bytes(run) == before
    report = tmp_path / "report.json"
    assert demo.main([checkpoint, *fast, "--out", str(report)]) == 0
    assert demo.main([checkpoint, *fast, "--out", str(report)]) == 2
    one_error_line(capsys)
    report.write_text("old")
    assert demo.main([checkpoint, *fast, "--out", str(report), "--overwrite"]) == 0
    assert json.loads(report.read_text())["command"].startswith(f"python -m demos.{study} ")
    assert not (tmp_path / "report.json.tmp").exists()


# --- checkpoints: finite, readable, never executed --------------------------------------------------------

def poison(path):
    """Make one weight of checkpoint ``path`` NaN."""
    state = torch.load(path, weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key].view(-1)[0] = float("nan")
    torch.save(state, path)


def test_resuming_from_non_finite_weights_is_refused_before_anything_is_written(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    poison(run / "checkpoint-forward.pt")
    before = folder_bytes(run)
    assert deq_cifar10.main(tiny_deq(run, "--resume", solver="forward")) == 2
    err = one_error_line(capsys)
    assert "checkpoint-forward.pt" in err and "non-finite" in err
    assert folder_bytes(run) == before  # residuals.csv, residuals.png and summary.json untouched


def test_studies_refuse_non_finite_weights(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    poison(run / "checkpoint-forward.pt")
    report = tmp_path / "solvers.json"
    assert deq_solvers.main([str(run / "checkpoint-forward.pt"), "--batches", "1", "--out", str(report)]) == 2
    err = one_error_line(capsys)
    assert "checkpoint-forward.pt" in err and "non-finite" in err and not report.exists()
    assert deq_jacobian.main([str(run / "checkpoint-forward.pt")]) == 2
    assert "non-finite" in one_error_line(capsys)


class _RunsCode:
    """Unpickling this creates the folder ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def bad_checkpoint(kind, folder):
    path = folder / "checkpoint-forward.pt"
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "malicious":
        torch.save(dict(config={}, solver="forward", model=_RunsCode(folder / "pwned")), path)
    elif kind == "not a checkpoint":
        torch.save(dict(weights=torch.zeros(3)), path)
    return path  # "missing": not written


@pytest.mark.parametrize("kind", ["missing", "garbage", "malicious", "not a checkpoint"])
def test_bad_checkpoints_are_one_line_errors_and_run_nothing(tmp_path, capsys, kind):
    path = bad_checkpoint(kind, tmp_path)
    for demo, argv in ((deq_solvers, [str(path), "--batches", "1"]), (deq_jacobian, [str(path)]),
                       (deq_compaction, [str(path), "--batches", "1"])):
        assert demo.main(argv) == 2, (demo.__name__, kind)
        assert str(path) in one_error_line(capsys), (demo.__name__, kind)
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran


def test_a_malicious_checkpoint_in_a_subprocess(tmp_path):
    """What a user sees: exit status 2, one line naming the file, no traceback, and no side effect."""
    path = bad_checkpoint("malicious", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "demos.deq_solvers", str(path), "--threads", "1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))  # demos/ is importable from the root
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(path) in proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_resuming_from_a_malicious_checkpoint_runs_nothing(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    torch.save(dict(config={}, solver="forward", model=_RunsCode(tmp_path / "pwned")), run / "checkpoint-forward.pt")
    assert deq_cifar10.main(tiny_deq(run, "--resume", solver="forward")) == 2
    assert "checkpoint-forward.pt" in one_error_line(capsys)
    assert not (tmp_path / "pwned").exists()


# --- devices and backends that are not there ---------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("backend", ["torch", "numpy", "auto"])
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys, backend):
    with pytest.raises(SystemExit) as exc:
        deq_cifar10.main(tiny_deq(tmp_path / "x", "--device", "cuda", "--solver-backend", backend))
    assert exc.value.code == 2
    line = parser_error(capsys)
    assert "--device cuda" in line and "CUDA" in line
    assert not (tmp_path / "x").exists()


def _usable(library, device):
    from fixedpoint import backends

    return any(b.usable for b in backends() if (b.library, b.device) == (library, device))


@pytest.mark.parametrize("spec, library", [("cupy", "cupy"), ("cupy:cuda:0", "cupy"), ("torch:cuda:0", "torch")])
def test_gpu_backends_that_are_not_there_are_one_line(tmp_path, capsys, spec, library):
    if _usable(library, "cuda"):
        pytest.skip(f"{library} on CUDA is usable here")
    with pytest.raises(SystemExit) as exc:
        cpu_vs_gpu.main(quick_sweep(tmp_path / "x", "--backends", "numpy", spec))
    assert exc.value.code == 2
    line = parser_error(capsys)
    assert f"--backends {spec}" in line and library in line
    assert not (tmp_path / "x").exists()


# --- flags of another gradient mode ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--gradient-steps", "3"], ("--gradient-steps", "--gradient implicit")),
    (["--gradient-damping", "0.7"], ("--gradient-damping", "--gradient implicit")),
    (["--gradient", "jfb", "--gradient-steps", "3"], ("--gradient-steps", "--gradient jfb")),
    (["--gradient", "phantom", "--backward-tol", "1e-3"], ("--backward-tol", "--gradient phantom")),
    (["--gradient", "jfb", "--backward-max-iter", "5"], ("--backward-max-iter", "--gradient jfb")),
])
def test_flags_of_another_gradient_mode_are_refused(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exc:
        deq_cifar10.main(tiny_deq(tmp_path / "x", *flags))
    assert exc.value.code == 2
    line = parser_error(capsys)
    assert all(word in line for word in named), line
    assert not (tmp_path / "x").exists()


def test_phantom_defaults_are_recorded_as_before(tmp_path):
    """Without --gradient-steps the settings (and so --resume's comparison) hold the phantom defaults, 5 and 0.5."""
    parser = deq_cifar10.make_parser()
    args = parser.parse_args(tiny_deq(tmp_path / "x"))
    deq_cifar10._check_solver_values(args, parser)
    assert (args.gradient_steps, args.gradient_damping) == (5, 0.5)


# --- progress bars ------------------------------------------------------------------------------------------

def test_progress_bars_only_on_a_terminal():
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    assert cli.progress_disabled(False, Stream(True)) is False
    assert cli.progress_disabled(True, Stream(True)) is True
    assert cli.progress_disabled(False, Stream(False)) is True
    assert cli.progress_disabled(False, object()) is True  # no isatty: treated as a log


def test_every_progress_demo_has_the_same_no_progress_flag():
    helps = {}
    for demo in (deq_cifar10, stable_anderson, cpu_vs_gpu):
        (action,) = [a for a in demo.make_parser()._actions if "--no-progress" in a.option_strings]
        helps[demo.__name__] = action.help
    assert len(set(helps.values())) == 1, helps


@pytest.mark.parametrize("script, argv", [("cpu_vs_gpu", quick_sweep), ("stable_anderson", quick_anderson)])
def test_no_progress_bars_in_a_redirected_log(tmp_path, script, argv):
    """Without --no-progress, with stderr and stdout pipes (as in a log): no bars.  (--no-progress itself is
    given in the runs above.)"""
    proc = subprocess.run([sys.executable, "-m", f"demos.{script}", *argv(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not BAR_MARKS.search(proc.stderr + proc.stdout), proc.stderr[-2000:]


def test_unusable_reason_names_what_is_missing():
    from fixedpoint.backend import BackendInfo
    from tooling.timing import unusable_reason

    found = [BackendInfo("numpy", "cpu", True, "numpy 2"), BackendInfo("torch", "cpu", True, "torch 2"),
             BackendInfo("torch", "cuda", False, "torch 2+cpu: no usable CUDA device"),
             BackendInfo("cupy", "cuda", False, "not importable: No module named 'cupy'")]
    assert unusable_reason("numpy", found) is None and unusable_reason("torch", found) is None
    assert unusable_reason("torch:cuda:0", found) == "torch 2+cpu: no usable CUDA device"
    assert unusable_reason("cupy", found) == "cupy not importable: No module named 'cupy'"
    assert "CUDA device only" in unusable_reason("cupy:cpu", found)
    assert "unknown device" in unusable_reason("torch:xpu", found)
