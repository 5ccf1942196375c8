"""One parameter group of :class:`fixedpoint.torch.optim.AndersonAcceleration`.

Its weights as flat buffers, its Anderson history, and the moving average of the optimizer iterates
between stored ones.  The stored iterate of a block of optimizer steps is the optimizer's weights, or
with averaging the mean of the block's iterates; the relative standard deviation (RSD) of the block's
steps decides the ``"auto"`` mode (J. Yin, M. Lupo Pasini, M. Stoyanov & V. Reshniak, "Stable Anderson
Acceleration for Deep Learning", arXiv 2110.14813, 2021).  Each stored pair (g_k, f_k = g_k − θ_k) goes
into a :class:`fixedpoint.AndersonHistory`, which extrapolates.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from ..anderson import Anderson, AndersonHistory
from ..backend import Array, resolve_namespace
from ..kernels import Kernels

__all__ = ["ParamGroupState"]


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy each tensor of ``src`` into the matching one of ``dst`` (one fused call; nothing for empty lists)."""
    if dst:
        torch._foreach_copy_(dst, src)


class ParamGroupState:
    """Flat buffers, Anderson history and counters of one parameter group.

    Parameters
    ----------
    index : int
        The group's index in the optimizer's ``param_groups`` (for error messages).
    group : dict of str to object
        The parameter group; its parameters with ``requires_grad`` are extrapolated, as one flat vector
        of n = their total number of elements, in the promoted dtype of the parameters (at least float32).
    method : fixedpoint.Anderson
        Window m, regularisation and safeguards of the history (:class:`fixedpoint.AndersonHistory`).
    averaging : bool
        Keep the sums of the moving average (``average`` "on" or "auto").

    Raises
    ------
    TypeError
        A parameter is not of a real floating dtype.
    ValueError
        The group's parameters lie on several devices.
    """

    BUFFERS = ("prev", "last", "s1", "s2", "acc")
    # flat (1, n) buffers: the weights now, scratch, the last stored weights; with averaging the previous
    # weights, the sums of the steps and of their squares, and the sum of the iterates of the block
    cur: torch.Tensor
    work: torch.Tensor
    prev: torch.Tensor
    last: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    acc: torch.Tensor
    views: dict[str, list[torch.Tensor]]
    hist: AndersonHistory
    active: Array  # small-state bool array of shape (1,): the one "sample" the restart safeguards apply to
    device: torch.device
    averaging: bool

    def __init__(self, index: int, group: dict[str, Any], method: Anderson, averaging: bool) -> None:
        self.params = [p for p in group["params"] if p.requires_grad]
        self.n = n = sum(p.numel() for p in self.params)
        self.block = 0
        self.was_averaged: bool | None = None
        self.counts: dict[str, int] = dict(stores=0, averaged=0, accepted=0, rejected=0, restart=0, short_history=0)
        if n == 0:
            return
        for p in self.params:
            if not p.is_floating_point():
                raise TypeError(f"param_groups[{index}] holds a parameter of dtype {p.dtype}; "
                                "only real floating parameters can be extrapolated")
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"param_groups[{index}] has parameters on several devices {sorted(map(str, devices))}; "
                             "put each device's parameters in a group of their own")
        self.device = device = devices.pop()
        dtype = torch.float32
        for p in self.params:
            dtype = torch.promote_types(dtype, p.dtype)
        xp = resolve_namespace("torch")
        kern = Kernels(xp, device)
        self.hist = method.init(kern, 1, n, dtype)
        self.active = kern.sxp.ones((1,), dtype=kern.sxp.bool, device=kern.sdevice)  # small state (see Kernels)
        names = ("cur", "work", "prev") + (("last", "s1", "s2", "acc") if averaging else ())
        for name in names:
            setattr(self, name, torch.zeros((1, n), dtype=dtype, device=device))
        self.averaging = averaging
        self.views = {}
        for name in ("cur", "work", "prev"):  # each parameter's slice of the flat buffers
            buf, start, self.views[name] = getattr(self, name), 0, []
            for p in self.params:
                self.views[name].append(buf[0, start:start + p.numel()].view(p.shape))
                start += p.numel()
        self.gather("prev")
        if averaging:
            self.last.copy_(self.prev)

    def gather(self, name: str) -> None:
        """Copy the parameters into the flat buffer ``name``."""
        _copy_all(self.views[name], [p.detach() for p in self.params])

    def scatter(self, name: str) -> None:
        """Write the flat buffer ``name`` into the parameters the optimizer updates (those with a gradient)."""
        pairs = [(p, v) for p, v in zip(self.params, self.views[name]) if p.grad is not None]
        _copy_all([p.detach() for p, _ in pairs], [v for _, v in pairs])

    def rsd(self) -> float:
        """Return max_i std_i / max_i |mean_i| over the steps d_t = x_t − x_{t−1} of the current block.

        Clobbers ``work`` and ``s2`` (both are rewritten before their next use).
        """
        L = self.block
        torch.div(self.s1, L, out=self.work)                      # mean step
        lo, hi = torch.aminmax(self.work)
        self.s2.div_(L).addcmul_(self.work, self.work, value=-1.0)  # variance of the steps
        mean_max: float
        var_max: float
        mean_max, var_max = torch.stack([torch.maximum(-lo, hi), self.s2.max()]).tolist()
        std_max = math.sqrt(max(var_max, 0.0))
        if mean_max > 0.0:
            return std_max / mean_max
        return math.inf if std_max > 0.0 else 0.0

    def after_step(self, store: bool, mode: str, threshold: float) -> tuple[bool, float] | None:
        """Update the moving-average sums; on a store step, add the pair (g_k, f_k) to the history.

        Parameters
        ----------
        store : bool
            Whether this optimizer step stores an iterate.
        mode : {"on", "auto", "off"}
            The wrapper's ``average``.
        threshold : float
            The RSD above which "auto" averages.

        Returns
        -------
        tuple of (bool, float) or None
            (averaged, rsd) of the stored iterate (rsd NaN without averaging); None when nothing
            was stored (not a store step, or a group with nothing to extrapolate).
        """
        if self.n == 0:
            return None
        if self.averaging:
            self.gather("cur")
            torch.sub(self.cur, self.last, out=self.work)
            self.s1.add_(self.work)
            self.s2.addcmul_(self.work, self.work)
            self.acc.add_(self.cur)
            self.last.copy_(self.cur)
            self.block += 1
        if not store:
            return None
        averaged, rsd, value = False, math.nan, self.cur
        if self.averaging:
            rsd = self.rsd()
            averaged = mode == "on" or rsd > threshold
            if averaged:
                torch.div(self.acc, self.block, out=self.work)
                value = self.work
            for buf in (self.s1, self.s2, self.acc):
                buf.zero_()
            self.block = 0
        else:
            self.gather("cur")
        if self.was_averaged is not None and averaged != self.was_averaged:
            self.hist.reset()  # "auto" switched: the stored pairs belong to the other map
        self.was_averaged = averaged
        f_k = cast(torch.Tensor, self.hist.residual_buffer())  # a torch tensor: the history runs on torch Kernels
        torch.sub(value, self.prev, out=f_k)
        self.hist.push(value, f_k)
        self.prev.copy_(self.cur)  # the next block starts from the optimizer's weights
        self.counts["stores"] += 1
        self.counts["averaged"] += int(averaged)
        return averaged, rsd

    def candidate(self) -> str | None:
        """Extrapolate into ``work``; return a status when there is nothing to try, else None.

        The status is "short_history" (fewer than two stored pairs) or "restart" (AA's safeguard
        cleared the history).
        """
        if self.n_history() < 2:
            return "short_history"
        if bool(self.hist.extrapolate(self.active, self.work)[0]):
            return "restart"
        return None

    def n_history(self) -> int:
        """Return the number of stored pairs the next extrapolation combines."""
        return int(self.hist.size()[0]) if self.n else 0

    def state_dict(self) -> dict[str, Any]:
        """Return the group's state: counters and, for a group with parameters, history and buffers (copies)."""
        state = dict(n=self.n, block=self.block, was_averaged=self.was_averaged,
                     counts=dict(self.counts))
        if self.n:
            # as tensors (the small state may be NumPy), so that torch.load(weights_only=True) reads it
            state["history"] = {k: torch.as_tensor(v) for k, v in self.hist.state_dict().items()}
            state.update({b: getattr(self, b).clone() for b in self.BUFFERS if hasattr(self, b)})
        return state

    def check_state(self, state: dict[str, Any], index: int) -> None:
        """Refuse (``ValueError``) a :meth:`state_dict` of a group with another number of elements."""
        if state.get("n") != self.n:
            raise ValueError(f"state_dict: param_groups[{index}] has {state.get('n')} elements to extrapolate, "
                             f"this optimizer's has {self.n}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (checked by :meth:`check_state`)."""
        if self.n:
            self.hist.load_state_dict(state["history"])
            for b in self.BUFFERS:
                if hasattr(self, b):
                    getattr(self, b).copy_(state[b])
        self.block = state["block"]
        self.was_averaged = state["was_averaged"]
        self.counts = dict(state["counts"])
