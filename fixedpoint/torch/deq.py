"""Deep equilibrium (DEQ) layers: z* = f(z*, x) solved by fixedpoint, gradients by implicit differentiation.

Forward pass
    The fixed point z* of the map z ↦ f(z, x) is found by :func:`fixedpoint.solve`
    (Anderson acceleration or forward iteration) under ``torch.no_grad()``, so
    no autograd graph is built while iterating.  By default the solver runs in
    NumPy for CPU tensors and in CuPy for CUDA tensors; ``f`` still receives and
    returns torch tensors, exchanged with the solver's buffers through DLPack
    without copies (:mod:`fixedpoint.interop`).  ``backend="torch"`` runs the
    solver on the tensors themselves, for comparison.  Then f is evaluated once
    more at z*, with the graph, and that value is the layer's output.

Backward pass (implicit differentiation; first derivatives only: ``create_graph=True`` raises)
    With the loss gradient g = ∂L/∂z*, the implicit function theorem gives the
    gradients with respect to x and the parameters of f as the vector–Jacobian
    products of f at z* with the adjoint u, the fixed point of

        u = J_fᵀ u + g,        J_f = ∂f/∂z at (z*, x),

    which is solved with the same solver (its own tolerance and iteration cap);
    each J_fᵀ u is one ``torch.autograd.grad`` call on the graph of the single
    evaluation of f at z* (``retain_graph=True``, no graph per iteration).  The
    adjoint solve is an :class:`torch.autograd.Function`, so no hook is left on
    any tensor or module.

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
from ..checks import check_choice, check_int, check_real
from ..iteration import check_common
from ..method import Method
from ..result import FixedPointResult
from ..solve import resolve_method, solve

__all__ = ["DEQ", "DEQStats", "SolveStats", "deq_fixed_point", "solver_backend_for"]

#: Values of the ``backend`` argument of :class:`DEQ` and :func:`deq_fixed_point`.
SOLVER_BACKENDS = ("auto", "numpy", "cupy", "torch")

#: Solver options the layer sets itself (so they cannot be passed as ``options``).
_RESERVED = ("tol", "max_iter", "batch", "backend", "callback")

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
        Evaluations of the map for the whole batch (of f in the forward solve, of
        the vector–Jacobian product J_fᵀ u in the adjoint solve): the cost.
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
                   residual_history=hist.reshape(hist.shape[0], -1))

    def as_dict(self) -> dict[str, Any]:
        """The statistics as a dict of Python scalars (no residual history), for logging."""
        return {key: getattr(self, key) for key in self.__dataclass_fields__ if key != "residual_history"}


@dataclass
class DEQStats:
    """Statistics of one call of a DEQ layer.

    Attributes
    ----------
    forward : SolveStats
        The forward solve z* = f(z*, x).
    backward : SolveStats or None
        The adjoint solve u = J_fᵀ u + ∂L/∂z*, filled in when the backward pass
        through this call has run (None before, and for calls without autograd).
    """

    forward: SolveStats
    backward: SolveStats | None = None


@dataclass(frozen=True)
class _Config:
    method: Method
    solver_options: dict  # common solver options besides the layer's own (stop_mode, check_every)
    backend: str
    tol: float
    max_iter: int
    batch: bool
    backward_method: Method
    backward_solver_options: dict
    backward_tol: float
    backward_max_iter: int


def _resolve(method, options, name):
    """(method object, common solver options) from a method name or object and a dict of options."""
    if not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict of solver options, got {type(options).__name__}")
    for key in options:
        if key in _RESERVED:
            raise TypeError(f"{name} must not contain {key!r}: the DEQ layer sets it (use the layer's own "
                            f"tol, max_iter, batch, backend arguments)")
    method_obj, common = resolve_method(method, options, where="DEQ")
    return method_obj, check_common(common)


def _make_config(method, backend, tol, max_iter, batch, options, backward_method, backward_tol,
                 backward_max_iter, backward_options):
    check_choice("backend", backend, SOLVER_BACKENDS)
    tol = check_real("tol", tol, 0.0, None, low_open=True)
    max_iter = check_int("max_iter", max_iter, 1)
    if not isinstance(batch, bool):
        raise TypeError(f"batch must be True or False, got {batch!r}")
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
    return _Config(method_obj, common, backend, tol, max_iter, batch, backward_obj, backward_common, backward_tol,
                   backward_max_iter)


def _check_modes(f):
    """Refuse f with layers whose training mode makes f couple samples or change from call to call."""
    if not isinstance(f, torch.nn.Module):
        return
    for name, mod in f.named_modules():
        if mod.training and isinstance(mod, _UNSTABLE_IN_TRAINING):
            where = f"f.{name}" if name else "f"
            raise ValueError(
                f"{where} is a {type(mod).__name__} in training mode: inside a DEQ's fixed-point map it would "
                "change f on every call (dropout) or mix the samples and update running statistics on every "
                "iteration (batch norm). Use GroupNorm/LayerNorm in f, put that layer in eval mode, or move it "
                "out of f")


def _run_solve(g, u0, method, tol, max_iter, batch, options, backend):
    """Solve u = g(u) for a torch tensor u0 under no_grad with a method object; return (result, SolveStats)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        res = solve(g, u0, method, tol=tol, max_iter=max_iter, batch=batch, backend=backend, **options)
    synchronize(u0.device)
    return res, SolveStats.from_result(res, backend, time.perf_counter() - t0)


