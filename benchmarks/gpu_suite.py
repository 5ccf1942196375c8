"""The GPU run as one command: device report, gpu tests, bench_overhead, CPU-vs-GPU demo and DEQ demo, bundled.

Runs on any machine with a CUDA GPU (no network access needed once installed), in under 8 minutes:

1. ``env``: ``benchmarks/device_report.py`` (GPU, driver and CUDA versions, library versions);
2. ``overhead_cupy``, ``overhead_torch_cuda``: ``benchmarks/bench_overhead.py`` on CuPy and on
   PyTorch CUDA at n = 1e6, 1e7, 1e8 (float32 and float64, windows 1 to 20), with the copy
   bandwidth measured in the same run;
3. ``cvg_jacobi``: ``demos/cpu_vs_gpu.py`` on the cheap Jacobi map, NumPy against CuPy and
   PyTorch CUDA up to n = 1e7 (NumPy at 1e8 would take minutes);
4. ``gpu_tests``: ``python -m pytest -m gpu``;
5. ``cvg_gpu``: ``demos/cpu_vs_gpu.py`` on every problem, GPU backends only, up to n = 1e8;
6. ``deq_cupy``, ``deq_torch``: ``demos/deq_cifar10.py`` on digits, 2 epochs, both solvers,
   ``--device cuda``, with the CuPy and with the PyTorch solver.

Each stage is a subprocess with its own time budget (they add up to 7.5 minutes) inside one
deadline for the whole suite (``--time-limit``); a stage that fails or runs out of time is
recorded (a timed-out stage gets SIGTERM, then SIGKILL after 10 s) and the suite goes on.
Progress is printed with timestamps.  After every stage the bundle under ``--out`` is
rewritten, so an interrupted suite (SIGTERM, Ctrl-C, a killed machine) still leaves what was
measured up to then:

- ``report.md``: environment, stages, the two GPU targets (met / not met / not measured, with
  the numbers), condensed results;
- ``summary.json``: the same as data;
- ``suite.log``: the timestamped progress lines;
- ``results.tar.gz``: each stage's folder (its console output, JSON, CSV and plots; DEQ
  checkpoints and files over 8 MiB left out).

That is 4 files in one folder: a small bundle, easy to copy off a cluster node or a cloud
machine (the suite checks it stays within 8 files, 2 folders deep, 16 MiB a file, names of
letters, digits, ``.``, ``_`` and ``-``).  The GPU targets (issue 4):

- bandwidth: Anderson's own work per iteration at n >= 1e7 reaches at least 60% of the copy
  bandwidth measured in the same run (bench_overhead's "/copy" column), on every measured
  row (dtype, n, window);
- speed-up: CuPy at least 20 times faster than NumPy in time to tolerance on the Jacobi map
  at n >= 1e7, for both forward iteration and Anderson.

``--dry-run`` runs the same stages on the CPU at tiny sizes (NumPy standing in for CuPy and
PyTorch CPU for PyTorch CUDA; 1 epoch on 64 digits images) in well under a minute: the CI
test of the suite.  Its target statuses exercise the pipeline and say nothing about a GPU.

Examples
--------
    python -m benchmarks.gpu_suite --out out/gpu_suite              # on a CUDA machine
    python -m benchmarks.gpu_suite --dry-run --out /tmp/suite-dry   # rehearsal on a CPU
    python -m benchmarks.gpu_suite --list                           # the stages and commands
    python -m benchmarks.gpu_suite --only overhead_cupy deq_cupy --out out/rerun

See docs/benchmarks.md ("GPU") for what to install and how long each stage takes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: The files the suite writes under --out.
BUNDLE_FILES = ("report.md", "summary.json", "suite.log", "results.tar.gz")
#: The bundle stays small and plain: at most this many files, folders deep, bytes each, names of this form.
MAX_FILES, MAX_DEPTH, MAX_FILE_BYTES = 8, 2, 16 * 2**20
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
#: Files larger than this, and DEQ checkpoints, are left out of results.tar.gz.
MAX_MEMBER_BYTES = 8 * 2**20
LEFT_OUT_SUFFIXES = (".pt",)

STATUSES = ("ok", "failed", "timeout", "interrupted", "skipped")
TARGET_STATUSES = ("met", "not met", "not measured")
#: Seconds a stopped stage has between SIGTERM and SIGKILL, and the suite keeps for its bundle at the end.
GRACE_S, RESERVE_S = 10.0, 15.0
#: A stage is not started with less time than this left before the deadline.
MIN_STAGE_S = 10.0

BANDWIDTH_FRACTION, SPEEDUP = 0.60, 20.0


# --- the plan -----------------------------------------------------------------------------------

@dataclass
class Stage:
    """One subprocess of the suite.

    Attributes
    ----------
    name : str
        Short name; also the stage's folder under the work folder and in results.tar.gz.
    title : str
        What it does, for the report.
    kind : str
        "env", "tests", "overhead", "memory", "cvg" or "deq": how its results are read.
    label : str
        The backend it measures ("cupy", "torch:cuda:0"; in a dry run "numpy", "torch"), or "".
    args : list of str
        The command after the Python executable (paths relative to the repository root,
        ``{dir}`` standing for the stage's folder).
    budget_s : float
        Its time budget in seconds.
    result : str
        Its main output file, relative to its folder ("" for none).
    """

    name: str
    title: str
    kind: str
    label: str
    args: list[str]
    budget_s: float
    result: str

    def argv(self, python: str, folder: Path) -> list[str]:
        """The full command, run from the repository root, with the stage's folder filled in."""
        return [python] + [a.replace("{dir}", str(folder)) for a in self.args]


@dataclass
class Plan:
    """The stages of a suite run and the settings of the two GPU targets it checks."""

    dry_run: bool
    stages: list[Stage]
    #: bandwidth target: the overhead stages by backend label, and the smallest n that counts
    bandwidth_stages: dict[str, str] = field(default_factory=dict)
    bandwidth_n_min: int = 10**7
    #: speed-up target: the stage, the reference and candidate backends, other GPU backends shown beside
    speedup_stage: str = "cvg_jacobi"
    speedup_reference: str = "numpy"
    speedup_candidate: str = "cupy"
    speedup_others: tuple[str, ...] = ("torch:cuda:0",)
    speedup_n_min: int = 10**7


def build_plan(dry_run: bool = False) -> Plan:
    """The stages of the GPU run, or of its CPU rehearsal (``dry_run``): same stages, tiny sizes, CPU backends.

    Parameters
    ----------
    dry_run : bool
        NumPy stands in for CuPy and PyTorch CPU for PyTorch CUDA; sizes, epochs and images are
        tiny, torch and BLAS use one thread.

    Returns
    -------
    Plan
    """
    if dry_run:
        gpus = (("numpy", "cpu"), ("torch", "cpu"))
        overhead = ["--dtype", "float32", "float64", "--sizes", "1e3", "1e4", "--windows", "1", "5", "--repeats", "2",
                    "--copy-bytes", "1e6", "--threads", "1"]
        jacobi = ["--problems", "jacobi", "--backends", "numpy", "torch", "--sizes", "1e3", "1e4", "--max-n", "1e4",
                  "--repeats", "1", "--trace", "jacobi:1e3", "--threads", "1"]
        sweep = ["--backends", "numpy", "torch", "--sizes", "1e3", "--max-n", "1e3", "--dense-sizes", "100",
                 "--repeats", "1", "--trace", "jacobi:1e3", "--threads", "1"]
        deq = ["--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32", "--channels", "8",
               "--inner-channels", "8", "--groups", "4", "--max-iter", "30", "--fig-iters", "5", "--device", "cpu",
               "--threads", "1"]
        deq_backends = ("numpy", "torch")
        memory = ["--n", "1e4", "--iters", "10", "--m", "5"]
        budgets = dict(env=60, overhead_numpy=60, overhead_torch=60, memory=30, cvg_jacobi=60, gpu_tests=120,
                       cvg_gpu=60, deq=60)
    else:
        gpus = (("cupy", "cuda:0"), ("torch", "cuda:0"))
        # bench_overhead's default --max-history-gb 4 measures every window at n <= 1e7 and m <= 5 (float32) or
        # m <= 2 (float64) at 1e8: each window's random vectors are drawn on the host, ~4 s per window at 1e8
        overhead = ["--dtype", "float32", "float64", "--sizes", "1e6", "1e7", "1e8"]
        jacobi = ["--problems", "jacobi", "--backends", "numpy", "cupy", "torch:cuda:0", "--sizes", "1e5", "1e6",
                  "1e7", "--max-n", "1e7", "--repeats", "2", "--trace", "jacobi:1e6"]
        sweep = ["--backends", "cupy", "torch:cuda:0", "--sizes", "1e5", "1e6", "1e7", "1e8", "--max-n", "1e8",
                 "--repeats", "2"]
        deq = ["--epochs", "2", "--device", "cuda"]
        deq_backends = ("cupy", "torch")
        memory = ["--n", "1e8", "--iters", "20", "--m", "5", "--dtype", "float32"]  # 400 MB vectors
        budgets = dict(env=25, overhead_cupy=70, overhead_torch=65, memory=15, cvg_jacobi=70, gpu_tests=60,
                       cvg_gpu=60, deq=40)
    labels = [lib if dev == "cpu" or lib == "cupy" else f"{lib}:{dev}" for lib, dev in gpus]  # as --backends names them
    stages = [Stage("env", "environment and device report", "env", "",
                    ["-m", "benchmarks.device_report", "--json", "{dir}/device.json"], budgets["env"], "device.json")]
    overhead_names = {}
    for (lib, dev), label in zip(gpus, labels):
        name = "overhead_" + (lib if dry_run or lib == "cupy" else f"{lib}_cuda")
        overhead_names[label] = name
        stages.append(Stage(name, f"bench_overhead: Anderson's own cost per iteration, {label}", "overhead", label,
                            ["-m", "benchmarks.bench_overhead", "--backend", lib, "--device", dev, *overhead,
                             "--out", "{dir}/overhead.json"], budgets[f"overhead_{lib}"], "overhead.json"))
    for (lib, dev), label in zip(gpus, labels):  # peak device memory of one solve (NumPy: tracemalloc)
        mem_backend = lib if lib in ("numpy", "cupy") else f"{lib}:{dev}"
        stages.append(Stage(f"memory_{lib}", f"bench_memory: peak memory of one solve in vectors, {label}", "memory",
                            label, ["-m", "benchmarks.bench_memory", "--backend", mem_backend, *memory,
                                    "--out", "{dir}/memory.json"], budgets["memory"], "memory.json"))
    stages.append(Stage("cvg_jacobi", "CPU vs GPU on the cheap Jacobi map (the speed-up target)", "cvg", "",
                        ["-m", "demos.cpu_vs_gpu", *jacobi, "--out", "{dir}"], budgets["cvg_jacobi"], "results.json"))
    stages.append(Stage("gpu_tests", "the gpu-marked tests", "tests", "",
                        ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                         "--junitxml={dir}/junit.xml", "tests"], budgets["gpu_tests"], "junit.xml"))
    stages.append(Stage("cvg_gpu", "CPU vs GPU demo, every problem on the GPU backends" + (
        " (dry run: CPU stand-ins)" if dry_run else ", up to n = 1e8"), "cvg", "",
        ["-m", "demos.cpu_vs_gpu", *sweep, "--out", "{dir}"], budgets["cvg_gpu"], "results.json"))
    for backend in deq_backends:
        stages.append(Stage(f"deq_{backend}", f"DEQ demo on digits, both solvers, solver in {backend}", "deq",
                            backend, ["-m", "demos.deq_cifar10", "--dataset", "digits", "--solver", "both", *deq,
                                      "--solver-backend", backend, "--no-progress", "--out", "{dir}"],
                            budgets["deq"], "summary.json"))
    plan = Plan(dry_run, stages, bandwidth_stages=overhead_names)
    if dry_run:
        plan.bandwidth_n_min = plan.speedup_n_min = 10**4
        plan.speedup_candidate, plan.speedup_others = "torch", ()
    return plan


