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
    ``rebuild_fraction`` (default :data:`REBUILD_FRACTION`, one half) of the rows of
    the graph in use, f is evaluated again at
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

Modules
    This module holds the layer (:class:`DEQ`, :func:`deq_fixed_point`); its parts live in
    :mod:`fixedpoint.torch.config` (the options), :mod:`fixedpoint.torch.backends` (the
    solver's array library), :mod:`fixedpoint.torch.solving` (the solves and the rows they
    evaluate), :mod:`fixedpoint.torch.guards` (what f may not hold),
    :mod:`fixedpoint.torch.backward` (the backward passes), :mod:`fixedpoint.torch.jacobian`
    (the regulariser) and :mod:`fixedpoint.torch.stats` (the statistics), and are
    re-exported here.

References: S. Bai, J. Z. Kolter & V. Koltun, "Deep Equilibrium Models", NeurIPS
2019; Z. Kolter, D. Duvenaud & M. Johnson, "Deep Implicit Layers" tutorial,
chapter 4; M. Al Dajani & D. Keyes, arXiv 2410.19460 (2024).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, overload

import torch

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; in annotations only (never evaluated)

from ..checks import check_int
from ..method import Method
from .backends import SOLVER_BACKENDS, solver_backend_for
from .backward import Backward, Clock, FMap, ImplicitBackward, Timer, unroll
from .config import (
    GRADIENTS,
    LAYER_DEFAULTS,
    PHANTOM_DAMPING,
    PHANTOM_STEPS,
    REBUILD_FRACTION,
    UNCONVERGED,
    Config,
    LayerOptions,
    make_config,
    signal_unconverged,
)
from .guards import Watch, as_f_error, check_modes
from .jacobian import jacobian_frobenius
from .solving import RowsOf, solve_layer
from .stats import DEQStats, SolveStats

__all__ = ["DEQ", "DEQStats", "SolveStats", "deq_fixed_point", "jacobian_frobenius", "solver_backend_for",
           "GRADIENTS", "PHANTOM_DAMPING", "PHANTOM_STEPS", "REBUILD_FRACTION", "SOLVER_BACKENDS", "UNCONVERGED"]

# The autograd Functions' apply, with the signatures of their forward (torch declares Function.apply untyped)
_clock: Callable[[torch.Tensor, Timer, bool], torch.Tensor] = Clock.apply
_implicit: Callable[[torch.Tensor, torch.Tensor, Backward], torch.Tensor] = ImplicitBackward.apply


def _check_inputs(x: torch.Tensor, z0: torch.Tensor | None, batch: bool) -> torch.Tensor:
    """Check the layer's input ``x`` and initial guess ``z0``; return z0 (default zeros of x's shape).

    Raises
    ------
    TypeError
        For a non-tensor ``x`` or ``z0``, or a ``z0`` without a floating dtype.
    ValueError
        For a ``z0`` on another device than x, or (batch mode) without x's leading batch axis.
    """
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
    if batch and (z0.dim() == 0 or (x.dim() > 0 and z0.shape[0] != x.shape[0])):
        raise ValueError(f"batch=True needs z0 with x's leading batch axis, got z0 of shape {tuple(z0.shape)} "
                         f"and x of shape {tuple(x.shape)}")
    return z0


def _solve_forward(f: FMap, x: torch.Tensor, z0: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, SolveStats, str]:
    """Solve z* = f(z*, x) from ``z0`` under no_grad; return (z*, its SolveStats, the solver's library).

    f is checked first (:func:`check_modes`, :class:`Watch`), the solver's errors about the map
    are reworded for f (:func:`as_f_error`), and the ``unconverged`` policy is applied.
    """
    check_modes(f)
    backend = solver_backend_for(cfg.backend, z0.device)

    fmap: Callable[..., torch.Tensor]
    if cfg.compact is not False:
        x_rows = RowsOf(x)
        fmap = lambda z, rows: f(z, x_rows(rows))  # noqa: E731
    else:
        fmap = lambda z: f(z, x)  # noqa: E731

    try:
        with Watch(f):
            z_star, fstats = solve_layer(fmap, z0.detach(), cfg.method, cfg.tol, cfg.max_iter, cfg.batch,
                                         cfg.solver_options, backend, cfg.compact)
    except (TypeError, ValueError) as exc:
        err = as_f_error(exc)
        if err is exc:
            raise
        raise err from None
    signal_unconverged(cfg, "forward", fstats)
    return z_star, fstats, backend


