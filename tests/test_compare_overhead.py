"""benchmarks/compare_overhead.py on tiny sizes, this checkout against itself: a ratio per configuration, and
the commit of each tree recorded (the results file must say which code "old" was, not only its folder)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import compare_overhead
from tooling import timing


def test_compare_records_ratios_and_both_commits(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    compare_overhead.main(["--old", str(compare_overhead.ROOT), "--rounds", "1", "--work", str(tmp_path / "work"),
                           "--out", str(out), "--", "--backend", "numpy", "--sizes", "1e3", "--windows", "1", "2",
                           "--repeats", "1", "--copy-bytes", "1e6"])
    data = json.loads(out.read_text())
    assert [(r["n"], r["m"]) for r in data["rows"]] == [(1000, 1), (1000, 2)]
    assert all(r["ratio"] > 0 for r in data["rows"])
    commit = timing.machine_info(set()).get("git_commit")
    assert data["old_commit"] == data["new_commit"] == commit
