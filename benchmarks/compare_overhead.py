"""bench_overhead.py of two checkouts, run alternately, and the ratio of their times per iteration.

Anderson's own cost per iteration of the working tree against another checkout (e.g.
the commit before a change, made with ``git worktree add --detach DIR REV``): each
round runs ``benchmarks/bench_overhead.py`` of the other tree, then of this one, with
the same arguments, so that a slow spell of a shared machine hits both; per (dtype,
n, m) the median over rounds of each tree's time, and new / old.  Each run writes its
JSON into ``--work``; the comparison goes to ``--out``.

    python -m benchmarks.compare_overhead --old /tmp/base --rounds 3 -- --backend numpy --dtype float64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tooling import timing

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, args: list[str], out: Path) -> dict:
    """One bench_overhead run of ``tree`` (its own fixedpoint first on the path); returns its JSON."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, "-m", "benchmarks.bench_overhead", *args, "--out", str(out)],
                   check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the other checkout (a folder with fixedpoint/ and benchmarks/)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--work", default=None, help="folder for the runs' JSON (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead_compare.json"))
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for bench_overhead.py, after --")
    args = ap.parse_args(argv)
    bench_args = [a for a in args.bench_args if a != "--"]
    old, new = Path(args.old).resolve(), ROOT
    work = Path(args.work or tempfile.mkdtemp(prefix="overhead-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    times: dict[tuple, dict[str, list[float]]] = {}
    commits: dict[str, str | None] = {}  # each tree's commit, as its own run recorded it
    for i in range(args.rounds):
        for name, tree in (("old", old), ("new", new)):
            data = run(tree, bench_args, work / f"{name}{i}.json")
            commits[name] = data.get("machine", {}).get("git_commit")
            for r in data["results"]:
                times.setdefault((r["dtype"], r["n"], r["m"]), {"old": [], "new": []})[name].append(
                    r["time_per_iter_s"])
            print(f"round {i + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
    rows = []
    for (dtype, n, m), t in sorted(times.items()):
        o, nw = statistics.median(t["old"]), statistics.median(t["new"])
        rows.append(dict(dtype=dtype, n=n, m=m, old_us=1e6 * o, new_us=1e6 * nw, ratio=nw / o,
                         old_runs=t["old"], new_runs=t["new"]))
    timing.print_table(rows, [("dtype", "dtype", "{}"), ("n", "n", "{:.0e}"), ("m", "m", "{}"),
                              ("old_us", "old us/iter", "{:.1f}"), ("new_us", "new us/iter", "{:.1f}"),
                              ("ratio", "new/old", "{:.2f}")])
    ratios = [r["ratio"] for r in rows]
    print(f"\nold: {old} at commit {commits.get('old')}; new: {new} at commit {commits.get('new')}")
    print(f"new/old over {len(rows)} configurations: median {statistics.median(ratios):.2f}, "
          f"min {min(ratios):.2f}, max {max(ratios):.2f}")
    path = timing.write_json(args.out, dict(benchmark="compare_overhead",
                                            command=timing.run_command("benchmarks.compare_overhead"), old=str(old),
                                            old_commit=commits.get("old"), new_commit=commits.get("new"),
                                            machine=timing.machine_info({"numpy"}), rounds=args.rounds,
                                            bench_args=bench_args, rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
