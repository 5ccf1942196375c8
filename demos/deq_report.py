"""Outputs of the DEQ demo: metrics files, the comparison in the paper's terms, and the plots.

Files written into the output folder:

- ``metrics.jsonl``, ``metrics.csv``: one record per solver and epoch;
- ``batches.csv``: one record per training batch (solver iterations, f-evaluations, times);
- ``residuals.csv``: the residual curves of one fixed batch (the paper's Figure 1);
- ``summary.json``: settings, machine, per-solver totals and the comparison;
- ``accuracy_vs_time.png``, ``residuals.png``, ``iterations_per_batch.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from types import SimpleNamespace

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository root (demos/, benchmarks/, tooling/) importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tooling.timing import write_csv  # noqa: E402

__all__ = ["machine_info", "totals", "compare", "comparison_table", "write_outputs", "load_outputs", "PAPER",
           "OUTPUT_FILES", "make_parser", "main"]

#: The files the demo writes into its output folder (besides the checkpoints).
OUTPUT_FILES = ("metrics.jsonl", "metrics.csv", "batches.csv", "residuals.csv", "summary.json",
                "accuracy_vs_time.png", "residuals.png", "iterations_per_batch.png")

#: What arXiv 2410.19460 reports (from its summaries; CIFAR-10, V100 GPU vs Xeon CPU).
PAPER = dict(speedup="2-8.6x", compute_saved="50-88%", train_acc="64.7% -> 96.3%", test_acc="64.2% -> 79.1%",
             train_time="about 12,000 s -> 1,400 s")


def machine_info(device):
    """:func:`tooling.timing.machine_info` for a run on ``device`` (a ``torch.device``), for the records."""
    from fixedpoint.backend import cupy_usable
    from tooling.timing import machine_info as describe

    libs = {"torch"} | ({"cupy"} if device.type == "cuda" and cupy_usable() else set())
    return dict(describe(libs), device=str(device))


def totals(run):
    """Whole-run figures of one solver: accuracies, times, f-evaluations, iterations."""
    ep, b = run.epochs, run.batches
    if not ep:
        return dict(solver=run.solver, epochs=0)
    last = ep[-1]
    return dict(
        solver=run.solver, epochs=len(ep), train_acc=last["train_acc"], test_acc=last["test_acc"],
        best_test_acc=max(e["test_acc"] for e in ep), train_loss=last["train_loss"], test_loss=last["test_loss"],
        time_train=run.train_time, time_forward_solve=float(sum(x["time_forward_solve"] for x in b)),
        time_backward_solve=float(sum(x["time_backward_solve"] for x in b)),
        time_eval=float(sum(e["time_eval"] for e in ep)),
        fwd_fev=int(sum(x["fwd_fev"] for x in b)), bwd_fev=int(sum(x["bwd_fev"] for x in b)),
        fwd_fev_mean=float(np.mean([x["fwd_fev"] for x in b])), fwd_fev_max=int(max(x["fwd_fev"] for x in b)),
        bwd_fev_mean=float(np.mean([x["bwd_fev"] for x in b])), bwd_fev_max=int(max(x["bwd_fev"] for x in b)),
        fwd_converged=float(np.average([x["fwd_converged"] for x in b], weights=[x["size"] for x in b])),
        bwd_converged=float(np.average([x["bwd_converged"] for x in b], weights=[x["size"] for x in b])),
        fwd_sample_iters=float(sum(x["fwd_iter_mean"] * x["size"] for x in b)),
        bwd_sample_iters=float(sum(x["bwd_iter_mean"] * x["size"] for x in b)),
        batches=len(b))


def _time_to(run, acc):
    for e in run.epochs:
        if e["test_acc"] >= acc:
            return e["time_cumulative"], e["epoch"]
    return None, None


def compare(runs):
    """Anderson against forward iteration in the paper's terms (None when one of them is missing).

    Speed-ups are forward's time over Anderson's; compute saved is
    1 − f-evaluations(Anderson) / f-evaluations(forward), counting evaluations of
    the whole batch (what was paid: a batch iterates until its slowest sample
    converges); "per sample" compares the iterations each sample needed (what a
    solver that drops converged samples from the batch would pay).  The common
    accuracy is the lower of the two best test accuracies, and the time to it is
    the training time at the end of the first epoch that reached it.
    """
    if not {"forward", "anderson"} <= set(runs) or not runs["forward"].epochs or not runs["anderson"].epochs:
        return None
    fw, aa = totals(runs["forward"]), totals(runs["anderson"])
    target = min(fw["best_test_acc"], aa["best_test_acc"])
    t_fw, e_fw = _time_to(runs["forward"], target)
    t_aa, e_aa = _time_to(runs["anderson"], target)

    def ratio(a, b):
        return a / b if b else float("nan")

    return dict(
        common_test_acc=target, time_to_common_acc=dict(forward=t_fw, anderson=t_aa),
        epoch_of_common_acc=dict(forward=e_fw, anderson=e_aa),
        speedup_time_to_acc=ratio(t_fw, t_aa), speedup_total_time=ratio(fw["time_train"], aa["time_train"]),
        speedup_forward_solve=ratio(fw["time_forward_solve"], aa["time_forward_solve"]),
        speedup_backward_solve=ratio(fw["time_backward_solve"], aa["time_backward_solve"]),
        compute_saved_forward=1.0 - ratio(aa["fwd_fev"], fw["fwd_fev"]),
        compute_saved_backward=1.0 - ratio(aa["bwd_fev"], fw["bwd_fev"]),
        compute_saved_total=1.0 - ratio(aa["fwd_fev"] + aa["bwd_fev"], fw["fwd_fev"] + fw["bwd_fev"]),
        per_sample_saved_forward=1.0 - ratio(aa["fwd_sample_iters"], fw["fwd_sample_iters"]),
        per_sample_saved_backward=1.0 - ratio(aa["bwd_sample_iters"], fw["bwd_sample_iters"]),
        per_sample_saved_total=1.0 - ratio(aa["fwd_sample_iters"] + aa["bwd_sample_iters"],
                                           fw["fwd_sample_iters"] + fw["bwd_sample_iters"]),
        same_epochs=fw["epochs"] == aa["epochs"], paper=PAPER)


def comparison_table(runs, comparison):
    """The comparison as printable text."""
    cols = [s for s in ("forward", "anderson") if s in runs and runs[s].epochs]
    tots = {s: totals(runs[s]) for s in cols}
    rows = [
        ("epochs", "{:d}", "epochs"), ("train accuracy (last epoch)", "{:.2%}", "train_acc"),
        ("test accuracy (last epoch)", "{:.2%}", "test_acc"), ("best test accuracy", "{:.2%}", "best_test_acc"),
        ("training time [s]", "{:.1f}", "time_train"), ("  forward solves [s]", "{:.1f}", "time_forward_solve"),
        ("  backward (adjoint) solves [s]", "{:.1f}", "time_backward_solve"),
        ("f-evaluations, forward solves", "{:d}", "fwd_fev"), ("J^T u evaluations, adjoint solves", "{:d}", "bwd_fev"),
        ("mean / max forward iterations per batch", None, ("fwd_fev_mean", "fwd_fev_max")),
        ("mean / max adjoint iterations per batch", None, ("bwd_fev_mean", "bwd_fev_max")),
        ("sum of per-sample iterations, forward", "{:.0f}", "fwd_sample_iters"),
        ("sum of per-sample iterations, adjoint", "{:.0f}", "bwd_sample_iters"),
        ("converged fraction forward / adjoint", None, ("fwd_converged", "bwd_converged")),
    ]
    width = 42
    lines = [f"{'':<{width}}" + "".join(f"{c:>16}" for c in cols)]
    for label, fmt, key in rows:
        cells = []
        for c in cols:
            t = tots[c]
            if key == ("fwd_converged", "bwd_converged"):
                cells.append(f"{t[key[0]]:.1%} / {t[key[1]]:.1%}")
            elif fmt is None:
                cells.append(f"{t[key[0]]:.1f} / {t[key[1]]:d}")
            else:
                cells.append(fmt.format(t[key]))
        lines.append(f"{label:<{width}}" + "".join(f"{x:>16}" for x in cells))
    if comparison:
        c = comparison
        tt = c["time_to_common_acc"]
        lines += [
            "",
            "Anderson vs forward iteration (paper, CIFAR-10: 2-8.6x speed-up, 50-88% compute saved):",
            f"  speed-up, time to {c['common_test_acc']:.2%} test accuracy: {c['speedup_time_to_acc']:.2f}x "
            f"({tt['forward']:.1f} s vs {tt['anderson']:.1f} s)",
            f"  speed-up, total training time:         {c['speedup_total_time']:.2f}x",
            f"  speed-up, forward / adjoint solves:    {c['speedup_forward_solve']:.2f}x / "
            f"{c['speedup_backward_solve']:.2f}x",
            f"  compute saved, forward solves:         {c['compute_saved_forward']:.1%}",
            f"  compute saved, adjoint solves:         {c['compute_saved_backward']:.1%}",
            f"  compute saved, all solves:             {c['compute_saved_total']:.1%}",
            f"  iterations saved per sample, forward / adjoint / all: {c['per_sample_saved_forward']:.1%} / "
            f"{c['per_sample_saved_backward']:.1%} / {c['per_sample_saved_total']:.1%}",
        ]
    return "\n".join(lines)


def _write_text(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_outputs(out, runs, summary, curves=None, plots=True):
    """Write the metrics, the summary and (with ``plots``) the PNG plots into folder ``out``."""
    epochs = [e for r in runs.values() for e in r.epochs]
    batches = [b for r in runs.values() for b in r.batches]
    _write_text(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(e) + "\n" for e in epochs))
    if epochs:
        write_csv(os.path.join(out, "metrics.csv"), epochs)
    if batches:
        write_csv(os.path.join(out, "batches.csv"), batches)
    if curves:
        rows = [dict(method=m, iteration=i, residual=r, time=t) for m, c in curves.items()
                for i, r, t in zip(c["iteration"], c["residual"], c["time"])]
        write_csv(os.path.join(out, "residuals.csv"), rows)
    _write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2, default=float) + "\n")
    if plots:
        from demos.deq_plots import plot_all

        plot_all(out, runs, curves, summary)


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_outputs(out):
    """Read back an output folder: (runs, summary, curves), runs as objects with the records of each solver.

    Raises
    ------
    FileNotFoundError
        When summary.json, metrics.jsonl or batches.csv is missing (``filename`` names it).
    ValueError
        When one of the files cannot be read as the demo wrote it; the message names the file.
    """
    runs = {}

    def run(solver):
        if solver not in runs:
            runs[solver] = SimpleNamespace(solver=solver, epochs=[], batches=[], train_time=0.0)
        return runs[solver]

    def read(name, parse, required=True):
        path = os.path.join(out, name)
        if not required and not os.path.exists(path):
            return None
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                return parse(fh)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, csv.Error) as exc:
            raise ValueError(f"{path} is not readable as the demo writes it ({type(exc).__name__}: {exc})") from None

    def metrics(fh):
        for line in fh:
            rec = json.loads(line)
            run(rec["solver"]).epochs.append(rec)

    def batches(fh):
        for row in csv.DictReader(fh):
            rec = {k: _number(v) for k, v in row.items()}
            run(rec["solver"]).batches.append(rec)
        for r in runs.values():
            r.train_time = float(sum(b["time_total"] for b in r.batches))

    def residuals(fh):
        curves = {}
        for row in csv.DictReader(fh):
            c = curves.setdefault(row["method"], dict(iteration=[], residual=[], time=[]))
            for key in ("iteration", "residual", "time"):
                c[key].append(_number(row[key]))
        return curves

    def summary_dict(fh):
        summary = json.load(fh)
        if not isinstance(summary, dict):
            raise TypeError(f"expected a JSON object, got {type(summary).__name__}")
        return summary

    summary = read("summary.json", summary_dict)
    read("metrics.jsonl", metrics)
    read("batches.csv", batches)
    curves = read("residuals.csv", residuals, required=False) or {}
    return runs, summary, curves


def make_parser():
    """The command line of ``python demos/deq_report.py``."""
    p = argparse.ArgumentParser(
        description="Recompute the totals and the comparison of a DEQ demo output folder from its records "
                    "(metrics.jsonl, batches.csv, residuals.csv), rewrite its summary.json, redraw its plots and "
                    "print the comparison table.")
    p.add_argument("out", metavar="OUT", help="output folder of demos/deq_cifar10.py (its --out)")
    return p


def main(argv=None):
    """``python demos/deq_report.py OUT``: recompute the totals and the comparison of an output folder
    from its records (metrics.jsonl, batches.csv), rewrite summary.json, redraw the plots, print the table.

    Returns 0, or 2 with a one-line error naming the file when the folder or a record file is
    missing or unreadable."""
    args = make_parser().parse_args(argv)
    out = args.out
    if not os.path.isdir(out):
        print(f"error: {out} is not a folder (expected the --out folder of demos/deq_cifar10.py)", file=sys.stderr)
        return 2
    try:
        runs, summary, curves = load_outputs(out)
    except FileNotFoundError as exc:
        print(f"error: {exc.filename} is missing: {out} is not a complete output folder of demos/deq_cifar10.py",
              file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary.update(totals={k: totals(r) for k, r in runs.items()}, comparison=compare(runs))
    _write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2, default=float) + "\n")
    from demos.deq_plots import plot_all

    plot_all(out, runs, curves, summary)
    print(comparison_table(runs, summary["comparison"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
