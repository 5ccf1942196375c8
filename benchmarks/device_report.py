"""Environment and device report: GPUs, driver and CUDA versions, library versions, what fixedpoint can use.

Written for the first stage of ``benchmarks/gpu_suite.py`` and usable alone.  It never
fails because something is missing: a library that is not installed, a machine without
``nvidia-smi`` or without a usable CUDA device are reported as such.  Only the standard
library is imported up front; NumPy, PyTorch, CuPy and fixedpoint are each imported
inside a guard, so that a broken environment is described rather than crashing the
report.

Reported: the ``nvidia-smi`` query (GPU name, driver, memory, clocks, power limit) and the
CUDA version it prints; PyTorch's CUDA and cuDNN versions and device properties; CuPy's
CUDA runtime and driver versions and device properties; the versions and install
locations of the Python packages the suite needs (array-api-compat and array-api-strict
come from ``.whl/`` on a machine without them, see ``benchmarks/fetch_device_wheels.py``);
``fixedpoint.backends()``; the CPU, memory and OS (``tooling.timing.machine_info``); and a
SHA-256 of the source files, which names the code that ran where no git repository was
copied along.

Examples
--------
    python -m benchmarks.device_report
    python -m benchmarks.device_report --json out/device.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Python distributions whose versions and locations are reported (distribution name, module name).
PACKAGES = (("numpy", "numpy"), ("scipy", "scipy"), ("torch", "torch"), ("cupy-cuda13x", "cupy"),
            ("cupy-cuda12x", "cupy"), ("array-api-compat", "array_api_compat"),
            ("array-api-strict", "array_api_strict"), ("pytest", "pytest"), ("hypothesis", "hypothesis"),
            ("matplotlib", "matplotlib"), ("tqdm", "tqdm"), ("scikit-learn", "sklearn"))

#: Source folders hashed for :func:`source_digest`.
SOURCE_DIRS = ("fixedpoint", "benchmarks", "demos", "tooling", "tests")

NVIDIA_SMI_FIELDS = ("index", "name", "driver_version", "memory.total", "pci.bus_id", "clocks.max.sm",
                     "clocks.max.memory", "power.limit", "compute_cap")


def _guard(fn: Any) -> Any:
    """``fn()``, or ``{"error": "<type>: <message>"}`` when it raises anything."""
    try:
        return fn()
    except Exception as exc:  # a report describes failures instead of raising them
        return {"error": f"{type(exc).__name__}: {exc}"}


def cuda_version_text(version: int | None) -> str | None:
    """CUDA's integer version code as text: 13000 -> "13.0", 12080 -> "12.8"; None stays None."""
    if not version:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def nvidia_smi(timeout: float = 30.0) -> dict[str, Any]:
    """What ``nvidia-smi`` says: one dict per GPU from its CSV query, and the CUDA version of its banner.

    Returns ``{"available": False, "reason": ...}`` where the tool is missing or fails.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return dict(available=False, reason="nvidia-smi is not on the PATH")
    try:
        for fields in (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS[:4]):  # an older driver may not know every field
            query = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=timeout, check=False)
            if query.returncode == 0:
                break
        banner = subprocess.run([exe], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return dict(available=False, reason=f"nvidia-smi failed: {exc}")
    if query.returncode != 0:
        return dict(available=False, reason=f"nvidia-smi exited with {query.returncode}: "
                                            f"{(query.stderr or query.stdout).strip()[:300]}")
    gpus = [dict(zip(fields, (cell.strip() for cell in line.split(","))))
            for line in query.stdout.splitlines() if line.strip()]
    cuda = re.search(r"CUDA Version:\s*([0-9.]+)", banner.stdout)
    return dict(available=True, gpus=gpus, cuda_version=cuda.group(1) if cuda else None, text=banner.stdout)


def torch_info() -> dict[str, Any]:
    """PyTorch's version, CUDA and cuDNN versions and its CUDA devices (``installed: False`` without torch)."""
    if importlib.util.find_spec("torch") is None:
        return dict(installed=False)
    torch = importlib.import_module("torch")
    info: dict[str, Any] = dict(installed=True, version=torch.__version__, cuda_build=torch.version.cuda,
                                cuda_available=bool(torch.cuda.is_available()), threads=torch.get_num_threads())
    info["cudnn"] = _guard(lambda: torch.backends.cudnn.version())
    devices = []
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(dict(index=i, name=p.name, capability=f"{p.major}.{p.minor}",
                                memory_gib=round(p.total_memory / 2**30, 1),
                                multiprocessors=p.multi_processor_count))
    info["devices"] = devices
    return info


def cupy_info() -> dict[str, Any]:
    """CuPy's version, its CUDA runtime and the driver's CUDA version, and its devices (``installed: False``)."""
    if importlib.util.find_spec("cupy") is None:
        return dict(installed=False)
    cupy = importlib.import_module("cupy")
    rt = cupy.cuda.runtime
    info: dict[str, Any] = dict(installed=True, version=cupy.__version__)
    info["cuda_runtime"] = _guard(lambda: cuda_version_text(rt.runtimeGetVersion()))
    info["cuda_runtime_local"] = _guard(lambda: cuda_version_text(cupy.cuda.get_local_runtime_version()))
    info["cuda_driver"] = _guard(lambda: cuda_version_text(rt.driverGetVersion()))
    count = _guard(rt.getDeviceCount)
    info["device_count"] = count
    devices = []
    if isinstance(count, int):
        for i in range(count):
            props = _guard(lambda i=i: rt.getDeviceProperties(i))
            if "error" in props:
                devices.append(dict(index=i, **props))
                continue
            name = props.get("name", b"?")
            devices.append(dict(index=i, name=name.decode() if isinstance(name, bytes) else str(name),
                                capability=f"{props.get('major')}.{props.get('minor')}",
                                memory_gib=round(props.get("totalGlobalMem", 0) / 2**30, 1),
                                multiprocessors=props.get("multiProcessorCount")))
    info["devices"] = devices
    return info


