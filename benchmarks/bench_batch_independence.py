"""Does a sample's solve depend on its batch?  Iteration counts of hard samples alone, in a batch, compacted.

B = 2,000 samples of n = 256, float32, Anderson (m = 5), relative tolerance 1e-6; the map
g_i(z) = r_i tanh(½ z + ¼ (roll(z, 1) + roll(z, −1))) + u_i is computed entry by entry from the
sample's own row, so g's values for a sample are the same to the bit however many rows g is
given: any difference below comes from the solver.  r_i = 0.5 for 1,990 samples and 0.999 for 10
hard ones.  Printed: each hard sample's iterations in the whole batch, with ``compact=True``,
and solved alone, and how many samples' results differ between these.  Counts, not timings.

Run from the repository root::

    python -m benchmarks.bench_batch_independence --out benchmarks/results/batch_independence.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

import fixedpoint
from tooling import timing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_batch_independence",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--hard", type=int, default=10)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    B, n = args.batch, args.n
    rates = np.full((B, 1), 0.5, np.float32)
    hard = np.sort(rng.choice(B, args.hard, replace=False))
    rates[hard] = 0.999
    u = rng.standard_normal((B, n)).astype(np.float32)
    half, quarter = np.float32(0.5), np.float32(0.25)

    def g(z, rows=None):
        r, uu = (rates, u) if rows is None else (rates[rows], u[rows])
        return r * np.tanh(half * z + quarter * (np.roll(z, 1, axis=-1) + np.roll(z, -1, axis=-1))) + uu

    x0 = np.zeros((B, n), np.float32)
    kw: dict[str, Any] = dict(method="anderson", tol=1e-6, max_iter=2000)
    whole = fixedpoint.solve(g, x0, batch=True, **kw)
    compact = fixedpoint.solve(g, x0, batch=True, compact=True, **kw)
    alone = [fixedpoint.solve(lambda z, i=i: g(z[None], np.array([i]))[0], x0[i], **kw) for i in hard]
    res = dict(machine=timing.machine_info(()), settings=vars(args) | {"out": str(args.out)},
               hard_samples=hard.tolist(),
               iterations_whole_batch=np.asarray(whole.n_iter)[hard].tolist(),
               iterations_compact=np.asarray(compact.n_iter)[hard].tolist(),
               iterations_alone=[int(a.n_iter) for a in alone],
               samples_differing_compact=int((np.asarray(whole.x) != np.asarray(compact.x)).any(axis=1).sum()),
               hard_samples_differing_alone=int(sum(bool((np.asarray(a.x) != np.asarray(whole.x[i])).any())
                                                    for a, i in zip(alone, hard))))
    print(f"hard samples' iterations: whole batch {res['iterations_whole_batch']}\n"
          f"                          compact     {res['iterations_compact']}\n"
          f"                          alone       {res['iterations_alone']}\n"
          f"samples whose result differs with compact=True: {res['samples_differing_compact']} of {B}; "
          f"hard samples whose result differs alone: {res['hard_samples_differing_alone']} of {len(hard)}")
    if args.out:
        print(f"wrote {timing.write_json(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
