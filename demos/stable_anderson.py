"""Anderson acceleration of training, plain and stabilised by the moving average (arXiv 2110.14813).

Trains each problem with Adam alone, with Adam + Anderson (``average="off"``) and with Adam +
stabilised Anderson (``average="auto"``), from the same initial weights and on the same sequence
of mini-batches, for a small and a large batch size, and records the training loss and the
problem's error against optimizer steps and training wall time (evaluation excluded).  The
Anderson runs use the closure safeguard unless ``--no-safeguard`` is given.

    python -m demos.stable_anderson --out docs/results/stable_anderson
    python -m demos.stable_anderson --quick --out /tmp/stable_anderson     # seconds, for tests

Writes ``metrics.json`` (every curve, every extrapolation's status and RSD, the settings and the
machine), ``summary.csv`` (one row per run) and PNG plots into ``--out`` (default
``out/stable_anderson``); a folder that holds an earlier run is refused unless ``--overwrite``
is given (one line on stderr, exit status 2).  torch uses as many threads as there are idle CPUs unless ``--threads``
says otherwise (the models are small: on a busy machine extra threads only spin).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from demos.cli import (
    Refused,
    add_overwrite_flag,
    add_progress_flag,
    check_out_folder,
    make_out_folder,
    progress_disabled,
    refuse,
)
from demos.stable_anderson_problems import PROBLEMS
from fixedpoint.torch import AndersonAcceleration
from tooling.timing import (
    add_threads_flag,
    machine_info,
    positive_float,
    positive_int,
    run_command,
    use_threads,
    write_csv,
)

METHODS = ("adam", "anderson", "stable_anderson")
LABELS = {"adam": "Adam", "anderson": "Adam + AA", "stable_anderson": "Adam + stable AA (auto average)"}

#: Per-problem settings of the full run: steps, evaluation interval, learning rate, batch sizes.
SETTINGS = {
    "mlp_diabetes": dict(steps=3000, eval_every=25, lr=1e-3, batches=(16, None)),
    "burgers_pinn": dict(steps=3000, eval_every=50, lr=1e-3, batches=(128, 2048)),
}
QUICK = dict(steps=20, eval_every=10)


def train(problem, method, batch, steps, eval_every, lr, aa, seed, progress=True):
    """One run; returns the curves, the wrapper's log and its summary."""
    model = problem.model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if method != "adam":
        opt = AndersonAcceleration(opt, average="off" if method == "anderson" else "auto", **aa)
    gen = torch.Generator().manual_seed(seed + 1)
    first = problem.evaluate(model)
    curve = {"step": [0], "time": [0.0], **{k: [v] for k, v in first.items()}}
    elapsed = 0.0
    label = f"{problem.name} b={batch or 'full'} {method}"
    for step in tqdm(range(1, steps + 1), desc=label, leave=False, disable=not progress, mininterval=1.0):
        idx = problem.sample(gen, batch)

        def closure(idx=idx):
            opt.zero_grad()
            loss = problem.loss(model, idx)
            loss.backward()
            return loss

        t0 = time.perf_counter()
        opt.step(closure)
        elapsed += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            curve["step"].append(step)
            curve["time"].append(elapsed)
            for k, v in problem.evaluate(model).items():
                curve[k].append(v)
    log, summary = None, None
    if method != "adam":
        log = [r for r in opt.records if r.group == 0]  # one entry per extrapolation (all groups alike here)
        log = dict(step=[r.step for r in log], status=[r.status for r in log], averaged=[int(r.averaged) for r in log],
                   rsd=[None if math.isnan(r.rsd) else float(f"{r.rsd:.4g}") for r in log])
        summary = opt.summary()
    return dict(curve=curve, log=log, summary=summary)


SMOOTH = 5  # evaluations in the trailing geometric mean that smooths the noisy loss curves


def smoothed(values):
    logs = np.log(np.maximum(np.asarray(values, dtype=float), 1e-300))
    return np.exp([logs[max(0, i - SMOOTH + 1):i + 1].mean() for i in range(len(logs))])


def first_reaching(curve, key, target):
    """(step, time) of the first evaluation whose smoothed curve[key] is <= target, or (None, None)."""
    for s, t, v in zip(curve["step"], curve["time"], smoothed(curve[key])):
        if v <= target:
            return s, t
    return None, None


