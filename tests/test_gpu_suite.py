"""benchmarks/gpu_suite.py: the dry run end to end, the bundle's limits, the targets, stage failures.

The dry run (the same stages on the CPU at tiny sizes) runs once for the module, as a
subprocess with one thread per library; the other tests drive the suite's parts directly
with small commands.  benchmarks/fetch_device_wheels.py is tested on wheels made here.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import fetch_device_wheels as fetch
from benchmarks import gpu_suite

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _one_thread_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run's bundle folder, its work folder, the finished process and its wall time."""
    for module in ("torch", "matplotlib", "tqdm", "sklearn"):
        pytest.importorskip(module)
    base = tmp_path_factory.mktemp("suite")
    out, work = base / "out", base / "work"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--out", str(out),
                           "--work", str(work)], cwd=ROOT, env=_one_thread_env(), capture_output=True, text=True,
                          timeout=600, check=False)
    return out, work, proc, time.monotonic() - t0


def _summary(out):
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_says_so(dry_run):
    out, _, proc, wall = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _summary(out)
    assert summary["dry_run"] and summary["finished"] and not summary["interrupted"]
    plan = gpu_suite.build_plan(dry_run=True)
    assert [s["name"] for s in summary["stages"]] == [s.name for s in plan.stages]
    for st in summary["stages"]:
        assert st["status"] == "ok", st
        assert st["wall_s"] <= st["timeout_s"] and st["command"][0].startswith("python")
    assert wall < 180  # well under a minute on an idle machine; generous for a loaded CI runner
    # the progress lines carry a clock time and the seconds since the start, and end with the targets
    lines = proc.stdout.splitlines()
    assert all(re.match(r"^\[\d\d:\d\d:\d\d \+ *\d+\.\d+s\] ", line) for line in lines if not line.startswith(" "))
    assert any("target bandwidth:" in line for line in lines) and any("target speedup:" in line for line in lines)


@pytest.mark.slow
def test_bundle_is_what_a_device_call_returns(dry_run):
    out = dry_run[0]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(gpu_suite.BUNDLE_FILES)
    assert len(files) <= 8
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert all(NAME.match(part) for part in rel.parts), rel
        assert len(rel.parts) - 1 <= 2, rel  # at most 2 folders deep
        assert not p.is_symlink()
        if p.is_file():
            assert 0 < p.stat().st_size <= 16 * 2**20, rel
    assert gpu_suite.check_bundle(out) == []


@pytest.mark.slow
def test_tarball_holds_every_stage_output_and_no_checkpoint(dry_run):
    out, work, _, _ = dry_run
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    for stage in gpu_suite.build_plan(dry_run=True).stages:
        assert f"gpu_suite/{stage.name}/output.log" in names
        assert f"gpu_suite/{stage.name}/{stage.result}" in names
    assert not [n for n in names if n.endswith(".pt")]
    assert (work / "deq_numpy" / "checkpoint-anderson.pt").is_file()  # left out of the bundle, not lost
    assert any("checkpoint" in why for why in _summary(out)["bundle"]["left_out"])


@pytest.mark.slow
def test_report_names_environment_stages_and_each_target_status(dry_run):
    out = dry_run[0]
    report = (out / "report.md").read_text(encoding="utf-8")
    summary = _summary(out)
    assert "DRY RUN" in report
    import numpy

    assert f"| Python, NumPy, SciPy | {sys.version.split()[0]}, {numpy.__version__}" in report
    for st in summary["stages"]:
        assert re.search(rf"^\| {st['name']} \| ok \|", report, re.M), st["name"]
    for key in ("bandwidth", "speedup"):
        t = summary["targets"][key]
        assert t["status"] in gpu_suite.TARGET_STATUSES and t["status"] != "not measured"
        assert f"**{t['title']}: {t['status'].upper()}**" in report
    env = summary["environment"]
    assert env["gpus"] == [] and env["packages"]["numpy"] == numpy.__version__
    assert len(env["source_sha256"]["fixedpoint"]) == 64


@pytest.mark.slow
def test_speedup_target_is_the_time_ratio_of_the_rows(dry_run):
    summary = _summary(dry_run[0])
    rows = summary["results"]["cvg_jacobi"]["rows"]
    times = {(r["backend"], r["n"], r["method"]): r["time"] for r in rows}
    got = summary["targets"]["speedup"]["torch"]["ratios"]
    assert {(g["n"], g["method"]) for g in got} == {(10**4, "forward"), (10**4, "anderson")}
    for g in got:
        key = (g["n"], g["method"])
        assert g["ratio"] == pytest.approx(times[("numpy",) + key] / times[("torch",) + key])


# --- the targets on made-up numbers -------------------------------------------------------------