class _ImplicitBackward(torch.autograd.Function):
    """Identity on z = f(z*, x) in the forward pass; in the backward pass, replaces the incoming
    gradient ∂L/∂z by the adjoint u = J_fᵀ u + ∂L/∂z, which then flows through the graph of f
    to x and the parameters."""

    @staticmethod
    def forward(ctx, z, z_leaf, cfg, backend, stats):
        ctx.save_for_backward(z, z_leaf)
        ctx.cfg, ctx.backend, ctx.stats = cfg, backend, stats
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative is being built
            raise RuntimeError(
                "second derivatives through a DEQ layer are not supported: the implicit gradient's dependence on "
                "the parameters through the adjoint solve is not differentiated, so create_graph=True would give "
                "wrong higher-order gradients. Compute them without create_graph, or differentiate an unrolled "
                "evaluation of f instead")
        z, z_leaf = ctx.saved_tensors
        cfg = ctx.cfg
        grad = grad.contiguous()

        def adjoint_map(u):
            (vjp,) = torch.autograd.grad(z, z_leaf, u, retain_graph=True)
            return vjp.add_(grad)

        res, stats = _run_solve(adjoint_map, grad, cfg.backward_method, cfg.backward_tol, cfg.backward_max_iter,
                                cfg.batch, cfg.backward_solver_options, ctx.backend)
        ctx.stats.backward = stats
        return res.x, None, None, None, None


def _deq(f, x, z0, cfg):
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
    _check_modes(f)
    backend = solver_backend_for(cfg.backend, z0.device)

    def fmap(z):
        return f(z, x)

    res, fstats = _run_solve(fmap, z0.detach(), cfg.method, cfg.tol, cfg.max_iter, cfg.batch, cfg.solver_options,
                             backend)
    stats = DEQStats(forward=fstats)
    z_star = res.x
    if not torch.is_grad_enabled():
        return f(z_star, x), stats
    z_leaf = z_star.detach().requires_grad_()
    z = f(z_leaf, x)
    if tuple(z.shape) != tuple(z_leaf.shape):
        raise ValueError(f"f must return z's shape {tuple(z_leaf.shape)}, got {tuple(z.shape)}")
    return _ImplicitBackward.apply(z, z_leaf, cfg, backend, stats), stats