# --- reading the stages' outputs ----------------------------------------------------------------

def _load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_env(path: Path) -> dict[str, Any]:
    """The device report's JSON, condensed to what the report shows."""
    rep = _load_json(path)
    smi, tch, cp = rep.get("nvidia_smi", {}), rep.get("torch", {}), rep.get("cupy", {})
    mach, pk = rep.get("machine", {}), rep.get("packages", {})
    gpus = [g.get("name") for g in smi.get("gpus", [])] or [d.get("name") for d in tch.get("devices", [])] or \
        [d.get("name") for d in cp.get("devices", [])]
    env: dict[str, Any] = dict(
        gpus=gpus, gpu_usable=rep.get("gpu_usable"),
        driver=next((g.get("driver_version") for g in smi.get("gpus", [])), None),
        cuda_driver=smi.get("cuda_version") or cp.get("cuda_driver"),
        gpu_memory=next((g.get("memory.total") for g in smi.get("gpus", [])), None),
        compute_capability=next((d.get("capability") for d in tch.get("devices", [])), None),
        torch=tch.get("version"), torch_cuda=tch.get("cuda_build"), cudnn=tch.get("cudnn"),
        cupy=cp.get("version"), cupy_cuda_runtime=cp.get("cuda_runtime"),
        python=rep.get("python"), cpu=mach.get("cpu"), usable_cpus=mach.get("usable_cpus"),
        ram_gib=mach.get("ram_gib"), os=mach.get("os"), fixedpoint=mach.get("fixedpoint"),
        git_commit=mach.get("git_commit"),
        source_sha256={k: v.get("sha256") for k, v in rep.get("source_sha256", {}).items() if isinstance(v, dict)},
        packages={k: v.get("version") for k, v in pk.items() if isinstance(v, dict)},
        package_locations={k: v.get("location") for k, v in pk.items() if isinstance(v, dict)},
        usable_backends=[f"{b['library']}:{b['device']}" for b in rep.get("fixedpoint_backends", [])
                         if isinstance(b, dict) and b.get("usable")],
    )
    return env