def _overhead(fractions, n=10**7):
    rows = [dict(dtype="float32", n=n, m=m, fraction_of_copy_bw=f, n_restarts=0) for m, f in fractions.items()]
    rows.append(dict(dtype="float32", n=10**6, m=1, fraction_of_copy_bw=0.01, n_restarts=0))  # below n_min: ignored
    return dict(rows=rows, copy_gbs_before=4000.0, copy_gbs_after=4100.0)


def test_bandwidth_target_met_not_met_and_not_measured():
    met = gpu_suite.bandwidth_target({"cupy": _overhead({1: 0.7, 5: 0.9})}, 10**7)
    assert met["status"] == "met" and met["cupy"]["min"] == 0.7 and "4100 GB/s" in met["cupy"]["line"]
    missed = gpu_suite.bandwidth_target({"cupy": _overhead({1: 0.59, 5: 0.9}), "torch:cuda:0": None}, 10**7)
    assert missed["status"] == "not met" and missed["torch:cuda:0"]["status"] == "not measured"
    assert "m=1 (0.59)" in missed["cupy"]["line"] and missed["unmeasured"] == ["torch:cuda:0"]
    partial = gpu_suite.bandwidth_target({"cupy": _overhead({5: 0.8}), "torch:cuda:0": None}, 10**7)
    assert partial["status"] == "met" and partial["unmeasured"] == ["torch:cuda:0"]
    none = gpu_suite.bandwidth_target({"cupy": _overhead({5: 0.8}, n=10**6), "torch:cuda:0": None}, 10**7)
    assert none["status"] == "not measured"


def test_speedup_target_needs_every_method_at_every_large_n():
    def rows(cupy_times):
        out = []
        for (n, method), t in cupy_times.items():
            out += [dict(problem="jacobi", n=n, backend="numpy", method=method, time=1.0),
                    dict(problem="jacobi", n=n, backend="cupy", method=method, time=t),
                    dict(problem="tanh", n=n, backend="cupy", method=method, time=1e-9)]  # another problem: ignored
        return dict(rows=out)

    fast = rows({(10**7, "forward"): 0.01, (10**7, "anderson"): 0.04, (10**6, "forward"): 0.5})
    t = gpu_suite.speedup_target(fast, "numpy", "cupy", 10**7)
    assert t["status"] == "met" and sorted(round(g["ratio"]) for g in t["cupy"]["ratios"]) == [25, 100]
    slow = rows({(10**7, "forward"): 0.01, (10**7, "anderson"): 0.06})
    assert gpu_suite.speedup_target(slow, "numpy", "cupy", 10**7)["status"] == "not met"
    assert gpu_suite.speedup_target(None, "numpy", "cupy", 10**7)["status"] == "not measured"
    assert gpu_suite.speedup_target(rows({(10**6, "forward"): 0.01}), "numpy", "cupy", 10**7)["status"] == \
        "not measured"


def test_sizes_print_as_powers_of_ten():
    assert [gpu_suite.sci(n) for n in (10**7, 10**8, 1000, 4096)] == ["1e7", "1e8", "1e3", "4,096"]


# --- stages that fail, hang or are interrupted --------------------------------------------------

def _plan(*stages):
    return gpu_suite.Plan(dry_run=True, stages=[
        gpu_suite.Stage(name, name, "raw", "", ["-c", code], budget, "") for name, code, budget in stages])


@pytest.fixture
def quick_limits(monkeypatch):
    """Short grace periods, so that the stopping tests take seconds."""
    monkeypatch.setattr(gpu_suite, "GRACE_S", 2.0)
    monkeypatch.setattr(gpu_suite, "RESERVE_S", 1.0)
    monkeypatch.setattr(gpu_suite, "MIN_STAGE_S", 0.5)


def test_failed_and_timed_out_stages_are_recorded_and_the_suite_goes_on(tmp_path, quick_limits):
    plan = _plan(("fails", "import sys; print('boom'); sys.exit(3)", 30),
                 ("hangs", "import time; print('started', flush=True); time.sleep(60)", 1.5),
                 ("works", "print('fine')", 30))
    suite = gpu_suite.Suite(plan, tmp_path / "out", tmp_path / "work", 120, {"fails", "hangs", "works"}, echo=False)
    t0 = time.monotonic()
    assert suite.run() == 1
    assert time.monotonic() - t0 < 30
    stages = {s["name"]: s for s in _summary(tmp_path / "out")["stages"]}
    assert stages["fails"]["status"] == "failed" and stages["fails"]["returncode"] == 3
    assert stages["hangs"]["status"] == "timeout" and stages["hangs"]["wall_s"] < 10
    assert stages["works"]["status"] == "ok"
    assert "boom" in (tmp_path / "work" / "fails" / "output.log").read_text()
    assert "fails (failed):" in (tmp_path / "out" / "report.md").read_text()  # the report shows its last lines
    assert "boom" in stages["fails"]["output_tail"]
    log = (tmp_path / "out" / "suite.log").read_text()
    assert "hangs: timeout" in log and "last lines of its output" in log
    assert gpu_suite.check_bundle(tmp_path / "out") == []


