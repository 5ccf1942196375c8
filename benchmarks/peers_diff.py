"""Two runs of ``compare_peers``, side by side: did fixedpoint lose ground against a peer between them?

For every problem, method and peer that both JSON files hold, it prints fixedpoint's and the peer's
evaluations and fixedpoint's time as a fraction of the peer's (fixedpoint on the peer's reference library:
NumPy against SciPy and JAXopt, PyTorch against torchdeq), before and after, and flags

- ``FEV-WORSE``: fixedpoint needed no more evaluations than the peer before, and more after;
- ``TIME-WORSE``: fixedpoint was faster than the peer before, and not after.

A time flag compares ratios taken within each run (the peers ran in the same process, taking turns), so a
peer whose own time moved between the runs moves the ratio too: look at the times themselves
(``--times``) before reading a flag as a change in fixedpoint.  Run from the repository root::

    python -m benchmarks.peers_diff OLD.json benchmarks/results/peers.json [--times]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: fixedpoint's solver that each peer is compared with (compare_peers' REFERENCE_LIBRARY).
OURS = {"scipy": "fixedpoint[numpy]", "jaxopt": "fixedpoint[numpy]", "torchdeq": "fixedpoint[torch]"}


def _rows(path: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    runs = json.loads(path.read_text())["runs"]
    return {(r["problem"], r["solver"], r["method"]): r for r in runs if "n_fev" in r}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers_diff", description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--times", action="store_true", help="also print each solver's median times (ms)")
    args = p.parse_args(argv)
    old, new = _rows(args.old), _rows(args.new)
    print(f"old: {args.old}\nnew: {args.new}")
    print(f"{'problem':15s} {'method':8s} {'peer':9s} {'fev old':>9s} {'fev new':>9s} {'t/peer old':>10s} "
          f"{'t/peer new':>10s}" + ("  ms ours old/new, peer old/new" if args.times else ""))
    flagged = 0
    for (prob, solver, method), peer_new in sorted(new.items()):
        ours = OURS.get(solver)
        if ours is None:
            continue
        keys = [(prob, solver, method), (prob, ours, method)]
        if not all(k in old and k in new for k in keys):
            continue
        peer_old, us_old, us_new = old[keys[0]], old[keys[1]], new[keys[1]]
        t_old = us_old["time_s"]["median"] / peer_old["time_s"]["median"]
        t_new = us_new["time_s"]["median"] / peer_new["time_s"]["median"]
        flags = ""
        if us_old["n_fev"] <= peer_old["n_fev"] and us_new["n_fev"] > peer_new["n_fev"]:
            flags += " FEV-WORSE"
        if t_old < 1.0 <= t_new:
            flags += " TIME-WORSE"
        flagged += bool(flags)
        times = (f"  {1e3 * us_old['time_s']['median']:.1f}/{1e3 * us_new['time_s']['median']:.1f}, "
                 f"{1e3 * peer_old['time_s']['median']:.1f}/{1e3 * peer_new['time_s']['median']:.1f}"
                 if args.times else "")
        print(f"{prob:15s} {method:8s} {solver:9s} {us_old['n_fev']:>4}/{peer_old['n_fev']:<4} "
              f"{us_new['n_fev']:>4}/{peer_new['n_fev']:<4} {t_old:10.2f} {t_new:10.2f}{times}{flags}")
    print(f"{flagged} flagged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
