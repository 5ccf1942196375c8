"""Package-level properties: light import, no per-iteration allocations of size n."""

import subprocess
import sys
import tracemalloc

import numpy as np

import fixedpoint


def test_import_does_not_pull_heavy_libraries():
    code = (
        "import sys, fixedpoint, fixedpoint.problems; "
        "print(' '.join(m for m in ('torch', 'cupy', 'scipy', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _peak_after_warmup(method, n, m=5, iters=40):
    """Peak traced memory over iterations m+2 .. iters, minus the memory in use when they began."""
    buf = np.empty(n)
    c = np.linspace(0.0, 1.0, n)

    def g(x):  # writes into its own buffer: allocates nothing
        np.multiply(x, 0.5, out=buf)
        np.add(buf, c, out=buf)
        return buf

    mark = {}

    def cb(info):
        if info.iteration == m + 2:
            tracemalloc.reset_peak()
            mark["base"] = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        own = {"m": m} if method == "anderson" else {}
        fixedpoint.solve(g, np.zeros(n), method=method, tol=1e-300, max_iter=iters, callback=cb, **own)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - mark["base"]


def test_no_allocation_of_size_n_inside_the_loop():
    n = 200_000  # 1.6 MB per vector
    for method in ("anderson", "forward"):
        extra = _peak_after_warmup(method, n)
        assert extra < n * 8 // 4, (method, extra)