def test_stages_past_the_deadline_are_skipped(tmp_path, quick_limits):
    plan = _plan(("slow", "import time; time.sleep(60)", 100), ("late", "print(1)", 100))
    suite = gpu_suite.Suite(plan, tmp_path / "out", tmp_path / "work", 3.0, {"slow", "late"}, echo=False)
    suite.run()
    stages = {s["name"]: s for s in _summary(tmp_path / "out")["stages"]}
    assert stages["slow"]["status"] == "timeout" and stages["slow"]["timeout_s"] <= 2.0
    assert stages["late"]["status"] == "skipped" and "no time left" in stages["late"]["note"]


def test_sigterm_stops_the_stage_and_still_writes_the_bundle(tmp_path, quick_limits):
    plan = _plan(("running", "import time; time.sleep(60)", 100), ("never", "print(1)", 100))
    suite = gpu_suite.Suite(plan, tmp_path / "out", tmp_path / "work", 120, {"running", "never"}, echo=False)
    previous = signal.signal(signal.SIGTERM, gpu_suite._raise_interrupted)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert suite.run() == 128 + signal.SIGTERM
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    summary = _summary(tmp_path / "out")
    assert summary["interrupted"] == "SIGTERM"
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("running", "interrupted"), ("never", "skipped")]
    assert "interrupted by SIGTERM" in (tmp_path / "out" / "report.md").read_text()


def test_a_stage_that_writes_no_result_file_fails(tmp_path, quick_limits):
    plan = gpu_suite.Plan(dry_run=True, stages=[
        gpu_suite.Stage("quiet", "quiet", "overhead", "numpy", ["-c", "pass"], 30, "overhead.json")])
    suite = gpu_suite.Suite(plan, tmp_path / "out", tmp_path / "work", 60, {"quiet"}, echo=False)
    assert suite.run() == 1
    (st,) = _summary(tmp_path / "out")["stages"]
    assert st["status"] == "failed" and "overhead.json was not written" in st["note"]


def test_a_demo_stopped_part_way_still_counts_the_rows_it_wrote(tmp_path, quick_limits):
    """cpu_vs_gpu rewrites rows.csv after each configuration; the suite reads it when results.json is missing."""
    csv_text = ("problem,n,backend,method,n_fev,converged,time\n"
                "jacobi,10000000,numpy,forward,175,True,12.0\njacobi,10000000,cupy,forward,175,True,0.04\n")
    code = (f"import sys, time; open(sys.argv[1] + '/rows.csv', 'w').write({csv_text!r}); print('row', flush=True); "
            "time.sleep(60)")
    stage = gpu_suite.Stage("cvg_jacobi", "demo", "cvg", "", ["-c", code, "{dir}"], 2.0, "results.json")
    suite = gpu_suite.Suite(gpu_suite.Plan(False, [stage]), tmp_path / "out", tmp_path / "work", 60, {"cvg_jacobi"},
                            echo=False)
    assert suite.run() == 1
    summary = _summary(tmp_path / "out")
    (st,) = summary["stages"]
    assert st["status"] == "timeout" and "rows of rows.csv so far" in st["note"]
    assert summary["results"]["cvg_jacobi"]["partial"]
    speedup = summary["targets"]["speedup"]
    assert speedup["status"] == "met" and speedup["cupy"]["ratios"][0]["ratio"] == pytest.approx(300)


def test_on_a_gpu_run_all_skipped_gpu_tests_are_a_failure(tmp_path, quick_limits):
    xml = ('<testsuites><testsuite tests="2" failures="0" errors="0" skipped="2">'
           '<testcase classname="t" name="a"><skipped message="no CUDA"/></testcase>'
           '<testcase classname="t" name="b"><skipped message="no CUDA"/></testcase></testsuite></testsuites>')
    code = f"import sys; open(sys.argv[1], 'w').write({xml!r})"
    stage = gpu_suite.Stage("gpu_tests", "tests", "tests", "", ["-c", code, "{dir}/junit.xml"], 30, "junit.xml")
    for dry_run, status in ((True, "ok"), (False, "failed")):
        out = tmp_path / str(dry_run)
        suite = gpu_suite.Suite(gpu_suite.Plan(dry_run, [stage]), out, tmp_path / f"work{dry_run}", 60, {"gpu_tests"},
                                echo=False)
        suite.run()
        (st,) = _summary(out)["stages"]
        assert st["status"] == status and st["headline"] == "0 passed, 0 failed, 0 errors, 2 skipped"
        assert ("no gpu test ran" in st.get("note", "")) is (not dry_run)


