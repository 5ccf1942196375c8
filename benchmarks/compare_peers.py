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
H(1), which tells the physical root (H(1) ≈ 2.858 at c = 0.9999) from the non-physical one (≈ 2.959).

Peers that are not installed are skipped with a note.  Run from the repository root with one thread per
library (the script sets ``torch.set_num_threads`` and, unless already set, ``XLA_FLAGS``; the BLAS pools must
be pinned in the environment)::

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
    python -m benchmarks.compare_peers                                    # everything: several minutes
    python -m benchmarks.compare_peers --quick --out /tmp/peers.json      # small sizes, one repeat: seconds
    python -m benchmarks.compare_peers --problems h-equation tanh --peers torchdeq scipy
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


def h_case(n: int, c: float, libs: set[str]) -> Case:
    """Chandrasekhar's H-equation with N = ``n`` nodes and albedo ``c``: float64, tol 1e-8, one vector."""
    p = chandrasekhar(n, c, dtype="float64")
    maps: dict[str, tuple[Callable[[Any], Any], Any]] = {"numpy": (p.g, p.x0)}
    if "torch" in libs:
        pt = chandrasekhar(n, c, backend="torch", dtype="float64")
        maps["torch"] = (pt.g, pt.x0)
    jax_map = None
    if "jax" in libs:
        kt = _h_kernel_t(p.params["nodes"], p.params["weights"], c)

        def h_jax(h: Any, aux: Any) -> Any:
            jnp = importlib.import_module("jax.numpy")
            return 1.0 / (1.0 - h @ jnp.asarray(kt))

        jax_map = JaxMap(h_jax, np.asarray(p.x0), np.zeros(()))
    evaluate = p.params["evaluate"]
    return Case(key=f"h{n}-c{c:g}", name=f"H-equation N={n} c={c:g}", family="h-equation", tol=1e-8,
                dtype="float64", batch=False, max_iter=1000, maps=maps, jax_map=jax_map,
                residual64=lambda x: relative_residuals(p.g, x, False), solution=np.asarray(p.solution),
                evaluate=lambda x: float(np.asarray(evaluate(x, [1.0]))[0]),
                params=dict(n=n, c=c, x0="ones", solution="Newton's method in float64 (the physical root)",
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


PROBLEM_KEYS = [f"h{n}-c{c:g}" for n, c in H_CASES] + ["tanh", "poisson", "poisson-scaled", "conv"]
PROBLEM_GROUPS = {"h-equation": [k for k in PROBLEM_KEYS if k.startswith("h")]}


#: The iteration budget of the float32 problems with ``--quick`` (the H-equation keeps its 1000).
QUICK_MAX_ITER = 60


def build_case(key: str, quick: bool, libs: set[str]) -> Case:
    """The :class:`Case` named ``key`` (full sizes, or CI sizes with ``quick``)."""
    case = _build_case(key, quick, libs)
    if quick and case.family != "h-equation":
        case.max_iter = min(case.max_iter, QUICK_MAX_ITER)
    return case


def _build_case(key: str, quick: bool, libs: set[str]) -> Case:
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


def fixedpoint_solvers(case: Case, lib: str) -> list[Solver]:
    """fixedpoint's three methods on ``case`` in library ``lib``."""
    g, x0 = case.maps[lib]
    counter = Counted(g)
    sync = timing.setup_backend(lib, "cpu")[2]
    out = []
    for name, method in FIXEDPOINT_METHODS.items():
        def run(method: Any = method) -> Outcome:
            res = fixedpoint.solve(counter, x0, method=method, tol=case.tol, max_iter=case.max_iter,
                                   stop_mode="rel", batch=case.batch)
            return Outcome(res.x, bool(np.all(res.converged)), res.status, res.n_fev, float(np.max(res.residual)))

        out.append(Solver("fixedpoint", lib, name, f"fixedpoint.solve(method={type(method).__name__}())", run,
                          counter, sync, dict(method.options(), tol=case.tol, max_iter=case.max_iter,
                                              stop_mode="rel", batch=case.batch), REL_TEST))
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
                z, _, info = fn(mapped, x0_td, max_iter=case.max_iter, tol=case.tol, stop_mode="rel")
            rel = float(info["rel_lowest"].max())
            ok = rel < case.tol
            steps = int(info["nstep"].max())
            return Outcome(z.reshape(shape), ok, "converged" if ok else "not converged", steps, rel)

        settings = dict(defaults, tol=case.tol, max_iter=case.max_iter, stop_mode="rel",
                        note="documented defaults besides tol, max_iter, stop_mode")
        if method == "broyden":  # LBFGS_thres=None: max_iter pairs (u, v) allocated (zeroed) by every solve
            settings["pairs_allocated_bytes"] = 2 * case.max_iter * x0.numel() * x0.element_size()
        out.append(Solver("torchdeq", "torch", method, fname, run, counter, lambda: None, settings,
                          "‖g(x)−x‖/(‖g(x)‖+1e-9) < tol for the largest of the batch"))
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
                          "fixedpoint's, through tol_norm (the batch is one system)"))
    return out


