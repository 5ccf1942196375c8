"""Fill .whl/ with the wheels an offline GPU machine may lack: array-api-compat and array-api-strict, for Python 3.12.

A GPU machine without network access that has PyTorch, CuPy and the rest may still lack
array-api-compat (which fixedpoint imports) and array-api-strict (which the tests' conftest
lists); see docs/benchmarks.md, "Running it on a CUDA machine".  Both are pure-Python wheels
(tag ``py3-none-any``); this script downloads them, on a machine with network access, with
``pip download`` for CPython 3.12 on manylinux x86_64 into ``.whl/`` at the repository root
(ignored by git: copy it along with the working tree), where the GPU machine installs them
with ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl``.

Idempotent: a wheel already in ``.whl/`` at the wanted version is kept and nothing is
downloaded; other versions of the same packages are removed, so that ``.whl/*.whl``
holds exactly one wheel per package.  By default the wanted versions are those installed
here (what the tests ran with); ``--latest`` takes the newest on the index instead.

Every wheel is then checked: a readable zip whose METADATA names the package and version
of its file name, pure Python (``Root-Is-Purelib: true``, tag ``py3-none-any``), a
``Requires-Python`` that admits 3.12, and importable from the wheel file itself (by
zipimport, in a subprocess of this Python).  ``--check`` runs only the checks, without
the network.

Examples
--------
    python -m benchmarks.fetch_device_wheels            # fill .whl/ (about 160 kB)
    python -m benchmarks.fetch_device_wheels --check    # check what is there
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (distribution name, module it provides): what the GPU machine lacks.
PACKAGES = (("array-api-compat", "array_api_compat"), ("array-api-strict", "array_api_strict"))
#: The GPU machine's Python, and the platforms pip is told about (pure wheels fit any of them).
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class WheelError(Exception):
    """A wheel that would not install or import on the GPU machine."""


def normalize(name: str) -> str:
    """A distribution name as wheel file names spell it: lower case, runs of ``-_.`` as one ``_``."""
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_name_parts(path: Path) -> tuple[str, str, str]:
    """(normalised distribution, version, tags) from a wheel's file name ``dist-version(-build)?-py-abi-plat.whl``."""
    parts = path.name[:-len(".whl")].split("-")
    if not path.name.endswith(".whl") or len(parts) not in (5, 6):
        raise WheelError(f"{path.name}: not a wheel file name")
    return normalize(parts[0]), parts[1], "-".join(parts[-3:])


def python_admitted(requires: str | None, version: str = PYTHON_VERSION) -> bool:
    """Whether a ``Requires-Python`` specifier (e.g. ``>=3.10,<4``) admits Python ``version``."""
    if not requires:
        return True
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # packaging is pytest's dependency, so normally there; without it, compare by hand
        want = tuple(int(x) for x in version.split("."))
        for spec in requires.split(","):
            m = re.fullmatch(r"\s*(>=|<=|==|!=|>|<|~=)\s*([0-9.]+)(\.\*)?\s*", spec)
            if not m:
                return True  # a form this fallback does not read: let pip decide on the device
            op, bound = m.group(1), tuple(int(x) for x in m.group(2).split("."))
            n = len(bound)
            ok = {">=": want[:n] >= bound, "<=": want[:n] <= bound, ">": want[:n] > bound, "<": want[:n] < bound,
                  "==": want[:n] == bound, "!=": want[:n] != bound, "~=": want[:n] >= bound}[op]
            if not ok:
                return False
        return True
    return SpecifierSet(requires).contains(version, prereleases=True)


def check_wheel(path: Path, dist: str, module: str, version: str | None = None, try_import: bool = True) -> str:
    """Check one wheel (see the module docstring); returns its version, raises :class:`WheelError`."""
    name, file_version, tags = wheel_name_parts(path)
    if name != normalize(dist):
        raise WheelError(f"{path.name}: file name says {name}, expected {normalize(dist)}")
    if version is not None and file_version != version:
        raise WheelError(f"{path.name}: version {file_version}, expected {version}")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise WheelError(f"{path.name}: corrupt member {bad}")
            info = f"{name}-{file_version}.dist-info"
            names = {n.lower(): n for n in zf.namelist()}
            meta_name, wheel_name = names.get(f"{info}/metadata"), names.get(f"{info}/wheel")
            if meta_name is None or wheel_name is None:
                raise WheelError(f"{path.name}: no {info}/METADATA or WHEEL")
            meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
            wheel = Parser().parsestr(zf.read(wheel_name).decode("utf-8"))
    except (zipfile.BadZipFile, OSError) as exc:
        raise WheelError(f"{path.name}: not a readable zip ({exc})") from None
    if normalize(meta.get("Name", "")) != normalize(dist) or meta.get("Version") != file_version:
        raise WheelError(f"{path.name}: METADATA says {meta.get('Name')} {meta.get('Version')}")
    if wheel.get("Root-Is-Purelib", "").strip().lower() != "true" or "py3-none-any" not in wheel.get_all("Tag", []):
        raise WheelError(f"{path.name}: not a pure-Python py3-none-any wheel ({tags}); the device needs one built "
                         f"for CPython {PYTHON_VERSION} on manylinux x86_64")
    if not python_admitted(meta.get("Requires-Python"), PYTHON_VERSION):
        raise WheelError(f"{path.name}: Requires-Python {meta.get('Requires-Python')} excludes {PYTHON_VERSION}")
    if try_import:
        code = f"import {module}, sys; sys.stdout.write({module}.__file__)"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path.resolve()), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                              check=False)
        if proc.returncode != 0 or str(path.resolve()) not in proc.stdout:
            raise WheelError(f"{path.name}: `import {module}` from the wheel failed: "
                             f"{(proc.stderr.strip().splitlines() or [proc.stdout])[-1]}")
    return file_version


