"""The backward passes of a DEQ layer: implicit differentiation (the adjoint solve), phantom gradients, JFB.

``"implicit"``: :class:`ImplicitBackward` replaces the loss gradient g = ∂L/∂z* by the adjoint
u, the fixed point of u = J_fᵀ u + g (:class:`_Adjoint`, each product one
``torch.autograd.grad`` call on the graph of f at z*, and with compaction on the rows still
iterating), solved with the layer's adjoint options; u then flows through the graph of f to x
and the parameters.  ``"phantom"`` and ``"jfb"``: the output is built by :func:`unroll` (k damped
steps from z*, or the one evaluation f(z*, x)) and autograd differentiates it as it stands.
:class:`Timer` and :class:`Clock` measure the backward pass (:class:`~fixedpoint.torch.stats.DEQStats`).
The methods and their references are in :mod:`fixedpoint.torch.deq`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from ..backend import synchronize
from .config import Config, signal_unconverged
from .guards import Watch
from .solving import RowSet, solve_layer
from .stats import DEQStats

#: The layer's map f(z, x) -> tensor of z's shape.
FMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Timer:
    """Record the ends of one call's backward pass in :attr:`DEQStats.backward_time` (and its cost, once known).

    Parameters
    ----------
    stats : DEQStats
        The call's statistics, written by :meth:`start` and :meth:`stop`.
    device : torch.device
        Device synchronised at both ends.
    vjps, rows : int, optional
        The backward pass's products and their samples, when known before it runs (phantom
        gradients, JFB); written into ``stats`` at :meth:`start`.
    """

    def __init__(self, stats: DEQStats, device: torch.device, vjps: int | None = None,
                 rows: int | None = None) -> None:
        self.stats, self.device, self.vjps, self.rows = stats, device, vjps, rows
        self.t0: float | None = None

    def start(self) -> None:
        """Note the start of the backward pass (after synchronising the device)."""
        synchronize(self.device)
        self.t0 = time.perf_counter()
        if self.vjps is not None:
            self.stats.backward_vjps, self.stats.backward_rows = self.vjps, self.rows

    def stop(self) -> None:
        """Set ``stats.backward_time`` (after synchronising the device), if the start was noted."""
        if self.t0 is not None:
            synchronize(self.device)
            self.stats.backward_time = time.perf_counter() - self.t0


class Clock(torch.autograd.Function):
    """Copy a tensor; its backward notes that the gradient has passed, on a :class:`Timer`.

    The start or the end of the layer's backward pass: at its output, or at x once every
    contribution to x's gradient has been summed.
    """

    # ctx: torch's autograd context object, which carries the attributes set here (untyped in torch)
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, timer: Timer, end: bool) -> torch.Tensor:
        """Return a copy of ``t``; ``end`` says whether its backward ends (else starts) ``timer``."""
        ctx.timer, ctx.end = timer, end
        return t.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        """Stop or start the timer; pass ``grad`` through unchanged."""
        if ctx.end:
            ctx.timer.stop()
        else:
            ctx.timer.start()
        return grad, None, None


class _Adjoint:
    """The adjoint map u ↦ J_fᵀ u + g at z*, on every sample or (compaction) on the rows still iterating.

    Products are ``torch.autograd.grad`` calls on the graph of f at z* (``retain_graph=True``).
    With compaction, when the rows still iterating are at most ``rebuild_fraction`` (the layer's
    option, default :data:`~fixedpoint.torch.config.REBUILD_FRACTION`) of the rows of the graph in
    use, f is evaluated again at ``(z*[rows], x[rows])`` with autograd and later products use that
    graph; otherwise the product runs on the graph in use with u scattered into zeros.  Rows only
    ever shrink (samples that stop do not come back).
    """

    def __init__(self, f: FMap, z: torch.Tensor, z_leaf: torch.Tensor, x: torch.Tensor, grad: torch.Tensor,
                 batch: bool, rebuild_fraction: float) -> None:
        self.f, self.x, self.grad = f, x, grad
        self.rebuild_fraction = rebuild_fraction
        self.z_star = z_leaf.detach()
        self.graph = (z, z_leaf)
        self.graph_rows: torch.Tensor | None = None  # indices of the graph's samples in the batch; None: every sample
        self.size = z.shape[0] if batch else 1  # samples of the graph in use
        self.batch = batch
        self.seen = RowSet()
        self.pos: torch.Tensor | None = None  # places of the rows in the graph; None: the graph holds exactly them
        # grad[rows]: read only after _select has set it (the first set of rows is always new)
        self.grad_rows = grad
        self.vjp_rows = 0  # samples of the graphs the products were taken on, in all
        self.rebuilt_rows = 0  # samples f was evaluated on again

    def _vjp(self, u: torch.Tensor) -> torch.Tensor:
        out, leaf = self.graph
        (v,) = torch.autograd.grad(out, leaf, u, retain_graph=True)
        self.vjp_rows += self.size
        return v

    def __call__(self, u: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Return J_fᵀ u + g for u of the shape of the rows ``rows`` of the batch (all of them when None)."""
        if rows is None or (self.graph_rows is None and rows.shape[0] == self.size):
            return self._vjp(u) + self.grad  # out of place: the product may be u itself (f(z) = z + ...)
        if self.seen.changed(rows):
            self._select(rows)
        if self.pos is None:  # the graph holds exactly these rows
            return self._vjp(u) + self.grad_rows
        w = u.new_zeros((self.size,) + tuple(u.shape[1:]))
        w.index_copy_(0, self.pos, u)
        return self._vjp(w).index_select(0, self.pos) + self.grad_rows

    def _select(self, rows: torch.Tensor) -> None:
        """Take new rows (at a host check): rebuild the graph on them when they are few enough; their places in it."""
        # a copy (the solver's array is its own), set by the seen.changed(rows) that led here
        rows = cast(torch.Tensor, self.seen.rows)
        self.grad_rows = self.grad.index_select(0, rows)
        k = rows.shape[0]
        if k <= self.rebuild_fraction * self.size:
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
class Backward:
    """What the adjoint solve of one call needs besides the saved tensors."""

    f: FMap
    x: torch.Tensor  # detached
    cfg: Config
    backend: str
    stats: DEQStats
    timer: Timer


