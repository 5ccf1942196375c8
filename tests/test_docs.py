"""The Sphinx documentation builds without a single warning (``-W``).

Skipped unless the ``docs`` extra (sphinx, numpydoc, myst-parser) is installed.
The build goes to a temporary directory, so docs/_build is left alone.
"""

import re
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
                 "fixedpoint.Kernels", "fixedpoint.register_method", "fixedpoint.COMMON_OPTIONS"):
        assert f'id="{name}"' in api, f"{name} missing from the API page"


USER_DOCS = [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]
#: Words of the remote-run tooling some of this project's machines have and no user has.
NOT_FOR_USERS = [r"device call", r"device tool", r"files_at", r"files_fetch", r"\$OUT\b", r"\bcarry=", r"budget_left",
                 r"\blent\b", r"\blease\b", r"/tmp/site", r"give_back", r"limit_s"]


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_docs_speak_to_a_user_not_to_our_run_tooling(doc):
    text = doc.read_text(encoding="utf-8")
    assert [w for w in NOT_FOR_USERS if re.search(w, text)] == []


def test_gpu_sections_say_how_to_run_on_your_own_cuda_machine():
    bench = " ".join((DOCS / "benchmarks.md").read_text(encoding="utf-8").split("## GPU\n", 1)[1].split())
    cvg = " ".join((DOCS / "cpu_vs_gpu.md").read_text(encoding="utf-8").split("## GPU run", 1)[1].split())
    for text in (bench, cvg):
        assert "python -m venv" in text and 'pip install -e ".[test,torch,demos,cuda12]"' in text
        assert "python -m benchmarks.gpu_suite --out out/gpu_suite" in text
        assert "report.md" in text and "results.tar.gz" in text and "has not been measured" in text
    # the commands name real extras and the suite's real files
    cfg = (DOCS.parent / "setup.cfg").read_text()
    assert all(f"\n{e} =" in cfg for e in ("test", "torch", "demos", "cuda12", "cuda13"))
    from benchmarks.gpu_suite import BUNDLE_FILES

    assert all(f in bench for f in BUNDLE_FILES)
