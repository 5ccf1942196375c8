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


# SciPy's anderson warns of its own ill-conditioned mixing system near convergence (a peer's message)
@pytest.mark.filterwarnings("ignore:An ill-conditioned matrix detected")
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


# --- issue 22's cases ---------------------------------------------------------------------------------

#: One easy and one hard H-equation case of issue 22 (N = 100: the N = 1000 ones take longer), the n = 5
#: system, the hard batch (n = 100 with --quick) and the nonlinear-systems group.
ISSUE22 = ["h-mid100-c0.5", "h-gl100-c0.9999", "broyden-small", "broyden-hard", "nonlin"]


def test_issue22_groups_expand_to_the_cases_the_issue_names() -> None:
    sixteen = compare_peers.select(["h-equation-16"], compare_peers.PROBLEM_KEYS, compare_peers.PROBLEM_GROUPS, "p")
    cases = [compare_peers.H22_CASES[k] for k in sixteen]
    assert len(cases) == 16 and len(set(cases)) == 16
    assert {r for r, _, _ in cases} == {"midpoint", "gauss-legendre"} and {n for _, n, _ in cases} == {100, 1000}
    assert {c for _, _, c in cases} == {0.9, 0.99, 0.999, 0.9999}
    twenty = compare_peers.select(["h-equation-20"], compare_peers.PROBLEM_KEYS, compare_peers.PROBLEM_GROUPS, "p")
    assert set(sixteen) < set(twenty) and len(twenty) == 20
    old = compare_peers.select(["h-equation"], compare_peers.PROBLEM_KEYS, compare_peers.PROBLEM_GROUPS, "p")
    assert old == [f"h{n}-c{c:g}" for n, c in compare_peers.H_CASES]  # the original cases, unchanged


def test_root_label_tells_the_two_roots_apart() -> None:
    """Against independent references: Newton's solution, and the other root found by SciPy's fsolve."""
    optimize = pytest.importorskip("scipy.optimize")
    case = compare_peers.build_case("h-mid100-c0.5", True, {"numpy"})
    g = case.maps["numpy"][0]
    physical = case.solution
    assert physical is not None
    other = optimize.fsolve(lambda h: g(h) - h, 5 * physical, xtol=1e-13)
    weights = compare_peers.chandrasekhar(100, 0.5, rule="midpoint").params["weights"]
    # closed form of the moments (c/2) Σ w_i H_i = 1 ∓ √(1 − c): the root SciPy found is the other one
    assert 0.25 * float(weights @ other) == pytest.approx(1 + math.sqrt(0.5), rel=1e-10)
    for x, label in ((physical, "physical"), (other, "non-physical"), (1.5 * physical, "not a root")):
        row = {"verified_residual": float(case.residual64(x)[0]),
               "max_error": float(max(abs(x - physical)) / max(abs(physical)))}
        assert compare_peers.root_label(row, case, x) == label