class ImplicitBackward(torch.autograd.Function):
    """Pass z = f(z*, x) through; in the backward pass, replace ∂L/∂z by the adjoint u = J_fᵀ u + ∂L/∂z.

    The adjoint then flows through the graph of f to x and the parameters.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, z_leaf: torch.Tensor, job: Backward) -> torch.Tensor:
        """Return a copy of ``z``; save ``z`` and the leaf ``z_leaf`` (z*) it was computed from, and ``job``."""
        ctx.save_for_backward(z, z_leaf)
        ctx.job = job
        return z.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        """Solve the adjoint fixed point for the incoming ``grad``; return it as the gradient of ``z``.

        Raises
        ------
        RuntimeError
            Under ``create_graph=True`` (second derivatives are not supported).
        ConvergenceError
            With ``unconverged="raise"``, when the adjoint solve ends unconverged.
        """
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
        adjoint = _Adjoint(job.f, z, z_leaf, job.x, grad.contiguous(), cfg.batch, cfg.rebuild_fraction)
        with Watch(job.f):
            u, stats = solve_layer(adjoint, adjoint.grad, cfg.backward_method, cfg.backward_tol, cfg.backward_max_iter,
                              cfg.batch, cfg.backward_solver_options, job.backend, cfg.compact)
        stats.n_rows, stats.n_graph_rows = adjoint.vjp_rows, adjoint.rebuilt_rows
        batch_rows = z.shape[0] if cfg.batch else 1
        job.stats.backward = stats
        job.stats.backward_vjps = stats.n_fev + 1  # and the product that carries u to x and the parameters
        job.stats.backward_rows = stats.n_rows + batch_rows
        signal_unconverged(cfg, "adjoint", stats)
        return u, None, None


def unroll(f: FMap, z_first: torch.Tensor, x: torch.Tensor, steps: int,
           damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the layer's output from z* with autograd, and f(z*, x).

    ``steps`` = 1 (implicit gradients, JFB): the one evaluation f(z*, x).  Phantom gradients:
    z_k after the k = ``steps`` damped steps z_{i+1} = (1 − λ) z_i + λ f(z_i, x) from z_0 = z*,
    λ = ``damping``, whose backpropagation is the phantom gradient.

    Raises
    ------
    ValueError
        If f returns another shape than z's.
    """
    z, fz_first = z_first, z_first
    for i in range(steps):
        fz = f(z, x)
        if i == 0:
            if tuple(fz.shape) != tuple(z_first.shape):
                raise ValueError(f"f must return z's shape {tuple(z_first.shape)}, got {tuple(fz.shape)}")
            fz_first = fz
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
    return z, fz_first
