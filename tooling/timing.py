"""Measuring solvers: device-synchronised timing, copy bandwidth, machine description, result files.

Shared by ``benchmarks/`` and the demos (not part of the library).  Timed regions
are bracketed by a device synchronisation (:func:`fixedpoint.backend.synchronize`)
so that queued GPU work is counted; results are medians over repeats after warm-up
runs.  torch and cupy are imported only when a backend that needs them is asked for.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fixedpoint import __version__ as _fixedpoint_version
from fixedpoint import solve
from fixedpoint.backend import backends, resolve_namespace, synchronize
from fixedpoint.kernels import Kernels

# --- backends -----------------------------------------------------------------------------------

def parse_backend(spec):
    """``"numpy"``, ``"torch"``, ``"torch:cuda:0"``, ``"cupy"``, ``"cupy:cuda:1"`` -> (library, device string)."""
    lib, _, dev = spec.partition(":")
    if lib not in ("numpy", "torch", "cupy"):
        raise ValueError(f"unknown backend {spec!r} (numpy, torch, torch:cuda:0, cupy, cupy:cuda:0)")
    if not dev:
        dev = "cuda:0" if lib == "cupy" else "cpu"
    if lib == "numpy" and dev != "cpu":
        raise ValueError("numpy runs on the cpu only")
    return lib, dev


def usable_backends():
    """Backend specs that :func:`fixedpoint.backends` reports usable here (array-api-strict left out)."""
    specs = []
    for b in backends(usable_only=True):
        if b.library in ("numpy", "torch", "cupy"):
            specs.append(b.library if b.device == "cpu" else f"{b.library}:{b.device}")
    return specs


def unusable_reason(spec, found=None):
    """Why backend ``spec`` (as :func:`parse_backend` takes it) cannot run here, or None when it can.

    For a command line to refuse, in one line, a backend that is not there (CuPy or CUDA without a
    GPU) before anything runs.  ``found`` is :func:`fixedpoint.backends` (probed when None).

    Raises
    ------
    ValueError
        When ``spec`` is not a backend at all (:func:`parse_backend`).
    """
    lib, dev = parse_backend(spec)
    kind, _, index = dev.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        return f"unknown device {dev!r} (cpu, cuda, cuda:0, cuda:1, ...)"
    if lib == "cupy" and kind != "cuda":
        return "CuPy runs on a CUDA device only"
    info = next((b for b in (backends() if found is None else found) if (b.library, b.device) == (lib, kind)), None)
    if info is None:
        return f"{lib} on {kind} is not available here"
    if not info.usable:
        return info.detail if info.detail.startswith(lib) else f"{lib} {info.detail}"
    if kind == "cuda" and index:
        count = (importlib.import_module("torch").cuda.device_count() if lib == "torch"
                 else importlib.import_module("cupy").cuda.runtime.getDeviceCount())
        if int(index) >= count:
            return f"no CUDA device {index} here ({count} found)"
    return None


def refuse_unusable(parser, spec, flags):
    """``parser.error`` (one line, exit status 2) naming ``flags`` when backend ``spec`` cannot run here."""
    try:
        why = unusable_reason(spec)
    except ValueError as exc:
        why = str(exc)
    if why is not None:
        parser.error(f"{flags}: {why}")


def setup_backend(lib, dev):
    """Array API namespace, the device object its array constructors take, and a synchronise function.

    The synchronise function waits for the device's queued work (``torch.cuda.synchronize``,
    ``cupy.cuda.Device(i).synchronize()``); it does nothing on the CPU.
    """
    xp = resolve_namespace(lib)
    if lib == "numpy":
        device = "cpu"
    elif lib == "torch":
        device = importlib.import_module("torch").device(dev)
    else:
        device = importlib.import_module("cupy").cuda.Device(int(dev.rpartition(":")[2] or 0))
    return xp, device, functools.partial(synchronize, device)


def dtype_of(xp, name):
    """``xp.float32`` / ``xp.float64`` from a name."""
    return getattr(xp, name)


# --- timing -------------------------------------------------------------------------------------

def summarize(times):
    """Seconds of repeated runs -> dict of median, min, max, q1, q3 (quartiles) and the runs themselves."""
    q1, q3 = np.percentile(times, [25, 75])
    return dict(median=statistics.median(times), min=min(times), max=max(times), q1=float(q1), q3=float(q3),
                times=list(times))


def timed(fn, *, repeats=5, warmup=1, sync=lambda: None):
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed.

    Each timed run is bracketed by ``sync()`` so that queued GPU work is counted.
    Returns :func:`summarize` of the seconds, plus the value ``fn`` returned on its
    last run under ``"last"``.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return dict(summarize(times), last=out)


def traced_solve(g, x0, *, sync=lambda: None, **options):
    """One :func:`fixedpoint.solve` with the clock read after every evaluation of ``g``.

    The device is synchronised (``sync()``) before the start and at every reading, so each
    time includes the GPU work of that iteration; the loop checks for convergence every
    iteration (``check_every=1``).  Used for residual-against-wall-time plots (the Figure 1 of
    Al Dajani & Keyes, arXiv 2410.19460).

    Parameters
    ----------
    g, x0
        As for :func:`fixedpoint.solve`.
    sync : callable, optional
        Waits for the device's queued work (see :func:`setup_backend`); nothing on the CPU.
    **options
        Further options of :func:`fixedpoint.solve` (``method``, ``tol``, ``max_iter``, ``batch``,
        ``backend``, method options); not ``callback`` or ``check_every``.

    Returns
    -------
    result : FixedPointResult
    times : list of float
        Seconds from the start to the end of each evaluation of ``g``, one per row of
        ``result.residual_history``.
    """
    stamps = []

    def stamp(info):
        sync()
        stamps.append(time.perf_counter())

    sync()
    t0 = time.perf_counter()
    res = solve(g, x0, callback=stamp, check_every=1, **options)
    return res, [t - t0 for t in stamps]


def copy_bandwidth(xp, device, sync, nbytes=int(4e8), repeats=5):
    """Bytes/s of an out-of-place copy ``dst[...] = src`` of ``nbytes`` in library ``xp``, counting read + write.

    NumPy: ``numpy.copyto``; PyTorch: ``Tensor.copy_``; CuPy: ``cupy.copyto``.  Small
    arrays are copied several times per timed run (about 2e8 bytes per run).
    Returns (bytes per second at the median time, timing dict).
    """
    kern = Kernels(xp, device)
    n = max(1, int(nbytes) // 8)
    src = xp.ones((1, n), dtype=xp.float64, device=device)
    dst = xp.zeros((1, n), dtype=xp.float64, device=device)
    reps = max(1, int(2e8 // (8 * n)))

    def copies():
        for _ in range(reps):
            kern.copy(dst, src)

    t = timed(copies, repeats=repeats, warmup=2, sync=sync)
    t.pop("last")
    t["copies_per_run"] = reps
    return 2 * n * 8 * reps / t["median"], t


def set_threads(lib, threads):
    """``torch.set_num_threads(threads)`` for torch (None: leave the default); NumPy's BLAS threads are not touched."""
    if lib == "torch" and threads:
        importlib.import_module("torch").set_num_threads(threads)