def test_issue22_cases_in_quick_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("scipy")
    monkeypatch.setitem(compare_peers.sys.modules, "benchmarks.peers_nonlin", FakeNonlin())
    data = run(tmp_path, "--problems", *ISSUE22, "--peers", "scipy", "torchdeq")
    rows = data["runs"]
    assert {r["problem"] for r in rows} == set(ISSUE22) - {"nonlin"}
    by = {(r["problem"], r["solver"], r["method"]): r for r in rows}
    for key in set(ISSUE22) - {"nonlin"}:
        assert {("fixedpoint[numpy]", m) for m in ("forward", "anderson", "broyden")} <= {
            (r["solver"], r["method"]) for r in rows if r["problem"] == key}, key
    tg = data["targets"]

    # H-equation: the easy case's roots, and the target's counts over the cases that ran
    for r in rows:
        if r["problem"] == "h-mid100-c0.5" and r["converged"] and r["same_stop_test"]:
            assert r["root"] == "physical" and r["verified_residual"] <= SLACK * 1e-10, r["solver"]
    h = tg["h_equation_16"]
    assert [c["problem"] for c in h["cases"]] == ["h-mid100-c0.5", "h-gl100-c0.9999"]
    assert [c["in_16"] for c in h["cases"]] == [False, True]
    assert h["cases_run"] == 1 and h["all_cases"]["cases_run"] == 2 and h["met"] is False  # 1 of 16 ran
    ours = by[("h-gl100-c0.9999", "fixedpoint[numpy]", "anderson")]
    assert h["physical"] == int(ours["root"] == "physical")

    # n = 5: the absolute test, and the figures per evaluation
    small = [r for r in rows if r["problem"] == "broyden-small"]
    assert all(r["stop_mode"] == "abs" for r in small)
    for method in ("anderson", "broyden"):
        r = by[("broyden-small", "fixedpoint[numpy]", method)]
        assert r["converged"] and r["verified_residual"] <= 1e-12, method
    b = tg["broyden_small"]["broyden"]
    assert b["fixedpoint_us_per_iter"] == pytest.approx(
        1e6 * by[("broyden-small", "fixedpoint[numpy]", "broyden")]["time_s"]["median"] / b["fixedpoint_n_fev"])
    assert b["scipy_n_fev"] == by[("broyden-small", "scipy", "broyden")]["n_fev"] and isinstance(b["met"], bool)

    # the hard batch: per-sample verdicts and iterations, consistent with the recomputed residuals
    for r in rows:
        if r["problem"] != "broyden-hard" or r["status"] == "error":
            continue
        assert len(r["sample_converged"]) == 10, r["solver"]
        if r["peer"] == "fixedpoint":
            assert len(r["sample_iters"]) == 10 and max(r["sample_iters"]) == r["n_fev"] <= 300
            if all(r["sample_converged"]):
                assert r["verified_residual"] <= SLACK * 1e-6, r["solver"]
    hard = {(s["solver"], s["method"]): s for s in tg["broyden_hard"]["solvers"]}
    ours = by[("broyden-hard", "fixedpoint[numpy]", "broyden")]
    assert hard[("fixedpoint[numpy]", "broyden")]["converged"] == sum(ours["sample_converged"])
    assert tg["broyden_hard"]["met"] == all(
        s["converged"] == 10 for (solver, m), s in hard.items() if solver.startswith("fixedpoint") and m == "broyden")

    # the nonlinear-systems group is called and its targets reported; every issue-22 target side by side
    assert data["nonlin_runs"] == FakeNonlin.rows and tg["nonlin"] == FakeNonlin.targets
    summary = {t["name"]: t for t in tg["issue22"]}
    assert len(summary) == 6 and all(t["met"] in (True, False, None) for t in summary.values())
    assert summary["SciPy test_nonlin problems via fixedpoint.root"]["met"] is True
    assert summary["Broyden on the hard batch"]["met"] == tg["broyden_hard"]["met"]
    assert summary["nothing worse: tanh Broyden vs torchdeq"]["met"] is None  # not run here


def test_nonlin_group_is_skipped_with_a_note_without_its_module(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(compare_peers.sys.modules, "benchmarks.peers_nonlin", None)  # import raises
    data = run(tmp_path, "--problems", "nonlin", "--peers", "scipy")
    assert data["runs"] == [] and data["nonlin_runs"] == []
    assert any(note.startswith("nonlin:") for note in data["skipped"])


class FakeNonlin:
    """Stands in for benchmarks/peers_nonlin.py (written separately): records that the group calls it."""

    rows = [dict(problem="F4_powell", solver="fixedpoint.root", method="broyden", converged=True, n_fev=10,
                 time_s=dict(median=1e-3, q1=1e-3, q3=1e-3), residual=1e-12)]
    targets = dict(F4_powell=dict(converged=True, n_fev=10, best_scipy="anderson", best_scipy_n_fev=95, ratio=0.1,
                                  note=None, target=True))

    def nonlin_rows(self, repeats: int = 3, warmup: int = 1, quick: bool = False) -> list[dict[str, Any]]:
        assert quick
        return self.rows

    def nonlin_targets(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return self.targets
