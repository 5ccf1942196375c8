"""fixedpoint against its peers: torchdeq, SciPy and JAXopt on the same maps, initial guesses and tolerances.

Solvers compared (each on the problem's map in its own array library):

- fixedpoint ``solve`` with ``ForwardIteration()``, ``Anderson()`` (m=5) and ``Broyden()`` (m=20), on NumPy and
  on PyTorch (CPU);
- torchdeq's solvers called directly (``torchdeq.solver.fixed_point_iter``, ``anderson_solver``,
  ``broyden_solver``), on PyTorch;
- SciPy: ``scipy.optimize.fixed_point`` (its default is Steffensen's method with Aitken's del², not plain
  forward iteration), ``scipy.optimize.anderson`` and ``scipy.optimize.broyden1``, on NumPy;
- JAXopt: ``FixedPointIteration`` and ``AndersonAcceleration``, jit-compiled (``jax.vmap`` over the batch for
  batched problems), timed after compilation.

Problems: Chandrasekhar's H-equation (N = 200 Gauss–Legendre nodes at c = 0.9, 0.99, 0.9999; N = 2000 at
c = 0.9, 0.99; float64, tol 1e-8), the DEQ-like tanh layer (B = 32, d = 4096, rho = 0.9, float32, tol 1e-4),
the cheap Poisson–Jacobi sweep (B = 32 samples of n = 32768, shift 0.5, float32, tol 1e-4; its solution is
of order 1e-9, so the same sweep is also run on the unknowns scaled by (n + 1)², "poisson-scaled", to separate
scale effects from the rest) and the convolutional DEQ cell of demos/deq_model.py (B = 32 × 16 channels × 16 × 16,
float32, tol 1e-4; PyTorch, which SciPy and fixedpoint on NumPy call through ``torch.from_numpy``; no JAX version).
The iteration budget is 1000 for the H-equation and 100 for the others (``--quick``: 60).

The cases of issue 22 (``--problems issue22``, or each group or key on its own):

- ``h-equation-16`` / ``h-equation-20``: the H-equation from H = 1 at tol 1e-10 (relative 2-norm), budget 1000,
  float64, with the midpoint rule (μ_i = (i − 1/2)/N, w_i = 1/N) and Gauss–Legendre, N = 100 and 1000,
  c ∈ {0.5, 0.9, 0.99, 0.999, 0.9999}: keys ``h-mid100-c0.9999``, ``h-gl1000-c0.5``, ...  That is 20 cases; the
  issue counts 16, which is the reading that keeps every case it names (its 6 failures are at c = 0.999 and
  0.9999, its 8 hard cases c ∈ {0.999, 0.9999} × 2 rules × 2 N): c ∈ {0.9, 0.99, 0.999, 0.9999}.  All 20 run in
  ``h-equation-20`` (and by default); the target is computed on the 16 (group ``h-equation-16``) and the c = 0.5
  cases are reported besides.  Target: fixedpoint[numpy]'s default Anderson finds the physical root in 16/16
  (the moment test (c/2) Σ w_i H_i = 1 − √(1 − c) of ``problems.chandrasekhar``) with evaluations <= SciPy
  anderson's in every case.  The original cases above (Gauss–Legendre, tol 1e-8) are kept as they were.
- ``broyden-small``: g(x) = tanh(A x) + b, n = 5, A Gaussian (seed 0) scaled to ‖A‖₂ = 0.95, b ~ N(0, 1), x0 = 0,
  float64, tol 1e-12 on the *absolute* ‖g(x) − x‖₂ (``stop_mode="abs"``; SciPy's ``tol_norm`` is then the 2-norm,
  torchdeq's ``stop_mode="abs"``, JAXopt's tol is tol itself), budget 100.  Each timed run makes 200 solves (5
  with ``--quick``) and the time is per solve.  Reported: time per evaluation (median time / evaluations) and
  total time of fixedpoint's Broyden and Anderson against ``broyden1`` and ``anderson``.  Target: our Broyden's
  time per evaluation <= 1.2 × broyden1's, and its total time below broyden1's where it needs fewer evaluations.
- ``broyden-hard``: the hard batch of benchmarks/bench_broyden.py (``hard_map(400, 10, seed=0)``:
  g_i(z) = tanh(z W + u_i), W symmetric, ‖W‖₂ = 0.99, float32), relative tol 1e-6, budget 300 (``--quick``:
  n = 100, the same budget); PyTorch calls the NumPy map through ``torch.from_numpy``; no JAX version.  Per
  solver: samples converged out of 10 (the solver's own per-sample verdict: fixedpoint's ``converged``,
  torchdeq's lowest residual per sample, JAXopt's per-sample test; for SciPy, which solves the batch as one
  system, the recomputed residual) and iterations per sample (mean/max; torchdeq: the step of its lowest
  residual).  Target: fixedpoint's default Broyden converges 10/10 within 300 iterations.
- ``nonlin``: SciPy's nonlinear test problems through ``fixedpoint.root`` against SciPy's solvers, run by
  benchmarks/peers_nonlin.py (``nonlin_rows``, ``nonlin_targets``; imported when selected, skipped with a note if
  absent); its rows are printed and stored as ``nonlin_runs``, its targets under ``targets["nonlin"]``.

The JSON's ``targets["issue22"]`` and the end of the printed summary list the issue's targets side by side
(met: true, false, or null where the case did not run), with the original ones (tanh Broyden against
torchdeq; Anderson against SciPy on the tol-1e-8 H-equation cases) as its "nothing gets worse".

Every solver gets the same map, initial guess, tolerance and iteration budget, the relative stopping test
‖g(x) − x‖₂ / ‖g(x)‖₂ <= tol per sample wherever the peer can express it, and otherwise the peer's own
defaults; every setting is recorded in the JSON.  Where the semantics differ:

- torchdeq: its relative test is ‖g(x) − x‖ / (‖g(x)‖ + 1e-9) (fixedpoint adds 1e-12), and it stops when the
  largest residual of the batch is below tol, without freezing converged samples.  Its Anderson and forward
  iteration return g(x_k), not x_k; its Anderson solves the mixing system in the input dtype with an absolute
  ridge lam = 1e-4 on the unscaled Gram matrix; its Broyden keeps max_iter update pairs (``LBFGS_thres=None``),
  allocated up front, and stops early when the residual is below 3·tol and has not improved by 1.3× in 30 steps.
  A one-vector problem is passed as shape (1, n): torchdeq treats the leading axis as the batch (a 1-D input
  would make every entry its own sample).
- SciPy ``anderson``/``broyden1``: the residual F(x) = g(x) − x is handed to them, ``f_tol=tol`` with a
  ``tol_norm`` that computes the relative residual per sample from the last evaluation of g, so the test is
  fixedpoint's; the batch is one coupled system (one set of mixing weights), and their default Armijo line
  search may evaluate g more than once per iteration (maxiter counts iterations).  Inputs of g are cast to the
  problem's dtype: a backtracking step makes SciPy's float32 iterates float64.  ``fixed_point`` stops when
  every entry's relative change of its del² extrapolate is below ``xtol=tol`` (a different test; each
  iteration evaluates g twice, so maxiter is half the budget).
- JAXopt: it stops when the absolute ‖g(x) − x‖₂ <= its ``tol``, so it is given tol × ‖x*‖₂ per sample (x* from
  the problem's reference solution or a tighter fixedpoint solve in float64), equivalent to the relative test to
  first order; its Anderson takes ``history_size`` plain iterations before extrapolating, regularises with an
  absolute ridge 1e-5, and returns g(x_k).  Its state's ``num_fun_eval`` also counts an evaluation in
  ``init_state`` whose value is discarded; evaluations are taken as its ``iter_num`` (one g per iteration).

Reported per solver and problem: the peer's own verdict (status), evaluations of g (counted by wrapping g;
for JAXopt the iteration count its state reports), median time over ``--repeats`` timed runs after one warm-up
run (the solvers of a problem take turns, so a slow spell hits all of them; JAX results are waited for with
``block_until_ready``, and JAX is compiled ahead of the runs),
the ratios of both to fixedpoint's same method on the same array library (NumPy for SciPy and JAXopt, PyTorch
for torchdeq), and the final residual ‖g(x) − x‖₂ / ‖g(x)‖₂ recomputed here from the returned x in float64 (the
largest over the batch).  For the H-equation: the error against Newton's solution (the physical root) and
H(1) (≈ 2.858 on the physical root at c = 0.9999, ≈ 2.959 on the other) and the root, told by the moment test
of ``problems.chandrasekhar`` ("not a root" where the recomputed residual exceeds 100 tol).

Peers that are not installed are skipped with a note.  Run from the repository root with one thread per
library (the script sets ``torch.set_num_threads`` and, unless already set, ``XLA_FLAGS``; the BLAS pools must
be pinned in the environment)::

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
    python -m benchmarks.compare_peers                                    # everything: several minutes
    python -m benchmarks.compare_peers --quick --out /tmp/peers.json      # small sizes, one repeat: seconds
    python -m benchmarks.compare_peers --problems h-equation tanh --peers torchdeq scipy
    python -m benchmarks.compare_peers --problems issue22 --out /tmp/issue22.json   # issue 22's cases only
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import fixedpoint
from fixedpoint.interop import to_numpy
from fixedpoint.problems import chandrasekhar, poisson_jacobi, tanh_layer
from tooling import timing

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: The peers besides fixedpoint, with the modules each needs.
PEERS = {"torchdeq": ("torch", "torchdeq"), "scipy": ("scipy",), "jaxopt": ("jax", "jaxopt")}

#: The array library of each peer, and so of the fixedpoint run its ratios are taken against.
PEER_LIBRARY = {"torchdeq": "torch", "scipy": "numpy", "jaxopt": "jax"}
REFERENCE_LIBRARY = {"torchdeq": "torch", "scipy": "numpy", "jaxopt": "numpy"}

#: fixedpoint's method objects (documented defaults).
FIXEDPOINT_METHODS = {"forward": fixedpoint.ForwardIteration(), "anderson": fixedpoint.Anderson(),
                      "broyden": fixedpoint.Broyden()}

#: XLA flags for one CPU thread (set before jax is imported, unless XLA_FLAGS is set already).
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

#: The H-equation cases: (N, c).
H_CASES = [(200, 0.9), (200, 0.99), (200, 0.9999), (2000, 0.9), (2000, 0.99)]


def available(peer: str) -> bool:
    """Whether every module ``peer`` needs can be imported here (without importing it)."""
    return all(importlib.util.find_spec(mod) is not None for mod in PEERS[peer])


# --- problems -------------------------------------------------------------------------------------

@dataclass
class JaxMap:
    """A problem's map for JAX: ``fun(z, aux)`` on one sample z, ``aux`` the sample's data (mapped by vmap)."""

    fun: Callable[[Any, Any], Any]
    x0: np.ndarray
    aux: np.ndarray


@dataclass
class Case:
    """One benchmark problem, built for every array library that runs it.

    Attributes
    ----------
    key : str
        Name on the command line (``--problems``).
    name : str
        Description with the sizes.
    family : str
        "h-equation", "tanh", "poisson" or "conv".
    tol, dtype, batch, max_iter
        Tolerance (relative), working dtype name, batch mode, iteration budget.
    maps : dict
        Library name ("numpy", "torch") -> (g, x0) in that library.
    jax_map : JaxMap or None
        The map for JAX (None: the problem has no JAX version).
    residual64 : callable
        x (NumPy float64, the shape of x0) -> per-sample ‖g(x) − x‖₂ / ‖g(x)‖₂ computed in float64.
    solution : ndarray or None
        The reference solution in float64 (the shape of x0), where the problem has one.
    reference_solve : callable or None
        Returns a float64 solution computed by a tighter fixedpoint solve (for problems without ``solution``).
    evaluate : callable or None
        H-equation only: x (float64) -> H(1).
    params : dict
        The parameters, recorded in the JSON.
    stop_mode : str
        "rel" (‖g(x) − x‖₂ / ‖g(x)‖₂ <= tol) or "abs" (‖g(x) − x‖₂ <= tol), per sample.
    inner : int
        Solves per timed run (the time reported is per solve): microsecond problems are timed over many.
    root_of : callable or None
        H-equation: x (float64) -> "physical" or "non-physical" by the moment test of the discretisation.
    """

    key: str
    name: str
    family: str
    tol: float
    dtype: str
    batch: bool
    max_iter: int
    maps: dict[str, tuple[Callable[[Any], Any], Any]]
    jax_map: JaxMap | None
    residual64: Callable[[np.ndarray], np.ndarray]
    solution: np.ndarray | None = None
    reference_solve: Callable[[], np.ndarray] | None = None
    evaluate: Callable[[np.ndarray], float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stop_mode: str = "rel"
    inner: int = 1
    root_of: Callable[[np.ndarray], str] | None = None
    _x_ref: np.ndarray | None = None

    def reference_norms(self) -> np.ndarray:
        """‖x*‖₂ per sample (shape (B,), B = 1 unless batched), from the solution or a reference solve."""
        if self._x_ref is None:
            if self.solution is not None:
                self._x_ref = self.solution
            elif self.reference_solve is not None:
                self._x_ref = self.reference_solve()
            else:
                raise ValueError(f"problem {self.key!r} has neither a solution nor a reference solve")
        return np.linalg.norm(self._x_ref.reshape(self.n_samples, -1), axis=1)

    @property
    def n_samples(self) -> int:
        """B: the leading axis of x0 in batch mode, else 1."""
        return int(self.maps["numpy"][1].shape[0]) if self.batch else 1


def relative_residuals(g64: Callable[[Any], Any], x: np.ndarray, batch: bool) -> np.ndarray:
    """‖g(x) − x‖₂ / ‖g(x)‖₂ per sample, in float64 (one sample unless ``batch``)."""
    x = np.asarray(x, dtype=np.float64)
    gx = np.asarray(g64(x), dtype=np.float64)
    rows = (x.shape[0], -1) if batch else (1, -1)
    return np.linalg.norm((gx - x).reshape(rows), axis=1) / np.linalg.norm(gx.reshape(rows), axis=1)


def check_same_map(name: str, a: Any, b: Any, rtol: float) -> None:
    """Raise RuntimeError if two versions of a map, evaluated at the same point to ``a`` and ``b``, differ.

    The difference is measured in the max norm relative to ``b``'s; any array library.
    """
    a64, b64 = as_float64(a, tuple(np.shape(b))), as_float64(b, tuple(np.shape(b)))
    err = float(np.max(np.abs(a64 - b64)) / max(float(np.max(np.abs(b64))), 1e-300))
    if not err <= rtol:
        raise RuntimeError(f"{name}: the two versions of the map differ by {err:.2e} (relative), more than {rtol:g}")


def _torch() -> Any:
    return importlib.import_module("torch")


def _h_kernel_t(nodes: np.ndarray, weights: np.ndarray, c: float) -> np.ndarray:
    """Kᵀ of the discrete H-equation, K_ij = (c/2) w_j μ_i / (μ_i + μ_j), from a problem's nodes and weights.

    The same kernel :func:`fixedpoint.problems.chandrasekhar` builds; used for the JAX version of its map
    (checked against the problem's own map at build time).
    """
    kmat = 0.5 * c * weights[None, :] * nodes[:, None] / (nodes[:, None] + nodes[None, :])
    return np.ascontiguousarray(kmat.T)


def h_case(n: int, c: float, libs: set[str], *, rule: str = "gauss-legendre", tol: float = 1e-8,
           key: str | None = None) -> Case:
    """Chandrasekhar's H-equation with N = ``n`` nodes of ``rule`` and albedo ``c``: float64, one vector.

    The defaults are the original cases (Gauss–Legendre, tol 1e-8, key ``h{n}-c{c}``); the issue-22 cases
    pass ``rule``, tol 1e-10 and their own key.
    """
    p = chandrasekhar(n, c, rule=rule, dtype="float64")
    maps: dict[str, tuple[Callable[[Any], Any], Any]] = {"numpy": (p.g, p.x0)}
    if "torch" in libs:
        pt = chandrasekhar(n, c, rule=rule, backend="torch", dtype="float64")
        maps["torch"] = (pt.g, pt.x0)
    jax_map = None
    if "jax" in libs:
        kt = _h_kernel_t(p.params["nodes"], p.params["weights"], c)

        def h_jax(h: Any, aux: Any) -> Any:
            jnp = importlib.import_module("jax.numpy")
            return 1.0 / (1.0 - h @ jnp.asarray(kt))

        jax_map = JaxMap(h_jax, np.asarray(p.x0), np.zeros(()))
    evaluate = p.params["evaluate"]
    label = "" if rule == "gauss-legendre" else f" {rule}"
    return Case(key=key or f"h{n}-c{c:g}", name=f"H-equation N={n}{label} c={c:g}", family="h-equation", tol=tol,
                dtype="float64", batch=False, max_iter=1000, maps=maps, jax_map=jax_map,
                residual64=lambda x: relative_residuals(p.g, x, False), solution=np.asarray(p.solution),
                evaluate=lambda x: float(np.asarray(evaluate(x, [1.0]))[0]), root_of=p.params.get("root"),
                params=dict(n=n, c=c, rule=rule, x0="ones", solution="Newton's method in float64 (the physical root)",
                            h1_physical=float(np.asarray(evaluate(np.asarray(p.solution), [1.0]))[0])))


def tanh_case(d: int, batch: int, rho: float, libs: set[str]) -> Case:
    """The tanh layer g(z) = tanh(z Wᵀ + x Uᵀ + b): float32, batch, tol 1e-4.

    The library's constructor (whose spectral norm costs an SVD of W) runs once, in float32 NumPy; the PyTorch,
    JAX and float64 versions are built from its parameters and checked against its map.
    """
    p = tanh_layer(d, batch, rho=rho, dtype="float32")
    w, u, b, xin = (p.params[k] for k in ("W", "U", "b", "x"))
    inj64 = xin @ u.T + b
    wt32, inj32 = np.ascontiguousarray(w.T, dtype=np.float32), inj64.astype(np.float32)
    maps: dict[str, tuple[Callable[[Any], Any], Any]] = {"numpy": (p.g, p.x0)}
    rng = np.random.default_rng(1)
    probe = rng.uniform(-1.0, 1.0, size=(batch, d)).astype(np.float32)
    if "torch" in libs:
        torch = _torch()
        wt_t, inj_t = torch.from_numpy(wt32), torch.from_numpy(inj32)

        def g_torch(z: Any) -> Any:
            return torch.tanh(z @ wt_t + inj_t)

        check_same_map("tanh layer, torch", g_torch(torch.from_numpy(probe)), p.g(probe), 1e-5)
        maps["torch"] = (g_torch, torch.zeros(batch, d, dtype=torch.float32))
    jax_map = None
    if "jax" in libs:
        def tanh_jax(z: Any, inj: Any) -> Any:
            jnp = importlib.import_module("jax.numpy")
            return jnp.tanh(z @ jnp.asarray(wt32) + inj)

        jax_map = JaxMap(tanh_jax, np.zeros((batch, d), np.float32), inj32)
    wt64 = np.ascontiguousarray(w.T)

    def g64(z: np.ndarray) -> np.ndarray:
        return np.tanh(z @ wt64 + inj64)

    def reference() -> np.ndarray:
        res = fixedpoint.solve(g64, np.zeros((batch, d)), method=fixedpoint.Anderson(), tol=1e-10, max_iter=1000,
                               batch=True)
        return np.asarray(res.x)

    check_same_map("tanh layer, float64", g64(probe.astype(np.float64)), p.g(probe), 1e-5)
    return Case(key="tanh", name=f"tanh layer B={batch} d={d} rho={rho:g}", family="tanh", tol=1e-4,
                dtype="float32", batch=True, max_iter=100, maps=maps, jax_map=jax_map,
                residual64=lambda x: relative_residuals(g64, x, True), reference_solve=reference,
                params=dict(d=d, batch=batch, rho=rho, seed=0, x0="zeros"))


def _scaled(g: Callable[[Any], Any], scale: float) -> Callable[[Any], Any]:
    """The map w ↦ scale · g(w / scale): the same iteration on the unknowns multiplied by ``scale``."""
    if scale == 1.0:
        return g

    def g_scaled(w: Any) -> Any:
        return g(w / scale) * scale

    return g_scaled


def poisson_case(n: int, batch: int, shift: float, libs: set[str], scaled: bool = False) -> Case:
    """The Poisson–Jacobi sweep (an O(n) map) on a batch of ``batch`` vectors of size ``n``: float32, tol 1e-4.

    The solution is of order h²/shift (about 1e-9 for n = 32768): a test of scale invariance.  With ``scaled``
    the unknowns are multiplied by (n + 1)² = 1/h² (w = u/h², the map w ↦ g(h² w)/h², the sweep for
    (2 + s) w_i − w_{i−1} − w_{i+1} = 1), whose solution is of order 1/shift; the iterates of a scale-invariant
    method are the same up to that factor.
    """
    scale = float(n + 1) ** 2 if scaled else 1.0
    p = poisson_jacobi(n, shift, dtype="float32")
    x0 = np.zeros((batch, n), np.float32)
    maps: dict[str, tuple[Callable[[Any], Any], Any]] = {"numpy": (_scaled(p.g, scale), x0)}
    if "torch" in libs:
        pt = poisson_jacobi(n, shift, backend="torch", dtype="float32")
        maps["torch"] = (_scaled(pt.g, scale), _torch().zeros(batch, n, dtype=_torch().float32))
    rhs, denom = (1.0 / (n + 1)) ** 2 * scale, 2.0 + shift
    jax_map = None
    if "jax" in libs:
        def jacobi_jax(v: Any, aux: Any) -> Any:
            jnp = importlib.import_module("jax.numpy")
            zero = jnp.zeros((1,), v.dtype)
            return (jnp.concatenate([zero, v[:-1]]) + jnp.concatenate([v[1:], zero]) + rhs) / denom

        jax_map = JaxMap(jacobi_jax, x0, np.zeros((batch,), np.float32))
    p64 = poisson_jacobi(n, shift, dtype="float64")
    return Case(key="poisson-scaled" if scaled else "poisson",
                name=f"Poisson-Jacobi B={batch} n={n} shift={shift:g}" + (" scaled by (n+1)^2" if scaled else ""),
                family="poisson", tol=1e-4, dtype="float32", batch=True, max_iter=100, maps=maps, jax_map=jax_map,
                residual64=lambda x: relative_residuals(_scaled(p64.g, scale), x, True),
                solution=np.broadcast_to(np.asarray(p64.solution) * scale, (batch, n)).copy(),
                params=dict(n=n, batch=batch, shift=shift, x0="zeros", unknowns_scaled_by=scale))


def conv_case(batch: int, libs: set[str]) -> Case:
    """The DEQ demo's convolutional cell (as demos/cpu_vs_gpu.py builds it), float32, batch, tol 1e-4.

    PyTorch only; the NumPy version (for SciPy and fixedpoint on NumPy) calls the same cell through
    ``torch.from_numpy`` (no copy), so its time includes that conversion.
    """
    if "torch" not in libs:
        raise RuntimeError("the conv problem needs torch")
    torch = _torch()
    from demos.cpu_vs_gpu import ConvDEQ

    deq = ConvDEQ(batch * 16 * 16 * 16, "torch", torch.device("cpu"), torch.float32)
    cell64, x64 = copy.deepcopy(deq.cell).double(), deq.x.double()

    def g_numpy(z: np.ndarray) -> np.ndarray:
        return deq.g(torch.from_dlpack(z)).numpy()

    def g64(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return cell64(torch.from_dlpack(z), x64).numpy()

    def reference() -> np.ndarray:
        res = fixedpoint.solve(g64, np.zeros(tuple(deq.x.shape)), method=fixedpoint.Anderson(), tol=1e-10,
                               max_iter=1000, batch=True)
        return np.asarray(res.x)

    maps: dict[str, tuple[Callable[[Any], Any], Any]] = {
        "torch": (deq.g, deq.x0), "numpy": (g_numpy, np.zeros(tuple(deq.x.shape), np.float32))}
    return Case(key="conv", name=f"conv DEQ cell B={deq.batch}x16x16x16", family="conv", tol=1e-4,
                dtype="float32", batch=True, max_iter=100, maps=maps, jax_map=None,
                residual64=lambda x: relative_residuals(g64, x, True), reference_solve=reference,
                params=dict(batch=deq.batch, channels=16, inner=32, side=16, groups=8, init_std=0.02, seed=0,
                            x0="zeros", cell="demos.deq_model.ResidualCell via demos.cpu_vs_gpu.ConvDEQ"))


def absolute_residuals(g64: Callable[[Any], Any], x: np.ndarray, batch: bool) -> np.ndarray:
    """‖g(x) − x‖₂ per sample, in float64 (one sample unless ``batch``)."""
    x = np.asarray(x, dtype=np.float64)
    rows = (x.shape[0], -1) if batch else (1, -1)
    return np.linalg.norm((np.asarray(g64(x), dtype=np.float64) - x).reshape(rows), axis=1)


#: broyden-small: n, ‖A‖₂, seed, absolute tolerance, budget.
SMALL_N, SMALL_NORM, SMALL_SEED, SMALL_TOL, SMALL_MAX_ITER = 5, 0.95, 0, 1e-12, 100


def small_case(libs: set[str], inner: int) -> Case:
    """g(x) = tanh(A x) + b, n = 5, ‖A‖₂ = 0.95, float64, one vector, tol 1e-12 on the absolute ‖g(x) − x‖₂.

    A is a Gaussian matrix (seed 0) scaled to spectral norm 0.95 and b ~ N(0, 1); x0 = 0.  A map of a few
    microseconds, where a solver's own cost per iteration is all there is to time: each timed run makes
    ``inner`` solves.  SciPy gets ``tol_norm`` = the 2-norm (its default is the max norm), torchdeq
    ``stop_mode="abs"``, JAXopt its own absolute test with tol itself.
    """
    n = SMALL_N
    rng = np.random.default_rng(SMALL_SEED)
    a = rng.standard_normal((n, n))
    a *= SMALL_NORM / np.linalg.norm(a, 2)
    b = rng.standard_normal(n)
    at = np.ascontiguousarray(a.T)

    def g(x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ at) + b

    maps: dict[str, tuple[Callable[[Any], Any], Any]] = {"numpy": (g, np.zeros(n))}
    if "torch" in libs:
        torch = _torch()
        at_t, b_t = torch.from_numpy(at), torch.from_numpy(b)

        def g_torch(x: Any) -> Any:
            return torch.tanh(x @ at_t) + b_t

        maps["torch"] = (g_torch, torch.zeros(n, dtype=torch.float64))
    jax_map = None
    if "jax" in libs:
        def small_jax(x: Any, aux: Any) -> Any:
            jnp = importlib.import_module("jax.numpy")
            return jnp.tanh(x @ jnp.asarray(at)) + jnp.asarray(b)

        jax_map = JaxMap(small_jax, np.zeros(n), np.zeros(()))
    return Case(key="broyden-small", name=f"tanh(Ax)+b n={n} |A|={SMALL_NORM:g}", family="small",
                tol=SMALL_TOL, dtype="float64", batch=False, max_iter=SMALL_MAX_ITER, maps=maps,
                jax_map=jax_map, residual64=lambda x: absolute_residuals(g, x, False), stop_mode="abs",
                reference_solve=lambda: np.asarray(fixedpoint.solve(g, np.zeros(n), tol=1e-14, stop_mode="abs",
                                                                    max_iter=1000).x),
                inner=inner, params=dict(n=n, spectral_norm=SMALL_NORM, seed=SMALL_SEED, x0="zeros",
                                         b="N(0, 1)", solves_per_timed_run=inner))


#: broyden-hard: samples, seed, relative tolerance, budget (n is 400, 100 with --quick).
HARD_BATCH, HARD_SEED, HARD_TOL, HARD_MAX_ITER = 10, 0, 1e-6, 300


def hard_case(n: int, libs: set[str]) -> Case:
    """The hard batch of benchmarks/bench_broyden.py: g_i(z) = tanh(z W + u_i), W symmetric, ‖W‖₂ = 0.99.

    B = 10 samples of length ``n``, float32, relative tol 1e-6, budget 300 (``hard_map`` with seed 0).  The map
    is NumPy's; PyTorch (fixedpoint on torch, torchdeq) calls it through ``torch.from_numpy`` (no copy).
    No JAX version.  Per-sample convergence and iterations are recorded (the target: 10/10).  The verified
    residual evaluates the float32 map at the returned x (rounded to float32) and widens it to float64: its
    rounding error (about 1e-7 relative) is a tenth of tol.
    """
    from benchmarks.bench_broyden import hard_map

    g_raw, x0 = hard_map(n, HARD_BATCH, HARD_SEED)

    def g(z: np.ndarray) -> np.ndarray:
        return g_raw(z)

    maps: dict[str, tuple[Callable[[Any], Any], Any]] = {"numpy": (g, x0)}
    if "torch" in libs:
        torch = _torch()

        def g_torch(z: Any) -> Any:
            return torch.from_numpy(g_raw(z.numpy()))

        maps["torch"] = (g_torch, torch.from_numpy(x0.copy()))

    def g64(z: np.ndarray) -> np.ndarray:  # hard_map keeps W and u in float32: its float32 values, widened
        return np.asarray(g_raw(np.asarray(z, dtype=np.float32)), dtype=np.float64)

    def reference() -> np.ndarray:
        res = fixedpoint.solve(g, x0, method=fixedpoint.Broyden(m=300), tol=1e-6, max_iter=1000, batch=True)
        return np.asarray(res.x, dtype=np.float64)

    return Case(key="broyden-hard", name=f"hard tanh batch B={HARD_BATCH} n={n} |W|=0.99", family="hard",
                tol=HARD_TOL, dtype="float32", batch=True, max_iter=HARD_MAX_ITER, maps=maps, jax_map=None,
                residual64=lambda x: relative_residuals(g64, x, True), reference_solve=reference,
                params=dict(n=n, batch=HARD_BATCH, seed=HARD_SEED, spectral_norm=0.99, x0="zeros",
                            map="benchmarks.bench_broyden.hard_map"))


#: The H-equation cases of issue 22: both rules, N = 100 and 1000, five albedos, tol 1e-10, x0 = ones.
H22_RULES = {"mid": "midpoint", "gl": "gauss-legendre"}
H22_NS = (100, 1000)
H22_CS = (0.5, 0.9, 0.99, 0.999, 0.9999)
H22_TOL = 1e-10
#: The albedos of the issue's 16 cases (2 rules × 2 N × 4 c; c = 0.5 is run and reported besides).
H22_CS_16 = (0.9, 0.99, 0.999, 0.9999)
H22_CASES = {f"h-{r}{n}-c{c:g}": (rule, n, c) for r, rule in H22_RULES.items() for n in H22_NS for c in H22_CS}

#: Groups of problems that are not built as a Case: the nonlinear-system comparison of benchmarks/peers_nonlin.py.
NONLIN = "nonlin"

PROBLEM_KEYS = ([f"h{n}-c{c:g}" for n, c in H_CASES] + ["tanh", "poisson", "poisson-scaled", "conv"]
                + list(H22_CASES) + ["broyden-small", "broyden-hard", NONLIN])
PROBLEM_GROUPS = {"h-equation": [f"h{n}-c{c:g}" for n, c in H_CASES],
                  "h-equation-16": [k for k, (_, _, c) in H22_CASES.items() if c in H22_CS_16],
                  "h-equation-20": list(H22_CASES),
                  "issue22": list(H22_CASES) + ["broyden-small", "broyden-hard", NONLIN]}


#: The iteration budget of the float32 problems with ``--quick`` (the H-equation keeps its 1000).
QUICK_MAX_ITER = 60


def build_case(key: str, quick: bool, libs: set[str]) -> Case:
    """The :class:`Case` named ``key`` (full sizes, or CI sizes with ``quick``)."""
    case = _build_case(key, quick, libs)
    if quick and case.family not in ("h-equation", "hard"):
        case.max_iter = min(case.max_iter, QUICK_MAX_ITER)
    return case


#: broyden-small: solves per timed run (each takes about a millisecond), full size and with ``--quick``.
SMALL_INNER = (200, 5)


def _build_case(key: str, quick: bool, libs: set[str]) -> Case:
    if key in H22_CASES:
        rule, n, c = H22_CASES[key]
        return h_case(n, c, libs, rule=rule, tol=H22_TOL, key=key)
    if key == "broyden-small":
        return small_case(libs, SMALL_INNER[1] if quick else SMALL_INNER[0])
    if key == "broyden-hard":
        return hard_case(100 if quick else 400, libs)
    if key.startswith("h"):
        n, c = next((n, c) for n, c in H_CASES if f"h{n}-c{c:g}" == key)
        return h_case(n, c, libs)
    if key == "tanh":
        return tanh_case(128, 4, 0.9, libs) if quick else tanh_case(4096, 32, 0.9, libs)
    if key in ("poisson", "poisson-scaled"):
        n, batch = (4096, 4) if quick else (32768, 32)
        return poisson_case(n, batch, 0.5, libs, scaled=key == "poisson-scaled")
    if key == "conv":
        return conv_case(2 if quick else 32, libs)
    raise ValueError(f"unknown problem {key!r}; choose from {', '.join(PROBLEM_KEYS + list(PROBLEM_GROUPS))}")


# --- solvers --------------------------------------------------------------------------------------

class Counted:
    """Wraps a map and counts its calls (:attr:`calls`, reset by :meth:`reset`)."""

    def __init__(self, g: Callable[[Any], Any]) -> None:
        self.g, self.calls, self.last_input = g, 0, None

    def reset(self) -> None:
        self.calls, self.last_input = 0, None

    def __call__(self, x: Any) -> Any:
        self.calls += 1
        self.last_input = x
        return self.g(x)


@dataclass
class Outcome:
    """What one solve returned: the solution (any library), the peer's own verdict and counts."""

    x: Any
    converged: bool
    status: str
    n_fev_reported: int | None = None
    own_residual: float | None = None
    n_fev: int | None = None  # set by the solver only where g cannot be wrapped (JAX)
    message: str | None = None
    sample_converged: list[bool] | None = None  # batch problems: the solver's own verdict per sample
    sample_iters: list[int] | None = None  # batch problems: iterations per sample, where the solver reports them


@dataclass
class Solver:
    """One peer's solver on one problem, ready to run: ``run()`` solves once from the initial guess."""

    peer: str  # "fixedpoint", "torchdeq", "scipy", "jaxopt"
    library: str  # array library: "numpy", "torch", "jax"
    method: str  # "forward", "anderson", "broyden": the fixedpoint method it is compared with
    function: str  # what is called
    run: Callable[[], Outcome]
    counter: Counted | None
    sync: Callable[[], None]
    settings: dict[str, Any]
    stop_test: str
    same_stop_test: bool = True  # fixedpoint's relative test, exactly or to first order in tol

    @property
    def label(self) -> str:
        return f"fixedpoint[{self.library}]" if self.peer == "fixedpoint" else self.peer


REL_TEST = "‖g(x)−x‖₂/‖g(x)‖₂ <= tol per sample"
ABS_TEST = "‖g(x)−x‖₂ <= tol per sample"


def our_test(case: Case) -> str:
    """fixedpoint's stopping test on ``case``, in words."""
    return ABS_TEST if case.stop_mode == "abs" else REL_TEST


def fixedpoint_solvers(case: Case, lib: str) -> list[Solver]:
    """fixedpoint's three methods on ``case`` in library ``lib``."""
    g, x0 = case.maps[lib]
    counter = Counted(g)
    sync = timing.setup_backend(lib, "cpu")[2]
    out = []
    for name, method in FIXEDPOINT_METHODS.items():
        def run(method: Any = method) -> Outcome:
            res = fixedpoint.solve(counter, x0, method=method, tol=case.tol, max_iter=case.max_iter,
                                   stop_mode=case.stop_mode, batch=case.batch)
            out = Outcome(res.x, bool(np.all(res.converged)), res.status, res.n_fev, float(np.max(res.residual)))
            if case.batch:
                out.sample_converged = [bool(v) for v in np.asarray(res.converged).reshape(-1)]
                out.sample_iters = [int(v) for v in np.asarray(res.n_iter).reshape(-1)]
            return out

        out.append(Solver("fixedpoint", lib, name, f"fixedpoint.solve(method={type(method).__name__}())", run,
                          counter, sync, dict(method.options(), tol=case.tol, max_iter=case.max_iter,
                                              stop_mode=case.stop_mode, batch=case.batch), our_test(case)))
    return out


def torchdeq_solvers(case: Case) -> list[Solver]:
    """torchdeq's fixed_point_iter, anderson_solver and broyden_solver on ``case`` (PyTorch)."""
    torch = _torch()
    from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter

    g, x0 = case.maps["torch"]
    shape = tuple(x0.shape)
    x0_td = x0 if case.batch else x0.reshape(1, -1)  # torchdeq: the leading axis is the batch
    counter = Counted(g)

    def mapped(z: Any) -> Any:
        return counter(z.reshape(shape)).reshape(z.shape)

    functions: dict[str, tuple[str, Any, dict[str, Any]]] = {
        "forward": ("torchdeq.solver.fixed_point_iter", fixed_point_iter, dict(tau=1.0)),
        "anderson": ("torchdeq.solver.anderson_solver", anderson_solver, dict(m=6, lam=1e-4, tau=1.0)),
        "broyden": ("torchdeq.solver.broyden_solver", broyden_solver, dict(LBFGS_thres=None, ls=False))}
    out = []
    for method, (fname, fn, defaults) in functions.items():
        def run(fn: Any = fn) -> Outcome:
            with torch.no_grad():
                z, _, info = fn(mapped, x0_td, max_iter=case.max_iter, tol=case.tol, stop_mode=case.stop_mode)
            lowest = info[f"{case.stop_mode}_lowest"].reshape(-1)
            rel = float(lowest.max())
            ok = rel < case.tol
            steps = int(info["nstep"].max())
            out = Outcome(z.reshape(shape), ok, "converged" if ok else "not converged", steps, rel)
            if case.batch:  # per sample: its lowest residual, and the step where it was reached
                out.sample_converged = [bool(v < case.tol) for v in lowest.tolist()]
                out.sample_iters = [int(v) for v in info["nstep"].reshape(-1).tolist()]
            return out

        settings = dict(defaults, tol=case.tol, max_iter=case.max_iter, stop_mode=case.stop_mode,
                        note="documented defaults besides tol, max_iter, stop_mode")
        if method == "broyden":  # LBFGS_thres=None: max_iter pairs (u, v) allocated (zeroed) by every solve
            settings["pairs_allocated_bytes"] = 2 * case.max_iter * x0.numel() * x0.element_size()
        out.append(Solver("torchdeq", "torch", method, fname, run, counter, lambda: None, settings,
                          "‖g(x)−x‖/(‖g(x)‖+1e-9) < tol for the largest of the batch" if case.stop_mode == "rel"
                          else "‖g(x)−x‖ < tol for the largest of the batch"))
    return out


class ScipyRelativeNorm:
    """A ``tol_norm`` for SciPy's nonlinear solvers that gives fixedpoint's relative test.

    SciPy's termination check calls ``tol_norm`` on F(x), then on x, then on dx.  The residual function
    :meth:`residual` records ‖g(x)‖₂ and ‖g(x) − x‖₂ per sample at each evaluation; the check of F(x) returns
    max_b ‖F_b‖ / ‖g_b‖ for the last evaluation (which is the F(x) SciPy checks: it always accepts the last
    point its line search tried, or evaluates again), after checking that F is that evaluation's.  The other
    two calls return SciPy's default max norm.
    """

    def __init__(self, g: Callable[[Any], Any], shape: tuple[int, ...], n_samples: int) -> None:
        self.g, self.shape, self.rows = g, shape, (n_samples, -1)
        self.calls = 0
        self.g_norms: np.ndarray | None = None
        self.f_norms: np.ndarray | None = None

    def reset(self) -> None:
        self.calls, self.g_norms, self.f_norms = 0, None, None

    def residual(self, x: np.ndarray) -> np.ndarray:
        gx = self.g(x)
        f = gx - x
        self.g_norms = np.linalg.norm(gx.reshape(self.rows), axis=1)
        self.f_norms = np.linalg.norm(f.reshape(self.rows), axis=1)
        return f

    def __call__(self, v: np.ndarray) -> float:
        self.calls += 1
        if self.calls % 3 != 1:  # x or dx: SciPy's default norm (the x tolerances are infinite)
            return float(np.max(np.abs(v)))
        assert self.g_norms is not None and self.f_norms is not None
        fn = np.linalg.norm(np.reshape(v, self.rows), axis=1)
        if not np.allclose(fn, self.f_norms, rtol=1e-5, atol=0.0):
            raise RuntimeError("scipy's termination check did not see the last evaluated F(x); the relative "
                               "stopping test cannot be reproduced with this SciPy version")
        return float(np.max(fn / (self.g_norms + 1e-12)))


def scipy_solvers(case: Case) -> list[Solver]:
    """scipy.optimize.fixed_point, anderson and broyden1 on ``case`` (NumPy)."""
    from scipy import optimize

    g, x0 = case.maps["numpy"]

    def g_cast(x: np.ndarray) -> np.ndarray:  # the map in the problem's dtype, whatever SciPy's iterates are
        return g(np.asarray(x, dtype=x0.dtype))

    counter = Counted(g_cast)
    maxiter = case.max_iter // 2  # fixed_point evaluates g twice per iteration

    def run_fixed_point() -> Outcome:
        try:
            x = optimize.fixed_point(counter, x0, xtol=case.tol, maxiter=maxiter)
        except RuntimeError as exc:  # SciPy raises when maxiter is reached; the value is only in the message
            return Outcome(counter.last_input, False, "max_iter", message=str(exc)[:80])
        return Outcome(x, True, "converged")

    out = [Solver("scipy", "numpy", "forward", "scipy.optimize.fixed_point", run_fixed_point, counter, lambda: None,
                  dict(method="del2", xtol=case.tol, maxiter=maxiter,
                       note="documented defaults besides xtol and maxiter (2 evaluations per iteration)"),
                  "max_i |p_i − p0_i| / |p0_i| < xtol (relative change of the del² extrapolate, per entry)",
                  same_stop_test=False)]
    for method, fname in (("anderson", "anderson"), ("broyden", "broyden1")):
        out.append(Solver("scipy", "numpy", method, f"scipy.optimize.{fname}",
                          _scipy_nonlin(getattr(optimize, fname), optimize.NoConvergence, counter, x0, case),
                          counter, lambda: None, _scipy_nonlin_settings(fname, case),
                          "fixedpoint's, through tol_norm (the batch is one system)" if case.stop_mode == "rel"
                          else "‖F(x)‖₂ <= f_tol (tol_norm = the 2-norm)"))
    return out


def _scipy_nonlin(solve: Callable[..., Any], no_convergence: type[Exception], g: Callable[[Any], Any],
                  x0: np.ndarray, case: Case) -> Callable[[], Outcome]:
    """A run of SciPy's nonlinear solver ``solve`` on F(x) = g(x) − x with fixedpoint's stopping test."""
    tol_norm = ScipyRelativeNorm(g, tuple(x0.shape), case.n_samples)
    residual, norm = ((tol_norm.residual, tol_norm) if case.stop_mode == "rel" else
                      (lambda x: g(x) - x, lambda v: float(np.linalg.norm(v))))

    def run() -> Outcome:
        tol_norm.reset()
        try:
            x = solve(residual, x0, f_tol=case.tol, tol_norm=norm, maxiter=case.max_iter)
        except no_convergence as exc:
            return Outcome(exc.args[0], False, "max_iter")
        return Outcome(x, True, "converged")

    return run


def _scipy_nonlin_settings(fname: str, case: Case) -> dict[str, Any]:
    """The settings of SciPy's ``anderson`` or ``broyden1`` as run here (the rest are its defaults)."""
    settings: dict[str, Any] = dict(
        f_tol=case.tol, tol_norm=("relative residual per sample (max over the batch)" if case.stop_mode == "rel"
                                  else "2-norm of F"), maxiter=case.max_iter,
        line_search="armijo", alpha="None (0.5 max(‖x0‖, 1) / ‖F(x0)‖)",
        note="documented defaults besides f_tol, tol_norm and maxiter")
    settings.update(dict(M=5, w0=0.01) if fname == "anderson" else dict(reduction_method="restart", max_rank="inf"))
    if case.dtype != "float64":
        settings["dtype"] = ("inputs of g cast to the problem's dtype: after a backtracking step of the Armijo line "
                             "search (a NumPy float64 step length) SciPy's iterates are float64 under NumPy 2's "
                             "promotion rules")
    return settings


def _x64(jax: Any, enabled: bool) -> Any:
    """A context manager that sets JAX's 64-bit mode (``jax.enable_x64``; ``jax.experimental`` before it)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(enabled)
    experimental = importlib.import_module("jax.experimental")
    return experimental.enable_x64() if enabled else experimental.disable_x64()


def jaxopt_solvers(case: Case) -> list[Solver]:
    """jaxopt.FixedPointIteration and AndersonAcceleration on ``case``: jit-compiled, vmapped over the batch."""
    if case.jax_map is None:
        return []
    jax = importlib.import_module("jax")
    jnp = importlib.import_module("jax.numpy")
    jaxopt = importlib.import_module("jaxopt")
    jm = case.jax_map
    x64 = case.dtype == "float64"
    tols = (case.tol * case.reference_norms() if case.stop_mode == "rel"
            else np.full(case.n_samples, case.tol))
    g_np, x0_np = case.maps["numpy"]
    probe = (x0_np + 0.1 * np.random.default_rng(2).uniform(size=x0_np.shape)).astype(x0_np.dtype)
    with _x64(jax, x64):
        fun = jax.vmap(jm.fun) if case.batch else jm.fun
        check_same_map(f"{case.name}, jax", fun(jnp.asarray(probe), jnp.asarray(jm.aux)), g_np(probe),
                       1e-12 if x64 else 1e-5)
    out = []
    for method, cls in (("forward", jaxopt.FixedPointIteration), ("anderson", jaxopt.AndersonAcceleration)):
        def solve_one(z0: Any, aux: Any, tol: Any, cls: Any = cls) -> Any:
            solver = cls(fixed_point_fun=jm.fun, maxiter=case.max_iter, tol=tol)
            return solver.run(z0, aux)

        with _x64(jax, x64):
            args = (jnp.asarray(jm.x0), jnp.asarray(jm.aux),
                    jnp.asarray(tols if case.batch else tols[0], dtype=jnp.float64 if x64 else jnp.float32))
            t0 = time.perf_counter()
            fn = jax.jit(jax.vmap(solve_one) if case.batch else solve_one).lower(*args).compile()
            compile_s = time.perf_counter() - t0

        def run(fn: Any = fn, args: tuple[Any, ...] = args, tols: np.ndarray = tols) -> Outcome:
            with _x64(jax, x64):
                res = fn(*args)
                jax.block_until_ready(res)
            err = np.atleast_1d(np.asarray(res.state.error))
            ok = bool(np.all(err <= tols))
            n_iter = int(np.max(np.asarray(res.state.iter_num)))
            own = err / case.reference_norms() if case.stop_mode == "rel" else err
            out = Outcome(res.params, ok, "converged" if ok else "max_iter",
                          int(np.max(np.asarray(res.state.num_fun_eval))), float(np.max(own)), n_fev=n_iter)
            if case.batch:
                out.sample_converged = [bool(v) for v in err <= tols]
                out.sample_iters = [int(v) for v in np.atleast_1d(np.asarray(res.state.iter_num))]
            return out

        settings: dict[str, Any] = dict(tol="tol × ‖x*‖₂ per sample" if case.stop_mode == "rel" else "tol",
                                        tol_per_sample=[float(t) for t in tols],
                                        maxiter=case.max_iter, jit=True, vmap_over_batch=case.batch,
                                        jax_enable_x64=x64, compile_s=compile_s,
                                        note="documented defaults besides tol and maxiter; compiled ahead of "
                                             "the timed runs")
        if method == "anderson":
            settings.update(history_size=5, mixing_frequency=1, beta=1.0, ridge=1e-5)
        out.append(Solver("jaxopt", "jax", method, f"jaxopt.{cls.__name__}", run, None, lambda: None, settings,
                          "absolute ‖g(x)−x‖₂ <= tol·‖x*‖₂ per sample" if case.stop_mode == "rel" else ABS_TEST))
    return out


# --- measuring ------------------------------------------------------------------------------------

def as_float64(x: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A solution from any library as a NumPy float64 array of ``shape``."""
    if x is None:
        return np.full(shape, np.nan)
    a = np.asarray(x) if type(x).__module__.startswith("jax") else to_numpy(x)
    return np.asarray(a, dtype=np.float64).reshape(shape)


def run_once(s: Solver, inner: int = 1) -> tuple[float, Outcome]:
    """Seconds per solve and outcome of the last of ``inner`` solves, the device synchronised before and after."""
    s.sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        if s.counter is not None:
            s.counter.reset()
        res = s.run()
    s.sync()
    elapsed = (time.perf_counter() - t0) / inner
    if res.n_fev is None and s.counter is not None:
        res.n_fev = s.counter.calls
    return elapsed, res


def measure_case(case: Case, solvers: list[Solver], repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Rows for every solver on ``case``: ``warmup`` untimed rounds, then ``repeats`` timed rounds.

    In each round the solvers take turns.  A solver that raises is recorded with status "error" and
    left out of the following rounds.
    """
    last: dict[int, Outcome] = {}
    errors: dict[int, str] = {}
    times: dict[int, list[float]] = {i: [] for i in range(len(solvers))}
    for round_ in range(warmup + repeats):
        for i, s in enumerate(solvers):
            if i in errors:
                continue
            try:
                t, last[i] = run_once(s, case.inner)
            except Exception as exc:  # a peer that fails is a result, not the end of the benchmark
                errors[i] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"  {case.key}: {s.label} {s.function} raised {errors[i]}", file=sys.stderr, flush=True)
                continue
            if round_ >= warmup:
                times[i].append(t)
    shape = tuple(case.maps["numpy"][1].shape)
    rows = []
    for i, s in enumerate(solvers):
        row: dict[str, Any] = dict(
            problem=case.key, problem_name=case.name, family=case.family, peer=s.peer, solver=s.label,
            library=s.library, method=s.method, function=s.function, dtype=case.dtype, tol=case.tol,
            max_iter=case.max_iter, stop_test=s.stop_test, same_stop_test=s.same_stop_test, settings=s.settings)
        if i in errors:
            row.update(status="error", converged=False, error=errors[i])
            rows.append(row)
            continue
        res = last[i]
        x = as_float64(res.x, shape)
        verified = case.residual64(x)
        row.update(status=res.status, converged=res.converged, n_fev=res.n_fev, n_fev_reported=res.n_fev_reported,
                   own_residual=res.own_residual, verified_residual=float(np.max(verified)),
                   verified_meets_tol=bool(np.max(verified) <= case.tol), time_s=timing.summarize(times[i]))
        if res.message:
            row["message"] = res.message
        if case.stop_mode != "rel":
            row["stop_mode"] = case.stop_mode
        if case.batch:
            row.update(sample_converged=res.sample_converged or [bool(v <= case.tol) for v in verified],
                       sample_converged_from="solver" if res.sample_converged else "verified residual",
                       sample_iters=res.sample_iters)
        if case.solution is not None:
            row["max_error"] = float(np.max(np.abs(x - case.solution)) / np.max(np.abs(case.solution)))
        if case.evaluate is not None:
            row["h1"] = case.evaluate(x)
            row["root"] = root_label(row, case, x)
        rows.append(row)
        print(f"  {case.key:14s} {s.label:18s} {s.method:8s} {res.status:13s} n_fev={res.n_fev!s:>5} "
              f"res={row['verified_residual']:.2e} time={1e3 * row['time_s']['median']:9.2f} ms",
              file=sys.stderr, flush=True)
    add_ratios(rows)
    return rows


def root_label(row: dict[str, Any], case: Case, x: np.ndarray) -> str:
    """H-equation: "physical", "non-physical" or "not a root" (verified residual above 100 tol).

    Which root: the moment test of the problem (``params["root"]`` of :func:`fixedpoint.problems.chandrasekhar`,
    (c/2) Σ w_i H_i = 1 ∓ √(1 − c)) where it has one, else within 1e-4 (relative, max norm) of Newton's solution.
    """
    if not row["verified_residual"] <= 100 * case.tol:
        return "not a root"
    if case.root_of is not None:
        return case.root_of(x)
    return "physical" if row["max_error"] <= 1e-4 else "non-physical"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """fev_ratio and time_ratio of each row to fixedpoint's same method on the reference library of its peer."""
    ref = {(r["library"], r["method"]): r for r in rows if r["peer"] == "fixedpoint" and "n_fev" in r}
    for r in rows:
        lib = r["library"] if r["peer"] == "fixedpoint" else REFERENCE_LIBRARY[r["peer"]]
        base = ref.get((lib, r["method"]))
        r["reference"] = f"fixedpoint[{lib}] {r['method']}" if base else None
        if base is None or "n_fev" not in r:
            r["fev_ratio"] = r["time_ratio"] = None
            continue
        r["fev_ratio"] = r["n_fev"] / base["n_fev"] if r["n_fev"] and base["n_fev"] else None
        r["time_ratio"] = r["time_s"]["median"] / base["time_s"]["median"]


def targets(rows: list[dict[str, Any]], nonlin: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures the issues ask for, where the rows hold them; ``nonlin``: the targets of peers_nonlin."""
    by = {(r["problem"], r["solver"], r["method"]): r for r in rows if "n_fev" in r}
    out: dict[str, Any] = {}
    ours, theirs = by.get(("tanh", "fixedpoint[torch]", "broyden")), by.get(("tanh", "torchdeq", "broyden"))
    if ours and theirs:
        fev, t = ours["n_fev"] / theirs["n_fev"], ours["time_s"]["median"] / theirs["time_s"]["median"]
        out["tanh_broyden_vs_torchdeq"] = dict(
            fixedpoint_n_fev=ours["n_fev"], torchdeq_n_fev=theirs["n_fev"], fev_ratio=fev,
            fixedpoint_time_s=ours["time_s"]["median"], torchdeq_time_s=theirs["time_s"]["median"], time_ratio=t,
            target="fev_ratio <= 1.25 and time_ratio < 1", met=bool(fev <= 1.25 and t < 1.0),
            time_clearly_less=bool(ours["time_s"]["q3"] < theirs["time_s"]["q1"]),
            time_clearly_more=bool(ours["time_s"]["q1"] > theirs["time_s"]["q3"]))
    h = []
    for key in [k for k in PROBLEM_GROUPS["h-equation"] if any(r["problem"] == k for r in rows)]:
        ours, theirs = by.get((key, "fixedpoint[numpy]", "anderson")), by.get((key, "scipy", "anderson"))
        if ours and theirs:
            h.append(dict(problem=key, fixedpoint_n_fev=ours["n_fev"], scipy_n_fev=theirs["n_fev"],
                          fev_le_scipy=bool(ours["n_fev"] <= theirs["n_fev"]), fixedpoint_root=ours["root"],
                          scipy_root=theirs["root"], fixedpoint_time_s=ours["time_s"]["median"],
                          scipy_time_s=theirs["time_s"]["median"],
                          time_ratio=ours["time_s"]["median"] / theirs["time_s"]["median"]))
    if h:
        out["h_equation_anderson_vs_scipy"] = h
    for name, fn in (("h_equation_16", _target_h16), ("broyden_small", _target_small),
                     ("broyden_hard", _target_hard)):
        found = fn(by, rows)
        if found is not None:
            out[name] = found
    if nonlin is not None:
        out["nonlin"] = nonlin
    out["issue22"] = issue22_summary(out)
    return out


def _target_h16(by: dict[tuple[str, str, str], dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Issue 22, H-equation: fixedpoint[numpy]'s default Anderson on the physical root, evaluations <= SciPy's."""
    cases = []
    for key, (rule, n, c) in H22_CASES.items():
        ours, theirs = by.get((key, "fixedpoint[numpy]", "anderson")), by.get((key, "scipy", "anderson"))
        if ours is None:
            continue
        cases.append(dict(problem=key, rule=rule, n=n, c=c, in_16=c in H22_CS_16, fixedpoint_root=ours["root"],
                          fixedpoint_n_fev=ours["n_fev"], scipy_root=theirs["root"] if theirs else None,
                          scipy_n_fev=theirs["n_fev"] if theirs else None,
                          fev_le_scipy=bool(ours["n_fev"] <= theirs["n_fev"]) if theirs else None))
    if not cases:
        return None

    def counts(sel: list[dict[str, Any]]) -> dict[str, int]:
        return dict(cases_run=len(sel), physical=sum(c["fixedpoint_root"] == "physical" for c in sel),
                    scipy_compared=sum(c["fev_le_scipy"] is not None for c in sel),
                    fev_le_scipy=sum(c["fev_le_scipy"] is True for c in sel),
                    scipy_physical=sum(c["scipy_root"] == "physical" for c in sel))

    sixteen = counts([c for c in cases if c["in_16"]])
    met = (sixteen["cases_run"] == len(H22_RULES) * len(H22_NS) * len(H22_CS_16)
           and sixteen["physical"] == sixteen["cases_run"] == sixteen["fev_le_scipy"])
    return dict(sixteen, target="fixedpoint[numpy] Anderson(): physical root in 16/16 (c >= 0.9) and evaluations "
                "<= scipy.optimize.anderson's in every case", met=bool(met), all_cases=counts(cases), cases=cases)


def _target_small(by: dict[tuple[str, str, str], dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Issue 22, n = 5: Broyden's time per evaluation <= 1.2 × broyden1's; total time below where it needs fewer."""
    out: dict[str, Any] = {}
    for method, fname in (("broyden", "broyden1"), ("anderson", "anderson")):
        ours = by.get(("broyden-small", "fixedpoint[numpy]", method))
        theirs = by.get(("broyden-small", "scipy", method))
        if not (ours and theirs and ours["n_fev"] and theirs["n_fev"]):
            continue
        t_ours, t_theirs = ours["time_s"]["median"], theirs["time_s"]["median"]
        pi_ours, pi_theirs = t_ours / ours["n_fev"], t_theirs / theirs["n_fev"]
        fewer = ours["n_fev"] < theirs["n_fev"]
        out[method] = dict(peer=f"scipy.optimize.{fname}", fixedpoint_n_fev=ours["n_fev"],
                           scipy_n_fev=theirs["n_fev"], fixedpoint_converged=ours["converged"],
                           scipy_converged=theirs["converged"], fixedpoint_time_s=t_ours, scipy_time_s=t_theirs,
                           fixedpoint_us_per_iter=1e6 * pi_ours, scipy_us_per_iter=1e6 * pi_theirs,
                           per_iter_ratio=pi_ours / pi_theirs, fewer_evaluations=fewer,
                           total_time_ratio=t_ours / t_theirs)
    b = out.get("broyden")
    if b is None:
        return None
    b["target"] = ("time per evaluation <= 1.2x broyden1's, and total time below broyden1's wherever fewer "
                   "evaluations are needed")
    b["met"] = bool(b["fixedpoint_converged"] and b["per_iter_ratio"] <= 1.2
                    and (not b["fewer_evaluations"] or b["total_time_ratio"] < 1.0))
    return dict(out, target=b["target"], met=b["met"])


def _target_hard(by: dict[tuple[str, str, str], dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Issue 22, hard batch: samples converged (of 10) and iterations per solver; target: our Broyden 10/10."""
    solvers = []
    for r in rows:
        if r["problem"] != "broyden-hard" or "sample_converged" not in r:
            continue
        its = r["sample_iters"]
        solvers.append(dict(solver=r["solver"], method=r["method"], converged=sum(r["sample_converged"]),
                            samples=len(r["sample_converged"]), n_fev=r["n_fev"],
                            iterations_mean=float(np.mean(its)) if its else None,
                            iterations_max=int(np.max(its)) if its else None,
                            converged_from=r["sample_converged_from"]))
    if not solvers:
        return None
    ours = [s for s in solvers if s["solver"].startswith("fixedpoint") and s["method"] == "broyden"]
    met = bool(ours) and all(s["converged"] == s["samples"] and s["n_fev"] <= HARD_MAX_ITER for s in ours)
    return dict(solvers=solvers, target=f"fixedpoint Broyden() converges {HARD_BATCH}/{HARD_BATCH} samples "
                f"within {HARD_MAX_ITER} iterations (NumPy and PyTorch)", met=met)


def _nonlin_summary(nl: dict[str, Any] | None) -> dict[str, Any]:
    """The summary line of peers_nonlin's targets: per problem {"converged", "n_fev", "best_scipy_n_fev", "target"}."""
    line: dict[str, Any] = dict(name="SciPy test_nonlin problems via fixedpoint.root",
                                target="converged on every problem (complex case included), evaluations <= 1.2x "
                                       "the best converged SciPy solver's", met=None, figures=None)
    per = {k: v for k, v in (nl or {}).items() if isinstance(v, dict) and "target" in v}
    if per:
        met = [k for k, v in per.items() if v["target"]]
        line["met"] = len(met) == len(per)
        line["figures"] = f"{len(met)}/{len(per)} met; " + ", ".join(
            f"{k} {'converged' if v['converged'] else 'NOT converged'} {v['n_fev']} vs {v['best_scipy_n_fev']}"
            for k, v in per.items())
    return line


def issue22_summary(tg: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 22's targets side by side: name, target, met (None: not run here) and the figures in words."""
    out = []
    h = tg.get("h_equation_16")
    out.append(dict(name="H-equation, 16 cases", target=h["target"] if h else "physical root 16/16, evaluations <= "
                    "scipy anderson's", met=h["met"] if h else None, figures=None if h is None else
                    f"physical {h['physical']}/{h['cases_run']}, evaluations <= scipy {h['fev_le_scipy']}/"
                    f"{h['scipy_compared']} (all {h['all_cases']['cases_run']} cases run: physical "
                    f"{h['all_cases']['physical']}, <= scipy {h['all_cases']['fev_le_scipy']})"))
    out.append(_nonlin_summary(tg.get("nonlin")))
    b = (tg.get("broyden_small") or {}).get("broyden")
    out.append(dict(name="Broyden n=5 cost per iteration", target=b["target"] if b else "<= 1.2x broyden1's",
                    met=b["met"] if b else None, figures=None if b is None else
                    f"{b['fixedpoint_us_per_iter']:.1f} vs {b['scipy_us_per_iter']:.1f} us per evaluation "
                    f"({b['per_iter_ratio']:.2f}x); evaluations {b['fixedpoint_n_fev']} vs {b['scipy_n_fev']}; total "
                    f"{1e6 * b['fixedpoint_time_s']:.0f} vs {1e6 * b['scipy_time_s']:.0f} us "
                    f"({b['total_time_ratio']:.2f}x)"))
    hd = tg.get("broyden_hard")
    out.append(dict(name="Broyden on the hard batch", target=hd["target"] if hd else "10/10 within 300",
                    met=hd["met"] if hd else None, figures=None if hd is None else "; ".join(
                        f"{s['solver']} {s['method']} {s['converged']}/{s['samples']}"
                        + (f" (iterations mean {s['iterations_mean']:.0f}, max {s['iterations_max']})"
                           if s["iterations_mean"] is not None else "") for s in hd["solvers"]
                        if s["method"] != "forward")))
    t = tg.get("tanh_broyden_vs_torchdeq")
    old_h = tg.get("h_equation_anderson_vs_scipy")
    out.append(dict(name="nothing worse: tanh Broyden vs torchdeq", target=t["target"] if t else "fev <= 1.25x, "
                    "time < torchdeq's", met=t["met"] if t else None, figures=None if t is None else
                    f"evaluations {t['fixedpoint_n_fev']} vs {t['torchdeq_n_fev']}, time {t['time_ratio']:.2f}x"))
    out.append(dict(name="nothing worse: H-equation tol 1e-8 (Gauss-Legendre N=200/2000)",
                    target="Anderson evaluations <= scipy anderson's on every case, physical root",
                    met=None if not old_h else all(c["fev_le_scipy"] and c["fixedpoint_root"] == "physical"
                                                   for c in old_h),
                    figures=None if not old_h else ", ".join(
                        f"{c['problem']} {c['fixedpoint_n_fev']} vs {c['scipy_n_fev']}" for c in old_h)))
    return out


# --- main -----------------------------------------------------------------------------------------

def select(names: list[str] | None, choices: list[str], groups: dict[str, list[str]], what: str) -> list[str]:
    """Expand ``names`` (None: all ``choices``) through ``groups``; raise ValueError naming an unknown one."""
    if names is None:
        return list(choices)
    out: list[str] = []
    for name in names:
        if name in groups:
            out += [k for k in groups[name] if k not in out]
        elif name in choices:
            out += [name] if name not in out else []
        else:
            raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(choices + list(groups))}")
    return out


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The result table (one line per solver and problem)."""
    for r in rows:
        if "time_s" in r:
            r["_t"] = 1e3 * r["time_s"]["median"]
            r["_range"] = f"[{1e3 * r['time_s']['q1']:.1f}, {1e3 * r['time_s']['q3']:.1f}]"
        r["_root"] = f"{r['root']} H(1)={r['h1']:.4f}" if "root" in r else None
    timing.print_table(rows, [
        ("problem", "problem", "{}"), ("solver", "solver", "{}"), ("method", "method", "{}"),
        ("status", "status", "{}"), ("n_fev", "n_fev", "{}"), ("fev_ratio", "fev ratio", "{:.2f}"),
        ("_t", "time ms", "{:.2f}"), ("_range", "[q1, q3] ms", "{}"), ("time_ratio", "time ratio", "{:.2f}"),
        ("verified_residual", "verified res.", "{:.2e}"), ("_root", "root", "{}")])
    for r in rows:
        for k in [k for k in r if k.startswith("_")]:
            del r[k]


def print_targets(tg: dict[str, Any]) -> None:
    """The target figures in words."""
    t = tg.get("tanh_broyden_vs_torchdeq")
    if t:
        print(f"\ntanh layer, Broyden: fixedpoint {t['fixedpoint_n_fev']} evaluations vs torchdeq "
              f"{t['torchdeq_n_fev']} ({t['fev_ratio']:.2f}x, target <= 1.25x); time "
              f"{1e3 * t['fixedpoint_time_s']:.1f} vs {1e3 * t['torchdeq_time_s']:.1f} ms "
              f"({t['time_ratio']:.2f}x, target < 1): {'met' if t['met'] else 'NOT met'}"
              + ("" if t["time_clearly_less"] or t["time_clearly_more"] else
                 " (the times' interquartile ranges overlap: a tie within the spread of the runs)"))
    for h in tg.get("h_equation_anderson_vs_scipy", []):
        print(f"{h['problem']}: Anderson evaluations fixedpoint {h['fixedpoint_n_fev']} ({h['fixedpoint_root']}) "
              f"vs scipy {h['scipy_n_fev']} ({h['scipy_root']}): {'<=' if h['fev_le_scipy'] else '>'}; time "
              f"{1e3 * h['fixedpoint_time_s']:.2f} vs {1e3 * h['scipy_time_s']:.2f} ms ({h['time_ratio']:.2f}x)")
    h16 = tg.get("h_equation_16")
    if h16:
        print("\nH-equation, issue 22 (tol 1e-10; fixedpoint[numpy] Anderson vs scipy anderson):")
        for c in h16["cases"]:
            print(f"  {c['problem']:18s} {c['fixedpoint_root']:12s} n_fev {c['fixedpoint_n_fev']!s:>5} vs scipy "
                  f"{c['scipy_n_fev']!s:>5} ({c['scipy_root']})" + ("" if c["in_16"] else "  [not one of the 16]"))
    small = tg.get("broyden_small", {})
    for method in ("broyden", "anderson"):
        b = small.get(method)
        if b:
            print(f"n=5 {method}: {b['fixedpoint_us_per_iter']:.1f} us/evaluation vs {b['peer']} "
                  f"{b['scipy_us_per_iter']:.1f} ({b['per_iter_ratio']:.2f}x); evaluations {b['fixedpoint_n_fev']} "
                  f"vs {b['scipy_n_fev']}; total {1e6 * b['fixedpoint_time_s']:.0f} vs "
                  f"{1e6 * b['scipy_time_s']:.0f} us ({b['total_time_ratio']:.2f}x)")
    hard = tg.get("broyden_hard")
    if hard:
        print("hard batch (samples converged, iterations mean/max):")
        for s in hard["solvers"]:
            its = "" if s["iterations_mean"] is None else f" {s['iterations_mean']:.1f}/{s['iterations_max']}"
            print(f"  {s['solver']:18s} {s['method']:8s} {s['converged']}/{s['samples']}{its} (n_fev {s['n_fev']})")
    verdict = {True: "met", False: "NOT met", None: "not run"}
    print("\nissue 22 targets:")
    for t in tg.get("issue22", []):
        print(f"  [{verdict[t['met']]:7s}] {t['name']}: {t['target']}" + (f"\n            {t['figures']}"
                                                                          if t["figures"] else ""))


def run_nonlin(repeats: int, warmup: int, quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """Rows and targets of benchmarks/peers_nonlin.py (SciPy's nonlinear test problems), or None if it is absent."""
    try:
        mod = importlib.import_module("benchmarks.peers_nonlin")
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks.peers_nonlin":
            raise
        return None
    rows = mod.nonlin_rows(repeats=repeats, warmup=warmup, quick=quick)
    return rows, mod.nonlin_targets(rows)


def print_nonlin(rows: list[dict[str, Any]]) -> None:
    """The table of the nonlinear-system rows."""
    table = [dict(r, _t=1e3 * r["time_s"]["median"] if r.get("time_s") else None) for r in rows]
    print("\nnonlinear systems F(x) = 0 (benchmarks/peers_nonlin.py):")
    timing.print_table(table, [
        ("problem", "problem", "{}"), ("solver", "solver", "{}"), ("method", "method", "{}"),
        ("converged", "converged", "{}"), ("n_fev", "n_fev", "{}"), ("_t", "time ms", "{:.2f}"),
        ("residual", "residual", "{:.2e}")])


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns 0.  See the module docstring and ``--help``."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_peers", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI size: H-equation N<=200 only, small tanh/Poisson/conv/hard problems, 5 solves per timed "
                         "run of broyden-small, 1 repeat")
    ap.add_argument("--problems", nargs="+", default=None,
                    help=f"problems to run (default all): {', '.join(PROBLEM_KEYS + list(PROBLEM_GROUPS))}")
    ap.add_argument("--peers", nargs="+", default=None,
                    help="peers to compare with (default every installed one): torchdeq, scipy, jaxopt; "
                         "fixedpoint always runs")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per solver after one warm-up (default 5, "
                                                               "1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed runs per solver before the timed ones (default 1, 0 with --quick; JAX is "
                         "compiled beforehand either way)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads and, unless XLA_FLAGS is set, one XLA thread (default 1; 0: libraries' own)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/peers.json, "
                                                "peers_quick.json with --quick)")
    args = ap.parse_args(argv)
    try:
        problem_keys = select(args.problems, PROBLEM_KEYS, PROBLEM_GROUPS, "problem")
        peers = [p for p in select(args.peers, list(PEERS), {"fixedpoint": []}, "peer")]
    except ValueError as exc:
        ap.error(str(exc))
    if args.quick and args.problems is None:
        problem_keys = [k for k in problem_keys if not k.startswith("h2000")
                        and not (k in H22_CASES and H22_CASES[k][1] > 100)]
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if repeats < 1 or warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    out_path = args.out or str(RESULTS_DIR / ("peers_quick.json" if args.quick else "peers.json"))

    skipped = []
    for peer in list(peers):
        if not available(peer):
            missing = [m for m in PEERS[peer] if importlib.util.find_spec(m) is None]
            note = f"{peer}: not installed ({', '.join(missing)} missing), skipped"
            print(f"note: {note}", file=sys.stderr)
            skipped.append(note)
            peers.remove(peer)
    has_torch = importlib.util.find_spec("torch") is not None
    libs = {"numpy"} | ({"torch"} if has_torch else set()) | ({"jax"} if "jaxopt" in peers else set())
    if "conv" in problem_keys and not has_torch:
        skipped.append("conv: needs torch, skipped")
        print("note: conv needs torch, skipped", file=sys.stderr)
        problem_keys.remove("conv")
    if args.threads:
        if has_torch:
            timing.set_threads("torch", args.threads)
        if "jax" in libs and args.threads == 1 and "XLA_FLAGS" not in os.environ and "jax" not in sys.modules:
            os.environ["XLA_FLAGS"] = XLA_ONE_THREAD

    rows: list[dict[str, Any]] = []
    problems = []
    nonlin: tuple[list[dict[str, Any]], dict[str, Any]] | None = None
    for key in problem_keys:
        t0 = time.perf_counter()
        if key == NONLIN:
            nonlin = run_nonlin(repeats, warmup, args.quick)
            if nonlin is None:
                skipped.append("nonlin: benchmarks/peers_nonlin.py not found, skipped")
                print("note: nonlin: benchmarks/peers_nonlin.py not found, skipped", file=sys.stderr)
            continue
        case = build_case(key, args.quick, libs)
        print(f"{case.name}: built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        solvers = fixedpoint_solvers(case, "numpy")
        if "torch" in case.maps:
            solvers += fixedpoint_solvers(case, "torch")
        if "torchdeq" in peers:
            solvers += torchdeq_solvers(case)
        if "scipy" in peers:
            solvers += scipy_solvers(case)
        if "jaxopt" in peers:
            if case.jax_map is None:
                skipped.append(f"jaxopt on {key}: no JAX version of this map, skipped")
            else:
                solvers += jaxopt_solvers(case)
        rows += measure_case(case, solvers, repeats, warmup)
        problems.append(dict(key=case.key, name=case.name, family=case.family, tol=case.tol, dtype=case.dtype,
                             batch=case.batch, max_iter=case.max_iter, params=case.params))

    print(f"\nTime: median of {repeats} runs after {warmup} warm-up run(s); ratios to fixedpoint's same method on "
          "the peer's library (NumPy for SciPy and JAXopt, PyTorch for torchdeq); verified res. = max over the "
          "batch of ‖g(x)−x‖₂/‖g(x)‖₂ in float64 at the returned x\n")
    print_rows(rows)
    if nonlin is not None:
        print_nonlin(nonlin[0])
    tg = targets(rows, nonlin[1] if nonlin is not None else None)
    print_targets(tg)
    for note in skipped:
        print(f"skipped: {note}")

    versions = {}
    for mod in ("scipy", "torch", "torchdeq", "jax", "jaxlib", "jaxopt"):
        if importlib.util.find_spec(mod) is not None:
            try:
                from importlib.metadata import version

                versions[mod] = version(mod)
            except Exception:
                versions[mod] = "unknown"
    machine = timing.machine_info({"torch"} if has_torch else set())
    machine["thread_env"]["XLA_FLAGS"] = os.environ.get("XLA_FLAGS")
    path = timing.write_json(out_path, dict(
        benchmark="compare_peers", command=timing.run_command("benchmarks.compare_peers"), machine=machine,
        peer_versions=versions,
        settings=dict(quick=args.quick, repeats=repeats, warmup=warmup, threads=args.threads, peers=peers,
                      problems=problems, reference_library=REFERENCE_LIBRARY,
                      fixedpoint_methods={k: m.options() for k, m in FIXEDPOINT_METHODS.items()}),
        skipped=skipped, runs=rows, nonlin_runs=nonlin[0] if nonlin is not None else [], targets=tg))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
