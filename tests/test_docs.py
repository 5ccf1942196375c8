"""The Sphinx documentation builds without a single warning (``-W``).

Skipped unless the ``docs`` extra (sphinx, numpydoc, myst-parser) is installed.
The build goes to a temporary directory, so docs/_build is left alone.
"""

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    pytest.importorskip("myst_parser")
    if not (DOCS / "conf.py").is_file():
        pytest.skip("docs/ is not part of this checkout")
    cmd = [
        sys.executable, "-m", "sphinx",
        "-W", "--keep-going",        # every warning is an error, all of them reported
        "-E",                        # fresh environment, no cached state
        "-b", "html",
        "-d", str(tmp_path / "doctrees"),
        str(DOCS), str(tmp_path / "html"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    for page in ("index", "algorithm", "api", "benchmarks"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), page
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in ("fixedpoint.solve", "fixedpoint.anderson", "fixedpoint.FixedPointResult",
                 "fixedpoint.problems.h_function", "fixedpoint.interop.convert",
                 "fixedpoint.kernels.Kernels"):
        assert f'id="{name}"' in api, f"{name} missing from the API page"