def wanted_version(dist: str, latest: bool) -> str | None:
    """The version to fetch: the one installed here, or None (the newest) with ``latest`` or when not installed."""
    if latest:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheels_of(dest: Path, dist: str) -> list[Path]:
    """The wheel files of ``dist`` in ``dest``."""
    return sorted(p for p in dest.glob("*.whl") if p.name.split("-")[0].lower() == normalize(dist))


def download(dist: str, version: str | None, dest: Path) -> Path:
    """``pip download`` one pure wheel for the device's Python into ``dest``; returns its path."""
    req = f"{dist}=={version}" if version else dist
    with tempfile.TemporaryDirectory(prefix="wheels_") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               PYTHON_VERSION, "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)),
               "--dest", tmp, "--quiet", req]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise WheelError(f"pip download {req} failed (exit {proc.returncode}): "
                             f"{(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
        got = wheels_of(Path(tmp), dist)
        if len(got) != 1:
            raise WheelError(f"pip download {req} gave {len(got)} wheels of it: {[p.name for p in got]}")
        target = dest / got[0].name
        shutil.move(str(got[0]), target)
    return target


def fill(dest: Path, latest: bool = False, check_only: bool = False) -> list[dict[str, str]]:
    """Make ``dest`` hold one checked wheel per package of :data:`PACKAGES`; returns what it holds.

    Raises
    ------
    WheelError
        A download or a check failed (``check_only``: a wheel is missing or wrong).
    """
    dest.mkdir(parents=True, exist_ok=True)
    held = []
    for dist, module in PACKAGES:
        version = wanted_version(dist, latest) if not check_only else None
        have = wheels_of(dest, dist)
        keep = [p for p in have if version is None or wheel_name_parts(p)[1] == version]
        if check_only:
            if len(have) != 1:
                raise WheelError(f"{dest} holds {len(have)} wheels of {dist} ({[p.name for p in have]}); expected "
                                 "one: run benchmarks/fetch_device_wheels.py")
            path, action = have[0], "checked"
        elif keep and not latest:
            path, action = keep[-1], "kept"
        else:
            path, action = download(dist, version, dest), "downloaded"
        for other in have:
            if other != path and other.exists():
                other.unlink()
        found = check_wheel(path, dist, module, version)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        held.append(dict(package=dist, version=found, file=path.name, action=action, bytes=str(path.stat().st_size),
                         sha256=digest))
    return held


def git_ignored(path: Path) -> bool | None:
    """Whether git ignores the folder ``path`` in this checkout, whether or not it exists (None: git cannot tell)."""
    try:  # the trailing slash makes a folder pattern such as /.whl/ match a folder that does not exist yet
        proc = subprocess.run(["git", "check-ignore", "-q", str(path) + "/"], cwd=ROOT, capture_output=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: True, 1: False}.get(proc.returncode)


def make_parser() -> argparse.ArgumentParser:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fetch_device_wheels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(ROOT / ".whl"),
                    help="folder of the wheels (default: .whl/ in the repository root)")
    ap.add_argument("--latest", action="store_true",
                    help="fetch the newest versions on the index instead of those installed here")
    ap.add_argument("--check", action="store_true",
                    help="only check the wheels already in --dest (no network)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Fill or check the folder; 0 when every wheel passed, 1 when one is missing or failed a check."""
    args = make_parser().parse_args(argv)
    dest = Path(args.dest)
    try:
        held = fill(dest, latest=args.latest, check_only=args.check)
    except WheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for h in held:
        print(f"{h['action']:>10}  {h['file']}  ({int(h['bytes']) / 1e3:.0f} kB, sha256 {h['sha256'][:16]}...)")
    print(f"{dest}: {len(held)} wheels, pure Python, Requires-Python admits {PYTHON_VERSION}, each imports from its "
          "file")
    if dest.resolve() == (ROOT / ".whl").resolve() and git_ignored(dest) is False:
        print(f"warning: git does not ignore {dest}; add /.whl/ to .gitignore so the wheels are never committed",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
