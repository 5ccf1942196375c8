"""The deterministic figures of README.md and docs/: evaluation counts, recomputed on the CPU.

Timings are measurements and stay as recorded, each with its date and commit; the counts of
evaluations of g are a property of the code, so they are recomputed here and written into the
docs.  One command regenerates all of them (about a minute on 2 CPU cores, most of it the
H-equation at n = 4000 and the conv DEQ at n = 1e6)::

    python -m tooling.doc_figures            # recompute, write docs/results/figures.json, rewrite the docs
    python -m tooling.doc_figures --check    # recompute and compare; exit status 1 if a doc differs

The record ``docs/results/figures.json`` holds every count with the commit and versions that
gave it.  Each figure in a doc sits between two HTML comments, ``<!-- figures:NAME -->`` and
``<!-- /figures:NAME -->`` (invisible when rendered); the text between them is rendered from the
record by ``BLOCKS[NAME]`` and replaced in place.  ``tests/test_doc_figures.py`` recomputes the
small problems of the record and checks that every block in the docs is what the record renders.

The figure sets:

- ``cli``: ``python -m fixedpoint`` with its defaults (H-equation, n = 400, c = 0.99, float64,
  tolerance 1e-10; forward iteration, Anderson m = 5 with its defaults, Broyden): the README's claim.
- ``cpu_vs_gpu``: the problems and sizes of ``demos/cpu_vs_gpu.py``'s default sweep, float32,
  tolerance 1e-5, on NumPy and PyTorch (CPU), forward iteration and Anderson; plus the conv DEQ
  at n = 1e5 of its residual trace.
- ``solvers``: the problems of ``benchmarks/bench_solvers.py`` (float64, tolerance 1e-8), the three
  methods, on NumPy and PyTorch (CPU).

PyTorch runs with one thread here, as in the recorded runs: a float32 reduction's rounding, and so
a count, can depend on how the work is split between threads.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.util
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "results" / "figures.json"
#: The files whose figures this script writes.
DOCS = ("README.md", "docs/cpu_vs_gpu.md", "docs/benchmarks.md")
#: The recorded CPU-vs-GPU run whose timings the docs quote (its counts are compared with today's).
CVG_RECORD = ROOT / "docs" / "results" / "cpu_vs_gpu"

CVG_SIZES = {"jacobi": [1000, 10_000, 100_000, 1_000_000], "tanh": [1000, 10_000, 100_000, 1_000_000],
             "h-equation": [250, 500, 1000, 2000, 4000], "conv": [1000, 10_000, 100_000, 1_000_000]}
#: The small problems the test recomputes (seconds in all).
FAST_CVG_SIZES = {"jacobi": [1000, 10_000], "tanh": [1000, 10_000], "h-equation": [250, 500], "conv": [1000]}
SOLVERS_SLOW = ("poisson-jacobi n=1000",)
BACKENDS = ("numpy", "torch")


# --- computing -----------------------------------------------------------------------------------

def _has_torch():
    return importlib.util.find_spec("torch") is not None


def _backends(specs):
    """(spec, library, namespace, device) of each backend spec that can run here (torch only if installed)."""
    from tooling import timing

    for spec in specs:
        if spec == "torch" and not _has_torch():
            continue
        lib, dev = timing.parse_backend(spec)
        xp, device, _ = timing.setup_backend(lib, dev)
        yield spec, lib, xp, device


@contextlib.contextmanager
def _one_torch_thread():
    if not _has_torch():
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cli_counts():
    """Evaluations of g of ``python -m fixedpoint`` with its defaults."""
    from fixedpoint import problems
    from fixedpoint.__main__ import DEFAULT_TOL, compare, make_parser

    args = make_parser().parse_args([])
    prob = problems.chandrasekhar(args.n, args.c)
    runs = compare(prob, DEFAULT_TOL["float64"], m=args.m, max_iter=args.max_iter)
    return dict(n=args.n, c=args.c, tol=DEFAULT_TOL["float64"], m=args.m,
                **{name: dict(n_fev=int(r.n_fev), status=r.status) for name, r in runs.items()})


def cvg_counts(sizes=None, backends=BACKENDS):
    """Evaluations of g of the CPU-vs-GPU demo's solves: a list of rows (problem, n asked, n, backend, method)."""
    from types import SimpleNamespace

    from demos import cpu_vs_gpu as cvg

    sizes = CVG_SIZES if sizes is None else sizes
    args = SimpleNamespace(tol=1e-5, max_iter=1000, dtype="float32")
    rows = []
    for spec, lib, _, device in _backends(backends):
        for name, ns in sizes.items():
            if name == "conv" and not _has_torch():
                continue
            for n in ns:
                p, opts = cvg.make_problem(name, n, lib, device, args.dtype)
                size = int(np.prod(p.x0.shape))
                for method in cvg.METHODS:
                    res = cvg.run_solve(p, method, args, opts)
                    rows.append(dict(problem=name, n_asked=n, n=size, backend=spec, method=method,
                                     n_fev=int(res.n_fev), converged=bool(np.all(res.converged))))
    return rows


