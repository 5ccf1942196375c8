"""Anderson acceleration of a PyTorch optimizer's iterates, with the stabilising moving average.

Training is read as a fixed-point iteration: with θ_k the weights stored after some optimizer steps,
the optimizer maps θ_k to the next stored weights g(θ_k), and Type-II Anderson acceleration (AA)
extrapolates from the last m pairs (g_j, f_j = g_j − θ_j) every few steps.  Mini-batch noise makes
that sequence oscillate, which spoils AA; the moving average replaces each stored iterate by the mean
of the optimizer iterates since the previous one, and the ``"auto"`` mode switches it on only when
the relative standard deviation (RSD) of the steps between consecutive iterates is large.

J. Yin, M. Lupo Pasini, M. Stoyanov & V. Reshniak, "Stable Anderson Acceleration for Deep
Learning", arXiv 2110.14813 (2021).  The AA itself is :class:`fixedpoint.AndersonHistory` (the same
Gram update and least-squares solve as :func:`fixedpoint.anderson`); one parameter group's buffers,
history and moving average are :class:`fixedpoint.torch.optim_group.ParamGroupState`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from ..anderson import Anderson
from ..checks import check_bool, check_choice, check_int, check_options, check_real
from .optim_group import ParamGroupState

__all__ = ["AndersonAcceleration", "ExtrapolationRecord"]

AVERAGE_MODES = ("off", "on", "auto")

#: The wrapper's default regularisation λ and how it is measured (see the class docstring: a stronger,
#: uniform ridge than the solvers' default).
DEFAULT_LAM, DEFAULT_LAM_MODE = 1e-2, "relative_max"
STATUSES = ("accepted", "rejected", "restart", "short_history")


@dataclass(frozen=True)
class ExtrapolationRecord:
    """What happened to one parameter group at one extrapolation step (for logging).

    Attributes
    ----------
    step : int
        Number of optimizer steps taken when the extrapolation was attempted.
    group : int
        Index of the parameter group.
    status : str
        ``"accepted"`` (weights replaced by the extrapolate), ``"rejected"`` (the safeguard found a
        higher or non-finite loss and kept the optimizer's weights), ``"restart"`` (the history was
        cleared by AA's own safeguard: non-finite or huge mixing weights, or residual growth) or
        ``"short_history"`` (fewer than two stored pairs; nothing done).
    averaged : bool
        Whether the iterate stored just before was a moving average.
    rsd : float
        Relative standard deviation of the steps in that block (NaN when ``average="off"``).
    n_history : int
        Number of pairs (g_j, f_j) the extrapolation used.
    loss_plain, loss_extrapolated : float
        Loss on the current batch at the optimizer's weights and at the extrapolate (NaN without
        the safeguard; averaged over ranks under ``torch.distributed``).
    """

    step: int
    group: int
    status: str
    averaged: bool
    rsd: float
    n_history: int
    loss_plain: float = math.nan
    loss_extrapolated: float = math.nan

    @property
    def accepted(self) -> bool:
        """Whether the weights were replaced by the extrapolate (``status == "accepted"``)."""
        return self.status == "accepted"


class AndersonAcceleration:
    """Anderson acceleration of any ``torch.optim.Optimizer``, with the stabilising moving average.

    Wraps an optimizer (which it leaves unmodified) and is used in its place: ``step``,
    ``zero_grad``, ``state_dict``, ``load_state_dict``, ``param_groups``.  Every ``store_every``
    optimizer steps the flattened weights of each parameter group are stored; every ``every``
    steps after the first ``delay``, the weights are replaced by the Type-II Anderson extrapolate
    of the last ``m`` stored iterates (Yin et al., arXiv 2110.14813; Walker & Ni 2011):

        θ ← Σ_j α_j [g_j − (1 − β) f_j],  α = argmin ‖Σ_j α_j f_j‖₂ s.t. Σ_j α_j = 1,

    where g_j is a stored iterate and f_j = g_j − θ_j the change since the one before it (or since
    the last extrapolate).  The optimizer's own state (momentum, Adam moments) is left as it is.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer to accelerate.  Each parameter group gets its own history; the parameters
        of a group must be real floating tensors on one device.  Parameters with
        ``requires_grad=False`` when the wrapper is built are not tracked; parameters whose
        ``.grad`` is None at an extrapolation are not written (the optimizer did not move them).
    method : fixedpoint.Anderson, optional
        The Anderson options as one object, e.g. ``Anderson(m=10, lam=1e-3)`` (its ``delay`` must be
        0 or None, read as 0: this wrapper's own ``delay`` counts optimizer steps).  Default:
        ``Anderson(lam=1e-2, lam_mode="relative_max", delay=0, **anderson_options)``.
    **anderson_options
        Instead of ``method``: the options of :class:`fixedpoint.Anderson`, with the defaults below.
    m : int, default 5
        Window: number of stored pairs (g_j, f_j) combined, >= 2 (5 as in :func:`fixedpoint.anderson`;
        the authors' AADL code uses 5 to 15).
    beta : float, default 1.0
        Mixing β in (0, 1] (AADL's "relaxation"): 1 steps to Σ α_j g_j; smaller values pull the
        extrapolate back towards Σ α_j θ_j, i.e. towards the start of the recent blocks, which
        undoes optimizer progress (docs/stable_anderson.md).
    lam : float, default 1e-2
        Regularisation λ >= 0 of the least-squares problem for α (this wrapper's default; the solvers'
        is 1e-5).
    lam_mode : {"relative_max", "relative", "absolute"}, default "relative_max"
        As in :class:`fixedpoint.Anderson` (this wrapper's default): "relative_max" adds
        λ·max_j ‖f_j‖² to every diagonal entry of the Gram matrix, so that λ does not depend on the
        step size.  Consecutive optimizer steps are nearly parallel, so the Gram matrix is nearly
        singular; this uniform ridge with λ = 1e-2 keeps the weights α moderate (with 1e-6,
        unsafeguarded AA on Adam's iterates diverged in our runs) at the price of slower
        convergence on deterministic quadratics (docs/stable_anderson.md).  The per-entry
        "relative" ridge of the solvers regularises the small steps less.
    store_every : int, default 5
        Store an iterate every this many optimizer steps (AADL's ``store_each_nth``), >= 1.
        With averaging this is also the length of the moving average, so it must be >= 2.
    every : int or None, default None (= ``store_every``)
        Extrapolate every this many optimizer steps (AADL's ``frequency``); a multiple of
        ``store_every``.
    delay : int, default 0
        No extrapolation during the first ``delay`` optimizer steps (iterates are still stored).
    average : {"auto", "on", "off"}, default "auto"
        Moving average of the iterates: "on" stores the mean of the ``store_every`` optimizer
        iterates since the last stored one instead of the last of them (the map g then sends the
        block's first weights to the block's mean); "auto" does so only when the block's relative
        standard deviation (RSD) exceeds ``rsd_threshold``, and discards the stored pairs when it
        switches, since they belong to the other map; "off" never averages (and keeps 4·n fewer
        values per group).
    rsd_threshold : float, default 0.1
        Threshold of the "auto" criterion, > 0.  The RSD of a block of optimizer steps
        d_t = x_t − x_{t−1} is ``max_i std_t(d_t,i) / max_i abs(mean_t(d_t,i))``: near 0 for a steady
        (deterministic) sequence, of order 1 when noise dominates the steps.  The
        max(std)/max(mean) form and the value 0.1 are those of the authors' AADL code (ORNL),
        which applies them to the iterates of the window; here they apply to the steps, so that
        a steady drift does not count as oscillation.  ``records[i].rsd`` shows the values seen.
    safeguard : bool, default False
        Keep an extrapolate only if its loss on the current batch is finite and not higher than
        that of the optimizer's weights (AADL's safeguard).  Needs ``step(closure)`` and costs
        two extra closure calls (forward and backward) per extrapolation; the decision covers all
        groups at once.  Recommended: in the runs of docs/stable_anderson.md every AA run ended
        at a lower loss with it than without.
    restart_growth, restart_weight : float, default 1e4, 1e6
        AA's own restart safeguards, as in :class:`fixedpoint.Anderson`.

    Raises
    ------
    TypeError
        If ``optimizer`` is not a ``torch.optim.Optimizer``, ``method`` is not a
        :class:`fixedpoint.Anderson` or comes with Anderson options beside it, an option is
        unknown or has the wrong type, or a group holds non-floating parameters.
    ValueError
        If an option is out of range (the message names it), ``every`` is not a multiple of
        ``store_every``, averaging is asked for with ``store_every`` < 2, or a group's parameters
        lie on several devices.

    Notes
    -----
    Memory: (2m + 3)·n values per group of n elements, plus 4·n with averaging, on the
    parameters' device (in float32 for half-precision parameters).  Work: the Gram row and the
    combination cost O(m·n) per stored iterate or extrapolation, plus O(n) per step with
    averaging.  Each extrapolation reads a few scalars on the host (a synchronisation on GPUs).

    Under ``DistributedDataParallel`` every rank holds the same replicated weights after each
    optimizer step, so every rank stores the same iterates and computes the same extrapolate; no
    weights are communicated.  The safeguard's two losses are averaged over ranks (one
    ``all_reduce`` of two numbers, when ``torch.distributed`` is initialised) so that all ranks take
    the same decision.

    Learning-rate schedulers are attached to the wrapped optimizer (``wrapper.optimizer``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, method: Anderson | None = None, *, store_every: int = 5,
                 every: int | None = None, delay: int = 0, average: str = "auto", rsd_threshold: float = 0.1,
                 safeguard: bool = False, **anderson_options: Any) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if method is None:
            check_options("AndersonAcceleration", anderson_options,
                          tuple(f.name for f in dataclasses.fields(Anderson) if f.name != "delay"))
            method = Anderson(**{"lam": DEFAULT_LAM, "lam_mode": DEFAULT_LAM_MODE, **anderson_options, "delay": 0})
        elif not isinstance(method, Anderson):
            raise TypeError(f"method must be a fixedpoint.Anderson, got {method!r}")
        elif anderson_options:
            raise TypeError(f"pass the Anderson options either as method=Anderson(...) or as keywords, not both "
                            f"(got method and {', '.join(sorted(anderson_options))})")
        if method.m < 2:
            raise ValueError(f"m must be an integer >= 2 (an extrapolation combines at least two iterates), "
                             f"got {method.m}")
        if method.delay is None:  # Anderson's solve default (SOLVE_DELAY plain steps) is not for optimizer steps
            method = dataclasses.replace(method, delay=0)
        if method.delay:
            raise ValueError(f"method.delay must be 0 here, got {method.delay}: the wrapper's own delay= counts "
                             "optimizer steps")
        self.method = method
        self.delay = check_int("delay", delay, 0)
        self.store_every = check_int("store_every", store_every, 1)
        self.every = self.store_every if every is None else check_int("every", every, 1)
        if self.every % self.store_every:
            raise ValueError(f"every must be a multiple of store_every ({self.store_every}), got {self.every}")
        self.average = check_choice("average", average, AVERAGE_MODES)
        if self.average != "off" and self.store_every < 2:
            raise ValueError(f"average={average!r} averages the store_every iterates between stored ones, "
                             "so it needs store_every >= 2 (or average='off')")
        self.rsd_threshold = check_real("rsd_threshold", rsd_threshold, 0.0, None, low_open=True, allow_inf=True)
        safeguard = check_bool("safeguard", safeguard)
        self.safeguard = safeguard
        aa = {k: v for k, v in method.options().items() if k != "delay"}
        self.options = dict(aa, store_every=self.store_every, every=self.every, delay=self.delay,
                            average=self.average, rsd_threshold=self.rsd_threshold, safeguard=safeguard)
        self.optimizer = optimizer
        self.n_steps = 0
        self.records: list[ExtrapolationRecord] = []
        with torch.no_grad():
            self.groups = [ParamGroupState(i, g, method, self.average != "off")
                           for i, g in enumerate(optimizer.param_groups)]

    # --- the optimizer interface -------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups."""
        return self.optimizer.param_groups

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:
        """The wrapped optimizer's per-parameter state (momentum, Adam moments, ...)."""
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the parameters, as the wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step, then (on the steps due) store the iterate and extrapolate.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (``torch.optim`` convention); required
            with ``safeguard=True``.

        Returns
        -------
        The wrapped optimizer's return value (the closure's loss, or None).

        Raises
        ------
        ValueError
            If ``safeguard=True`` and no closure is given.
        RuntimeError
            If the optimizer's parameter groups changed since the wrapper was built.
        """
        if self.safeguard and closure is None:
            raise ValueError("safeguard=True compares losses, so step needs a closure: step(closure)")
        if len(self.optimizer.param_groups) != len(self.groups):
            raise RuntimeError("the optimizer's parameter groups changed after AndersonAcceleration was built; "
                               "build a new wrapper")
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.n_steps += 1
        store = self.n_steps % self.store_every == 0
        with torch.no_grad(), np.errstate(all="ignore"):  # a singular small system is a restart, not a warning
            stored = [g.after_step(store, self.average, self.rsd_threshold) for g in self.groups]
            if store and self.n_steps > self.delay and self.n_steps % self.every == 0:
                self._extrapolate(closure, stored)
        return loss

    # --- extrapolation -----------------------------------------------------------------------
    @staticmethod
    def _loss(closure: Callable[[], Any]) -> float:
        """Return the closure's loss (evaluated with grad mode on) as a float; ``TypeError`` for None."""
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise TypeError("safeguard=True needs a closure that returns the loss, got None")
        return float(loss)

    def _extrapolate(self, closure: Callable[[], Any] | None, stored: list[tuple[bool, float] | None]) -> None:
        """Extrapolate every group that can, keep or undo the extrapolates, and record the outcome per group.

        ``stored`` is :meth:`ParamGroupState.after_step`'s return value for each group on this store step.
        """
        status, tried = self._candidates()
        losses = (math.nan, math.nan)
        decision = "accepted"  # for the groups tried, if any
        if tried:
            accept, losses = self._try_extrapolates(closure, tried)
            self._keep_or_undo(tried, accept)
            decision = "accepted" if accept else "rejected"
        self._record({i: decision if st is None else st for i, st in status.items()}, stored, losses)

    def _candidates(self) -> tuple[dict[int, str | None], list[ParamGroupState]]:
        """Extrapolate each group with parameters into its ``work`` buffer.

        Returns the status of each such group by index (None for a group with an extrapolate to
        try) and the groups to try.
        """
        status: dict[int, str | None] = {}
        tried: list[ParamGroupState] = []
        for i, g in enumerate(self.groups):
            if g.n:
                status[i] = g.candidate()
                if status[i] is None:
                    tried.append(g)
        return status, tried

    def _try_extrapolates(self, closure: Callable[[], Any] | None,
                          tried: list[ParamGroupState]) -> tuple[bool, tuple[float, float]]:
        """Write the extrapolates of ``tried`` into the parameters; return (accept, (loss_plain, loss_extrapolated)).

        Without the safeguard every extrapolate is accepted and the losses are NaN; with it, the
        closure's losses before and after (averaged over ranks) decide for all groups at once.
        """
        guard = closure if self.safeguard else None  # step() refuses safeguard=True without a closure
        plain = self._loss(guard) if guard is not None else math.nan
        for g in tried:
            g.scatter("work")
        if guard is None:
            return True, (math.nan, math.nan)
        losses = _mean_over_ranks((plain, self._loss(guard)), tried[0].device)
        return math.isfinite(losses[1]) and losses[1] <= losses[0], losses

    @staticmethod
    def _keep_or_undo(tried: list[ParamGroupState], accept: bool) -> None:
        """Make accepted extrapolates the start of the next block, or write the optimizer's weights back."""
        for g in tried:
            if accept:
                g.gather("prev")
                if g.averaging:
                    g.last.copy_(g.prev)
            else:
                g.scatter("cur")

    def _record(self, status: dict[int, str], stored: list[tuple[bool, float] | None],
                losses: tuple[float, float]) -> None:
        """Count each group's status and append its :class:`ExtrapolationRecord`."""
        for i, st in status.items():
            g = self.groups[i]
            g.counts[st] += 1
            # a group with parameters stored an iterate on this store step
            averaged, rsd = cast("tuple[bool, float]", stored[i])
            self.records.append(ExtrapolationRecord(self.n_steps, i, st, averaged, rsd, g.n_history(), *losses))

    def reset(self) -> None:
        """Forget the stored iterates of every group.

        E.g. after a learning-rate drop, when the old steps no longer describe the map; the moving
        average and the counters carry on.
        """
        for g in self.groups:
            if g.n:
                g.hist.reset()

    def summary(self) -> dict[str, int]:
        """Return counts over all groups.

        ``steps``, ``stores``, ``averaged`` (stored iterates that were moving averages) and one
        entry per extrapolation status (see :class:`ExtrapolationRecord`).
        """
        out = dict(steps=self.n_steps, stores=0, averaged=0, **{s: 0 for s in STATUSES})
        for g in self.groups:
            for key, val in g.counts.items():
                out[key] += val
        return out

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return the wrapped optimizer's state dict and the wrapper's own state (tensors are copies).

        Returns
        -------
        dict
            ``{"optimizer": optimizer.state_dict(), "anderson": {...}}``; the ``"anderson"`` part
            holds the options, the step count and, per group, the Anderson history (buffers, Gram
            matrix, restart bookkeeping), the last stored iterate and the moving-average sums.
            ``records`` (the log) is not included.
        """
        return {"optimizer": self.optimizer.state_dict(),
                "anderson": {"options": dict(self.options), "n_steps": self.n_steps,
                             "groups": [g.state_dict() for g in self.groups]}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, so that training continues exactly as it would have.

        The model's weights are restored separately (``model.load_state_dict``).  Options that
        fix the layout (``m``, ``store_every``, ``average``) must match; the others take the values
        given to this wrapper.

        Raises
        ------
        ValueError
            If the state comes from a wrapper with another layout or other parameter groups.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "anderson"}:
            raise ValueError("state_dict must be the dict returned by AndersonAcceleration.state_dict()")
        mine = state_dict["anderson"]
        for key in ("m", "store_every", "average"):
            if mine["options"].get(key) != self.options[key]:
                raise ValueError(f"state_dict was saved with {key}={mine['options'].get(key)!r}, "
                                 f"this wrapper has {key}={self.options[key]!r}")
        if len(mine["groups"]) != len(self.groups):
            raise ValueError(f"state_dict has {len(mine['groups'])} parameter groups, the optimizer has "
                             f"{len(self.groups)}")
        for i, (g, s) in enumerate(zip(self.groups, mine["groups"])):
            g.check_state(s, i)
        with torch.no_grad():
            for g, s in zip(self.groups, mine["groups"]):
                g.load_state_dict(s)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.n_steps = int(mine["n_steps"])

    def __repr__(self) -> str:
        """Return ``AndersonAcceleration(<optimizer class>, <options>)``."""
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"AndersonAcceleration({type(self.optimizer).__name__}, {opts})"


def _mean_over_ranks(losses: tuple[float, float], device: torch.device) -> tuple[float, float]:
    """Return ``losses`` averaged over the ranks when ``torch.distributed`` is initialised, else as given."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pair = torch.tensor(losses, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(pair)
        plain, extrapolated = (pair / torch.distributed.get_world_size()).tolist()
        return plain, extrapolated
    return losses
