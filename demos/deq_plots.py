"""PNG plots of the DEQ demo (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

__all__ = ["plot_all", "plot_accuracy", "plot_residuals", "plot_iterations"]

COLORS = {"forward": "tab:blue", "anderson": "tab:red", "broyden": "tab:green"}
LABELS = {"forward": "forward iteration", "anderson": "Anderson", "broyden": "Broyden"}


def _legend(ax):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _title(summary):
    s = summary.get("settings", {})
    return f"DEQ on {s.get('dataset', '?')}, {s.get('device', '?')} ({s.get('solver_backend', '?')} solver)"


#: Above this ratio of the runs' training times, the time axis of accuracy_vs_time.png is logarithmic.
LOG_TIME_RATIO = 10.0


def _save(fig, path):
    """Save ``fig`` to ``path`` and release it from pyplot; returns the figure (for inspection)."""
    fig.savefig(path)
    plt.close(fig)
    return fig


def plot_accuracy(path, runs, summary, points):
    """Test accuracy at every test evaluation (``points``: solver -> its evaluation records, several per
    epoch, :func:`demos.deq_report.evaluation_points`) and train accuracy after each epoch, against the
    training CPU time so far (evaluation excluded); against the training wall time for runs recorded
    before the demo measured CPU time.

    When one run took more than :data:`LOG_TIME_RATIO` times as long as another, the time axis
    is logarithmic, so that the faster run is not squashed against the axis.  Returns the figure.
    """
    records = [e for name, run in runs.items() if run.epochs for e in (*points[name], *run.epochs)]
    cpu = all(math.isfinite(e.get("cpu_cumulative", math.nan)) for e in records)
    key = "cpu_cumulative" if cpu else "time_cumulative"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ends = [run.epochs[-1][key] for run in runs.values() if run.epochs]
    if len(ends) > 1 and min(ends) > 0 and max(ends) > LOG_TIME_RATIO * min(ends):
        ax.set_xscale("log")
    for name, run in runs.items():
        if not run.epochs:
            continue
        c, mine = COLORS.get(name), points[name]
        ax.plot([e[key] for e in mine], [e["test_acc"] for e in mine], "o-", color=c, ms=4,
                label=f"{LABELS.get(name, name)}, test")
        ax.plot([e[key] for e in run.epochs], [e["train_acc"] for e in run.epochs], "s--", color=c,
                alpha=0.6, label=f"{LABELS.get(name, name)}, train (epoch mean)")
    scale = " (log scale)" if ax.get_xscale() == "log" else ""
    ax.set_xlabel(f"training {'CPU' if cpu else 'wall'} time [s]{scale}")
    ax.set_ylabel("accuracy")
    ax.set_title(_title(summary), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_residuals(path, curves, summary):
    """Relative residual of one fixed batch against iteration and against wall time (the paper's Figure 1).

    Returns the figure."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    tol = summary.get("settings", {}).get("tol")
    for name, c in curves.items():
        kw = dict(color=COLORS.get(name), label=LABELS.get(name, name), lw=1.5)
        axes[0].semilogy(c["iteration"], c["residual"], **kw)
        axes[1].semilogy(c["time"], c["residual"], **kw)
    for ax, xlabel in zip(axes, ("iteration", "wall time [s]")):
        if tol:
            ax.axhline(tol, color="gray", ls=":", lw=1, label=f"training tolerance {tol:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(r"relative residual $\|f(z)-z\| / \|f(z)\|$")
        ax.grid(alpha=0.3, which="both")
        _legend(ax)
    fig.suptitle(_title(summary) + ": one fixed batch, trained model", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_iterations(path, runs, summary):
    """Solver iterations of every training batch: evaluations per batch (the slowest sample), rows of f
    per sample of the batch (what was paid: with compaction close to the mean iterations per sample),
    and mean iterations per sample.

    The logarithmic axes are labelled with plain numbers (20, 30, 100), also between powers of ten.
    Returns the figure."""
    panels = [("fwd_fev", "bwd_fev", "evaluations per batch (slowest sample)"),
              ("fwd_rows", "bwd_rows", "rows of f per sample (paid)"),
              ("fwd_iter_mean", "bwd_iter_mean", "mean iterations per sample")]
    recorded = [b for run in runs.values() for b in run.batches]
    if recorded:  # records of older runs lack the rows
        panels = [p for p in panels if any(p[0] in b for b in recorded)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4), dpi=80, squeeze=False)
    axes = axes[0]
    for name, run in runs.items():
        if not run.batches:
            continue
        steps = [b["step"] for b in run.batches]
        c, label = COLORS.get(name), LABELS.get(name, name)
        for ax, (fwd, bwd, _) in zip(axes, panels):
            per = (lambda b: b["size"]) if fwd == "fwd_rows" else (lambda b: 1)
            ax.plot(steps, [b.get(fwd, float("nan")) / per(b) for b in run.batches], "-", color=c, lw=1,
                    label=f"{label}, forward solve")
            ax.plot(steps, [b.get(bwd, float("nan")) / per(b) for b in run.batches], ":", color=c, lw=1,
                    label=f"{label}, adjoint solve")
    for ax, (_, _, ylabel) in zip(axes, panels):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.set_xlabel("training batch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        _legend(ax)
    fig.suptitle(_title(summary), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_all(out, runs, curves, summary, points):
    """Write accuracy_vs_time.png, iterations_per_batch.png and (with curves) residuals.png into ``out``;
    ``points`` as for :func:`plot_accuracy`."""
    plot_accuracy(os.path.join(out, "accuracy_vs_time.png"), runs, summary, points)
    plot_iterations(os.path.join(out, "iterations_per_batch.png"), runs, summary)
    if curves:
        plot_residuals(os.path.join(out, "residuals.png"), curves, summary)

