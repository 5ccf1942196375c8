"""Every Python block of README.md runs as written, in order, in one namespace (the tour a newcomer copies)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 2


def test_every_readme_block_runs(capsys):
    namespace: dict = {}
    for i, block in enumerate(_blocks()):
        if "import torch" in block:
            pytest.importorskip("torch")
        exec(compile(block, f"README.md, python block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "diverged" in printed
    assert namespace["res"].converged.all() and namespace["layer"].stats.backward.converged_fraction == 1.0