def read_tests(path: Path) -> dict[str, Any]:
    """Counts of a pytest JUnit XML file and the names of the tests that failed or errored."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            bad.append(name)
        elif (skip := case.find("skipped")) is not None:
            skipped.append(f"{name}: {skip.get('message', '')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(counts, passed=passed, failed_tests=bad, skipped_tests=skipped)


def read_overhead(path: Path) -> dict[str, Any]:
    """bench_overhead's JSON: copy bandwidth before and after, and its rows without the timing details."""
    data = _load_json(path)
    keep = ("dtype", "n", "m", "time_per_iter_s", "weights_time_s", "achieved_gbs", "fraction_of_copy_bw",
            "copy_gbs_at_n", "n_restarts")
    return dict(backend=data.get("backend"), device=data.get("device"), copy_bytes=data.get("copy_bytes"),
                copy_gbs_before=data.get("copy_gbs_before"),
                copy_gbs_after=data.get("copy_gbs_after"), rows=[{k: r.get(k) for k in keep} for r in data["results"]],
                skipped=data.get("skipped", []), fits=data.get("fits", {}))


def read_memory(path: Path) -> dict[str, Any]:
    """bench_memory's JSON: per method, the peak in vectors of size n and its target."""
    data = _load_json(path)
    return dict(backend=data.get("backend"), device=data.get("device"), n=data.get("n"), dtype=data.get("dtype"),
                rows=data.get("rows", []))


def read_cvg(path: Path) -> dict[str, Any]:
    """cpu_vs_gpu's results.json without the residual traces (kept in results.tar.gz)."""
    data = _load_json(path)
    keep = ("problem", "n", "backend", "method", "n_fev", "converged", "time", "time_per_iter", "g_time",
            "overhead_per_iter", "gpu_speedup")
    trace = data.get("trace") or {}
    return dict(rows=[{k: r.get(k) for k in keep} for r in data["rows"]], ratios=data.get("ratios", []),
                crossovers=data.get("crossovers", []),
                trace={k: trace.get(k) for k in ("problem", "n", "backend", "mixing_penalty", "crossover_time")})


def read_deq(path: Path) -> dict[str, Any]:
    """The DEQ demo's summary.json: per-solver totals and the comparison."""
    data = _load_json(path)
    keep = ("epochs", "train_acc", "test_acc", "time_train", "time_forward_solve", "time_backward_solve", "fwd_fev",
            "bwd_fev", "fwd_converged", "bwd_converged")
    comp = data.get("comparison") or {}
    settings = data.get("settings", {})
    return dict(device=settings.get("device"), solver_backend=settings.get("solver_backend"),
                totals={s: {k: t.get(k) for k in keep} for s, t in (data.get("totals") or {}).items()},
                comparison={k: comp.get(k) for k in ("speedup_total_time", "compute_saved_total",
                                                     "speedup_time_to_acc", "common_test_acc")})