def solver_counts(names=None, backends=BACKENDS):
    """Evaluations of g of bench_solvers.py's solves: rows (backend, problem, method, status, n_fev)."""
    import fixedpoint
    from benchmarks import bench_solvers as bs

    rows = []
    for spec, lib, xp, device in _backends(backends):
        for name, make, batch, bounded in bs.PROBLEMS:
            if names is not None and name not in names:
                continue
            p = make(backend=lib, dtype=xp.float64, device=device)
            max_iter = 20_000 if bounded == "poisson" else bs.MAX_ITER
            for method in bs.METHODS:
                res = fixedpoint.solve(p.g, p.x0, method=method, tol=bs.TOL, max_iter=max_iter, batch=batch)
                rows.append(dict(backend=spec, problem=name, method=method, status=res.status,
                                 n_fev=int(res.n_fev), max_iter=max_iter))
    return rows


def compute(fast=False):
    """Every figure set; ``fast``: only the small problems (what the test recomputes)."""
    if _has_torch():
        import fixedpoint.torch  # noqa: F401  (imported before threads are set: torch's first import may set them)
    with _one_torch_thread():
        figures = dict(cli=cli_counts(),
                       cpu_vs_gpu=cvg_counts(FAST_CVG_SIZES if fast else None),
                       solvers=solver_counts([n for n, *_ in _solver_problems() if n not in SOLVERS_SLOW]
                                             if fast else None))
        if not fast:
            figures["cvg_trace"] = cvg_counts({"conv": [100_000]}, backends=("numpy",))
    return figures


def _solver_problems():
    from benchmarks import bench_solvers as bs

    return bs.PROBLEMS


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def make_record(figures):
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    if _has_torch():
        import torch

        versions["torch"] = torch.__version__
    dirty = _git("status", "--porcelain", "--", "fixedpoint", "demos/cpu_vs_gpu.py", "benchmarks/bench_solvers.py")
    return dict(command="python -m tooling.doc_figures", commit=_git("rev-parse", "--short", "HEAD") or "unknown",
                uncommitted_changes=bool(dirty), date=datetime.date.today().isoformat(),
                machine=f"{platform.machine()} CPU, {platform.system()}", versions=versions,
                torch_threads=1, figures=figures)


# --- rendering -----------------------------------------------------------------------------------

def _n(n):
    """1000 -> 1e3, 99840 -> 99 840 (n as the docs write it)."""
    k = round(np.log10(n))
    return f"1e{k}" if n == 10**k else f"{n:,}".replace(",", " ")


def _counts(rows, **key):
    return {r["backend"]: r["n_fev"] for r in rows if all(r[k] == v for k, v in key.items())}


def _both(by_backend):
    """"175", or "24 (PyTorch 27)" where PyTorch's count differs from NumPy's."""
    np_, torch_ = by_backend.get("numpy"), by_backend.get("torch")
    if torch_ is None or torch_ == np_:
        return f"{np_}"
    return f"{np_} (PyTorch {torch_})"


def _span(values, fmt="{}"):
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def block_cli(rec):
    f = rec["figures"]["cli"]
    fw, aa = f["forward"]["n_fev"], f["anderson"]["n_fev"]
    return (f"{fw / aa:.1f}× on Chandrasekhar's H-equation at c = {f['c']:g}: {fw} against {aa} evaluations at "
            f"n = {f['n']}, tolerance {f['tol']:g}, as `python -m fixedpoint` prints")