def _attach(f: FMap, x: torch.Tensor, z_star: torch.Tensor, fstats: SolveStats, cfg: Config, backend: str,
            grad_on: bool, jacobian_probes: int) -> tuple[torch.Tensor, DEQStats, torch.Tensor | None]:
    """Evaluate f at z* with autograd and attach the output to the graph as ``cfg.gradient`` says.

    Returns (output, DEQStats, Jacobian estimate or None); ``grad_on`` is the grad mode of the call.
    """
    steps = cfg.gradient_steps if cfg.gradient == "phantom" else 1
    stats = DEQStats(forward=fstats, gradient=cfg.gradient, graph_evals=steps)
    z_star = z_star.detach()
    batch_rows = z_star.shape[0] if cfg.batch else 1
    timer = Timer(stats, z_star.device, *(() if cfg.gradient == "implicit" else (steps, steps * batch_rows)))
    x_in = _clock(x, timer, True) if grad_on and x.requires_grad else x
    # z* is a leaf that requires grad where something differentiates with respect to it: the adjoint's
    # products (implicit) and the Jacobian estimate
    leaf = bool(jacobian_probes) or (grad_on and cfg.gradient == "implicit")
    z_first = z_star.requires_grad_() if leaf else z_star
    # one evaluation of f at z*, or the phantom gradient's damped steps
    z, fz_first = unroll(f, z_first, x_in, steps, cfg.gradient_damping)
    jac = jacobian_frobenius(fz_first, z_first, jacobian_probes) if jacobian_probes else None
    if not grad_on or not z.requires_grad:  # nothing to differentiate (no_grad, or nothing in f requires grad)
        return z, stats, jac
    if cfg.gradient == "implicit":
        job = Backward(f, x.detach(), cfg, backend, stats, timer)
        return _implicit(z, z_first, job), stats, jac
    return _clock(z, timer, False), stats, jac


def _deq(f: FMap, x: torch.Tensor, z0: torch.Tensor | None, cfg: Config,
         jacobian_probes: int = 0) -> tuple[torch.Tensor, DEQStats, torch.Tensor | None]:
    """Run one call of the layer: check the inputs, solve z* = f(z*, x), attach the output to autograd.

    Returns (output, DEQStats, Jacobian estimate or None); the errors are those of
    :func:`deq_fixed_point`.
    """
    z0 = _check_inputs(x, z0, cfg.batch)
    jacobian_probes = check_int("jacobian_probes", jacobian_probes, 0)
    grad_on = torch.is_grad_enabled()
    if jacobian_probes and not grad_on:
        raise ValueError("jacobian_probes > 0 needs grad mode (the estimate is differentiated through f's graph); "
                         "call the layer without it under torch.no_grad()")
    z_star, fstats, backend = _solve_forward(f, x, z0, cfg)
    return _attach(f, x, z_star, fstats, cfg, backend, grad_on, jacobian_probes)


@overload
def deq_fixed_point(f: FMap, x: torch.Tensor, z0: torch.Tensor | None = None, *, jacobian_probes: Literal[0] = 0,
                    **options: Unpack[LayerOptions]) -> tuple[torch.Tensor, DEQStats]: ...


@overload
def deq_fixed_point(f: FMap, x: torch.Tensor, z0: torch.Tensor | None = None, *, jacobian_probes: int,
                    **options: Unpack[LayerOptions]
                    ) -> tuple[torch.Tensor, DEQStats] | tuple[torch.Tensor, DEQStats, torch.Tensor]: ...


