"""The CPU-vs-GPU timing demo runs end to end in --quick mode and writes what it promises."""

import json

import pytest


def load_demo():
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from demos import cpu_vs_gpu

    return cpu_vs_gpu


def test_quick_run_writes_rows_plots_and_ratios(tmp_path, capsys):
    demo = load_demo()
    argv = ["--quick", "--backends", "numpy", "--problems", "jacobi", "h-equation", "--threads", "1",
            "--out", str(tmp_path)]
    assert demo.main(argv) == 0
    for name in ("rows.csv", "results.json", "time_vs_n.png", "residual_vs_time.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert {r["problem"] for r in rows} == {"jacobi", "h-equation"} and all(r["converged"] for r in rows)
    by = {(r["problem"], r["n"], r["method"]): r for r in rows}
    for r in data["ratios"]:
        fw, aa = by[(r["problem"], r["n"], "forward")], by[(r["problem"], r["n"], "anderson")]
        assert r["fev_ratio"] == pytest.approx(fw["n_fev"] / aa["n_fev"])
        assert aa["n_fev"] < fw["n_fev"]  # both problems contract slowly: Anderson needs fewer evaluations
    trace = data["trace"]["traces"]
    assert trace["anderson"]["residual"][-1] <= 1e-5
    assert len(trace["forward"]["time"]) == len(trace["forward"]["residual"])
    printed = capsys.readouterr().out
    assert "no GPU found" in printed and "torch threads: 1 (--threads)" in printed
    # the n column prints every size exactly (250, not 2e+02; 4,000, not 4e+03)
    table = [line.split() for line in printed.splitlines() if line.lstrip().startswith(("jacobi", "h-equation"))]
    assert {cells[1] for cells in table} == {"1,000", "4,000", "250", "500"}


def test_crossover_is_the_first_size_of_a_winning_tail():
    demo = load_demo()
    rows = [dict(problem="p", method="anderson", backend="cupy", n=n, gpu_speedup=s)
            for n, s in ((10, 0.5), (100, 1.5), (1000, 0.9), (10000, 3.0), (100000, 9.0))]
    (c,) = [c for c in demo.crossovers(rows) if c["method"] == "anderson"]
    assert c["crossover_n"] == 10000


def test_conv_deq_rows_agree_across_solver_libraries(tmp_path):
    """The conv problem goes through fixedpoint.torch's DEQ forward solve; NumPy (via DLPack) and
    PyTorch solvers see the same map, so they need the same number of evaluations."""
    pytest.importorskip("torch")
    demo = load_demo()
    assert demo.main(["--problems", "conv", "--sizes", "4096", "--backends", "numpy", "torch", "--repeats", "1",
                      "--trace", "conv:4096", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    by = {(r["backend"], r["method"]): r for r in data["rows"]}
    assert set(by) == {(b, m) for b in ("numpy", "torch") for m in ("forward", "anderson")}
    assert all(r["converged"] and r["n"] == 4096 for r in by.values())
    for method in ("forward", "anderson"):
        assert abs(by[("numpy", method)]["n_fev"] - by[("torch", method)]["n_fev"]) <= 1
    assert by[("numpy", "anderson")]["n_fev"] < by[("numpy", "forward")]["n_fev"]
    assert data["trace"]["traces"]["anderson"]["residual"][-1] <= 1e-5
