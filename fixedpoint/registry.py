"""The registry of methods by name: what ``solve(method="name")`` and the DEQ layer look names up in.

The built-in methods register themselves when their module is imported
(``register_method("anderson", Anderson)`` at the end of :mod:`fixedpoint.anderson`); a
method written elsewhere does the same in its own module, and from then on every entry
point takes its name, with its options as keyword arguments (docs/algorithm.md, "Writing
a method").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from .checks import check_options
from .method import Method
from .options import COMMON_OPTIONS

__all__ = ["register_method", "METHODS", "method_class", "resolve_method"]

M = TypeVar("M", bound=type[Method])

_REGISTERED: dict[str, type[Method]] = {}

#: The registered methods by name (a read-only view: add to it with :func:`register_method`).
METHODS: Mapping[str, type[Method]] = MappingProxyType(_REGISTERED)


def register_method(name: str, cls: M, *, replace: bool = False) -> M:
    """Make ``cls`` available by ``name`` to :func:`fixedpoint.solve`, its shortcuts and the DEQ layer.

    Parameters
    ----------
    name : str
        The name, a Python identifier (``solve(g, x0, method=name, **options)`` then makes
        ``cls(**options)``).  A class may be registered under several names.
    cls : type
        A subclass of :class:`fixedpoint.Method` (a frozen dataclass of options with ``init``).
    replace : bool, default False
        Allow ``name`` to move to another class.  Without it, registering a name again is accepted
        only for a class of the same module and qualified name (a module run again, as in a
        notebook or after ``importlib.reload``), which then replaces the old one.

    Returns
    -------
    type
        ``cls``, unchanged.

    Raises
    ------
    TypeError
        If ``name`` is not a string or ``cls`` is not a subclass of :class:`fixedpoint.Method`.
    ValueError
        If ``name`` is not an identifier, is an option common to every method, or is registered
        to another class and ``replace`` is False.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {name!r}")
    if not name.isidentifier():
        raise ValueError(f"name must be a Python identifier (it becomes a value of method=), got {name!r}")
    if name in COMMON_OPTIONS:
        raise ValueError(f"name {name!r} is an option common to every method; choose another name")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"cls must be a subclass of fixedpoint.Method, got {cls!r}")
    old = _REGISTERED.get(name)
    if old is not None and old is not cls and not replace and _path(old) != _path(cls):
        raise ValueError(f"method name {name!r} is already registered to {_path(old)}; pass replace=True to "
                         f"register {_path(cls)} under it")
    _REGISTERED[name] = cls
    return cls


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def method_class(name: str) -> type[Method]:
    """Return the class registered as ``name``.

    Raises
    ------
    ValueError
        If no method is registered under ``name``; the message lists the registered names.
    """
    try:
        return _REGISTERED[name]
    except (KeyError, TypeError):
        known = ", ".join(map(repr, _REGISTERED))
        raise ValueError(f"method must be one of {known} (the registered methods; fixedpoint.register_method adds "
                         f"one) or a method object, got {name!r}") from None


def resolve_method(method: str | Method, options: Mapping[str, Any],
                   where: str = "solve") -> tuple[Method, dict[str, Any]]:
    """Split ``options`` into a method object and the common options.

    Parameters
    ----------
    method : str or Method
        A registered name (:data:`METHODS`; its options are then taken from ``options``) or a method object.
    options : mapping
        Keyword options: common ones (:data:`fixedpoint.options.COMMON_OPTIONS`) and, with a method name,
        the method's.
    where : str
        How the caller is named in error messages.

    Returns
    -------
    (Method, dict)
        The method object and the common options that were given (not yet checked).

    Raises
    ------
    ValueError
        For a name that is not registered (the message lists the registered ones), or a bad option value
        (the message names it).
    TypeError
        For a method that is neither a name nor a method object, an option that neither the method
        nor the solve loop takes (with the closest valid name), or method options passed beside
        a method object.
    """
    common = {k: v for k, v in options.items() if k in COMMON_OPTIONS}
    own = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
    if isinstance(method, str):
        cls = method_class(method)
        fields = tuple(f.name for f in dataclasses.fields(cls))
        check_options(f"{where}(method={method!r})", own, fields + tuple(COMMON_OPTIONS))
        return cls(**own), common
    if isinstance(method, type):
        raise TypeError(f"method must be a method object or a name, got the class {method.__name__}; "
                        f"pass an instance such as {method.__name__}()")
    if not callable(getattr(method, "init", None)):
        raise TypeError(f"method must be one of {', '.join(map(repr, _REGISTERED))} or a method object such as "
                        f"fixedpoint.Anderson(m=5) (an object with init(kern, B, n, dtype)), got {method!r}")
    if own:
        check_options(f"{where}(method={type(method).__name__}(...))", own, tuple(COMMON_OPTIONS))
    return method, common