def read_cvg_rows(path: Path) -> dict[str, Any]:
    """cpu_vs_gpu's rows.csv, which it rewrites after every configuration: the rows of a sweep stopped part way."""
    import csv

    def value(text: str) -> Any:
        if text in ("True", "False"):
            return text == "True"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text or None

    with open(path, newline="", encoding="utf-8") as fh:
        rows = [{k: value(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    keep = ("problem", "n", "backend", "method", "n_fev", "converged", "time", "time_per_iter", "g_time",
            "overhead_per_iter", "gpu_speedup")
    return dict(rows=[{k: r.get(k) for k in keep} for r in rows], ratios=[], crossovers=[], trace={}, partial=True)


READERS = dict(env=read_env, tests=read_tests, overhead=read_overhead, memory=read_memory, cvg=read_cvg,
               deq=read_deq)
#: What a stage of a kind leaves when it is stopped before its main output: (file, reader).
PARTIAL_READERS = dict(cvg=("rows.csv", read_cvg_rows))


# --- the two GPU targets ------------------------------------------------------------------------

def sci(n: float) -> str:
    """A size as 1e7 (not 1e+07); sizes that are not a power of ten keep their digits (4,096)."""
    text = f"{n:.0e}"
    return text.replace("e+0", "e").replace("e+", "e") if float(text) == n else f"{n:,}"


def bandwidth_target(overheads: dict[str, dict[str, Any] | None], n_min: int,
                     threshold: float = BANDWIDTH_FRACTION) -> dict[str, Any]:
    """Target 1: Anderson's own work at n >= ``n_min`` reaches ``threshold`` of the copy bandwidth.

    Parameters
    ----------
    overheads : dict
        Backend label -> :func:`read_overhead` result, or None where the stage gave none.
    n_min : int
        Smallest n that counts.
    threshold : float
        Fraction of the copy bandwidth each row must reach.

    Returns
    -------
    dict
        ``status`` ("met" when every measured row of every measured backend reaches the
        threshold, "not met" when one does not, "not measured" when no row counts), ``line``
        (a sentence with the numbers) and ``backends`` (the same per backend, with the rows
        that counted).
    """
    per: dict[str, Any] = {}
    for label, res in overheads.items():
        rows = [r for r in (res or {}).get("rows", []) if r["n"] >= n_min and r.get("fraction_of_copy_bw") is not None]
        if not rows:
            per[label] = dict(status="not measured", line=f"{label}: not measured (no row at n >= {sci(n_min)})")
            continue
        fr = [r["fraction_of_copy_bw"] for r in rows]
        low = [r for r in rows if r["fraction_of_copy_bw"] < threshold]
        copy = max(res.get("copy_gbs_before") or 0, res.get("copy_gbs_after") or 0) if res else 0
        status = "not met" if low else "met"
        line = (f"{label}: {status}: /copy {min(fr):.2f} to {max(fr):.2f} over {len(rows)} rows at n >= "
                f"{sci(n_min)} (copy bandwidth {copy:.0f} GB/s)")
        if low:
            line += "; below " + f"{threshold:.2f}: " + ", ".join(
                f"{r['dtype']} n={sci(r['n'])} m={r['m']} ({r['fraction_of_copy_bw']:.2f})" for r in low[:8]) + (
                f" and {len(low) - 8} more" if len(low) > 8 else "")
        restarts = sum(int(r.get("n_restarts") or 0) for r in rows)
        if restarts:
            line += f"; {restarts} safeguard restarts (the rows are not comparable)"
        per[label] = dict(status=status, line=line, min=min(fr), max=max(fr), copy_gbs=copy,
                          rows_below=len(low), rows=len(rows))
    return dict(per, **_overall(per, f"Anderson's own work at n >= {sci(n_min)} reaches >= {threshold:.0%} of the copy "
                                     "bandwidth measured in the same run"))


def speedup_target(cvg: dict[str, Any] | None, reference: str, candidate: str, n_min: int,
                   threshold: float = SPEEDUP, others: tuple[str, ...] = (), problem: str = "jacobi") -> dict[str, Any]:
    """Target 2: ``candidate`` at least ``threshold`` times faster than ``reference`` on ``problem`` at n >= ``n_min``.

    Time to tolerance (medians) of each method at each such n; "met" when every ratio reaches
    the threshold, "not met" when one does not, "not measured" when no pair was timed.  The
    ratios of ``others`` (other GPU backends) are reported beside, without a status.
    """
    rows = (cvg or {}).get("rows", [])
    times = {(r["backend"], r["n"], r["method"]): r["time"] for r in rows if r["problem"] == problem}

    def ratios(backend: str) -> list[dict[str, Any]]:
        return [dict(n=n, method=m, reference_s=times[(reference, n, m)], time_s=t, ratio=times[(reference, n, m)] / t)
                for (b, n, m), t in sorted(times.items()) if b == backend and n >= n_min and (reference, n, m) in times
                and t > 0]

    got = ratios(candidate)
    title = f"{candidate} >= {threshold:g}x {reference} in time to tolerance on {problem} at n >= {sci(n_min)}"
    res: dict[str, Any]
    if not got:
        res = dict(status="not measured", line=f"{candidate}: not measured (no {problem} pair at n >= {sci(n_min)})")
    else:
        low = [g for g in got if g["ratio"] < threshold]
        status = "not met" if low else "met"
        res = dict(status=status, ratios=got, line=f"{candidate}: {status}: " + ", ".join(
            f"{g['method']} n={sci(g['n'])} {g['ratio']:.1f}x ({g['reference_s']:.3g} s / {g['time_s']:.3g} s)"
            for g in got))
    per: dict[str, Any] = {candidate: res}
    out = dict(per, **_overall(per, title))
    out["others"] = {o: ratios(o) for o in others}
    return out


def _overall(per: dict[str, Any], title: str) -> dict[str, Any]:
    """The status over backends: not measured when none was, not met when one missed, else met."""
    measured = [v["status"] for v in per.values() if v["status"] != "not measured"]
    status = "not measured" if not measured else "not met" if "not met" in measured else "met"
    missing = [k for k, v in per.items() if v["status"] == "not measured"] if measured else []
    return dict(status=status, title=title, unmeasured=missing)


# --- bundle -------------------------------------------------------------------------------------

def check_bundle(out: Path) -> list[str]:
    """What in folder ``out`` breaks the bundle's limits: too many files, too deep, too big, odd names."""
    problems, files = [], []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if any(not NAME_RE.match(part) for part in rel.parts):
            problems.append(f"{rel}: name not of letters, digits, '.', '_', '-'")
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{rel}: not a plain file or folder")
        elif path.is_file():
            files.append(rel)
            if len(rel.parts) - 1 > MAX_DEPTH:
                problems.append(f"{rel}: more than {MAX_DEPTH} folders deep")
            if path.stat().st_size > MAX_FILE_BYTES:
                problems.append(f"{rel}: {path.stat().st_size} bytes, over {MAX_FILE_BYTES}")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, over {MAX_FILES}")
    return problems


def write_tarball(work: Path, dest: Path, max_member: int = MAX_MEMBER_BYTES) -> tuple[list[str], list[str]]:
    """``work``'s files into the gzipped tar ``dest`` under ``gpu_suite/``; returns (included, left out with why).

    DEQ checkpoints (``*.pt``) and files over ``max_member`` bytes are left out; the tar is written
    to a temporary name beside ``dest`` and renamed, so ``dest`` is never half-written.
    """
    included, left = [], []
    tmp = dest.with_name("." + dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(p for p in work.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(work).as_posix()
            size = path.stat().st_size
            if path.suffix in LEFT_OUT_SUFFIXES:
                left.append(f"{rel} (checkpoint, {size / 2**20:.1f} MiB)")
            elif size > max_member:
                left.append(f"{rel} ({size / 2**20:.1f} MiB, over {max_member / 2**20:.0f} MiB)")
            else:
                tar.add(path, arcname=f"gpu_suite/{rel}")
                included.append(rel)
    os.replace(tmp, dest)
    return included, left


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- the report ---------------------------------------------------------------------------------

def _fmt(v: Any, spec: str = "{}") -> str:
    return "–" if v is None else spec.format(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_report(summary: dict[str, Any]) -> str:
    """The markdown report of a suite run (:func:`Suite.summary`)."""
    s, env = summary, summary.get("environment") or {}
    lines = ["# GPU suite report", ""]
    if s["dry_run"]:
        lines += ["**DRY RUN on the CPU**: NumPy stands in for CuPy and PyTorch CPU for PyTorch CUDA, at tiny sizes. "
                  "The numbers and target statuses below test the pipeline; they are not GPU measurements.", ""]
    state = ("**in progress or killed** (the bundle so far)" if not s.get("finished") else
             f"**interrupted by {s['interrupted']}**" if s.get("interrupted") else "finished")
    lines += [f"Started {s['started']}, {state}, {s['wall_s']:.0f} s of a {s['time_limit_s']:.0f} s limit. "
              f"Command: `{shlex.join(s['command'])}`", ""]
    lines += ["## Environment", ""]
    if env and not s["dry_run"] and not env.get("gpu_usable"):
        lines += ["**No usable GPU was found on this machine**: the GPU stages cannot have measured anything.", ""]
    if env:
        pk = env.get("packages") or {}
        rows = [["GPU", ", ".join(map(str, env.get("gpus") or [])) or "none found"],
                ["GPU memory, compute capability",
                 f"{_fmt(env.get('gpu_memory'))}, {_fmt(env.get('compute_capability'))}"],
                ["driver, CUDA (driver)", f"{_fmt(env.get('driver'))}, {_fmt(env.get('cuda_driver'))}"],
                ["PyTorch (CUDA, cuDNN)", f"{_fmt(env.get('torch'))} ({_fmt(env.get('torch_cuda'))}, "
                                          f"{_fmt(env.get('cudnn'))})"],
                ["CuPy (CUDA runtime)", f"{_fmt(env.get('cupy'))} ({_fmt(env.get('cupy_cuda_runtime'))})"],
                ["Python, NumPy, SciPy",
                 f"{_fmt(env.get('python'))}, {_fmt(pk.get('numpy'))}, {_fmt(pk.get('scipy'))}"],
                ["array-api-compat, array-api-strict", f"{_fmt(pk.get('array-api-compat'))}, "
                                                       f"{_fmt(pk.get('array-api-strict'))}"],
                ["fixedpoint, git commit", f"{_fmt(env.get('fixedpoint'))}, {_fmt(env.get('git_commit'))}"],
                ["source sha256 (fixedpoint/)", f"`{_fmt((env.get('source_sha256') or {}).get('fixedpoint'))}`"],
                ["CPU", f"{_fmt(env.get('cpu'))}, {_fmt(env.get('usable_cpus'))} usable, {_fmt(env.get('ram_gib'))} "
                        "GiB RAM"],
                ["OS", _fmt(env.get("os"))],
                ["fixedpoint backends usable", ", ".join(env.get("usable_backends") or []) or "–"]]
        lines += _table(["", ""], rows)
    else:
        lines.append("Not known: the env stage gave no report.")
    lines += ["", "## Stages", ""]
    lines += _table(["stage", "status", "time [s]", "budget [s]", "result"], [
        [st["name"], st["status"], _fmt(st.get("wall_s"), "{:.1f}"), _fmt(st.get("timeout_s"), "{:.0f}"),
         "; ".join(x for x in (st.get("note"), st.get("headline")) if x).replace("|", "/")] for st in s["stages"]])
    failed = [st for st in s["stages"] if st.get("output_tail")]
    if failed:
        lines += ["", "The last lines of the output of each stage that did not succeed:", ""]
        for st in failed:
            lines += [f"{st['name']} ({st['status']}):", "", "```text", *st["output_tail"], "```", ""]
    lines += ["", "Commands (from the repository root; each stage's console output is `<stage>/output.log` in "
              "results.tar.gz):", ""]
    lines += [f"- {st['name']}: `{shlex.join(st['command'])}`" for st in s["stages"]]
    lines += ["", "## GPU targets", ""]
    for key in ("bandwidth", "speedup"):
        t = s["targets"].get(key)
        if not t:
            continue
        missing = t.get("unmeasured") or []
        lines.append(f"- **{t['title']}: {t['status'].upper()}**" + (
            f" ({', '.join(missing)} not measured)" if missing else ""))
        lines += [f"  - {v['line']}" for k, v in t.items() if isinstance(v, dict) and "line" in v]
        for other, rat in (t.get("others") or {}).items():
            lines.append(f"  - {other} beside it (no target): " + (", ".join(
                f"{g['method']} n={sci(g['n'])} {g['ratio']:.1f}x" for g in rat) or "not measured"))
    lines += _results_sections(s)
    b = s.get("bundle") or {}
    if b:
        lines += ["", "## Files", "", f"Under --out: {', '.join(b.get('files', []))}. results.tar.gz holds "
                  f"{len(b.get('included', []))} files of the stages' folders (`tar -xzf results.tar.gz`)."]
        if b.get("left_out"):
            lines.append("Left out of it: " + "; ".join(b["left_out"]) + ".")
    return "\n".join(lines) + "\n"


def _results_sections(s: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    res = s["results"]
    tests = res.get("gpu_tests")
    if tests:
        lines += ["", "## gpu-marked tests", "",
                  f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped."]
        lines += [f"- failed: `{n}`" for n in tests["failed_tests"]]
        lines += [f"- skipped: {n}" for n in tests["skipped_tests"][:20]]
    for st in s["stages"]:
        r = res.get(st["name"])
        if not r or st["kind"] != "overhead":
            continue
        lines += ["", f"## bench_overhead, {st['label']}", "",
                  f"Copy bandwidth ({_fmt(r.get('copy_bytes'), '{:.3g}')} byte arrays, read + write) before / after: "
                  f"{_fmt(r['copy_gbs_before'], '{:.0f}')}"
                  f" / {_fmt(r['copy_gbs_after'], '{:.0f}')} GB/s. Cells: µs per iteration (/copy: fraction of the "
                  "larger copy bandwidth).", ""]
        ms = sorted({row["m"] for row in r["rows"]})
        cells = {(row["dtype"], row["n"], row["m"]): row for row in r["rows"]}
        table = []
        for dtype, n in sorted({(row["dtype"], row["n"]) for row in r["rows"]}):
            table.append([dtype, sci(n)] + [
                f"{1e6 * c['time_per_iter_s']:.1f} ({c['fraction_of_copy_bw']:.2f})" if (c := cells.get((dtype, n, m)))
                else "–" for m in ms])
        lines += _table(["dtype", "n"] + [f"m={m}" for m in ms], table)
    for st in s["stages"]:
        r = res.get(st["name"])
        if not r or st["kind"] != "memory":
            continue
        lines += ["", f"## bench_memory, {st['label']} (n = {sci(r['n'])}, {r['dtype']})", ""]
        lines += _table(["method", "peak [vectors of n]", "target", "met"],
                        [[row["method"], _fmt(row["vectors"], "{:.3f}"), _fmt(row["target"]),
                          _fmt(row["meets_target"])] for row in r["rows"]])
    for st in s["stages"]:
        r = res.get(st["name"])
        if not r or st["kind"] != "cvg":
            continue
        lines += ["", f"## {st['name']}: time to tolerance [s], forward / Anderson", ""]
        backends = sorted({row["backend"] for row in r["rows"]}, key=lambda b: (b != "numpy", b))
        t = {(row["problem"], row["n"], row["backend"], row["method"]): row["time"] for row in r["rows"]}
        keys = sorted({(row["problem"], row["n"]) for row in r["rows"]})
        lines += _table(["problem", "n"] + backends, [
            [p, f"{n:,}"] + [" / ".join(_fmt(t.get((p, n, b, m)), "{:.3g}") for m in ("forward", "anderson"))
                             for b in backends] for p, n in keys])
        if r.get("trace", {}).get("problem"):
            tr = r["trace"]
            lines += ["", f"Residual trace ({tr['problem']}, n = {tr['n']:,}, {tr['backend']}): mixing penalty "
                          f"{_fmt(tr['mixing_penalty'], '{:.2f}')}x per iteration."]
    for st in s["stages"]:
        r = res.get(st["name"])
        if not r or st["kind"] != "deq":
            continue
        c = r["comparison"]
        lines += ["", f"## DEQ demo, solver in {r['solver_backend']} on {r['device']}", ""]
        lines += _table(["solver", "epochs", "train time [s]", "test acc", "f evals fwd / adjoint",
                         "converged fwd / adj"],
                        [[k, _fmt(v["epochs"]), _fmt(v["time_train"], "{:.1f}"), _fmt(v["test_acc"], "{:.1%}"),
                          f"{_fmt(v['fwd_fev'])} / {_fmt(v['bwd_fev'])}",
                          f"{_fmt(v['fwd_converged'], '{:.1%}')} / {_fmt(v['bwd_converged'], '{:.1%}')}"]
                         for k, v in r["totals"].items()])
        lines += ["", f"Anderson over forward: {_fmt(c.get('speedup_total_time'), '{:.2f}')}x training time, "
                      f"{_fmt(c.get('compute_saved_total'), '{:.0%}')} of the evaluations saved."]
    return lines


def headline(stage: Stage, result: dict[str, Any] | None, plan: Plan) -> str:
    """One line of a stage's main numbers, for the progress output and the stage table."""
    if not result:
        return ""
    if stage.kind == "env":
        return (f"{', '.join(map(str, result.get('gpus') or [])) or 'no GPU'}; driver {result.get('driver')}, CUDA "
                f"{result.get('cuda_driver')}; torch {result.get('torch')}, cupy {result.get('cupy')}")
    if stage.kind == "tests":
        return (f"{result['passed']} passed, {result['failures']} failed, {result['errors']} errors, "
                f"{result['skipped']} skipped")
    if stage.kind == "overhead":
        t = bandwidth_target({stage.label: result}, plan.bandwidth_n_min)[stage.label]
        copy = f"copy {_fmt(result['copy_gbs_before'], '{:.0f}')}/{_fmt(result['copy_gbs_after'], '{:.0f}')} GB/s"
        if "min" in t:
            copy += f"; /copy {t['min']:.2f}-{t['max']:.2f} at n >= {sci(plan.bandwidth_n_min)}"
        return copy
    if stage.kind == "memory":
        return ", ".join(f"{r['method']} {_fmt(r['vectors'], '{:.2f}')} (<= {r['target']})" for r in result["rows"])
    if stage.kind == "cvg":
        rows = result["rows"]
        probs = sorted({r["problem"] for r in rows})
        line = f"{len(rows)} rows, {', '.join(probs)}, n up to {max((r['n'] for r in rows), default=0):,}"
        t = {(r["problem"], r["n"], r["backend"], r["method"]): r["time"] for r in rows}
        ref = {(p, n, m): v for (p, n, b, m), v in t.items() if b == plan.speedup_reference}
        if ref:  # speed-up over NumPy at the largest size both ran, per backend and method
            p, n = max(((p, n) for p, n, _ in ref), key=lambda k: (k[0] == "jacobi", k[1]))
            ups = [f"{b} {m} {ref[(p, n, m)] / v:.3g}x" for (p2, n2, b, m), v in sorted(t.items())
                   if (p2, n2) == (p, n) and b != plan.speedup_reference and (p, n, m) in ref and v > 0]
            if ups:
                line += f"; over {plan.speedup_reference} ({p}, n={sci(n)}): " + ", ".join(ups)
        return line
    if stage.kind == "deq":
        tt = result["totals"]
        parts = [f"{k} {v['time_train']:.3g} s, test {v['test_acc']:.1%}" for k, v in tt.items()
                 if v.get("time_train") is not None and v.get("test_acc") is not None]
        return "; ".join(parts)
    return ""


# --- running ------------------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the suite: stop the stage in flight, write the bundle, exit."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def stop_process(proc: subprocess.Popen, grace: float | None = None) -> None:
    """SIGTERM to the process group of ``proc`` (its children too), SIGKILL after ``grace`` seconds
    (default :data:`GRACE_S`)."""
    for sig, wait in ((signal.SIGTERM, GRACE_S if grace is None else grace), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(argv: list[str], log_path: Path, timeout: float, env: dict[str, str],
                cwd: Path = ROOT) -> tuple[str, int | None]:
    """Run ``argv`` with its output (stdout and stderr) into ``log_path``, for at most ``timeout`` seconds.

    Returns
    -------
    status : str
        "ok" (exit status 0), "failed" (another exit status, or the command could not start) or
        "timeout" (stopped: SIGTERM, then SIGKILL after :data:`GRACE_S` seconds).
    returncode : int or None

    Raises
    ------
    Interrupted
        When the suite is interrupted; the command has been stopped first.
    """
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.write(f"could not start {argv[0]}: {exc}\n".encode())
            return "failed", None
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            return "timeout", proc.returncode
        except BaseException:
            stop_process(proc)
            raise
    return ("ok" if rc == 0 else "failed"), rc


class Suite:
    """One run of the suite: the plan, the folders, the clock, the records and the bundle."""

    def __init__(self, plan: Plan, out: Path, work: Path, time_limit: float, selected: set[str],
                 python: str = sys.executable, echo: bool = True):
        self.plan, self.out, self.work, self.time_limit = plan, out, work, time_limit
        self.selected, self.python, self.echo = selected, python, echo
        self.t0 = time.monotonic()
        self.started = datetime.datetime.now().isoformat(timespec="seconds")
        self.log_lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.environment: dict[str, Any] | None = None
        self.finished = False
        self.interrupted: str | None = None
        self.bundle: dict[str, Any] = {}
        self.command = [Path(python).name, "-m", "benchmarks.gpu_suite", *sys.argv[1:]]

    # progress
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        """Print a line with the clock time and the seconds since the start, and keep it for suite.log."""
        for i, part in enumerate(text.splitlines() or [""]):
            line = (f"[{datetime.datetime.now():%H:%M:%S} +{self.elapsed():6.1f}s] " if i == 0 else " " * 20) + part
            self.log_lines.append(line)
            if self.echo:
                print(line, flush=True)

    def child_env(self) -> dict[str, str]:
        """The stages' environment: the checkout importable first, unbuffered output, no display; one thread in a
        dry run."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
        if self.plan.dry_run:
            env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return env

    # stages
    def run(self) -> int:
        """Run every selected stage in order, rewriting the bundle after each; returns the exit status.

        0 when every selected stage succeeded, 1 when one failed or timed out, 128 + the signal's
        number when the suite was interrupted.
        """
        deadline = self.time_limit - RESERVE_S
        mode = "DRY RUN on the CPU (tiny sizes, CPU stand-ins)" if self.plan.dry_run else "GPU run"
        self.say(f"gpu_suite: {mode}; {len(self.selected)} of {len(self.plan.stages)} stages, time limit "
                 f"{self.time_limit:.0f} s; output {self.out}; work folder {self.work}")
        self.write_bundle()
        code = 0
        stages = iter(self.plan.stages)
        try:
            for stage in stages:
                rec = self.run_stage(stage, deadline)
                if rec["status"] in ("failed", "timeout"):
                    code = 1
                self.write_bundle()
        except Interrupted as exc:
            name = self.interrupted = signal.Signals(exc.signum).name
            self.say(f"interrupted by {name}: stopping, writing what was measured")
            code = 128 + exc.signum
            if self.records and self.records[-1].get("status") == "running":
                rec = self.records[-1]
                rec.update(status="interrupted", note=f"suite interrupted by {name}",
                           wall_s=time.monotonic() - rec.pop("_t0"))
                self.collect(self._stage(rec["name"]), rec)
            for rest in stages:
                self.records.append(self.skipped(rest, f"suite interrupted by {name}"))
        self.finished = True
        self.write_bundle()
        self.print_summary()
        return code

    def _stage(self, name: str) -> Stage:
        return next(s for s in self.plan.stages if s.name == name)

    def skipped(self, stage: Stage, why: str) -> dict[str, Any]:
        return dict(name=stage.name, title=stage.title, kind=stage.kind, label=stage.label, status="skipped",
                    note=why, command=stage.argv(Path(self.python).name, Path(stage.name)), budget_s=stage.budget_s)

    def run_stage(self, stage: Stage, deadline: float) -> dict[str, Any]:
        """Run one stage within its budget and the suite's deadline, and read its results."""
        if stage.name not in self.selected:
            rec = self.skipped(stage, "not selected (--only/--skip)")
            self.records.append(rec)
            return rec
        left = deadline - self.elapsed()
        timeout = min(stage.budget_s, left)
        if timeout < MIN_STAGE_S:
            rec = self.skipped(stage, f"no time left ({max(left, 0):.0f} s before the suite's deadline)")
            self.records.append(rec)
            self.say(f"{stage.name}: skipped, {rec['note']}")
            return rec
        folder = self.work / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        argv = stage.argv(self.python, folder)
        shown = stage.argv(Path(self.python).name, Path(stage.name))
        rec = dict(name=stage.name, title=stage.title, kind=stage.kind, label=stage.label, status="running",
                   command=shown, budget_s=stage.budget_s, timeout_s=round(timeout, 1),
                   started=datetime.datetime.now().isoformat(timespec="seconds"), _t0=time.monotonic())
        self.records.append(rec)
        self.say(f"{stage.name}: started ({stage.title}; {timeout:.0f} s): {shlex.join(shown)}")
        log = folder / "output.log"
        log.write_text(f"$ {shlex.join(argv)}\n", encoding="utf-8")
        status, rc = run_command(argv, log, timeout, self.child_env())
        rec.update(status=status, returncode=rc, wall_s=round(time.monotonic() - rec.pop("_t0"), 2))
        if status == "timeout":
            rec["note"] = f"stopped after {timeout:.0f} s"
        elif status == "failed":
            rec["note"] = f"exit status {rc}"
        self.collect(stage, rec)
        self.say(f"{stage.name}: {rec['status']} in {rec['wall_s']:.1f} s" + (
            f" ({rec['note']})" if rec.get("note") else "") + (f": {rec['headline']}" if rec.get("headline") else ""))
        if rec["status"] != "ok":
            tail = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()[-12:]
            rec["output_tail"] = [line[-300:] for line in tail]
            self.say("last lines of its output:\n" + "\n".join("  " + line[-200:] for line in tail))
        return rec

    def collect(self, stage: Stage, rec: dict[str, Any]) -> None:
        """Read the stage's main output, when there is one, into the results (whatever the stage's status)."""
        if not stage.result:  # a stage without a result file to read
            return
        path = self.work / stage.name / stage.result
        reader = READERS.get(stage.kind)
        if not path.is_file():
            if rec["status"] == "ok":
                rec.update(status="failed", note=f"{stage.result} was not written")
            partial, reader = PARTIAL_READERS.get(stage.kind, ("", None))
            path = self.work / stage.name / partial
            if reader is None or not partial or not path.is_file():
                return
            why = f"{stage.result} not written: the rows of {partial} so far"
            rec["note"] = f"{rec['note']}; {why}" if rec.get("note") else why
        if reader is None:
            return
        try:
            result = reader(path)
        except Exception as exc:  # a broken output is recorded, not fatal
            why = f"cannot read {stage.result}: {type(exc).__name__}: {exc}"
            rec["note"] = f"{rec['note']}; {why}" if rec.get("note") else why
            if rec["status"] == "ok":
                rec["status"] = "failed"
            return
        if stage.kind == "env":
            self.environment = result
            if not self.plan.dry_run and not result.get("gpu_usable"):
                self.say("WARNING: no usable GPU found; the GPU stages will fail (--dry-run rehearses on the CPU)")
        else:
            self.results[stage.name] = result
        rec["headline"] = headline(stage, result, self.plan)
        if stage.kind == "tests" and rec["status"] == "ok":
            if result["failures"] or result["errors"]:
                rec["status"] = "failed"
            elif not self.plan.dry_run and not result["passed"]:
                rec.update(status="failed", note="no gpu test ran (all skipped: no usable GPU?)")

    # summary and bundle
    def targets(self) -> dict[str, Any]:
        p = self.plan
        overheads = {label: self.results.get(name) for label, name in p.bandwidth_stages.items()}
        return dict(bandwidth=bandwidth_target(overheads, p.bandwidth_n_min),
                    speedup=speedup_target(self.results.get(p.speedup_stage), p.speedup_reference, p.speedup_candidate,
                                           p.speedup_n_min, others=p.speedup_others))

    def summary(self) -> dict[str, Any]:
        """Everything the suite knows so far, as JSON-ready data."""
        recorded = {r["name"] for r in self.records}
        pending = [dict(self.skipped(s, "not run yet"), status="pending") for s in self.plan.stages
                   if s.name not in recorded]
        stages = [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.records] + pending
        return dict(suite="gpu_suite", dry_run=self.plan.dry_run, started=self.started, finished=self.finished,
                    interrupted=self.interrupted,
                    wall_s=round(self.elapsed(), 1), time_limit_s=self.time_limit, command=self.command,
                    environment=self.environment, stages=stages, targets=self.targets(), results=self.results,
                    bundle=self.bundle)

    def write_bundle(self) -> None:
        """Rewrite results.tar.gz, summary.json, report.md and suite.log under --out (each replaced whole)."""
        self.out.mkdir(parents=True, exist_ok=True)
        tar = self.out / "results.tar.gz"
        included, left = write_tarball(self.work, tar)
        if tar.stat().st_size > MAX_FILE_BYTES - 2**20:  # too big to come back: keep the small files only
            included, left2 = write_tarball(self.work, tar, max_member=2**19)
            left = left2
        self.bundle = dict(files=list(BUNDLE_FILES), included=included, left_out=left,
                           tar_bytes=tar.stat().st_size)
        summary = self.summary()
        _write_text(self.out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
        _write_text(self.out / "report.md", render_report(summary))
        _write_text(self.out / "suite.log", "\n".join(self.log_lines) + "\n")

    def print_summary(self) -> None:
        s = self.summary()
        self.say("stages: " + ", ".join(f"{r['name']} {r['status']}" for r in s["stages"]))
        for key in ("bandwidth", "speedup"):
            t = s["targets"][key]
            self.say(f"target {key}: {t['status'].upper()}: {t['title']}")
            for v in t.values():
                if isinstance(v, dict) and "line" in v:
                    self.say("  " + v["line"])
        problems = check_bundle(self.out)
        self.say(f"wrote {', '.join(BUNDLE_FILES)} in {self.out}" + (
            "" if not problems else "; OVER THE BUNDLE'S LIMITS: " + "; ".join(problems)))
        _write_text(self.out / "suite.log", "\n".join(self.log_lines) + "\n")


# --- command line -------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` shows every default once)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0],
                                 epilog="Stages: env, overhead_cupy, "
                                 "overhead_torch_cuda, cvg_jacobi, gpu_tests, cvg_gpu, deq_cupy, deq_torch (dry run: "
                                 "overhead_numpy, overhead_torch, deq_numpy, deq_torch). See docs/benchmarks.md.")
    ap.add_argument("--out", default="out/gpu_suite",
                    help="folder for the bundle: report.md, summary.json, suite.log, results.tar.gz; created when "
                         "missing, refused when it holds anything else (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the bundle of an earlier suite run in --out")
    ap.add_argument("--dry-run", action="store_true",
                    help="the same stages on the CPU at tiny sizes, NumPy and PyTorch CPU standing in for the GPU "
                         "backends (well under a minute; what CI runs)")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="seconds for the whole suite; stages are cut short or skipped so that it ends in time "
                         "(default: 465, 400 with --dry-run)")
    ap.add_argument("--only", nargs="+", default=None, metavar="STAGE", help="run only these stages (default: all)")
    ap.add_argument("--skip", nargs="+", default=[], metavar="STAGE", help="leave these stages out (default: none)")
    ap.add_argument("--work", default=None, metavar="DIR",
                    help="folder for the stages' own outputs, kept afterwards; must be empty or new (default: a "
                         "temporary folder, deleted at the end; its files are in results.tar.gz)")
    ap.add_argument("--list", action="store_true", help="print the stages, budgets and commands, and exit")
    return ap


def _check_out(out: Path, overwrite: bool) -> str | None:
    """Why --out cannot take the bundle, or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; expected a folder (it is created when missing)"
    if not out.is_dir():
        return None
    entries = sorted(p.name for p in out.iterdir())
    foreign = [e for e in entries if e not in BUNDLE_FILES and not e.endswith(".tmp")]
    if foreign:
        return (f"--out {out} holds other files ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                "choose an empty or new folder, so that the bundle stays small and plain")
    if entries and not overwrite:
        return f"--out {out} holds an earlier suite's bundle ({', '.join(entries)}); add --overwrite to replace it"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the suite; see the module docstring.  Exit status: 0 all stages ok, 1 a stage failed or timed out, 2 a
    usage error, 128 + signal number when interrupted."""
    ap = make_parser()
    args = ap.parse_args(argv)
    plan = build_plan(args.dry_run)
    names = [s.name for s in plan.stages]
    for flag, given in (("--only", args.only or []), ("--skip", args.skip)):
        unknown = [g for g in given if g not in names]
        if unknown:
            ap.error(f"{flag}: unknown stage {', '.join(unknown)} (stages: {', '.join(names)})")
    selected = {n for n in names if (args.only is None or n in args.only) and n not in args.skip}
    time_limit = args.time_limit if args.time_limit is not None else (400.0 if args.dry_run else 465.0)
    if time_limit <= RESERVE_S + MIN_STAGE_S:
        ap.error(f"--time-limit must be more than {RESERVE_S + MIN_STAGE_S:.0f} s, got {time_limit:g}")
    if args.list:
        total = sum(s.budget_s for s in plan.stages)
        print(f"{'dry run' if args.dry_run else 'GPU run'}: {len(names)} stages, budgets {total:.0f} s in all, "
              f"time limit {time_limit:.0f} s")
        for s in plan.stages:
            print(f"  {s.name:20s} {s.budget_s:4.0f} s  {shlex.join(s.argv('python', Path('WORK') / s.name))}")
        return 0
    out = Path(args.out)
    problem = _check_out(out, args.overwrite)
    if problem:
        ap.error(problem)
    if args.work:
        work = Path(args.work)
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            ap.error(f"--work {work} exists and is not an empty folder")
        work.mkdir(parents=True, exist_ok=True)
        if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
            ap.error("--work must not be --out or inside it (--out holds only the bundle)")
    else:
        work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    suite = Suite(plan, out, work, time_limit, selected)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return suite.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
