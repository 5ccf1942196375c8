"""What a DEQ layer refuses in its fixed-point map f, and how the solver's errors about the map reach f's user.

A BatchNorm or Dropout layer in training mode inside f would mix the samples or change f from
call to call, so that f has no fixed point to find: it is refused before the solve when f is a
module (:func:`check_modes`), and when f calls it otherwise (:class:`Watch`).  The solver's
checks of its map g(u) are reworded for the layer's f(z, x) (:func:`as_f_error`).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal, TypeVar

import torch
from torch.utils.hooks import RemovableHandle

E = TypeVar("E", bound=Exception)

#: Module types whose training mode makes f couple the samples or change between calls.
_UNSTABLE_IN_TRAINING = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)


def _unstable_message(where: str, mod: torch.nn.Module) -> str:
    """Return the error text for ``mod``, a layer of :data:`_UNSTABLE_IN_TRAINING` found at ``where``."""
    return (f"{where} is a {type(mod).__name__} in training mode: inside a DEQ's fixed-point map it would "
            "change f on every call (dropout) or mix the samples and update running statistics on every "
            "iteration (batch norm). Use GroupNorm/LayerNorm in f, put that layer in eval mode, or move it "
            "out of f")


def check_modes(f: object) -> None:
    """Refuse f with layers whose training mode makes f couple samples or change from call to call.

    Parameters
    ----------
    f : object
        The layer's map; only a ``torch.nn.Module`` is inspected (its submodules, itself included).

    Raises
    ------
    ValueError
        If a BatchNorm or Dropout layer in f is in training mode (the message names it).
    """
    if not isinstance(f, torch.nn.Module):
        return
    for name, mod in f.named_modules():
        if mod.training and isinstance(mod, _UNSTABLE_IN_TRAINING):
            raise ValueError(_unstable_message(f"f.{name}" if name else "f", mod))


def _refuse_unstable(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    """Refuse, as a global forward pre-hook, a layer of :data:`_UNSTABLE_IN_TRAINING` in training mode.

    Called before the module runs (its running statistics untouched), for modules called by an f
    that is not a module (a closure).
    """
    if module.training and isinstance(module, _UNSTABLE_IN_TRAINING):
        raise ValueError(_unstable_message("a module called by f", module))


class Watch:
    """Refuse, while solving, the layers of :data:`_UNSTABLE_IN_TRAINING` in training mode that f calls.

    A context manager, active only for an f that is not a ``torch.nn.Module`` (whose layers
    :func:`check_modes` cannot see): a global forward pre-hook is registered on entry and removed
    on exit.

    Parameters
    ----------
    f : object
        The layer's map.
    """

    def __init__(self, f: object) -> None:
        self.on = not isinstance(f, torch.nn.Module)
        self.handle: RemovableHandle | None = None

    def __enter__(self) -> Watch:
        """Register the pre-hook (for an f that is not a module); return this object."""
        if self.on:
            self.handle = torch.nn.modules.module.register_module_forward_pre_hook(_refuse_unstable)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        """Remove the pre-hook; exceptions propagate (returns False)."""
        if self.handle is not None:
            self.handle.remove()
        return False


def as_f_error(exc: E) -> E:
    """Reword an error of the solver's checks of the map g(u) for the layer's user, whose map is f(z, x).

    Parameters
    ----------
    exc : Exception
        The solver's error (a ``TypeError`` or ``ValueError``).

    Returns
    -------
    Exception
        ``exc`` itself when its message does not mention g, else a new exception of the same type
        with the reworded message and ``exc``'s ``fixedpoint_result`` attribute (None if absent).
    """
    text = str(exc)
    for old, new in (("g must not modify its argument", "f must not modify z"), ("g must return", "f must return"),
                     ("g returned its argument", "f returned z")):
        text = text.replace(old, new)
    if text == str(exc):
        return exc
    new_exc = type(exc)(text)
    # the solver's documented extra attribute on its errors (fixedpoint.solve), which no exception class declares
    setattr(new_exc, "fixedpoint_result", getattr(exc, "fixedpoint_result", None))  # noqa: B010
    return new_exc
