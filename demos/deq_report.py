"""Outputs of the DEQ demo: metrics files, the comparison in the paper's terms, and the plots.

Files written into the output folder:

- ``metrics.jsonl``, ``metrics.csv``: one record per solver and epoch;
- ``batches.csv``: one record per training batch (solver iterations, f-evaluations and rows, times);
- ``evaluations.csv``: one record per test evaluation, several per epoch (``--evals-per-epoch``): the
  training time and CPU time so far and the test accuracy, from which the time to an accuracy is computed;
- ``residuals.csv``: the residual curves of one fixed batch (the paper's Figure 1);
- ``summary.json``: settings, machine, per-solver totals, the comparison and the same-model solves
  (:mod:`demos.deq_same_model`);
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

from tooling.timing import write_csv

__all__ = ["machine_info", "totals", "compare", "compare_pair", "comparison_table", "write_outputs", "load_outputs",
           "PAPER", "OUTPUT_FILES", "make_parser", "main"]

#: The files the demo writes into its output folder (besides the checkpoints).
OUTPUT_FILES = ("metrics.jsonl", "metrics.csv", "batches.csv", "evaluations.csv", "residuals.csv", "summary.json",
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
    """Whole-run figures of one solver: accuracies, times, f-evaluations, rows, iterations.

    ``fwd_fev``/``bwd_fev`` count evaluations of the map (f, or the product J_fᵀ u) as
    batch calls; ``fwd_rows``/``bwd_rows`` count the samples they were evaluated on
    (with compaction fewer than batch size × calls); ``*_sample_iters`` sum the
    iterations each sample needed.
    """
    ep, b = run.epochs, run.batches
    if not ep:
        return dict(solver=run.solver, epochs=0)
    last = ep[-1]
    evals = getattr(run, "evaluations", None) or ep  # test evaluations: several per epoch, or (older runs) one

    def total(key):
        return sum(x.get(key) or 0 for x in b)

    out = dict(
        solver=run.solver, epochs=len(ep), train_acc=last["train_acc"], test_acc=last["test_acc"],
        best_test_acc=max(e["test_acc"] for e in ep), train_loss=last["train_loss"], test_loss=last["test_loss"],
        time_train=run.train_time, time_per_epoch=run.train_time / len(ep),
        time_forward_solve=float(total("time_forward_solve")), time_backward_solve=float(total("time_backward_solve")),
        time_backward_pass=float(total("time_backward_pass")),
        time_eval=float(sum(e["time_eval"] for e in evals)), cpu_eval=float(sum(e.get("cpu_eval", 0.0) for e in evals)),
        evaluations=len(evals),
        time_forward_map=float(total("time_forward_map")), time_backward_map=float(total("time_backward_map")),
        cpu_train=float(total("cpu_total")), cpu_per_epoch=float(total("cpu_total")) / len(ep),
        cpu_forward_solve=float(total("cpu_forward_solve")), cpu_backward_solve=float(total("cpu_backward_solve")),
        fwd_fev=int(total("fwd_fev")), bwd_fev=int(total("bwd_fev")),
        fwd_rows=int(total("fwd_rows")), bwd_rows=int(total("bwd_rows")), graph_rows=int(total("graph_rows")),
        fwd_fev_mean=float(np.mean([x["fwd_fev"] for x in b])), fwd_fev_max=int(max(x["fwd_fev"] for x in b)),
        bwd_fev_mean=float(np.mean([x["bwd_fev"] for x in b])), bwd_fev_max=int(max(x["bwd_fev"] for x in b)),
        fwd_converged=float(np.average([x["fwd_converged"] for x in b], weights=[x["size"] for x in b])),
        bwd_converged=float(np.average([x["bwd_converged"] for x in b], weights=[x["size"] for x in b])),
        fwd_sample_iters=float(sum(x["fwd_iter_mean"] * x["size"] for x in b)),
        bwd_sample_iters=float(sum(x["bwd_iter_mean"] * x["size"] for x in b)),
        batches=len(b))
    if "jac_frobenius" in last:
        out["jac_frobenius"] = last["jac_frobenius"]
    return out


def evaluation_points(run):
    """The run's test evaluations in training order: its records of ``evaluations.csv`` (several per epoch), or
    for a run recorded before them, one per epoch from ``metrics.jsonl``."""
    if getattr(run, "evaluations", None):
        return run.evaluations
    return [dict(epoch=e["epoch"], epoch_progress=float(e["epoch"]), time_cumulative=e["time_cumulative"],
                 cpu_cumulative=e.get("cpu_cumulative", float("nan")), test_acc=e["test_acc"]) for e in run.epochs]


def time_to_accuracy(run, acc):
    """The first test evaluation of ``run`` at or above accuracy ``acc``: dict(time=training wall seconds,
    cpu=training CPU seconds, epochs=epochs of training, fractional) up to that evaluation; None when never
    reached.  The times are upper bounds: the accuracy may have been reached since the evaluation before."""
    for e in evaluation_points(run):
        if e["test_acc"] >= acc:
            return dict(time=e["time_cumulative"], cpu=e["cpu_cumulative"], epochs=e["epoch_progress"])
    return None


def _get(hit, key):
    return None if hit is None else hit[key]


def _ratio(a, b):
    return a / b if b else float("nan")


def compare_pair(base, other):
    """``other`` (a run) against ``base`` (forward iteration) in the paper's terms, and per sample and per row.

    Speed-ups are base's time over other's.  Compute saved is 1 − cost(other) / cost(base),
    the cost being: evaluations of the whole batch (``compute_saved_*``: what a batch that
    iterates until its slowest sample converges pays); samples evaluated, i.e. rows
    (``rows_saved_*``: what was paid, with or without compaction); the iterations each
    sample needed (``per_sample_saved_*``: what a solver that drops converged samples
    from the batch would pay).  ``time_per_epoch_saved`` is 1 − (training time per
    epoch of other) / (that of base), and ``time_vs_iteration_saving`` is its ratio to
    ``per_sample_saved_total``: the part of the per-sample saving that became time
    (issue 11's target: at least 0.7); ``cpu_*`` are the same with this process's CPU
    seconds instead of wall time (robust to other processes on a shared machine).  The
    common accuracy is the lower of the two best test accuracies over every test evaluation
    (several per epoch, ``--evals-per-epoch``), and the time to it (wall ``time_to_common_acc``,
    CPU ``cpu_to_common_acc``) is the training time up to the first evaluation that reached it
    (:func:`time_to_accuracy`).  ``cpu_to_baseline_final_acc_vs_baseline_cpu`` is the CPU time
    ``other`` took to reach ``base``'s final test accuracy over ``base``'s whole training CPU time
    (issue 19's target: at most 0.5).
    """
    fw, aa = totals(base), totals(other)
    target = min(max(e["test_acc"] for e in evaluation_points(r)) for r in (base, other))
    hit_fw, hit_aa = time_to_accuracy(base, target), time_to_accuracy(other, target)
    final_fw = base.epochs[-1]["test_acc"]
    to_final = time_to_accuracy(other, final_fw)
    ratio = _ratio
    per_sample_total = 1.0 - ratio(aa["fwd_sample_iters"] + aa["bwd_sample_iters"],
                                   fw["fwd_sample_iters"] + fw["bwd_sample_iters"])
    time_saved = 1.0 - ratio(aa["time_per_epoch"], fw["time_per_epoch"])
    cpu_saved = 1.0 - ratio(aa["cpu_per_epoch"], fw["cpu_per_epoch"])
    return dict(
        baseline=base.solver, solver=other.solver,
        common_test_acc=target,
        time_to_common_acc={base.solver: _get(hit_fw, "time"), other.solver: _get(hit_aa, "time")},
        cpu_to_common_acc={base.solver: _get(hit_fw, "cpu"), other.solver: _get(hit_aa, "cpu")},
        epochs_to_common_acc={base.solver: _get(hit_fw, "epochs"), other.solver: _get(hit_aa, "epochs")},
        speedup_time_to_acc=ratio(hit_fw["time"], hit_aa["time"]) if hit_fw and hit_aa else None,
        speedup_cpu_to_acc=ratio(hit_fw["cpu"], hit_aa["cpu"]) if hit_fw and hit_aa else None,
        baseline_final_test_acc=final_fw,
        cpu_to_baseline_final_acc=_get(to_final, "cpu"), epochs_to_baseline_final_acc=_get(to_final, "epochs"),
        cpu_to_baseline_final_acc_vs_baseline_cpu=ratio(to_final["cpu"], fw["cpu_train"]) if to_final else None,
        speedup_total_time=ratio(fw["time_train"], aa["time_train"]),
        speedup_per_epoch=ratio(fw["time_per_epoch"], aa["time_per_epoch"]),
        speedup_forward_solve=ratio(fw["time_forward_solve"], aa["time_forward_solve"]),
        speedup_backward_pass=ratio(fw["time_backward_pass"], aa["time_backward_pass"]),
        compute_saved_forward=1.0 - ratio(aa["fwd_fev"], fw["fwd_fev"]),
        compute_saved_backward=1.0 - ratio(aa["bwd_fev"], fw["bwd_fev"]),
        compute_saved_total=1.0 - ratio(aa["fwd_fev"] + aa["bwd_fev"], fw["fwd_fev"] + fw["bwd_fev"]),
        rows_saved_forward=1.0 - ratio(aa["fwd_rows"], fw["fwd_rows"]),
        rows_saved_backward=1.0 - ratio(aa["bwd_rows"], fw["bwd_rows"]),
        rows_saved_total=1.0 - ratio(aa["fwd_rows"] + aa["bwd_rows"], fw["fwd_rows"] + fw["bwd_rows"]),
        per_sample_saved_forward=1.0 - ratio(aa["fwd_sample_iters"], fw["fwd_sample_iters"]),
        per_sample_saved_backward=1.0 - ratio(aa["bwd_sample_iters"], fw["bwd_sample_iters"]),
        per_sample_saved_total=per_sample_total,
        time_per_epoch_saved=time_saved, time_vs_iteration_saving=ratio(time_saved, per_sample_total),
        speedup_cpu=ratio(fw["cpu_per_epoch"], aa["cpu_per_epoch"]),
        cpu_per_epoch_saved=cpu_saved, cpu_vs_iteration_saving=ratio(cpu_saved, per_sample_total),
        same_epochs=fw["epochs"] == aa["epochs"], paper=PAPER)


def compare(runs):
    """Every other solver against forward iteration (:func:`compare_pair`): a dict solver -> comparison,
    or None when forward iteration or every other solver is missing or has no completed epoch."""
    base = runs.get("forward")
    if base is None or not base.epochs:
        return None
    out = {name: compare_pair(base, run) for name, run in runs.items() if name != "forward" and run.epochs}
    return out or None


def _pct(v):
    return "n/a" if v is None or v != v else f"{v:.1%}"


def _x(v):
    return "n/a" if v is None or v != v else f"{v:.2f}x"


def comparison_table(runs, comparison):
    """The totals of every solver side by side and the comparisons, as printable text."""
    cols = [s for s in runs if runs[s].epochs]
    tots = {s: totals(runs[s]) for s in cols}
    rows = [
        ("epochs", "{:d}", "epochs"), ("train accuracy (last epoch)", "{:.2%}", "train_acc"),
        ("test accuracy (last epoch)", "{:.2%}", "test_acc"), ("best test accuracy", "{:.2%}", "best_test_acc"),
        ("training time [s]", "{:.1f}", "time_train"), ("  per epoch [s]", "{:.1f}", "time_per_epoch"),
        ("training CPU time [s] (sum over ranks)", "{:.1f}", "cpu_train"),
        ("  forward solves [s]", "{:.1f}", "time_forward_solve"),
        ("  backward passes [s]", "{:.1f}", "time_backward_pass"),
        ("    adjoint solves [s]", "{:.1f}", "time_backward_solve"),
        ("  of the solves, in f or J^T u [s]", None, ("time_forward_map", "time_backward_map")),
        ("f-evaluations, forward solves", "{:d}", "fwd_fev"), ("J^T u evaluations, adjoint solves", "{:d}", "bwd_fev"),
        ("rows of f, forward solves", "{:d}", "fwd_rows"), ("rows of J^T u, adjoint solves", "{:d}", "bwd_rows"),
        ("mean / max forward iterations per batch", None, ("fwd_fev_mean", "fwd_fev_max")),
        ("mean / max adjoint iterations per batch", None, ("bwd_fev_mean", "bwd_fev_max")),
        ("sum of per-sample iterations, forward", "{:.0f}", "fwd_sample_iters"),
        ("sum of per-sample iterations, adjoint", "{:.0f}", "bwd_sample_iters"),
        ("converged fraction forward / adjoint", None, ("fwd_converged", "bwd_converged")),
        ("test evaluations / their CPU time [s]", None, ("evaluations", "cpu_eval")),
    ]
    width = 42
    lines = [f"{'':<{width}}" + "".join(f"{c:>18}" for c in cols)]
    for label, fmt, key in rows:
        cells = []
        for c in cols:
            t = tots[c]
            if key == ("fwd_converged", "bwd_converged"):
                cells.append(f"{_pct(t[key[0]])} / {_pct(t[key[1]])}")
            elif key == ("evaluations", "cpu_eval"):
                cells.append(f"{t[key[0]]:d} / {t[key[1]]:.1f}")
            elif key == ("time_forward_map", "time_backward_map"):
                cells.append(f"{t[key[0]]:.1f} / {t[key[1]]:.1f}")
            elif fmt is None:
                cells.append(f"{t[key[0]]:.1f} / {t[key[1]]:d}")
            else:
                cells.append(fmt.format(t[key]))
        lines.append(f"{label:<{width}}" + "".join(f"{x:>18}" for x in cells))
    if any("jac_frobenius" in t for t in tots.values()):
        lines.append(f"{'||df/dz||_F^2 estimate (last epoch)':<{width}}"
                     + "".join(f"{tots[c].get('jac_frobenius', float('nan')):>18.3g}" for c in cols))
    for name, c in (comparison or {}).items():
        tt, tc, te = c["time_to_common_acc"], c["cpu_to_common_acc"], c["epochs_to_common_acc"]
        base, t_base, t_other = c["baseline"], tt[c["baseline"]], tt[name]
        to_acc = (f"{_x(c['speedup_time_to_acc'])} wall ({t_base:.1f} s vs {t_other:.1f} s), "
                  f"{_x(c.get('speedup_cpu_to_acc'))} CPU ({tc[base]:.1f} s vs {tc[name]:.1f} s; epochs "
                  f"{te[base]:.2f} vs {te[name]:.2f})" if c["speedup_time_to_acc"] is not None else "n/a")
        to_final = c.get("cpu_to_baseline_final_acc")
        final = (f"{to_final:.1f} s CPU after {c['epochs_to_baseline_final_acc']:.2f} epochs, "
                 f"{c['cpu_to_baseline_final_acc_vs_baseline_cpu']:.2f} of forward iteration's training CPU time"
                 if to_final is not None else "not reached")
        lines += [
            "",
            f"{name} vs forward iteration (paper, Anderson on CIFAR-10: 2-8.6x speed-up, 50-88% compute saved):",
            f"  speed-up, time to {c['common_test_acc']:.2%} test accuracy (first of the test evaluations to reach "
            f"it): {to_acc}",
            f"  time to forward iteration's final test accuracy ({c['baseline_final_test_acc']:.2%}): {final}",
            f"  speed-up, total training time / per epoch: {_x(c['speedup_total_time'])} / "
            f"{_x(c['speedup_per_epoch'])}",
            f"  speed-up, forward solves / backward passes: {_x(c['speedup_forward_solve'])} / "
            f"{_x(c['speedup_backward_pass'])}",
            f"  compute saved, whole-batch evaluations, forward / adjoint / all: {_pct(c['compute_saved_forward'])} / "
            f"{_pct(c['compute_saved_backward'])} / {_pct(c['compute_saved_total'])}",
            f"  compute saved, rows (samples evaluated), forward / adjoint / all: {_pct(c['rows_saved_forward'])} / "
            f"{_pct(c['rows_saved_backward'])} / {_pct(c['rows_saved_total'])}",
            f"  iterations saved per sample, forward / adjoint / all: {_pct(c['per_sample_saved_forward'])} / "
            f"{_pct(c['per_sample_saved_backward'])} / {_pct(c['per_sample_saved_total'])}",
            f"  time per epoch saved: {_pct(c['time_per_epoch_saved'])}, i.e. "
            f"{c['time_vs_iteration_saving']:.2f} of the per-sample iteration saving (CPU time: "
            f"{_pct(c['cpu_per_epoch_saved'])}, {c['cpu_vs_iteration_saving']:.2f}; speed-up {_x(c['speedup_cpu'])})",
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
    evaluations = [e for r in runs.values() for e in getattr(r, "evaluations", [])]
    _write_text(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(e) + "\n" for e in epochs))
    if epochs:
        write_csv(os.path.join(out, "metrics.csv"), epochs)
    if batches:
        write_csv(os.path.join(out, "batches.csv"), batches)
    if evaluations:
        write_csv(os.path.join(out, "evaluations.csv"), evaluations)
    if curves:
        rows = [dict(method=m, iteration=i, residual=r, time=t) for m, c in curves.items()
                for i, r, t in zip(c["iteration"], c["residual"], c["time"])]
        write_csv(os.path.join(out, "residuals.csv"), rows)
    _write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2, default=float) + "\n")
    if plots:
        from demos.deq_plots import plot_all

        plot_all(out, runs, curves, summary, {k: evaluation_points(r) for k, r in runs.items()})


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
            runs[solver] = SimpleNamespace(solver=solver, epochs=[], batches=[], evaluations=[], train_time=0.0)
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

    def evaluations(fh):
        for row in csv.DictReader(fh):
            rec = {k: _number(v) for k, v in row.items()}
            run(rec["solver"]).evaluations.append(rec)

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
    read("evaluations.csv", evaluations, required=False)  # absent from runs made before the evaluation points
    curves = read("residuals.csv", residuals, required=False) or {}
    return runs, summary, curves


def make_parser():
    """The command line of ``python -m demos.deq_report``."""
    p = argparse.ArgumentParser(prog="python -m demos.deq_report",
        description="Recompute the totals and the comparison of a DEQ demo output folder from its records "
                    "(metrics.jsonl, batches.csv, residuals.csv), rewrite its summary.json, redraw its plots and "
                    "print the comparison table.")
    p.add_argument("out", metavar="OUT", help="output folder of demos/deq_cifar10.py (its --out)")
    return p


def main(argv=None):
    """``python -m demos.deq_report OUT``: recompute the totals and the comparison of an output folder
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

    plot_all(out, runs, curves, summary, {k: evaluation_points(r) for k, r in runs.items()})
    print(comparison_table(runs, summary["comparison"]))
    if summary.get("same_model"):  # measured by the training run at its end; kept as it was
        from demos.deq_same_model import same_model_table

        print()
        print(same_model_table(summary["same_model"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