def positive_int(text):
    """argparse type: an integer >= 1 (the error names what was expected and what was given)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_float(text):
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def default_threads():
    """A CPU thread count that does not oversubscribe the cores, and where it comes from.

    ``OMP_NUM_THREADS`` when it is set to a positive integer (the user's choice); otherwise the
    CPUs this process may run on minus the load of the machine (the 1-minute load average,
    rounded), at least 1.  On a loaded machine, more threads than idle cores make torch's
    OpenMP threads spin while they wait for each other: a small model can then run a hundred
    times slower than on one thread.

    Returns
    -------
    threads : int
    reason : str
        Where the number comes from, for the printed settings.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this system: assume idle
        load = 0.0
    threads = max(1, min(usable, usable - round(load)))
    return threads, f"idle CPUs: {usable} usable, load average {load:.1f}"


def add_threads_flag(parser):
    """Add the demos' ``--threads N`` option (torch CPU threads) to an argparse parser or group."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="torch CPU threads (default: OMP_NUM_THREADS when set, else the idle CPUs: the usable "
                             "CPUs minus the load average, at least 1; printed at the start)")


def use_threads(requested=None):
    """Set torch's CPU threads to ``requested``, or to :func:`default_threads` when None.

    Returns
    -------
    str
        A line for the demo to print, e.g. ``"torch threads: 2 (idle CPUs: 2 usable, load average 0.1)"``.
    """
    if requested:
        threads, reason = requested, "--threads"
    else:
        threads, reason = default_threads()
        reason += "; --threads N to choose"
    set_threads("torch", threads)
    return f"torch threads: {threads} ({reason})"


# --- machine and output -------------------------------------------------------------------------

def _cpu_model():
    """``model name`` of /proc/cpuinfo, with family/model/stepping (a VM may show only a family name)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                    fields[key] = val.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        return platform.processor() or platform.machine()
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')},"
            f" stepping {fields.get('stepping', '?')})")


