"""Deep equilibrium (DEQ) layers: z* = f(z*, x) solved by fixedpoint; implicit, phantom or Jacobian-free gradients.

Forward pass
    The fixed point z* of the map z ↦ f(z, x) is found by :func:`fixedpoint.solve`
    (Anderson acceleration, limited-memory Broyden or forward iteration) under
    ``torch.no_grad()``, so no autograd graph is built while iterating.  By default
    the solver runs in NumPy for CPU tensors and in CuPy for CUDA tensors; ``f``
    still receives and returns torch tensors, exchanged with the solver's buffers
    through DLPack without copies (:mod:`fixedpoint.interop`).  ``backend="torch"``
    runs the solver on the tensors themselves.  Then f is evaluated once more at z*,
    with the graph, and that value is the layer's output.

Compaction (``compact``)
    In batch mode every sample has its own stopping test.  With compaction the
    samples that have stopped also leave the batch: f is evaluated as
    ``f(z[rows], x[rows])`` on the samples still iterating only (the solver's
    ``compact`` option gathers their rows of z, the layer the matching rows of x,
    and the solver scatters the result back), so that a batch costs the sum of
    its samples' iterations instead of B times its slowest sample's.  The same
    holds in the adjoint solve (below).  The solver's own work per iteration (norms,
    best iterate, the method's step) follows the samples still iterating whether or
    not f does (:func:`fixedpoint.solve`).  The answers are those without compaction,
    to the bit where f's rows do not depend on how many rows it is given.

Backward pass (``gradient``; first derivatives only: ``create_graph=True`` raises)
    ``"implicit"`` (the default): implicit differentiation.  With the loss gradient
    g = ∂L/∂z*, the implicit function theorem gives the gradients with respect to x
    and the parameters of f as the vector–Jacobian products of f at z* with the
    adjoint u, the fixed point of

        u = J_fᵀ u + g,        J_f = ∂f/∂z at (z*, x),

    solved with the same solver (its own method, tolerance and iteration cap); each
    J_fᵀ u is one ``torch.autograd.grad`` call on the graph of the single evaluation
    of f at z* (``retain_graph=True``, no graph per iteration).  With compaction the
    products are taken on the rows still iterating: once they are at most
    :data:`REBUILD_FRACTION` of the rows of the graph in use, f is evaluated again at
    ``(z*[rows], x[rows])`` with autograd and the products use that smaller graph;
    until then they run on the graph in use, with zeros in the other rows.  The
    adjoint solve is an :class:`torch.autograd.Function`, so no hook is left on any
    tensor or module.

    ``"phantom"``: the unrolling-based phantom gradient of Z. Geng, X.-Y. Zhang, S. Bai,
    Y. Wang & Z. Lin, "On Training Implicit Models", NeurIPS 2021 (Eq. 7): k damped
    steps z_{i+1} = (1 − λ) z_i + λ f(z_i, x) from z_0 = z* (held fixed), built with
    autograd; the output is z_k and the gradient is backpropagation through the k
    steps, i.e. the Neumann series of the implicit gradient truncated after k terms
    (for λ = 1 it tends to the implicit gradient as k grows, where f is contractive).

    ``"jfb"``: Jacobian-free backpropagation, S. W. Fung, H. Heaton, Q. Li, D. McKenzie,
    S. Osher & W. Yin, "JFB: Jacobian-Free Backpropagation for Implicit Networks",
    AAAI 2022: the output f(z*, x) is differentiated with z* held fixed, i.e. the
    implicit gradient with (I − J_f)⁻¹ replaced by I (phantom with k = 1, λ = 1).

Jacobian regularisation
    :func:`jacobian_frobenius` estimates ‖∂f/∂z‖²_F per sample (Hutchinson) on a
    graph of f, differentiably, so that it can be added to the loss (S. Bai, V. Koltun
    & J. Z. Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML
    2021); ``DEQ(...)(x, jacobian_probes=n)`` returns it for the layer's own
    evaluation of f at z*, without evaluating f again.

References: S. Bai, J. Z. Kolter & V. Koltun, "Deep Equilibrium Models", NeurIPS
2019; Z. Kolter, D. Duvenaud & M. Johnson, "Deep Implicit Layers" tutorial,
chapter 4; M. Al Dajani & D. Keyes, arXiv 2410.19460 (2024).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..backend import cupy_usable, synchronize
from ..checks import check_bool, check_choice, check_int, check_real, user_stacklevel
from ..iteration import check_common
from ..method import Method
from ..result import ConvergenceError, ConvergenceWarning, FixedPointResult
from ..solve import resolve_method, solve

__all__ = ["DEQ", "DEQStats", "SolveStats", "deq_fixed_point", "jacobian_frobenius", "solver_backend_for",
           "GRADIENTS", "REBUILD_FRACTION"]

#: Values of the ``backend`` argument of :class:`DEQ` and :func:`deq_fixed_point`.
SOLVER_BACKENDS = ("auto", "numpy", "cupy", "torch")

#: Values of the ``gradient`` argument: implicit differentiation, phantom gradients, Jacobian-free backpropagation.
GRADIENTS = ("implicit", "phantom", "jfb")

#: Defaults of ``gradient_steps`` and ``gradient_damping`` for ``gradient="phantom"`` (Geng et al. 2021 use
#: k = 5 and λ = 0.5 for multiscale DEQs).
PHANTOM_STEPS, PHANTOM_DAMPING = 5, 0.5

#: Adjoint solve with compaction: f is evaluated again, with autograd, on the rows still iterating once they
#: are at most this fraction of the rows of the graph the products run on (see docs/deq.md for the measurement).
REBUILD_FRACTION = 0.5

#: Solver options the layer sets itself (so they cannot be passed as ``options``).
_RESERVED = ("tol", "max_iter", "batch", "backend", "callback", "compact")

#: Values of the ``unconverged`` argument: what the layer does when its forward or adjoint solve ends unconverged.
UNCONVERGED = ("warn", "raise", "ignore")

#: Module types whose training mode makes f couple the samples or change between calls.
_UNSTABLE_IN_TRAINING = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)


def solver_backend_for(backend: str, device: torch.device | str) -> str:
    """The array library the solver runs in for tensors on ``device``.

    Parameters
    ----------
    backend : {"auto", "numpy", "cupy", "torch"}
        "auto": NumPy for CPU tensors, CuPy for CUDA tensors (PyTorch itself,
        with a ``RuntimeWarning``, when CuPy is not installed or has no usable
        GPU; PyTorch for any other device type).
    device : torch.device or str
        Device of the tensors.

    Returns
    -------
    str
        "numpy", "cupy" or "torch".

    Raises
    ------
    ValueError
        For an unknown ``backend``, or "cupy" with tensors that are not on a CUDA device.
    ImportError
        For "cupy" when CuPy is not importable or sees no GPU.
    """
    check_choice("backend", backend, SOLVER_BACKENDS)
    dev = torch.device(device)
    if backend == "auto":
        if dev.type == "cpu":
            return "numpy"
        if dev.type == "cuda":
            if cupy_usable():
                return "cupy"
            warnings.warn("backend='auto': CuPy is not installed or sees no GPU, so the DEQ solver runs in "
                          "PyTorch; install the cuda12 or cuda13 extra for the CuPy solver", RuntimeWarning,
                          stacklevel=3)
        return "torch"
    if backend == "cupy":
        if dev.type != "cuda":
            raise ValueError(f"backend='cupy' needs tensors on a CUDA device, got tensors on {dev}")
        if not cupy_usable():
            raise ImportError("backend='cupy' needs CuPy with a usable GPU (pip install '.[cuda12]' or "
                              "'.[cuda13]'); use backend='torch' to solve on the tensors themselves")
    return backend


@dataclass
class SolveStats:
    """Statistics of one fixed-point solve of a DEQ layer (the forward solve or the adjoint solve).

    Attributes
    ----------
    method : str
        Name of the method ("anderson", "forward", "broyden", or a user method's name).
    backend : str
        Library the solver ran in: "numpy", "cupy" or "torch".
    batch_size : int
        Number of samples solved together (1 when ``batch=False``).
    n_fev : int
        Evaluations of the map (of f in the forward solve, of the vector–Jacobian
        product J_fᵀ u in the adjoint solve), each on the whole batch or, with
        compaction, on the samples still iterating.
    n_iter_mean, n_iter_max : float, int
        Mean and largest number of iterations per sample until it converged or stopped.
    residual_mean, residual_max : float
        Mean and largest final residual per sample (relative residual
        ‖f(z) − z‖ / (‖f(z)‖ + ε) with the default ``stop_mode="rel"``).
    converged_fraction : float
        Fraction of the samples that reached the tolerance, in [0, 1].
    status : str
        The solve's :attr:`fixedpoint.FixedPointResult.status`.
    wall_time : float
        Seconds spent in the solve, conversions included (CUDA work synchronised).
    n_rows : int
        The cost in samples: in the forward solve the samples f was evaluated on, in
        all (:attr:`fixedpoint.FixedPointResult.n_rows`; ``batch_size * n_fev`` without
        compaction); in the adjoint solve the samples of the graphs the products were
        taken on (with compaction, a product on a graph that still holds samples that
        have stopped costs all its rows).
    n_graph_rows : int
        Adjoint solve with compaction: samples on which f was evaluated again with
        autograd, to take the products on a smaller graph (0 otherwise).
    compacted : bool
        Whether the solve evaluated its map on fewer samples than the batch at some point.
    cpu_time : float
        CPU seconds this process used during the solve (``time.process_time``): on a
        shared machine a measure of the cost that other processes do not inflate.
    map_time : float or None
        Seconds of ``wall_time`` spent inside the map (f, or the product with its
        graph rebuilds), the rest being the solver's own work; measured for CPU
        tensors only (None on other devices, where it would need a synchronisation
        per evaluation).
    residual_history : ndarray of float64, shape (n_fev, batch_size)
        Residual of every iterate of every sample, NaN once a sample has stopped.
    """

    method: str
    backend: str
    batch_size: int
    n_fev: int
    n_iter_mean: float
    n_iter_max: int
    residual_mean: float
    residual_max: float
    converged_fraction: float
    status: str
    wall_time: float
    n_rows: int = 0
    n_graph_rows: int = 0
    compacted: bool = False
    cpu_time: float = 0.0
    map_time: float | None = None
    residual_history: np.ndarray = field(repr=False, default_factory=lambda: np.empty((0, 0)))

    @classmethod
    def from_result(cls, res: FixedPointResult, backend: str, wall_time: float) -> SolveStats:
        """Summarise a batch-mode or single :class:`fixedpoint.FixedPointResult`."""
        iters = np.atleast_1d(np.asarray(res.n_iter))
        resid = np.atleast_1d(np.asarray(res.residual, dtype=np.float64))
        conv = np.atleast_1d(np.asarray(res.converged, dtype=bool))
        hist = np.asarray(res.residual_history, dtype=np.float64)
        return cls(method=res.method, backend=backend, batch_size=int(iters.size), n_fev=int(res.n_fev),
                   n_iter_mean=float(iters.mean()), n_iter_max=int(iters.max()),
                   residual_mean=float(resid.mean()), residual_max=float(resid.max()),
                   converged_fraction=float(conv.mean()), status=str(res.status), wall_time=float(wall_time),
                   n_rows=int(res.n_rows), compacted=int(res.n_rows) < int(iters.size) * int(res.n_fev),
                   residual_history=hist.reshape(hist.shape[0], -1))

    def as_dict(self) -> dict[str, Any]:
        """The statistics as a dict of Python scalars (no residual history), for logging."""
        return {key: getattr(self, key) for key in self.__dataclass_fields__ if key != "residual_history"}


@dataclass
class DEQStats:
    """Statistics of one call of a DEQ layer: its forward solve and what its backward pass cost.

    Attributes
    ----------
    forward : SolveStats
        The forward solve z* = f(z*, x).
    gradient : str
        The layer's ``gradient`` mode: "implicit", "phantom" or "jfb".
    graph_evals : int
        Evaluations of f with autograd after the solve, on the whole batch: 1, or
        ``gradient_steps`` for phantom gradients (the output is then z_k).
    backward : SolveStats or None
        The adjoint solve u = J_fᵀ u + ∂L/∂z* (implicit gradients), filled in when the
        backward pass through this call has run; None before, for calls without
        autograd, and for phantom and Jacobian-free gradients, which solve nothing.
    backward_vjps : int or None
        Vector–Jacobian products through f in the backward pass, filled in when it runs:
        the adjoint solve's ``n_fev`` plus the one that carries u to x and the
        parameters (implicit), ``gradient_steps`` (phantom) or 1 (JFB).
    backward_rows : int or None
        The samples those products were taken on, in all (each product on the whole
        batch counts ``batch_size``): the cost of the backward pass in samples.
    backward_time : float or None
        Seconds of the layer's backward pass, from the gradient's arrival at the layer's
        output to its arrival at x (CUDA work synchronised): the adjoint solve and the
        final product (implicit) or the products through the unrolled steps.  None when
        x does not require grad (the end is then not observed) or before the backward pass.
    """

    forward: SolveStats
    gradient: str = "implicit"
    graph_evals: int = 1
    backward: SolveStats | None = None
    backward_vjps: int | None = None
    backward_rows: int | None = None
    backward_time: float | None = None


@dataclass(frozen=True)
class _Config:
    method: Method
    solver_options: dict  # common solver options besides the layer's own (stop_mode, check_every)
    backend: str
    tol: float
    max_iter: int
    batch: bool
    compact: bool | str
    gradient: str
    gradient_steps: int
    gradient_damping: float
    backward_method: Method
    backward_solver_options: dict
    backward_tol: float
    backward_max_iter: int
    unconverged: str = "warn"


def _resolve(method, options, name):
    """(method object, common solver options) from a method name or object and a dict of options."""
    if not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict of solver options, got {type(options).__name__}")
    for key in options:
        if key in _RESERVED:
            raise TypeError(f"{name} must not contain {key!r}: the DEQ layer sets it (use the layer's own "
                            f"tol, max_iter, batch, compact, backend arguments)")
    method_obj, common = resolve_method(method, options, where="DEQ")
    return method_obj, check_common(common)


def _check_compact(compact, batch):
    compact = check_choice("compact", compact, (False, True, "auto"))
    if compact is True and not batch:
        raise ValueError("compact=True evaluates f on the samples still iterating, so it needs batch=True "
                         "(compact='auto' or False with batch=False)")
    return compact if batch else False


def _check_gradient(gradient, steps, damping, backward_given):
    check_choice("gradient", gradient, GRADIENTS)
    if gradient != "phantom":
        for name, value in (("gradient_steps", steps), ("gradient_damping", damping)):
            if value is not None:
                raise ValueError(f"{name} applies to gradient='phantom' only, got {name}={value!r} with "
                                 f"gradient={gradient!r}")
    if gradient != "implicit" and backward_given:
        raise ValueError(f"{', '.join(backward_given)} set(s) the adjoint solve of gradient='implicit'; "
                         f"gradient={gradient!r} solves no adjoint")
    steps = PHANTOM_STEPS if steps is None else check_int("gradient_steps", steps, 1)
    damping = PHANTOM_DAMPING if damping is None else check_real("gradient_damping", damping, 0.0, 1.0,
                                                                  low_open=True)
    if gradient != "phantom":  # one evaluation of f at z*
        steps, damping = 1, 1.0
    return gradient, steps, damping


def _make_config(method, backend, tol, max_iter, batch, options, backward_method, backward_tol,
                 backward_max_iter, backward_options, compact="auto", gradient="implicit", gradient_steps=None,
                 gradient_damping=None, unconverged="warn"):
    check_choice("backend", backend, SOLVER_BACKENDS)
    unconverged = check_choice("unconverged", unconverged, UNCONVERGED)
    tol = check_real("tol", tol, 0.0, None, low_open=True)
    max_iter = check_int("max_iter", max_iter, 1)
    batch = check_bool("batch", batch)
    compact = _check_compact(compact, batch)
    given = [name for name, value in (("backward_method", backward_method), ("backward_tol", backward_tol),
                                      ("backward_max_iter", backward_max_iter),
                                      ("backward_options", backward_options)) if value is not None]
    gradient, gradient_steps, gradient_damping = _check_gradient(gradient, gradient_steps, gradient_damping, given)
    method_obj, common = _resolve(method, options or {}, "options")
    backward_tol = tol if backward_tol is None else check_real("backward_tol", backward_tol, 0.0, None,
                                                                low_open=True)
    backward_max_iter = max_iter if backward_max_iter is None else check_int("backward_max_iter",
                                                                             backward_max_iter, 1)
    if backward_method is None and backward_options is None:
        backward_obj, backward_common = method_obj, common
    else:
        if backward_method is None:  # the forward method's kind, with other options
            backward_method = method_obj.name if isinstance(method, Method) else method
        backward_obj, backward_common = _resolve(backward_method, backward_options or {}, "backward_options")
    return _Config(method_obj, common, backend, tol, max_iter, batch, compact, gradient, gradient_steps,
                   gradient_damping, backward_obj, backward_common, backward_tol, backward_max_iter, unconverged)


def _unstable_message(where, mod):
    return (f"{where} is a {type(mod).__name__} in training mode: inside a DEQ's fixed-point map it would "
            "change f on every call (dropout) or mix the samples and update running statistics on every "
            "iteration (batch norm). Use GroupNorm/LayerNorm in f, put that layer in eval mode, or move it "
            "out of f")


def _check_modes(f):
    """Refuse f with layers whose training mode makes f couple samples or change from call to call."""
    if not isinstance(f, torch.nn.Module):
        return
    for name, mod in f.named_modules():
        if mod.training and isinstance(mod, _UNSTABLE_IN_TRAINING):
            raise ValueError(_unstable_message(f"f.{name}" if name else "f", mod))


def _refuse_unstable(module, args):
    """A global forward pre-hook: refuse, before it runs (its running statistics untouched), a module of
    :data:`_UNSTABLE_IN_TRAINING` in training mode called by an f that is not a module (a closure)."""
    if module.training and isinstance(module, _UNSTABLE_IN_TRAINING):
        raise ValueError(_unstable_message("a module called by f", module))


class _Watch:
    """While solving with an f that is not a ``torch.nn.Module`` (whose layers :func:`_check_modes` cannot
    see): refuse the layers of :data:`_UNSTABLE_IN_TRAINING` in training mode when f calls them."""

    def __init__(self, f):
        self.on = not isinstance(f, torch.nn.Module)
        self.handle = None

    def __enter__(self):
        if self.on:
            self.handle = torch.nn.modules.module.register_module_forward_pre_hook(_refuse_unstable)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
        return False


def _as_f_error(exc):
    """An error of the solver's checks of the map, reworded for the layer's user, whose function is f(z, x)."""
    text = str(exc)
    for old, new in (("g must not modify its argument", "f must not modify z"), ("g must return", "f must return"),
                     ("g returned its argument", "f returned z")):
        text = text.replace(old, new)
    if text == str(exc):
        return exc
    new_exc = type(exc)(text)
    new_exc.fixedpoint_result = getattr(exc, "fixedpoint_result", None)
    return new_exc


def _signal_unconverged(cfg, which, stats):
    """The layer's ``unconverged`` policy for a solve (``which``: "forward" or "adjoint") that did not converge."""
    if cfg.unconverged == "ignore" or stats.converged_fraction >= 1.0:
        return
    where = "layer.stats.forward" if which == "forward" else "layer.stats.backward"
    so = "the output is not a fixed point of f" if which == "forward" else "the gradient is not the implicit gradient"
    if cfg.unconverged == "raise":
        raise ConvergenceError(f"DEQ {which} solve ended unconverged (status {stats.status!r}, "
                               f"{1 - stats.converged_fraction:.3g} of the samples above tol): {so}; see {where}, "
                               "raise max_iter or tol, or make f more contractive", stats)
    # The same text every time (the numbers are in the stats), so that Python's default filter shows it once.
    warnings.warn(f"DEQ {which} solve ended unconverged for some samples: {so} (see {where}; "
                  "unconverged='raise' makes this an error, 'ignore' silences it)", ConvergenceWarning,
                  stacklevel=user_stacklevel())



def _run_solve(g, u0, method, tol, max_iter, batch, options, backend, compact=False):
    """Solve u = g(u) for a torch tensor u0 under no_grad with a method object; return (result, SolveStats)."""
    t0, c0 = time.perf_counter(), time.process_time()
    extra = {"compact": compact} if compact is not False else {}
    with torch.no_grad():
        res = solve(g, u0, method, tol=tol, max_iter=max_iter, batch=batch, backend=backend, **options, **extra)
    synchronize(u0.device)
    stats = SolveStats.from_result(res, backend, time.perf_counter() - t0)
    stats.cpu_time = time.process_time() - c0
    return res, stats


class _Timed:
    """A map that adds the seconds spent in it to ``seconds`` (CPU tensors: no synchronisation needed)."""

    def __init__(self, g):
        self.g, self.seconds = g, 0.0

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self.g(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def _timed_solve(g, u0, *args):
    """:func:`_run_solve` with the map's own time in ``SolveStats.map_time`` (CPU tensors only)."""
    if u0.device.type != "cpu":
        return _run_solve(g, u0, *args)
    timed = _Timed(g)
    res, stats = _run_solve(timed, u0, *args)
    stats.map_time = timed.seconds
    return res, stats


def _solve(g, u0, method, tol, max_iter, batch, options, backend, compact):
    """The layer's solve of u = g(u); returns (x, SolveStats)."""
    res, stats = _timed_solve(g, u0, method, tol, max_iter, batch, options, backend, compact)
    return res.x, stats


class _RowSet:
    """Tells whether the solver's ``rows`` are the set seen last time, without synchronising a GPU.

    The solver keeps one index array between host checks and only ever drops samples, so a set
    with as many rows is the same set: on a GPU the count and the array's address are compared;
    on the CPU, where it costs no synchronisation, the indices themselves.
    """

    def __init__(self):
        self.key, self.rows = None, None

    def changed(self, rows):
        key = (rows.shape[0], rows.data_ptr(), rows.device)
        if rows.device.type == "cpu":
            same = self.rows is not None and self.rows.shape == rows.shape and bool(torch.equal(self.rows, rows))
        else:
            same = key == self.key
        if same:
            return False
        self.key, self.rows = key, rows.clone()
        return True


class _RowsOf:
    """``t[rows]`` for the sample indices the solver passes, gathered once per set of rows.

    The set changes only at the solver's host checks, and ``rows`` covers the whole batch
    (then ``t`` itself is returned) until compaction starts.
    """

    def __init__(self, t):
        self.t, self.seen, self.value = t, _RowSet(), None

    def __call__(self, rows):
        if self.t.dim() == 0 or rows.shape[0] == self.t.shape[0]:  # increasing and distinct: every row
            return self.t
        if self.seen.changed(rows):
            self.value = self.t.index_select(0, rows.to(self.t.device))
        return self.value


class _Timer:
    """The ends of one call's backward pass, for :attr:`DEQStats.backward_time` (and its cost, once known)."""

    def __init__(self, stats, device, vjps=None, rows=None):
        self.stats, self.device, self.vjps, self.rows, self.t0 = stats, device, vjps, rows, None

    def start(self):
        synchronize(self.device)
        self.t0 = time.perf_counter()
        if self.vjps is not None:
            self.stats.backward_vjps, self.stats.backward_rows = self.vjps, self.rows

    def stop(self):
        if self.t0 is not None:
            synchronize(self.device)
            self.stats.backward_time = time.perf_counter() - self.t0


class _Clock(torch.autograd.Function):
    """A copy of a tensor whose backward notes that the gradient has passed: start or end of the layer's
    backward pass (at its output, or at x once every contribution to x's gradient has been summed)."""

    @staticmethod
    def forward(ctx, t, timer, end):
        ctx.timer, ctx.end = timer, end
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.end:
            ctx.timer.stop()
        else:
            ctx.timer.start()
        return grad, None, None


class _Adjoint:
    """The adjoint map u ↦ J_fᵀ u + g at z*, on every sample or (compaction) on the rows still iterating.

    Products are ``torch.autograd.grad`` calls on the graph of f at z* (``retain_graph=True``).
    With compaction, when the rows still iterating are at most :data:`REBUILD_FRACTION` of the
    rows of the graph in use, f is evaluated again at ``(z*[rows], x[rows])`` with autograd and
    later products use that graph; otherwise the product runs on the graph in use with u
    scattered into zeros.  Rows only ever shrink (samples that stop do not come back).
    """

    def __init__(self, f, z, z_leaf, x, grad, batch):
        self.f, self.x, self.grad = f, x, grad
        self.z_star = z_leaf.detach()
        self.graph = (z, z_leaf)
        self.graph_rows = None  # indices of the graph's samples in the batch; None: every sample
        self.size = z.shape[0] if batch else 1  # samples of the graph in use
        self.batch = batch
        self.seen, self.pos, self.grad_rows = _RowSet(), None, None
        self.vjp_rows = 0  # samples of the graphs the products were taken on, in all
        self.rebuilt_rows = 0  # samples f was evaluated on again

    def _vjp(self, u):
        out, leaf = self.graph
        (v,) = torch.autograd.grad(out, leaf, u, retain_graph=True)
        self.vjp_rows += self.size
        return v

    def __call__(self, u, rows=None):
        if rows is None or (self.graph_rows is None and rows.shape[0] == self.size):
            return self._vjp(u) + self.grad  # out of place: the product may be u itself (f(z) = z + ...)
        if self.seen.changed(rows):
            self._select(rows)
        if self.pos is None:  # the graph holds exactly these rows
            return self._vjp(u) + self.grad_rows
        w = u.new_zeros((self.size,) + tuple(u.shape[1:]))
        w.index_copy_(0, self.pos, u)
        return self._vjp(w).index_select(0, self.pos) + self.grad_rows

    def _select(self, rows):
        """New rows (at a host check): rebuild the graph on them when they are few enough; their places in it."""
        rows = self.seen.rows  # a copy: the solver's array is its own
        self.grad_rows = self.grad.index_select(0, rows)
        k = rows.shape[0]
        if k <= REBUILD_FRACTION * self.size:
            with torch.enable_grad():
                leaf = self.z_star.index_select(0, rows).requires_grad_()
                x = self.x if self.x.dim() == 0 else self.x.index_select(0, rows)
                self.graph = (self.f(leaf, x), leaf)
            self.graph_rows, self.size = rows, k
            self.rebuilt_rows += k
        if k == self.size:
            self.pos = None
        elif self.graph_rows is None:
            self.pos = rows
        else:
            self.pos = torch.searchsorted(self.graph_rows, rows)


@dataclass
class _Backward:
    """What the adjoint solve of one call needs besides the saved tensors."""

    f: Callable
    x: torch.Tensor  # detached
    cfg: _Config
    backend: str
    stats: DEQStats
    timer: _Timer


class _ImplicitBackward(torch.autograd.Function):
    """Identity on z = f(z*, x) in the forward pass; in the backward pass, replaces the incoming
    gradient ∂L/∂z by the adjoint u = J_fᵀ u + ∂L/∂z, which then flows through the graph of f
    to x and the parameters."""

    @staticmethod
    def forward(ctx, z, z_leaf, job):
        ctx.save_for_backward(z, z_leaf)
        ctx.job = job
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative is being built
            raise RuntimeError(
                "second derivatives through a DEQ layer are not supported: the implicit gradient's dependence on "
                "the parameters through the adjoint solve is not differentiated, so create_graph=True would give "
                "wrong higher-order gradients. Compute them without create_graph, or differentiate an unrolled "
                "evaluation of f instead")
        job = ctx.job
        job.timer.start()
        z, z_leaf = ctx.saved_tensors
        cfg = job.cfg
        adjoint = _Adjoint(job.f, z, z_leaf, job.x, grad.contiguous(), cfg.batch)
        with _Watch(job.f):
            u, stats = _solve(adjoint, adjoint.grad, cfg.backward_method, cfg.backward_tol, cfg.backward_max_iter,
                              cfg.batch, cfg.backward_solver_options, job.backend, cfg.compact)
        stats.n_rows, stats.n_graph_rows = adjoint.vjp_rows, adjoint.rebuilt_rows
        batch_rows = z.shape[0] if cfg.batch else 1
        job.stats.backward = stats
        job.stats.backward_vjps = stats.n_fev + 1  # and the product that carries u to x and the parameters
        job.stats.backward_rows = stats.n_rows + batch_rows
        _signal_unconverged(cfg, "adjoint", stats)
        return u, None, None


def jacobian_frobenius(fz: torch.Tensor, z: torch.Tensor, n_probes: int = 1, *,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Hutchinson estimate of ‖∂f/∂z‖²_F per sample, differentiable, for Jacobian regularisation.

    For each sample b, with J_b = ∂f_b/∂z_b (d × d, d the entries of a sample) and
    Gaussian probes v ~ N(0, I), E‖J_bᵀ v‖² = tr(J_b J_bᵀ) = ‖J_b‖²_F
    (M. F. Hutchinson, Commun. Stat. Simul. Comput. 18, 1989); each probe is one
    vector–Jacobian product through the graph of ``fz`` with ``create_graph=True``,
    so the estimate can be added to a loss and differentiated with respect to the
    parameters of f (S. Bai, V. Koltun & J. Z. Kolter, "Stabilizing Equilibrium
    Models by Jacobian Regularization", ICML 2021, Eq. 5; unlike their code the
    estimate is per sample and not divided by the number of entries).

    Parameters
    ----------
    fz : torch.Tensor, shape (B, ...)
        f(z, x), computed from ``z`` with autograd.
    z : torch.Tensor, shape of ``fz``
        The tensor ``fz`` was computed from; it must require grad (e.g.
        ``z = z_star.detach().requires_grad_()``).  Samples along the leading axis
        must be mapped independently (as a DEQ's f in batch mode).
    n_probes : int, default 1
        Number of probes averaged; >= 1.
    generator : torch.Generator, optional
        Source of the probes (default: torch's global generator).

    Returns
    -------
    torch.Tensor, shape (B,), fz's dtype
        The estimates, attached to the graph (differentiable with respect to the
        parameters of f, x and z).

    Raises
    ------
    TypeError
        For ``fz`` or ``z`` that is not a tensor, or a non-integer ``n_probes``.
    ValueError
        For ``n_probes < 1``, shapes that differ or lack a batch axis, a ``z`` that does not
        require grad, or an ``fz`` without a graph (computed under ``torch.no_grad()``).

    Notes
    -----
    Variance: for one sample, with A = J_b J_bᵀ, Var‖J_bᵀ v‖² = 2‖A‖²_F = 2 Σ σᵢ⁴ (σᵢ the
    singular values of J_b), so the relative standard deviation of the mean of n probes is

        sqrt(2 Σ σᵢ⁴ / n) / Σ σᵢ²  ∈  [sqrt(2 / (n r)), sqrt(2 / n)],

    r being the number of nonzero singular values: sqrt(2/(n d)) when all singular values
    are equal, sqrt(2/n) (141 % for one probe) when J_b has rank one.  The error of
    the batch mean shrinks by a further sqrt(B).  For a regulariser a single probe is
    usual (the noise averages out over the training steps, as in Bai et al.); to
    *measure* ‖J‖²_F to 10 % for a sample whose Jacobian is dominated by a few
    directions, take n ≈ 200 / r_eff with r_eff = (Σ σᵢ²)² / Σ σᵢ⁴ (then 2/(n r_eff) = 0.01).
    """
    if not isinstance(fz, torch.Tensor) or not isinstance(z, torch.Tensor):
        raise TypeError(f"fz and z must be torch tensors, got {type(fz).__name__} and {type(z).__name__}")
    n_probes = check_int("n_probes", n_probes, 1)
    if fz.shape != z.shape or fz.dim() < 1:
        raise ValueError(f"fz and z must have the same shape with a leading batch axis, got {tuple(fz.shape)} and "
                         f"{tuple(z.shape)}")
    if not z.requires_grad:
        raise ValueError("z must require grad (z = z_star.detach().requires_grad_(), then fz = f(z, x))")
    if fz.grad_fn is None:
        raise ValueError("fz has no autograd graph: compute fz = f(z, x) from z with grad mode on (not under "
                         "torch.no_grad())")
    total = fz.new_zeros(fz.shape[0])
    for _ in range(n_probes):
        v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
        (vj,) = torch.autograd.grad(fz, z, v, create_graph=True, retain_graph=True)
        total = total + vj.square().flatten(1).sum(1)
    return total / n_probes


def _deq(f, x, z0, cfg, jacobian_probes=0):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if z0 is None:
        z0 = torch.zeros_like(x)
    elif not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor or None, got {type(z0).__name__}")
    elif z0.device != x.device:
        raise ValueError(f"z0 must be on x's device {x.device}, got {z0.device}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must have a floating dtype, got {z0.dtype}")
    if cfg.batch and (z0.dim() == 0 or (x.dim() > 0 and z0.shape[0] != x.shape[0])):
        raise ValueError(f"batch=True needs z0 with x's leading batch axis, got z0 of shape {tuple(z0.shape)} "
                         f"and x of shape {tuple(x.shape)}")
    jacobian_probes = check_int("jacobian_probes", jacobian_probes, 0)
    grad_on = torch.is_grad_enabled()
    if jacobian_probes and not grad_on:
        raise ValueError("jacobian_probes > 0 needs grad mode (the estimate is differentiated through f's graph); "
                         "call the layer without it under torch.no_grad()")
    _check_modes(f)
    backend = solver_backend_for(cfg.backend, z0.device)

    fmap: Callable[..., torch.Tensor]
    if cfg.compact is not False:
        x_rows = _RowsOf(x)
        fmap = lambda z, rows: f(z, x_rows(rows))  # noqa: E731
    else:
        fmap = lambda z: f(z, x)  # noqa: E731

    try:
        with _Watch(f):
            z_star, fstats = _solve(fmap, z0.detach(), cfg.method, cfg.tol, cfg.max_iter, cfg.batch,
                                    cfg.solver_options, backend, cfg.compact)
    except (TypeError, ValueError) as exc:
        err = _as_f_error(exc)
        if err is exc:
            raise
        raise err from None
    _signal_unconverged(cfg, "forward", fstats)
    steps = cfg.gradient_steps if cfg.gradient == "phantom" else 1
    stats = DEQStats(forward=fstats, gradient=cfg.gradient, graph_evals=steps)
    z_star = z_star.detach()
    batch_rows = z_star.shape[0] if cfg.batch else 1
    timer = _Timer(stats, z_star.device, *(() if cfg.gradient == "implicit" else (steps, steps * batch_rows)))
    x_in = _Clock.apply(x, timer, True) if grad_on and x.requires_grad else x
    # z* is a leaf that requires grad where something differentiates with respect to it: the adjoint's
    # products (implicit) and the Jacobian estimate
    leaf = bool(jacobian_probes) or (grad_on and cfg.gradient == "implicit")
    z_first = z_star.requires_grad_() if leaf else z_star
    z, fz_first = z_first, z_first
    for i in range(steps):  # one evaluation of f at z*, or the phantom gradient's damped steps
        fz = f(z, x_in)
        if i == 0:
            if tuple(fz.shape) != tuple(z_star.shape):
                raise ValueError(f"f must return z's shape {tuple(z_star.shape)}, got {tuple(fz.shape)}")
            fz_first = fz
        z = fz if cfg.gradient_damping == 1.0 else torch.lerp(z, fz, cfg.gradient_damping)
    jac = jacobian_frobenius(fz_first, z_first, jacobian_probes) if jacobian_probes else None
    if not grad_on or not z.requires_grad:  # nothing to differentiate (no_grad, or nothing in f requires grad)
        return z, stats, jac
    if cfg.gradient == "implicit":
        job = _Backward(f, x.detach(), cfg, backend, stats, timer)
        return _ImplicitBackward.apply(z, z_first, job), stats, jac
    return _Clock.apply(z, timer, False), stats, jac


_PARAMETERS = """
    compact : {"auto", True, False}, default "auto"
        Batch mode: evaluate f only on the samples still iterating, in the forward
        and in the adjoint solve (module documentation): True from the start, "auto"
        once at most :data:`fixedpoint.iteration.COMPACT_AUTO` (half) of the samples
        are still iterating, so that a GPU keeps large kernels while most samples
        iterate; False: f always sees the whole batch.  The answers are the same up
        to rounding.  Ignored ("auto") or refused (True) with ``batch=False``.
    gradient : {"implicit", "phantom", "jfb"}, default "implicit"
        How the backward pass differentiates z*: implicit differentiation (an adjoint
        fixed-point solve), phantom gradients (``gradient_steps`` damped unrolled
        steps from z*; Geng et al., NeurIPS 2021) or Jacobian-free backpropagation
        (the gradient of f(z*, x) with z* held fixed; Fung et al., AAAI 2022).
    gradient_steps : int, optional
        Phantom gradients: the number k of unrolled steps, >= 1 (default 5).
    gradient_damping : float, optional
        Phantom gradients: λ in z_{i+1} = (1 − λ) z_i + λ f(z_i, x), in (0, 1] (default
        0.5; 1 is undamped).
    backward_method : str or fixedpoint.method.Method, optional
        Method of the adjoint fixed point (implicit gradients); default ``method`` (the same object).
    backward_tol : float, optional
        Tolerance of the adjoint solve; default ``tol``.
    backward_max_iter : int, optional
        Iteration cap of the adjoint solve; default ``max_iter``.
    backward_options : dict, optional
        Solver options of the adjoint solve, as ``options``; default ``options`` when
        neither ``backward_method`` nor ``backward_options`` is given, else fixedpoint's
        defaults.
    unconverged : {"warn", "raise", "ignore"}, default "warn"
        When the forward solve or the adjoint solve ends with samples above the
        tolerance (max_iter, divergence, non-finite values): issue a
        :class:`fixedpoint.ConvergenceWarning` (once per place in the program, by
        Python's default filter), raise :class:`fixedpoint.ConvergenceError` (from
        the call, or from ``backward()`` for the adjoint), or do nothing.  The
        statistics are in the returned ``stats`` / ``layer.stats`` in every case."""


def deq_fixed_point(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                    z0: torch.Tensor | None = None, *, method: str | Method = "anderson", backend: str = "auto",
                    tol: float = 1e-2, max_iter: int = 1000, batch: bool = True, compact: bool | str = "auto",
                    gradient: str = "implicit", gradient_steps: int | None = None,
                    gradient_damping: float | None = None, options: dict[str, Any] | None = None,
                    backward_method: str | Method | None = None, backward_tol: float | None = None,
                    backward_max_iter: int | None = None, backward_options: dict[str, Any] | None = None,
                    jacobian_probes: int = 0, unconverged: str = "warn") -> tuple:
    """Fixed point z* = f(z*, x) of a DEQ layer, differentiable (implicitly, by phantom gradients or JFB).

    The functional form of :class:`DEQ` (see the module documentation for the methods).

    Parameters
    ----------
    f : callable
        ``f(z, x) -> tensor`` of z's shape, dtype and device; usually a
        ``torch.nn.Module``.  In batch mode it must treat the samples (leading
        axis) independently; with compaction it is called on some of them, with
        the matching rows of x.  Gradients flow to x and to every tensor f uses
        that requires grad (its parameters).
    x : torch.Tensor
        The input injection, any shape with z0's leading batch axis, floating dtype
        (float32 or float64 typical).
    z0 : torch.Tensor, optional
        Initial guess, default ``torch.zeros_like(x)``; its shape is z's shape.
    method : str or fixedpoint.method.Method, default "anderson"
        Method of the forward solve: an object (``fixedpoint.Anderson(m=5)``,
        ``fixedpoint.Broyden()``, ``fixedpoint.ForwardIteration()``, ...) or a name
        ("anderson", "forward", "broyden") whose options are given in ``options``.
    backend : {"auto", "numpy", "cupy", "torch"}, default "auto"
        Array library the solver runs in (:func:`solver_backend_for`): "auto" is
        NumPy for CPU tensors and CuPy for CUDA tensors, zero-copy through DLPack.
    tol : float, default 1e-2
        Tolerance on the residual (relative by default, see ``options["stop_mode"]``).
    max_iter : int, default 1000
        Iteration cap of the forward solve.
    batch : bool, default True
        Per-sample solves (own residual, convergence flag and iteration count for
        every sample along the leading axis); False solves the whole batch as one vector.""" + _PARAMETERS + """
    options : dict, optional
        Further solver options: ``stop_mode`` and ``check_every`` (as for
        :func:`fixedpoint.solve`) and, with a method name, the method's own (``m``,
        ``beta``, ``lam``, ``lam_mode``, ``damping``, ...); defaults are fixedpoint's
        (m = 5, β = 1.0, λ = 1e-5, stop_mode "rel").  All are validated here.
    jacobian_probes : int, default 0
        With n > 0, also return :func:`jacobian_frobenius` with n probes on the
        layer's own evaluation of f at z* (no further evaluation of f); needs grad mode.

    Returns
    -------
    z : torch.Tensor
        f(z*, x) at the solver's z* (one evaluation past the solver's iterate; for
        phantom gradients z_k, k damped steps past it), shape of z0; attached to the
        autograd graph when grad mode is on.
    stats : DEQStats
        Forward solve statistics; the backward fields are filled in by the backward pass.
    jacobian : torch.Tensor, shape (B,)
        Only with ``jacobian_probes > 0``: the estimate of ‖∂f/∂z‖²_F per sample at z*.

    Raises
    ------
    TypeError
        For a non-tensor ``x`` or ``z0``, a non-floating ``z0``, an unknown solver
        option, or a reserved one (``tol``, ``max_iter``, ``batch``, ``compact``,
        ``backend``, ``callback``) inside ``options``.
    ValueError
        For a bad option value (the message names it): a ``gradient`` or ``compact``
        outside its choices, ``gradient_steps < 1``, ``gradient_damping`` outside (0, 1],
        phantom options with another gradient, adjoint options with phantom or JFB
        gradients, ``compact=True`` with ``batch=False``; a ``z0`` on another device
        or without x's batch axis, an ``f`` that returns another shape, an ``f``
        holding a BatchNorm or Dropout layer in training mode, or ``jacobian_probes``
        under ``torch.no_grad()``.
    ImportError
        For ``backend="cupy"`` without a usable CuPy.

    ConvergenceError
        With ``unconverged="raise"``, when the forward solve ends unconverged (the adjoint
        solve's is raised by ``backward()``).

    Notes
    -----
    Samples that do not converge within ``max_iter`` are not an error by default: their
    best iterate is used, ``stats.forward.converged_fraction`` is below 1, and a
    :class:`fixedpoint.ConvergenceWarning` says so (``unconverged``).
    """
    cfg = _make_config(method, backend, tol, max_iter, batch, options, backward_method, backward_tol,
                       backward_max_iter, backward_options, compact, gradient, gradient_steps, gradient_damping,
                       unconverged)
    z, stats, jac = _deq(f, x, z0, cfg, jacobian_probes)
    return (z, stats) if jac is None else (z, stats, jac)


class DEQ(torch.nn.Module):
    """A deep equilibrium layer: returns z* with z* = f(z*, x), trained by implicit differentiation
    (default), phantom gradients or Jacobian-free backpropagation.

    See :mod:`fixedpoint.torch.deq` for the methods and :func:`deq_fixed_point`
    for the parameters, which are the same; solver options of the method (``m``,
    ``beta``, ``lam``, ``lam_mode``, ``stop_mode``, ...) are keyword arguments.
    Defaults are those of Al Dajani & Keyes (arXiv 2410.19460): Anderson with
    m = 5, β = 1.0, λ = 1e-5, relative residual tolerance 1e-2, at most 1000
    iterations; and compaction from half the batch on (``compact="auto"``).

    Parameters
    ----------
    f : torch.nn.Module or callable
        ``f(z, x)``; a module is registered as the submodule ``f``, so its
        parameters belong to this layer.
    method, backend, tol, max_iter, batch, compact, gradient, gradient_steps, gradient_damping, unconverged
        As in :func:`deq_fixed_point`.
    backward_method, backward_tol, backward_max_iter, backward_options
        As in :func:`deq_fixed_point` (implicit gradients only).
    **options
        Method options for the forward solve (and the adjoint solve, unless
        ``backward_options`` is given).

    Attributes
    ----------
    stats : DEQStats or None
        Statistics of the latest call (None before the first); its backward fields
        are filled in when the backward pass through that call runs.

    Raises
    ------
    TypeError, ValueError
        At construction for a bad option (named in the message); at call time as
        :func:`deq_fixed_point`.

    Examples
    --------
    >>> import torch
    >>> from fixedpoint.torch import DEQ
    >>> lin = torch.nn.Linear(4, 4)
    >>> layer = DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x), tol=1e-6)
    >>> z = layer(torch.randn(3, 4))
    >>> layer.stats.forward.converged_fraction
    1.0
    >>> z, jac = DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x), gradient="phantom")(torch.randn(3, 4),
    ...                                                                             jacobian_probes=1)
    >>> jac.shape
    torch.Size([3])
    """

    def __init__(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, method: str | Method = "anderson",
                 backend: str = "auto", tol: float = 1e-2, max_iter: int = 1000, batch: bool = True,
                 compact: bool | str = "auto", gradient: str = "implicit", gradient_steps: int | None = None,
                 gradient_damping: float | None = None, backward_method: str | Method | None = None,
                 backward_tol: float | None = None, backward_max_iter: int | None = None,
                 backward_options: dict[str, Any] | None = None, unconverged: str = "warn", **options: Any) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be a torch.nn.Module or a callable f(z, x), got {f!r}")
        self.f = f
        self.config = _make_config(method, backend, tol, max_iter, batch, options, backward_method, backward_tol,
                                   backward_max_iter, backward_options, compact, gradient, gradient_steps,
                                   gradient_damping, unconverged)
        self.stats: DEQStats | None = None

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None, *, jacobian_probes: int = 0) -> Any:
        """Solve z* = f(z*, x) from ``z0`` (default zeros of x's shape); see :func:`deq_fixed_point`.

        Returns z, or ``(z, jacobian)`` with ``jacobian_probes > 0`` (the estimate of
        ‖∂f/∂z‖²_F per sample at z*, shape (B,), differentiable; :func:`jacobian_frobenius`).
        """
        z, self.stats, jac = _deq(self.f, x, z0, self.config, jacobian_probes)
        return z if jac is None else (z, jac)

    def extra_repr(self):
        c = self.config
        opts = "".join(f", {k}={v!r}" for k, v in c.solver_options.items())
        back = "" if c.backward_method == c.method else f", backward_method={c.backward_method!r}"
        grad = c.gradient + (f" (k={c.gradient_steps}, damping={c.gradient_damping:g})"
                             if c.gradient == "phantom" else "")
        return (f"method={c.method!r}, backend={c.backend!r}, tol={c.tol:g}, max_iter={c.max_iter}{opts}{back}, "
                f"compact={c.compact!r}, gradient={grad}")