def packages() -> dict[str, dict[str, Any]]:
    """Version and install location of each package of :data:`PACKAGES` that is installed."""
    found = {}
    for dist, module in PACKAGES:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        found[dist] = dict(version=version, location=str(Path(origin).parent) if origin else None)
    return found


def source_digest(root: Path = ROOT) -> dict[str, Any]:
    """SHA-256 over the ``*.py`` files of :data:`SOURCE_DIRS` (paths and contents, sorted), one per folder.

    The same tree gives the same digests on any machine, so a record made where no git
    repository was copied along still names the code that ran.
    """
    digests: dict[str, Any] = {}
    for folder in SOURCE_DIRS:
        files = sorted((root / folder).rglob("*.py"))
        if not files:
            continue
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
        digests[folder] = dict(sha256=h.hexdigest(), files=len(files))
    return digests


def collect() -> dict[str, Any]:
    """Everything the report says, as a JSON-ready dict."""
    report: dict[str, Any] = dict(python=sys.version.split()[0], executable=sys.executable,
                                  platform=platform.platform())
    report["nvidia_smi"] = _guard(nvidia_smi)
    report["torch"] = _guard(torch_info)
    report["cupy"] = _guard(cupy_info)
    report["packages"] = _guard(packages)

    def backends() -> list[dict[str, Any]]:
        import fixedpoint

        return [dict(library=b.library, device=b.device, usable=b.usable, detail=b.detail)
                for b in fixedpoint.backends()]

    report["fixedpoint_backends"] = _guard(backends)

    def machine() -> dict[str, Any]:
        from tooling import timing

        libs = {lib for lib in ("torch", "cupy") if report[lib].get("installed")}
        return timing.machine_info(libs)

    report["machine"] = _guard(machine)
    report["source_sha256"] = _guard(source_digest)
    report["gpu_usable"] = bool(report["torch"].get("devices") or report["cupy"].get("devices"))
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report as short ``key: value`` lines for a terminal or a log."""
    smi, tch, cp, mach = report["nvidia_smi"], report["torch"], report["cupy"], report["machine"]
    lines = [f"python: {report['python']} ({report['executable']})"]
    if smi.get("available"):
        for g in smi["gpus"]:
            lines.append(f"GPU {g.get('index')}: {g.get('name')}, {g.get('memory.total')}, driver "
                         f"{g.get('driver_version')}, compute capability {g.get('compute_cap')}")
        lines.append(f"CUDA (driver, per nvidia-smi): {smi.get('cuda_version')}")
    else:
        lines.append(f"nvidia-smi: {smi.get('reason') or smi.get('error')}")
    if tch.get("installed"):
        lines.append(f"torch: {tch['version']}, CUDA build {tch['cuda_build']}, cuDNN {tch['cudnn']}, "
                     f"CUDA usable: {tch['cuda_available']}")
        for d in tch["devices"]:
            lines.append(f"  torch cuda:{d['index']}: {d['name']}, {d['memory_gib']} GiB, "
                         f"capability {d['capability']}, {d['multiprocessors']} SMs")
    else:
        lines.append(f"torch: {tch.get('error', 'not installed')}")
    if cp.get("installed"):
        lines.append(f"cupy: {cp['version']}, CUDA runtime {cp['cuda_runtime']} (local "
                     f"{cp['cuda_runtime_local']}), driver's CUDA {cp['cuda_driver']}, devices: {cp['device_count']}")
    else:
        lines.append(f"cupy: {cp.get('error', 'not installed')}")
    pk = report["packages"]
    if "error" not in pk:
        lines.append("packages: " + ", ".join(f"{k} {v['version']}" for k, v in pk.items()))
        for name in ("array-api-compat", "array-api-strict"):
            where = pk.get(name, {}).get("location")
            lines.append(f"  {name}: {where or 'NOT INSTALLED'}")
    be = report["fixedpoint_backends"]
    if isinstance(be, list):
        lines.append("fixedpoint backends usable: " + ", ".join(f"{b['library']}:{b['device']}" for b in be
                                                               if b["usable"]))
    else:
        lines.append(f"fixedpoint: {be.get('error')}")
    if "error" not in mach:
        lines.append(f"CPU: {mach.get('cpu')}, {mach.get('usable_cpus')} usable CPUs, {mach.get('ram_gib')} GiB; "
                     f"{mach.get('os')}")
        lines.append(f"fixedpoint {mach.get('fixedpoint')} from {mach.get('fixedpoint_path')}, git commit "
                     f"{mach.get('git_commit')}")
    else:
        lines.append(f"machine: {mach['error']}")
    src = report["source_sha256"]
    if "error" not in src:
        lines.append("source sha256: " + ", ".join(f"{k} {v['sha256'][:12]}" for k, v in src.items()))
    lines.append(f"GPU usable: {report['gpu_usable']}")
    return lines


def make_parser() -> argparse.ArgumentParser:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.device_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the full report as JSON to PATH (default: print only)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Print the report (and write it as JSON with ``--json``); always 0 unless the JSON cannot be written."""
    args = make_parser().parse_args(argv)
    report = collect()
    print("\n".join(summary_lines(report)), flush=True)
    if report["nvidia_smi"].get("text"):
        print("\n" + report["nvidia_smi"]["text"].rstrip())
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot write --json {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