def deq_fixed_point(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                    z0: torch.Tensor | None = None, *, method: str | Method = "anderson", backend: str = "auto",
                    tol: float = 1e-2, max_iter: int = 1000, batch: bool = True,
                    options: dict[str, Any] | None = None, backward_method: str | Method | None = None,
                    backward_tol: float | None = None, backward_max_iter: int | None = None,
                    backward_options: dict[str, Any] | None = None) -> tuple[torch.Tensor, DEQStats]:
    """Fixed point z* = f(z*, x) of a DEQ layer, differentiable by implicit differentiation.

    The functional form of :class:`DEQ` (see the module documentation for the method).

    Parameters
    ----------
    f : callable
        ``f(z, x) -> tensor`` of z's shape, dtype and device; usually a
        ``torch.nn.Module``.  In batch mode it must treat the samples (leading
        axis) independently.  Gradients flow to x and to every tensor f uses
        that requires grad (its parameters).
    x : torch.Tensor
        The input injection, any shape, floating dtype (float32 or float64 typical).
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
        every sample along the leading axis); False solves the whole batch as one vector.
    options : dict, optional
        Further solver options: ``stop_mode`` and ``check_every`` (as for
        :func:`fixedpoint.solve`) and, with a method name, the method's own (``m``,
        ``beta``, ``lam``, ``lam_mode``, ``damping``, ...); defaults are fixedpoint's
        (m = 5, β = 1.0, λ = 1e-5, stop_mode "rel").  All are validated here.
    backward_method : str or fixedpoint.method.Method, optional
        Method of the adjoint fixed point; default ``method`` (the same object).
    backward_tol : float, optional
        Tolerance of the adjoint solve; default ``tol``.
    backward_max_iter : int, optional
        Iteration cap of the adjoint solve; default ``max_iter``.
    backward_options : dict, optional
        Solver options of the adjoint solve, as ``options``; default ``options`` when
        neither ``backward_method`` nor ``backward_options`` is given, else fixedpoint's
        defaults.

    Returns
    -------
    z : torch.Tensor
        f(z*, x) at the solver's z* (one evaluation past the solver's iterate),
        shape of z0; attached to the autograd graph when grad mode is on.
    stats : DEQStats
        Forward solve statistics; ``stats.backward`` is filled in by the backward pass.

    Raises
    ------
    TypeError
        For a non-tensor ``x`` or ``z0``, a non-floating ``z0``, an unknown solver
        option, or a reserved one (``tol``, ``max_iter``, ``batch``, ``backend``,
        ``callback``) inside ``options``.
    ValueError
        For a bad option value (the message names it), a ``z0`` on another device
        or without x's batch axis, an ``f`` that returns another shape, or an ``f``
        holding a BatchNorm or Dropout layer in training mode.
    ImportError
        For ``backend="cupy"`` without a usable CuPy.

    Notes
    -----
    Samples that do not converge within ``max_iter`` are not an error: their best
    iterate is used and ``stats.forward.converged_fraction`` is below 1.
    """
    cfg = _make_config(method, backend, tol, max_iter, batch, options, backward_method, backward_tol,
                       backward_max_iter, backward_options)
    return _deq(f, x, z0, cfg)


class DEQ(torch.nn.Module):
    """A deep equilibrium layer: returns z* with z* = f(z*, x), trained by implicit differentiation.

    See :mod:`fixedpoint.torch.deq` for the method and :func:`deq_fixed_point`
    for the parameters, which are the same; solver options of the method (``m``,
    ``beta``, ``lam``, ``lam_mode``, ``stop_mode``, ...) are keyword arguments.
    Defaults are those of Al Dajani & Keyes (arXiv 2410.19460): Anderson with
    m = 5, β = 1.0, λ = 1e-5, relative residual tolerance 1e-2, at most 1000 iterations.

    Parameters
    ----------
    f : torch.nn.Module or callable
        ``f(z, x)``; a module is registered as the submodule ``f``, so its
        parameters belong to this layer.
    method, backend, tol, max_iter, batch, backward_method, backward_tol, backward_max_iter, backward_options
        As in :func:`deq_fixed_point`.
    **options
        Method options for the forward solve (and the adjoint solve, unless
        ``backward_options`` is given).

    Attributes
    ----------
    stats : DEQStats or None
        Statistics of the latest call (None before the first); its ``backward``
        field is filled in when the backward pass through that call runs.

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
    """

    def __init__(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, method: str | Method = "anderson",
                 backend: str = "auto", tol: float = 1e-2, max_iter: int = 1000, batch: bool = True,
                 backward_method: str | Method | None = None, backward_tol: float | None = None,
                 backward_max_iter: int | None = None, backward_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be a torch.nn.Module or a callable f(z, x), got {f!r}")
        self.f = f
        self.config = _make_config(method, backend, tol, max_iter, batch, options, backward_method, backward_tol,
                                   backward_max_iter, backward_options)
        self.stats = None

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """Solve z* = f(z*, x) from ``z0`` (default zeros of x's shape); see :func:`deq_fixed_point`."""
        z, self.stats = _deq(self.f, x, z0, self.config)
        return z

    def extra_repr(self):
        c = self.config
        opts = "".join(f", {k}={v!r}" for k, v in c.solver_options.items())
        back = "" if c.backward_method == c.method else f", backward_method={c.backward_method!r}"
        return f"method={c.method!r}, backend={c.backend!r}, tol={c.tol:g}, max_iter={c.max_iter}{opts}{back}"