def _scipy_nonlin(solve: Callable[..., Any], no_convergence: type[Exception], g: Callable[[Any], Any],
                  x0: np.ndarray, case: Case) -> Callable[[], Outcome]:
    """A run of SciPy's nonlinear solver ``solve`` on F(x) = g(x) − x with fixedpoint's stopping test."""
    tol_norm = ScipyRelativeNorm(g, tuple(x0.shape), case.n_samples)

    def run() -> Outcome:
        tol_norm.reset()
        try:
            x = solve(tol_norm.residual, x0, f_tol=case.tol, tol_norm=tol_norm, maxiter=case.max_iter)
        except no_convergence as exc:
            return Outcome(exc.args[0], False, "max_iter")
        return Outcome(x, True, "converged")

    return run


def _scipy_nonlin_settings(fname: str, case: Case) -> dict[str, Any]:
    """The settings of SciPy's ``anderson`` or ``broyden1`` as run here (the rest are its defaults)."""
    settings: dict[str, Any] = dict(
        f_tol=case.tol, tol_norm="relative residual per sample (max over the batch)", maxiter=case.max_iter,
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
    tols = case.tol * case.reference_norms()
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
            return Outcome(res.params, ok, "converged" if ok else "max_iter",
                           int(np.max(np.asarray(res.state.num_fun_eval))),
                           float(np.max(err / case.reference_norms())), n_fev=n_iter)

        settings: dict[str, Any] = dict(tol="tol × ‖x*‖₂ per sample", tol_per_sample=[float(t) for t in tols],
                                        maxiter=case.max_iter, jit=True, vmap_over_batch=case.batch,
                                        jax_enable_x64=x64, compile_s=compile_s,
                                        note="documented defaults besides tol and maxiter; compiled ahead of "
                                             "the timed runs")
        if method == "anderson":
            settings.update(history_size=5, mixing_frequency=1, beta=1.0, ridge=1e-5)
        out.append(Solver("jaxopt", "jax", method, f"jaxopt.{cls.__name__}", run, None, lambda: None, settings,
                          "absolute ‖g(x)−x‖₂ <= tol·‖x*‖₂ per sample"))
    return out


# --- measuring ------------------------------------------------------------------------------------

def as_float64(x: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A solution from any library as a NumPy float64 array of ``shape``."""
    if x is None:
        return np.full(shape, np.nan)
    a = np.asarray(x) if type(x).__module__.startswith("jax") else to_numpy(x)
    return np.asarray(a, dtype=np.float64).reshape(shape)


def run_once(s: Solver) -> tuple[float, Outcome]:
    """Seconds and outcome of one solve, the device synchronised before and after."""
    if s.counter is not None:
        s.counter.reset()
    s.sync()
    t0 = time.perf_counter()
    res = s.run()
    s.sync()
    elapsed = time.perf_counter() - t0
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
                t, last[i] = run_once(s)
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
        if case.solution is not None:
            row["max_error"] = float(np.max(np.abs(x - case.solution)) / np.max(np.abs(case.solution)))
        if case.evaluate is not None:
            row["h1"] = case.evaluate(x)
            row["root"] = root_label(row, case)
        rows.append(row)
        print(f"  {case.key:14s} {s.label:18s} {s.method:8s} {res.status:13s} n_fev={res.n_fev!s:>5} "
              f"res={row['verified_residual']:.2e} time={1e3 * row['time_s']['median']:9.2f} ms",
              file=sys.stderr, flush=True)
    add_ratios(rows)
    return rows


def root_label(row: dict[str, Any], case: Case) -> str:
    """H-equation: "physical" (Newton's root), "non-physical" (another root) or "not a root"."""
    if not row["verified_residual"] <= 100 * case.tol:
        return "not a root"
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


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the issue asks for, where the rows hold them."""
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
    for key in sorted({r["problem"] for r in rows if r["family"] == "h-equation"}, key=PROBLEM_KEYS.index):
        ours, theirs = by.get((key, "fixedpoint[numpy]", "anderson")), by.get((key, "scipy", "anderson"))
        if ours and theirs:
            h.append(dict(problem=key, fixedpoint_n_fev=ours["n_fev"], scipy_n_fev=theirs["n_fev"],
                          fev_le_scipy=bool(ours["n_fev"] <= theirs["n_fev"]), fixedpoint_root=ours["root"],
                          scipy_root=theirs["root"], fixedpoint_time_s=ours["time_s"]["median"],
                          scipy_time_s=theirs["time_s"]["median"],
                          time_ratio=ours["time_s"]["median"] / theirs["time_s"]["median"]))
    if h:
        out["h_equation_anderson_vs_scipy"] = h
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


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns 0.  See the module docstring and ``--help``."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_peers", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI size: H-equation N=200 only, small tanh/Poisson/conv problems, 1 repeat")
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
        problem_keys = [k for k in problem_keys if not k.startswith("h2000")]
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
    for key in problem_keys:
        t0 = time.perf_counter()
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
    tg = targets(rows)
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
        skipped=skipped, runs=rows, targets=tg))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
