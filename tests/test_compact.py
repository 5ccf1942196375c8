"""Compaction: g evaluated only on the samples still iterating, with the same answers."""

import numpy as np
import pytest

import fixedpoint
from fixedpoint import Anderson, Broyden, ForwardIteration


def _maps(backend, rates):
    xp = backend.xp
    r = backend.asarray(rates[:, None], dtype=xp.float64)
    seen = []

    def g_rows(x, rows):
        seen.append(backend.numpy(rows).astype(int).tolist())
        return 1.0 + xp.take(r, rows, axis=0) * (x - 1.0)

    def g_full(x):
        return 1.0 + r * (x - 1.0)

    return g_rows, g_full, seen


@pytest.mark.parametrize("method", [ForwardIteration(), Anderson(m=3), Broyden(m=3)], ids=repr)
@pytest.mark.parametrize("compact", [True, "auto"])
def test_same_answers_and_fewer_rows(backend, method, compact):
    """Half the samples contract 20 times faster (per decade) than the other half."""
    rates = np.array([0.1 ** 1.0] * 4 + [0.1 ** 0.05] * 4)  # 1 vs 20 iterations per decade (forward)
    g_rows, g_full, seen = _maps(backend, rates)
    x0 = backend.asarray(np.zeros((8, 3)), dtype=backend.xp.float64)
    opts = dict(method=method, batch=True, tol=1e-9, stop_mode="abs", max_iter=2000)
    ref = fixedpoint.solve(g_full, x0, **opts)
    res = fixedpoint.solve(g_rows, x0, compact=compact, **opts)
    assert res.converged.all() and (res.n_iter == ref.n_iter).all()
    np.testing.assert_array_equal(backend.numpy(res.x), backend.numpy(ref.x))
    assert res.n_rows == sum(len(s) for s in seen) and ref.n_rows == 8 * ref.n_fev
    for rows in seen:  # increasing sample indices, each once
        assert rows == sorted(rows) and len(set(rows)) == len(rows)
    assert seen[0] == list(range(8))
    if isinstance(method, ForwardIteration):  # the slow half alone at the end: at most 60 % of the rows
        assert seen[-1] == [4, 5, 6, 7] and res.n_rows <= 0.6 * ref.n_rows, (res.n_rows, ref.n_rows)


def test_rows_follow_the_host_checks():
    rates = np.array([0.01, 0.9, 0.9, 0.9])
    calls = []

    def g(x, rows):
        calls.append(len(rows))
        return 1.0 + rates[rows, None] * (x - 1.0)

    res = fixedpoint.solve(g, np.zeros((4, 2)), method="forward", batch=True, compact=True, check_every=5,
                           tol=1e-8, stop_mode="abs")
    assert res.converged.all()
    # sample 0 converges at the 6th evaluation; it is dropped at the next host check, after the 10th
    assert calls[:10] == [4] * 10 and set(calls[10:]) == {3}


def test_compact_needs_a_batch_and_a_valid_value():
    with pytest.raises(ValueError, match="batch=True"):
        fixedpoint.solve(lambda x, rows: x, np.zeros(3), compact=True)
    with pytest.raises(ValueError, match="compact"):
        fixedpoint.solve(lambda x, rows: x, np.zeros((2, 3)), batch=True, compact="yes")


def test_torch_map_through_the_numpy_solver_gets_torch_rows():
    torch = pytest.importorskip("torch")
    rates = torch.tensor([[0.1], [0.9]], dtype=torch.float64)
    kinds = set()

    def g(x, rows):
        kinds.add((type(x).__name__, type(rows).__name__, str(rows.dtype)))
        return 1.0 + rates[rows] * (x - 1.0)

    res = fixedpoint.solve(g, torch.zeros(2, 3, dtype=torch.float64), batch=True, compact=True, method="forward",
                           backend="numpy", tol=1e-10, stop_mode="abs")
    assert res.converged.all() and kinds == {("Tensor", "Tensor", "torch.int64")}


def test_compaction_benchmark_meets_its_target(tmp_path):
    # benchmarks/bench_compaction.py on a small batch: rows with compaction at most 60 % of those without,
    # for the solver and for the DEQ layer (forward and adjoint), with the same answers
    pytest.importorskip("torch")
    import json

    from benchmarks import bench_compaction

    out = tmp_path / "compaction.json"
    assert bench_compaction.main(["--batch", "8", "--n", "16", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for method in bench_compaction.METHODS:
        gen, lay = res["generic"][method], res["layer"][method]
        assert gen["on"]["converged"] and gen["off"]["converged"] and gen["max_x_difference"] <= 1e-12
        assert gen["ratio"] <= 0.6 and lay["forward_ratio"] <= 0.6 and lay["adjoint_ratio"] <= 0.6, (method, gen, lay)
        assert lay["max_z_difference"] <= 1e-12 and lay["max_grad_relative_difference"] <= 1e-10


def test_straggler_benchmark_runs_and_records_its_ratios(tmp_path):
    # benchmarks/bench_stragglers.py on tiny sizes: it runs, every solve converges, and the JSON holds the ratios
    # the targets are judged by (timings are not judged here)
    import json

    from benchmarks import bench_stragglers

    out = tmp_path / "stragglers.json"
    assert bench_stragglers.main(["--batch", "40", "--n", "16", "--deq-batch", "4", "--deq-n", "64", "--repeats", "1",
                                  "--k1", "20", "--k2", "40", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for method in bench_stragglers.METHODS:
        row = res["stragglers"][method]
        assert row["converged"] and row["ratio"] > 0 and len(row["slow_iterations"]) == 4
        assert res["deq_sized"][method]["k2"] == 40


def test_one_sample_benchmark_runs_both_loops_and_restores_the_one_sample_path(tmp_path):
    import json

    from benchmarks import bench_one_sample
    from fixedpoint import iteration

    before = iteration._Loop._run_one
    out = tmp_path / "one.json"
    assert bench_one_sample.main(["--repeats", "1", "--out", str(out)]) == 0
    assert iteration._Loop._run_one is before
    res = json.loads(out.read_text())["methods"]
    assert set(res) == {"forward", "anderson", "broyden"} and all(r["batch_loop_us"] > 0 for r in res.values())
