"""benchmarks/compare_peers.py runs in --quick mode with the peers installed here and writes a consistent record.

CI installs only SciPy and PyTorch: torchdeq and JAXopt are then skipped with a note, which these tests accept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import compare_peers

#: The one-vector float64 case with two roots, the batched float32 tanh layer, and the torch-only conv cell.
PROBLEMS = ["h200-c0.9999", "tanh", "conv"]

#: Slack on the tolerance for the residual recomputed in float64: float32 solvers measure their residual
#: with float32 rounding, and JAXopt's absolute test matches the relative one to first order only.
SLACK = 1.05


def run(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "peers.json"
    assert compare_peers.main(["--quick", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_run_with_installed_peers(tmp_path: Path) -> None:
    data = run(tmp_path, "--problems", *PROBLEMS)
    assert {"benchmark", "command", "machine", "peer_versions", "settings", "skipped", "runs", "targets"} <= set(data)
    installed = [p for p in compare_peers.PEERS if compare_peers.available(p)]
    rows = data["runs"]
    peers_run = {r["peer"] for r in rows}
    assert peers_run <= {"fixedpoint", *installed}
    for peer in set(compare_peers.PEERS) - set(installed):
        assert any(note.startswith(f"{peer}:") for note in data["skipped"])
    has_torch = compare_peers.importlib.util.find_spec("torch") is not None
    problems = {r["problem"] for r in rows}
    assert problems == (set(PROBLEMS) if has_torch else set(PROBLEMS) - {"conv"})
    for key in problems:
        ours = {(r["library"], r["method"]) for r in rows if r["problem"] == key and r["peer"] == "fixedpoint"}
        assert {("numpy", m) for m in ("forward", "anderson", "broyden")} <= ours

    for r in rows:
        where = f"{r['problem']} {r['solver']} {r['method']}"
        assert r["status"] != "error" or r["peer"] != "fixedpoint", where
        if r["status"] == "error":
            continue
        assert isinstance(r["n_fev"], int) and r["n_fev"] > 0, where
        assert r["time_s"]["median"] > 0 and len(r["time_s"]["times"]) == data["settings"]["repeats"], where
        assert math.isfinite(r["verified_residual"]) or not r["converged"], where
        assert isinstance(r["settings"], dict) and r["stop_test"], where
        if r["converged"] and r["same_stop_test"]:
            assert r["verified_residual"] <= SLACK * r["tol"], where
        if r["peer"] == "fixedpoint":
            assert r["converged"] and r["n_fev"] == r["n_fev_reported"], where  # g is called once per iteration
            assert r["fev_ratio"] == 1.0 and r["time_ratio"] == 1.0, where
        elif r["reference"] is not None:
            assert r["fev_ratio"] == pytest.approx(
                r["n_fev"] / next(b["n_fev"] for b in rows if b["problem"] == r["problem"] and b["peer"] ==
                                  "fixedpoint" and f"fixedpoint[{b['library']}] {b['method']}" == r["reference"]))
        if r["family"] == "h-equation":
            assert r["root"] in ("physical", "non-physical", "not a root") and r["h1"] > 1, where
            if r["converged"] and r["same_stop_test"]:
                assert r["root"] != "not a root", where


def test_peers_that_are_missing_are_skipped_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(compare_peers, "available", lambda peer: False)
    data = run(tmp_path, "--problems", "h200-c0.9", "--peers", "torchdeq", "scipy", "jaxopt")
    assert {r["peer"] for r in data["runs"]} == {"fixedpoint"}
    assert len(data["skipped"]) == 3 and "skipped" in capsys.readouterr().err
    assert all(r["converged"] and r["root"] == "physical" for r in data["runs"])


def test_unknown_problem_or_peer_is_a_usage_error(tmp_path: Path) -> None:
    for argv in (["--problems", "h-equations"], ["--peers", "torchdeqq"]):
        with pytest.raises(SystemExit) as exc:
            compare_peers.main([*argv, "--out", str(tmp_path / "x.json")])
        assert exc.value.code == 2