def block_cvg_counts(rec):
    rows = rec["figures"]["cpu_vs_gpu"]
    lines = ["| problem | n | g evals, forward | g evals, AA | forward / AA (NumPy) |", "|---|---|---:|---:|---:|"]
    label = {"jacobi": "jacobi", "tanh": "tanh layer", "h-equation": "h-equation, c = 0.99", "conv": "conv DEQ"}
    for prob in CVG_SIZES:
        for n in sorted({r["n"] for r in rows if r["problem"] == prob}):
            fw, aa = _counts(rows, problem=prob, n=n, method="forward"), _counts(rows, problem=prob, n=n,
                                                                                    method="anderson")
            lines.append(f"| {label[prob]} | {_n(n)} | {_both(fw)} | {_both(aa)} | {fw['numpy'] / aa['numpy']:.2f} |")
    return "\n".join(lines)


def block_cvg_summary(rec):
    """The evaluation figures the prose of docs/cpu_vs_gpu.md quotes."""
    rows = rec["figures"]["cpu_vs_gpu"]

    def ratios(prob):
        out = []
        for r in rows:
            if r["problem"] == prob and r["method"] == "anderson":
                fw = _counts(rows, problem=prob, n=r["n"], method="forward")[r["backend"]]
                out.append(fw / r["n_fev"])
        return out

    def evals(prob, method):
        return [r["n_fev"] for r in rows if r["problem"] == prob and r["method"] == method]

    conv = [1 - 1 / q for q in ratios("conv")]
    return (f"AA needs {_span(ratios('jacobi'), '{:.1f}')} times fewer evaluations on the Jacobi map, "
            f"{_span(ratios('h-equation'), '{:.1f}')} times fewer on the H-equation and "
            f"{_span([100 * s for s in conv], '{:.0f}')}% fewer on the conv DEQ "
            f"({_span(evals('conv', 'forward'))} → {_span(evals('conv', 'anderson'))}); the tanh layer converges "
            f"in {_span(evals('tanh', 'forward'))} evaluations by forward iteration and "
            f"{_span(evals('tanh', 'anderson'))} by AA")


def block_cvg_trace(rec):
    rows = rec["figures"]["cvg_trace"]
    fw, aa = (_counts(rows, method=m)["numpy"] for m in ("forward", "anderson"))
    return f"Forward iteration takes {fw} evaluations to 1e-5, AA {aa}"