def summarise(results):
    rows = []
    for (pname, batch), runs in results.items():
        metric = PROBLEMS[pname].metric
        target = smoothed(runs["adam"]["curve"]["train_loss"])[-1]  # Adam's final loss, smoothed
        for method, run in runs.items():
            c, s = run["curve"], run["summary"] or {}
            step_t, time_t = first_reaching(c, "train_loss", target)
            rsds = [v for v in (run["log"] or {}).get("rsd", []) if v is not None]
            tried = sum(s.get(k, 0) for k in ("accepted", "rejected", "restart"))
            rows.append(dict(
                problem=pname, batch="full" if batch is None else batch, method=method,
                steps=c["step"][-1], train_time_s=round(c["time"][-1], 3),
                final_train_loss=c["train_loss"][-1], best_train_loss=min(c["train_loss"]),
                metric=metric, final_metric=c[metric][-1], best_metric=min(c[metric]),
                smoothed_final_train_loss=float(smoothed(c["train_loss"])[-1]),
                steps_to_adam_final_loss=step_t, time_to_adam_final_loss_s=None if time_t is None else round(time_t, 3),
                extrapolations=tried, accepted=s.get("accepted", 0), rejected=s.get("rejected", 0),
                restarts=s.get("restart", 0),
                averaged_fraction=(s["averaged"] / s["stores"]) if s.get("stores") else None,
                median_rsd=float(np.median(rsds)) if rsds else None))
    return rows


def plot(results, out, threshold):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"adam": "0.35", "anderson": "tab:orange", "stable_anderson": "tab:blue"}
    written = []
    for pname in dict.fromkeys(p for p, _ in results):
        batches = [b for p, b in results if p == pname]
        for key in ("train_loss", PROBLEMS[pname].metric):
            fig, axes = plt.subplots(len(batches), 2, figsize=(10, 3.3 * len(batches)), squeeze=False)
            for row, batch in enumerate(batches):
                for method, run in results[(pname, batch)].items():
                    c = run["curve"]
                    for col, xkey in enumerate(("step", "time")):
                        axes[row, col].semilogy(c[xkey], c[key], color=colors[method], label=LABELS[method], lw=1.2)
                bname = "full batch" if batch is None else f"batch {batch}"
                axes[row, 0].set_title(f"{pname}, {bname}")
                axes[row, 1].set_title(f"{pname}, {bname}")
                axes[row, 0].set_xlabel("optimizer steps")
                axes[row, 1].set_xlabel("training wall time [s]")
                for ax in axes[row]:
                    ax.set_ylabel(key)
                    ax.grid(True, which="both", alpha=0.3)
            axes[0, 0].legend(fontsize=8)
            fig.tight_layout()
            path = out / f"{pname}_{key}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            written.append(path)
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3), squeeze=False)
    for ax, ((pname, batch), runs) in zip(axes[0], results.items()):
        log = runs["stable_anderson"]["log"]
        pts = [(st, v) for st, v in zip(log["step"], log["rsd"]) if v is not None]
        if pts:
            ax.semilogy(*zip(*pts), ".", ms=2, color="tab:blue")
        ax.axhline(threshold, color="k", lw=0.8, ls="--")
        ax.set_title(f"{pname}, {'full' if batch is None else batch}", fontsize=9)
        ax.set_xlabel("optimizer steps")
    axes[0, 0].set_ylabel("RSD of the steps (auto)")
    fig.tight_layout()
    path = out / "rsd.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return written + [path]


def output_names():
    """Every file the demo may write into --out (those of an earlier run are refused without --overwrite)."""
    plots = {f"{name}_{key}.png" for name, problem in PROBLEMS.items() for key in ("train_loss", problem.metric)}
    return {"metrics.json", "summary.csv", "rsd.png"} | plots


def make_parser():
    """The command line of the demo (``--help`` shows every default once)."""
    ap = argparse.ArgumentParser(prog="python -m demos.stable_anderson", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/stable_anderson"),
                    help="output folder; one that holds an earlier run is refused unless --overwrite is given "
                         "(default: %(default)s)")
    add_overwrite_flag(ap, "an earlier run in --out (its metrics.json, summary.csv and plots are deleted first)")
    ap.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=list(PROBLEMS),
                    help=f"problems to train (default: {' '.join(PROBLEMS)})")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK['steps']} steps per run and small problems, for tests")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help="optimizer steps per run (default: per problem, "
                         + ", ".join(f"{k} {v['steps']}" for k, v in SETTINGS.items()) + ")")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches (default: %(default)s)")
    ap.add_argument("--m", type=positive_int, default=5, help="Anderson window m (default: %(default)s)")
    ap.add_argument("--beta", type=float, default=1.0, help="mixing (relaxation) beta in (0, 1] (default: %(default)s)")
    ap.add_argument("--lam", type=float, default=1e-2, help="regularisation lambda, relative (default: %(default)s)")
    ap.add_argument("--store-every", type=positive_int, default=5,
                    help="store an iterate every this many steps (default: %(default)s)")
    ap.add_argument("--every", type=positive_int, default=None,
                    help="extrapolate every this many steps (default: the value of --store-every)")
    ap.add_argument("--rsd-threshold", type=positive_float, default=0.1,
                    help="RSD above which the auto mode stores moving averages (default: %(default)s)")
    ap.add_argument("--safeguard", action=argparse.BooleanOptionalAction, default=True,
                    help="keep an extrapolate only if the batch loss does not rise (default: on)")
    add_threads_flag(ap)
    add_progress_flag(ap)
    return ap


