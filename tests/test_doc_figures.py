"""The evaluation counts quoted in README.md and docs/ are what the code computes.

``python -m tooling.doc_figures`` recomputes every count (about a minute), writes the record
docs/results/figures.json and rewrites the marked figure blocks of the docs from it.  Here, in
seconds: the small problems of the record are recomputed on the CPU and compared with it, and
every figure block in the docs is compared with what the record renders.  A failure means the
code's counts moved (or a doc was edited by hand): run ``python -m tooling.doc_figures`` and
commit the record and the docs with the change.
"""

import json

import pytest

from tooling import doc_figures as figs

RECORD = json.loads(figs.RECORD.read_text())


def test_every_doc_block_is_what_the_record_renders():
    names = {name for doc in figs.DOCS for name, _ in figs.blocks_in((figs.ROOT / doc).read_text(encoding="utf-8"))}
    assert {"readme-cli", "cvg-counts", "cvg-drift", "solver-counts"} <= names
    assert figs.mismatches(RECORD) == []


def test_cli_counts_are_the_code_s():
    assert figs.cli_counts() == RECORD["figures"]["cli"]


def test_solver_counts_are_the_code_s():
    fast = [name for name, *_ in figs._solver_problems() if name not in figs.SOLVERS_SLOW]
    with figs._one_torch_thread():
        now = figs.solver_counts(fast, backends=("numpy",))
    recorded = [r for r in RECORD["figures"]["solvers"] if r["problem"] in fast]
    assert now == [r for r in recorded if r["backend"] in {n["backend"] for n in now}]


def test_cpu_vs_gpu_counts_are_the_code_s():
    sizes = dict(figs.FAST_CVG_SIZES)
    try:
        import demos.deq_model  # noqa: F401  (the conv problem needs torch and the demo's cell)
    except ImportError:
        sizes.pop("conv")
    with figs._one_torch_thread():
        now = figs.cvg_counts(sizes)
    if not now:
        pytest.skip("nothing to recompute")
    key = {(r["problem"], r["n_asked"], r["backend"], r["method"]): r for r in RECORD["figures"]["cpu_vs_gpu"]}
    assert [(r, key.get((r["problem"], r["n_asked"], r["backend"], r["method"]))) for r in now
            if key.get((r["problem"], r["n_asked"], r["backend"], r["method"])) != r] == []