# --- command line -------------------------------------------------------------------------------

def test_out_with_other_files_or_an_earlier_bundle_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        gpu_suite.main(["--dry-run", "--out", str(tmp_path)])
    assert info.value.code == 2 and "holds other files (notes.txt)" in capsys.readouterr().err
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.md").write_text("# old")
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dry-run", "--out", str(earlier)])
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_suite.main(["--only", "nonsense"])
    assert "unknown stage nonsense" in capsys.readouterr().err


def test_list_shows_each_gpu_stage_within_the_eight_minutes(capsys):
    assert gpu_suite.main(["--list"]) == 0
    text = capsys.readouterr().out
    plan = gpu_suite.build_plan()
    assert sum(s.budget_s for s in plan.stages) <= 460 and gpu_suite.main.__doc__
    for s in plan.stages:
        assert s.name in text
    assert "--backend cupy --device cuda:0" in text and "--solver-backend torch" in text
    assert "--sizes 1e6 1e7 1e8" in text and "--max-n 1e8" in text and "--device cuda" in text


# --- fetch_device_wheels ------------------------------------------------------------------------

def _make_wheel(folder, dist="array-api-compat", version="1.0", module="array_api_compat", tag="py3-none-any",
                requires=">=3.10", purelib="true", body="x = 1\n"):
    name = fetch.normalize(dist)
    path = folder / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", body)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
                                        f"Requires-Python: {requires}\n")
        zf.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: {purelib}\nTag: {tag}\n")
    return path


def test_wheel_checks_accept_a_pure_wheel_and_name_what_is_wrong(tmp_path):
    good = _make_wheel(tmp_path)
    assert fetch.check_wheel(good, "array-api-compat", "array_api_compat", "1.0") == "1.0"
    bad = {
        "not a pure-Python": dict(tag="cp311-cp311-manylinux_2_17_x86_64", purelib="false"),
        "excludes 3.12": dict(requires=">=3.13"),
        "import array_api_compat` from the wheel failed": dict(body="raise ImportError('broken')\n"),
    }
    for why, kw in bad.items():
        folder = tmp_path / re.sub(r"\W+", "_", why)
        folder.mkdir()
        with pytest.raises(fetch.WheelError, match=re.escape(why)):
            fetch.check_wheel(_make_wheel(folder, **kw), "array-api-compat", "array_api_compat")
    with pytest.raises(fetch.WheelError, match="version 1.0, expected 2.0"):
        fetch.check_wheel(good, "array-api-compat", "array_api_compat", "2.0")


def test_requires_python_is_read_with_and_without_packaging(monkeypatch):
    for spec, ok in ((">=3.10", True), (">=3.10,<3.12", False), ("~=3.9", True), ("==3.12.*", True), (None, True)):
        assert fetch.python_admitted(spec, "3.12") is ok, spec
    monkeypatch.setitem(sys.modules, "packaging.specifiers", None)  # the hand-written fallback
    for spec, ok in ((">=3.10", True), (">=3.10,<3.12", False), ("<4", True), ("!=3.12", False)):
        assert fetch.python_admitted(spec, "3.12") is ok, spec


def test_fill_keeps_the_wanted_version_and_removes_others_without_the_network(tmp_path, monkeypatch):
    for dist, module in fetch.PACKAGES:
        _make_wheel(tmp_path, dist, "1.0", module)
        _make_wheel(tmp_path, dist, "0.9", module)
    monkeypatch.setattr(fetch, "wanted_version", lambda dist, latest: "1.0")
    monkeypatch.setattr(fetch, "download", lambda *a: pytest.fail("nothing should be downloaded"))
    held = fetch.fill(tmp_path)
    assert [h["action"] for h in held] == ["kept", "kept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(h["file"] for h in held)
    assert all("-1.0-" in h["file"] for h in held)
    assert [h["action"] for h in fetch.fill(tmp_path, check_only=True)] == ["checked", "checked"]
    (tmp_path / held[0]["file"]).unlink()
    with pytest.raises(fetch.WheelError, match="holds 0 wheels of array-api-compat"):
        fetch.fill(tmp_path, check_only=True)


def test_the_wheel_folder_is_ignored_by_git():
    if fetch.git_ignored(ROOT / ".whl") is None:
        pytest.skip("not a git checkout")
    assert fetch.git_ignored(ROOT / ".whl") is True