def _reached(row):
    if row["steps_to_adam_final_loss"] is None:
        return "never"
    return f"step {row['steps_to_adam_final_loss']} ({row['time_to_adam_final_loss_s']:.1f} s)"


def _averaged(row):
    if row["averaged_fraction"] is None:
        return ""
    return f"  moving average {row['averaged_fraction']:.0%}"


def main(argv=None):
    ap = make_parser()
    args = ap.parse_args(argv)
    if not 0 < args.beta <= 1:
        ap.error(f"--beta must be in (0, 1], got {args.beta}")
    if not 0 <= args.lam < math.inf:
        ap.error(f"--lam must be a number >= 0, got {args.lam}")
    if args.every is not None and args.every % args.store_every:
        ap.error(f"--every must be a multiple of --store-every ({args.store_every}), got {args.every}")
    aa = dict(m=args.m, beta=args.beta, lam=args.lam, store_every=args.store_every, every=args.every,
              rsd_threshold=args.rsd_threshold, safeguard=args.safeguard)
    try:  # any other combination the wrapper refuses, before anything is trained or written
        AndersonAcceleration(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), **aa)
    except ValueError as exc:
        ap.error(f"the Anderson flags (--m, --beta, --lam, --store-every, --every, --rsd-threshold): {exc}")
    try:
        earlier = check_out_folder(args.out, output_names(), overwrite=args.overwrite)
        print(use_threads(args.threads), flush=True)
        make_out_folder(args.out, earlier if args.overwrite else ())
    except Refused as exc:
        return refuse(exc)
    progress = not progress_disabled(args.no_progress)
    results, settings = {}, {}
    for pname in args.problems:
        st = dict(SETTINGS[pname])
        kwargs = {}
        if args.quick:
            st.update(QUICK)
            kwargs = dict(n_collocation=256, n_initial=32, n_boundary=32) if pname == "burgers_pinn" else {}
        if args.steps is not None:
            st["steps"] = args.steps
        problem = PROBLEMS[pname](**kwargs)
        settings[pname] = dict(st, problem_kwargs=kwargs)
        for batch in st["batches"]:
            runs = {}
            for method in METHODS:
                runs[method] = train(problem, method, batch, st["steps"], st["eval_every"], st["lr"], aa, args.seed,
                                     progress=progress)
            results[(pname, batch)] = runs
    rows = summarise(results)
    write_csv(args.out / "summary.csv", rows)
    command = " ".join(run_command("demos.stable_anderson", argv))
    payload = dict(command=command, machine=machine_info({"torch"}), anderson_options=aa, settings=settings,
                   quick=args.quick, seed=args.seed,
                   summary=rows,
                   runs=[dict(problem=p, batch="full" if b is None else b, method=m, **run)
                         for (p, b), runs in results.items() for m, run in runs.items()])
    with open(args.out / "metrics.json", "w") as fh:
        json.dump(payload, fh, default=str)
    plots = plot(results, args.out, args.rsd_threshold)
    print("Final training loss and training time of each run; 'reached Adam's final loss': the first step at which "
          "the smoothed loss (trailing geometric mean of the last 5 evaluations) is at or below Adam's smoothed final "
          "loss; 'moving average': the share of stored iterates that were moving averages (always 0% with "
          "average='off', chosen by the RSD with 'auto').")
    for r in rows:
        print(f"{r['problem']:>13} batch {str(r['batch']):>5} {r['method']:>16}: "
              f"train loss {r['final_train_loss']:.3e}  "
              f"time {r['train_time_s']:.1f} s  reached Adam's final loss: {_reached(r)}{_averaged(r)}")
    print(f"wrote {args.out / 'summary.csv'}, {args.out / 'metrics.json'} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