def _recorded_cvg_rows():
    with open(CVG_RECORD / "rows.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def block_cvg_times(rec):
    """The recorded run's time ratios, forward / AA: median of 3 with the range over the repeats."""
    rows = _recorded_cvg_rows()
    machine = json.loads((CVG_RECORD / "results.json").read_text())["machine"]

    def spread(r):  # 3 repeats: np.percentile's quartiles lie half way between the median and min or max
        med, q1, q3 = float(r["time"]), float(r["time_q1"]), float(r["time_q3"])
        return med, 2 * q1 - med, 2 * q3 - med

    def ratio(prob, n, backend):
        fw, aa = (next(r for r in rows if (r["problem"], r["n"], r["backend"], r["method"]) == (prob, n, backend, m))
                  for m in ("forward", "anderson"))
        (fm, flo, fhi), (am, alo, ahi) = spread(fw), spread(aa)
        return f"{fm / am:.2f} ({flo / ahi:.2f}–{fhi / alo:.2f})"

    label = {"jacobi": "jacobi", "tanh": "tanh layer", "h-equation": "h-equation, c = 0.99", "conv": "conv DEQ"}
    lines = [f"Recorded run of {machine['date'][:10]}, commit `{machine['git_commit'][:7]}`: time to 1e-5, "
             "forward / AA, median of 3 repeats (range over the repeats)", "",
             "| problem | n | NumPy | PyTorch |", "|---|---|---:|---:|"]
    keys = list(dict.fromkeys((r["problem"], r["n"]) for r in rows))
    for prob, n in keys:
        lines.append(f"| {label[prob]} | {_n(int(n))} | {ratio(prob, n, 'numpy')} | {ratio(prob, n, 'torch')} |")
    return "\n".join(lines)


def block_cvg_drift(rec):
    """Where the recorded run's counts (rows.csv) differ from today's."""
    now = {(r["problem"], r["n"], r["backend"], r["method"]): r["n_fev"] for r in rec["figures"]["cpu_vs_gpu"]}
    old = _recorded_cvg_rows()
    diff = [(r, now[(r["problem"], int(r["n"]), r["backend"], r["method"])]) for r in old
            if (r["problem"], int(r["n"]), r["backend"], r["method"]) in now
            and int(r["n_fev"]) != now[(r["problem"], int(r["n"]), r["backend"], r["method"])]]
    if not diff:
        return f"The recorded run's {len(old)} counts are all those of the table above."
    items = "; ".join(f"{r['problem']} n = {_n(int(r['n']))} {r['backend']} {r['method']}: {r['n_fev']} then, {m} now"
                      for r, m in diff)
    return (f"{len(diff)} of the recorded run's {len(old)} counts (`rows.csv`) differ from the table above, "
            f"which is the code at `{rec['commit']}`: {items}. The changes to Anderson's small solve since then "
            "change its rounding, and at a tolerance of 1e-5 in float32 that can move the last iteration.")


def block_solver_counts(rec):
    rows = rec["figures"]["solvers"]
    label = {"chandrasekhar n=500 c=0.9": "Chandrasekhar n=500 c=0.9", "chandrasekhar n=500 c=0.99":
             "Chandrasekhar n=500 c=0.99", "linear n=1000 rho=0.95": "linear n=1000 ρ=0.95",
             "tanh d=256 batch=64": "tanh d=256 batch=64", "poisson-jacobi n=1000": "Poisson–Jacobi n=1000"}
    lines = ["| problem | forward | anderson | broyden |", "|---|---:|---:|---:|"]
    for prob in dict.fromkeys(r["problem"] for r in rows):
        cells = []
        for method in ("forward", "anderson", "broyden"):
            sel = [r for r in rows if r["problem"] == prob and r["method"] == method]
            status = {r["status"] for r in sel}
            cell = _both({r["backend"]: r["n_fev"] for r in sel})
            cells.append(cell + ("" if status == {"converged"} else f" ({'/'.join(sorted(status))})"))
        lines.append(f"| {label.get(prob, prob)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def block_provenance(rec):
    v = ", ".join(f"{k} {val}" for k, val in rec["versions"].items())
    return (f"`python -m tooling.doc_figures`, commit `{rec['commit']}`"
            + (" with uncommitted changes" if rec["uncommitted_changes"] else "")
            + f", {rec['date']}; {v}; {rec['machine']}")


BLOCKS = {
    "readme-cli": block_cli,
    "cvg-counts": block_cvg_counts,
    "cvg-summary": block_cvg_summary,
    "cvg-trace": block_cvg_trace,
    "cvg-times": block_cvg_times,
    "cvg-drift": block_cvg_drift,
    "solver-counts": block_solver_counts,
    "provenance": block_provenance,
}

MARK = re.compile(r"(<!-- figures:(?P<name>[a-z-]+) -->)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)


def blocks_in(text):
    """[(name, body)] of every figure block in ``text``."""
    return [(m["name"], m["body"]) for m in MARK.finditer(text)]


def render(name, rec, body):
    """The block's new text; a block that spans lines keeps a newline after its opening and before its closing."""
    text = BLOCKS[name](rec)
    return f"\n{text}\n" if "\n" in body else text


def rewrite(text, rec):
    return MARK.sub(lambda m: m[1] + render(m["name"], rec, m["body"]) + m[4], text)


def mismatches(rec):
    """[(file, block name)] whose text differs from what the record renders."""
    bad = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for name, body in blocks_in(text):
            if name not in BLOCKS or render(name, rec, body) != body:
                bad.append((doc, name))
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tooling.doc_figures", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="recompute and compare with the record and the docs, write nothing; exit 1 on a difference")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the docs from the existing record without recomputing")
    args = ap.parse_args(argv)
    if args.render_only:
        rec = json.loads(RECORD.read_text())
    else:
        rec = make_record(compute())
    if args.check:
        old = json.loads(RECORD.read_text())
        stale = [k for k in rec["figures"] if rec["figures"][k] != old["figures"].get(k)]
        bad = mismatches(old)
        for k in stale:
            print(f"figure set {k!r}: the code gives other counts than {RECORD.relative_to(ROOT)}")
        for doc, name in bad:
            print(f"{doc}: block {name!r} is not what the record renders")
        print("figures up to date" if not (stale or bad) else "run: python -m tooling.doc_figures")
        return 1 if stale or bad else 0
    RECORD.write_text(json.dumps(rec, indent=1) + "\n")
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text(encoding="utf-8")
        new = rewrite(text, rec)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {doc}")
    print(f"wrote {RECORD.relative_to(ROOT)} ({rec['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
