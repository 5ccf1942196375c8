"""Every solver on the same trained DEQ: what each solver saves on one model, apart from what it trained.

A training run compares solvers on different models: each solver's gradients train a model of its own,
and how many iterations a solve needs depends on the model as much as on the solver.  Here one trained
model's DEQ is solved by every solver on the same test batches, with the run's solver settings
(tolerance, cap, Anderson's m, β, λ and its mode, Broyden's m) and compaction on, in eval mode without
autograd (nothing in the model changes).  The solvers take turns batch by batch, so that a change in the
machine's load between solvers shows in all of them alike.

Per solver: the per-sample iterations (mean, median, largest), the rows of f (one sample in one
evaluation: what was paid), the converged fraction and the CPU seconds of the solves
(``time.process_time``).  Against forward iteration (:func:`same_model_ratios`): the ratio of rows and
the ratio of CPU time, and their quotient ``cpu_over_rows`` — 1 when every row saved is CPU time saved
and rows cost the same.  Two things move it above 1: the solver's own work per row beyond forward
iteration's (``own_s``: the solve's wall time minus the time in f, ``map_s``), and f's own cost per row,
which on a CPU depends on how many rows it is called with (a straggler's row, evaluated alone, costs less
than a row of a full batch).

Used at the end of ``demos/deq_cifar10.py`` (heading "same model" of its report and ``same_model`` in
summary.json) and by ``demos/deq_solvers.py`` on checkpoints.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from demos.deq_training import solver_options
from fixedpoint.torch import DEQ

__all__ = ["solve_same_model", "same_model_ratios", "same_model_table"]


def solve_same_model(model, solvers, cfg, backend, batches, n_batches):
    """Solve the DEQ of ``model`` with each of ``solvers`` on the first ``n_batches`` of ``batches``.

    Parameters
    ----------
    model : demos.deq_model.DEQClassifier
        The trained model; its weights and buffers are not changed (eval mode, no autograd; its mode
        is restored afterwards).
    solvers : sequence of str
        Solver names (``demos.deq_training.SOLVERS``).
    cfg : argparse.Namespace
        The run's settings (the demo's flags or a checkpoint's ``config``), read by
        :func:`demos.deq_training.solver_options`; compaction is on and gradients implicit here.
    backend : str
        The solver backend ("numpy", "cupy" or "torch").
    batches : demos.batches.Batches
        Test batches (their epoch 0, in order).
    n_batches : int
        Batches solved, >= 1 (fewer when there are fewer).

    Returns
    -------
    dict
        solver -> dict(samples, iterations_mean, iterations_median, iterations_max, rows, converged, cpu_s,
        reduction_median, wall_s, map_s, own_s): ``reduction_median`` is the median over the samples of the
        mean factor by which the residual fell per iteration (:func:`_reduction_per_iteration`); ``wall_s``
        the wall seconds of the solves, ``map_s`` the part spent in f (NaN on a GPU, where it is not
        measured) and ``own_s`` the rest, the solver's own work.
    """
    cfg = argparse.Namespace(**dict(vars(cfg), compact="on", gradient="implicit", whole_batch=False))
    layers = {}
    for s in solvers:
        layers[s] = DEQ(model.deq.f, **{**solver_options(s, cfg, backend), "unconverged": "ignore"}).eval()
    was_training = model.training
    model.eval()
    acc = {s: dict(iters=[], reduction=[], rows=0, converged=0.0, cpu=0.0, wall=0.0, map=0.0) for s in solvers}
    try:
        with torch.no_grad():
            for b, (_, images, _) in enumerate(batches.epoch(0)):
                if b == n_batches:
                    break
                x = model.injection(images)
                if b == 0:  # warm-up of each solver (lazy set-up in the libraries), not measured
                    for layer in layers.values():
                        layer(x[:1])
                for s, layer in layers.items():
                    c0 = time.process_time()
                    layer(x)
                    acc[s]["cpu"] += time.process_time() - c0
                    st = layer.stats.forward
                    acc[s]["wall"] += st.wall_time
                    acc[s]["map"] += st.map_time if st.map_time is not None else float("nan")
                    hist = np.asarray(st.residual_history, dtype=float)
                    acc[s]["iters"].append(np.isfinite(hist).sum(axis=0))
                    acc[s]["reduction"].append(_reduction_per_iteration(hist))
                    acc[s]["rows"] += st.n_rows
                    acc[s]["converged"] += st.converged_fraction * images.shape[0]
    finally:
        model.train(was_training)
    out = {}
    for s, a in acc.items():
        it = np.concatenate(a["iters"])
        out[s] = dict(samples=int(it.size), iterations_mean=float(it.mean()), iterations_median=float(np.median(it)),
                      iterations_max=int(it.max()), rows=int(a["rows"]), converged=float(a["converged"] / it.size),
                      cpu_s=float(a["cpu"]), reduction_median=float(np.nanmedian(np.concatenate(a["reduction"]))),
                      wall_s=float(a["wall"]), map_s=float(a["map"]), own_s=float(a["wall"] - a["map"]))
    return out


def _reduction_per_iteration(hist):
    """Per sample, the mean factor by which the residual fell per iteration, (r_last / r_first)^(1 / (k − 1)),
    from a residual history of shape (iterations, samples) with NaN after a sample stopped; NaN for a sample
    that made fewer than 2 iterations.  For forward iteration it estimates the contraction factor of f
    near z* (the spectral radius of ∂f/∂z when the solve is long enough)."""
    k = np.isfinite(hist).sum(axis=0)
    first = hist[0]
    last = hist[np.maximum(k - 1, 0), np.arange(hist.shape[1])]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (last / first) ** (1.0 / (k - 1))
    return np.where(k >= 2, out, np.nan)


def same_model_ratios(measurements, base="forward"):
    """Each solver against ``base`` on one model: dict solver -> dict(rows_ratio, cpu_ratio, cpu_over_rows,
    rows_saved, cpu_saved, cpu_saved_over_rows_saved); {} when ``base`` was not measured.

    ``cpu_over_rows`` = cpu_ratio / rows_ratio: the factor by which the solver's CPU time exceeds what its
    rows alone would predict (issue 19's target: at most 1.15).
    """
    ref = measurements.get(base)
    if ref is None:
        return {}
    out = {}
    for s, m in measurements.items():
        if s == base:
            continue
        rows, cpu = m["rows"] / ref["rows"], m["cpu_s"] / ref["cpu_s"]
        saved_rows, saved_cpu = 1.0 - rows, 1.0 - cpu
        out[s] = dict(rows_ratio=rows, cpu_ratio=cpu, cpu_over_rows=cpu / rows, rows_saved=saved_rows,
                      cpu_saved=saved_cpu,
                      cpu_saved_over_rows_saved=saved_cpu / saved_rows if saved_rows else float("nan"))
    return out


def _per_row(r):
    """" (per row: f … ms, solver … ms)" when the time in f was measured (CPU runs), else ""."""
    if not r["rows"] or not np.isfinite(r.get("map_s", float("nan"))):
        return ""
    return f" (per row: f {1e3 * r['map_s'] / r['rows']:.3f} ms, solver {1e3 * r['own_s'] / r['rows']:.3f} ms)"


def same_model_table(same):
    """The printed "same model" table of ``summary["same_model"]`` (trained_with -> dict(measurements, ratios))."""
    lines = ["same model: each final model solved by every solver on the same test batches (compaction on, "
             "CPU seconds of the solves)"]
    for trained, res in same.items():
        lines.append(f"  model trained with {trained}:")
        for s, r in res["measurements"].items():
            line = (f"    {s:9s} iterations/sample mean {r['iterations_mean']:6.1f} median "
                    f"{r['iterations_median']:5.0f} max {r['iterations_max']:5d} | rows {r['rows']:7d} | "
                    f"converged {r['converged']:6.1%} | "
                    + (f"residual x{r['reduction_median']:.3f} per iteration | " if "reduction_median" in r else "")
                    + f"CPU {r['cpu_s']:7.2f} s"
                    + _per_row(r))
            q = res["ratios"].get(s)
            if q is not None:
                line += (f" | vs forward: rows {q['rows_ratio']:.2f}, CPU {q['cpu_ratio']:.2f}, CPU/rows "
                         f"{q['cpu_over_rows']:.2f}")
            lines.append(line)
    return "\n".join(lines)