def deq_fixed_point(f: FMap, x: torch.Tensor, z0: torch.Tensor | None = None, *,
                    method: str | Method = LAYER_DEFAULTS["method"], backend: str = LAYER_DEFAULTS["backend"],
                    tol: float = LAYER_DEFAULTS["tol"], max_iter: int = LAYER_DEFAULTS["max_iter"],
                    batch: bool = LAYER_DEFAULTS["batch"], compact: bool | str = LAYER_DEFAULTS["compact"],
                    gradient: str = LAYER_DEFAULTS["gradient"], gradient_steps: int | None = None,
                    gradient_damping: float | None = None, options: dict[str, Any] | None = None,
                    backward_method: str | Method | None = None, backward_tol: float | None = None,
                    backward_max_iter: int | None = None, backward_options: dict[str, Any] | None = None,
                    jacobian_probes: int = 0, unconverged: str = LAYER_DEFAULTS["unconverged"],
                    rebuild_fraction: float = LAYER_DEFAULTS["rebuild_fraction"]
                    ) -> tuple[torch.Tensor, DEQStats] | tuple[torch.Tensor, DEQStats, torch.Tensor]:
    """Solve z* = f(z*, x) as a DEQ layer does, differentiably (implicitly, by phantom gradients or JFB).

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
        every sample along the leading axis); False solves the whole batch as one vector.
    compact : {"auto", True, False}, default "auto"
        Batch mode: evaluate f only on the samples still iterating, in the forward
        and in the adjoint solve (module documentation): True from the start, "auto"
        once at most :data:`fixedpoint.iteration.COMPACT_AUTO` (half) of the samples
        are still iterating, so that a GPU keeps large kernels while most samples
        iterate; False: f always sees the whole batch.  The answers are the same up
        to rounding.  Ignored ("auto") or refused (True) with ``batch=False``.
    rebuild_fraction : float, default 0.5
        Adjoint solve with compaction: when the rows still iterating are at most this
        fraction of the rows of the autograd graph in use, f is evaluated again, with
        autograd, on those rows only, and the vector–Jacobian products use that smaller
        graph; until then they run on the graph in use, with zeros in the rows that have
        stopped.  In [0, 1]: 0 never evaluates f again (every product on the graph of f
        at z*), 1 at every change of the rows.  The answers are the same up to rounding;
        the cost moves between products on rows that have stopped and evaluations of f.
        Ignored without compaction and with phantom or Jacobian-free gradients.
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
        statistics are in the returned ``stats`` / ``layer.stats`` in every case.
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
        gradients, ``compact=True`` with ``batch=False``, ``rebuild_fraction`` outside
        [0, 1]; a ``z0`` on another device or without x's batch axis, an ``f`` that
        returns another shape, an ``f``
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
    cfg = make_config(method, backend, tol, max_iter, batch, options, backward_method, backward_tol,
                       backward_max_iter, backward_options, compact, gradient, gradient_steps, gradient_damping,
                       unconverged, rebuild_fraction)
    z, stats, jac = _deq(f, x, z0, cfg, jacobian_probes)
    return (z, stats) if jac is None else (z, stats, jac)


class DEQ(torch.nn.Module):
    """A deep equilibrium layer: returns z* with z* = f(z*, x).

    Trained by implicit differentiation (default), phantom gradients or Jacobian-free backpropagation.

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
    method, backend, tol, max_iter, batch, compact, rebuild_fraction, unconverged
        As in :func:`deq_fixed_point`.
    gradient, gradient_steps, gradient_damping
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

    def __init__(self, f: FMap, *, method: str | Method = LAYER_DEFAULTS["method"],
                 backend: str = LAYER_DEFAULTS["backend"], tol: float = LAYER_DEFAULTS["tol"],
                 max_iter: int = LAYER_DEFAULTS["max_iter"], batch: bool = LAYER_DEFAULTS["batch"],
                 compact: bool | str = LAYER_DEFAULTS["compact"], gradient: str = LAYER_DEFAULTS["gradient"],
                 gradient_steps: int | None = None, gradient_damping: float | None = None,
                 backward_method: str | Method | None = None, backward_tol: float | None = None,
                 backward_max_iter: int | None = None, backward_options: dict[str, Any] | None = None,
                 unconverged: str = LAYER_DEFAULTS["unconverged"],
                 rebuild_fraction: float = LAYER_DEFAULTS["rebuild_fraction"], **options: Any) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be a torch.nn.Module or a callable f(z, x), got {f!r}")
        self.f = f
        self.config = make_config(method, backend, tol, max_iter, batch, options, backward_method, backward_tol,
                                   backward_max_iter, backward_options, compact, gradient, gradient_steps,
                                   gradient_damping, unconverged, rebuild_fraction)
        self.stats: DEQStats | None = None

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None, *,
                jacobian_probes: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Solve z* = f(z*, x) from ``z0`` (default zeros of x's shape); see :func:`deq_fixed_point`.

        Returns z, or ``(z, jacobian)`` with ``jacobian_probes > 0`` (the estimate of
        ‖∂f/∂z‖²_F per sample at z*, shape (B,), differentiable; :func:`jacobian_frobenius`).
        """
        z, self.stats, jac = _deq(self.f, x, z0, self.config, jacobian_probes)
        return z if jac is None else (z, jac)

    def extra_repr(self) -> str:
        """Return the layer's options for ``repr`` (those of the solver, the adjoint and the gradient)."""
        c = self.config
        opts = "".join(f", {k}={v!r}" for k, v in c.solver_options.items())
        back = "" if c.backward_method == c.method else f", backward_method={c.backward_method!r}"
        grad = c.gradient + (f" (k={c.gradient_steps}, damping={c.gradient_damping:g})"
                             if c.gradient == "phantom" else "")
        rebuild = "" if c.rebuild_fraction == REBUILD_FRACTION else f", rebuild_fraction={c.rebuild_fraction:g}"
        return (f"method={c.method!r}, backend={c.backend!r}, tol={c.tol:g}, max_iter={c.max_iter}{opts}{back}, "
                f"compact={c.compact!r}{rebuild}, gradient={grad}")
