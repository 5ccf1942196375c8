"""What a DEQ layer refuses in its fixed-point map f, and how the solver's errors about the map reach f's user.

A BatchNorm or Dropout layer in training mode inside f would mix the samples or change f from
call to call, so that f has no fixed point to find: it is refused before the solve when f is a
module (:func:`check_modes`), and when f calls it otherwise (:class:`Watch`).  The solver's
checks of its map g(u) are reworded for the layer's f(z, x) (:func:`as_f_error`).
"""

from __future__ import annotations

import torch

#: Module types whose training mode makes f couple the samples or change between calls.
_UNSTABLE_IN_TRAINING = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)


def _unstable_message(where, mod):
    return (f"{where} is a {type(mod).__name__} in training mode: inside a DEQ's fixed-point map it would "
            "change f on every call (dropout) or mix the samples and update running statistics on every "
            "iteration (batch norm). Use GroupNorm/LayerNorm in f, put that layer in eval mode, or move it "
            "out of f")


def check_modes(f):
    """Refuse f with layers whose training mode makes f couple samples or change from call to call."""
    if not isinstance(f, torch.nn.Module):
        return
    for name, mod in f.named_modules():
        if mod.training and isinstance(mod, _UNSTABLE_IN_TRAINING):
            raise ValueError(_unstable_message(f"f.{name}" if name else "f", mod))


def _refuse_unstable(module, args):
    """A global forward pre-hook: refuse, before it runs (its running statistics untouched), a module of
    :data:`_UNSTABLE_IN_TRAINING` in training mode called by an f that is not a module (a closure).
    """
    if module.training and isinstance(module, _UNSTABLE_IN_TRAINING):
        raise ValueError(_unstable_message("a module called by f", module))


class Watch:
    """While solving with an f that is not a ``torch.nn.Module`` (whose layers :func:`check_modes` cannot
    see): refuse the layers of :data:`_UNSTABLE_IN_TRAINING` in training mode when f calls them.
    """

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


def as_f_error(exc):
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