def _ram_gib():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None


def _os_name():
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"') + f" (kernel {platform.release()})"
    except OSError:
        pass
    return platform.platform()


def _git(args, cwd):
    """stdout of a read-only git command, or None when git is missing or fails."""
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def fixedpoint_source():
    """Where the imported fixedpoint package comes from, and its git commit and state where they can be known.

    The imported package may be an installed copy (site-packages) rather than a checkout's
    ``fixedpoint/``; only a package folder tracked by git in a work tree has a known commit.

    Returns
    -------
    dict
        ``fixedpoint_path`` (the package folder), ``git_commit`` (the work tree's HEAD, or
        ``"unknown"``), ``fixedpoint_uncommitted_changes`` (True, False, or ``"unknown"``) and,
        when unknown, ``git_unknown_because``.
    """
    import fixedpoint

    pkg = Path(fixedpoint.__file__).resolve().parent
    info = dict(fixedpoint_path=str(pkg), git_commit="unknown", fixedpoint_uncommitted_changes="unknown")
    top = _git(["rev-parse", "--show-toplevel"], pkg) if pkg.is_dir() else None
    tracked = _git(["ls-files", "--", "."], pkg) if top else None
    head = _git(["rev-parse", "HEAD"], pkg) if tracked else None
    status = _git(["status", "--porcelain", "--", "."], pkg) if head else None
    if top is None:
        info["git_unknown_because"] = f"{pkg} is not in a git work tree (an installed copy?)"
    elif not tracked:
        info["git_unknown_because"] = f"{pkg} is not tracked by the git work tree {top} (an installed copy?)"
    elif head is None or status is None:
        info["git_unknown_because"] = f"git could not read the commit or the state of {top}"
    else:
        info.update(git_commit=head, fixedpoint_uncommitted_changes=bool(status))
    return info


def machine_info(libs=()):
    """CPU model, cores, RAM, OS, Python and library versions; torch/cupy details only for ``libs`` asked for."""
    import array_api_compat

    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:
        blas = "unknown"
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        cpu=_cpu_model(), logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        ram_gib=_ram_gib(), os=_os_name(), python=sys.version.split()[0],
        numpy=np.__version__, numpy_blas=blas, array_api_compat=array_api_compat.__version__,
        fixedpoint=_fixedpoint_version, gpus=[],
    )
    info.update(fixedpoint_source())
    info["thread_env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    if "torch" in libs:
        torch = importlib.import_module("torch")
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if "cupy" in libs:
        cupy = importlib.import_module("cupy")
        info["cupy"] = cupy.__version__
        info["gpus"] = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode()
                        for i in range(cupy.cuda.runtime.getDeviceCount())]
    return info


def run_command(module, argv=None):
    """How this run was started, for the records: ``["python", "-m", module, *argv]`` (argv: ``sys.argv[1:]``).

    The demos and benchmarks run as modules from the repository root (``python -m demos.deq_cifar10``).
    """
    return ["python", "-m", module, *(sys.argv[1:] if argv is None else argv)]


def write_json(path, data):
    """Write ``data`` as indented JSON to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def write_csv(path, rows):
    """Write ``rows`` (dicts) as CSV to ``path``, atomically (a temporary file, then a rename).

    The columns are the union of the rows' keys in order of first appearance; missing cells are
    empty.  Folders are created; returns the path.
    """
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def print_table(rows, columns):
    """Print ``rows`` (dicts) as an aligned text table; ``columns`` is a list of (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else f.format(r[k])) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
