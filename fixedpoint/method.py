"""The protocol between a fixed-point method and the one driver loop (:mod:`fixedpoint.iteration`).

A *method* is a frozen dataclass of its options (validated at construction) whose
:meth:`Method.init` allocates a :class:`MethodState` for one solve.  The driver loop
owns everything else: calling ``g`` and checking what it returns, the residual norms
and the stopping test, batch mode with per-sample freezing, the best iterate, the
residual history, callbacks, ``check_every`` host synchronisation, the ``backend=``
bridge and the result.  Each iteration k it does, with x = x_k of shape ``(B, n)``::

    gx = g(x)                                   # the loop calls the map
    f = state.residual_buffer()                 # (B, n), the method's buffer (or None: the loop forms no f_k)
    f[...] = gx - x                             # the loop writes f_k = g(x_k) - x_k there (f not None)
    norm = state.observe(x, gx, f, need_gnorm)  # ‖f_k‖ (and ‖g_k‖) per sample, or None: the loop computes
    ...                                         # stopping test, best iterate, per-sample flags
    state.hold(held)                            # not by the loop: a wrapper's rejected points (MethodState.hold)
    restarted = state.step(x, gx, f, active, out)   # the method writes x_{k+1} into out

Rows of ``out`` whose sample is no longer ``active`` are overwritten by the loop with
x_k afterwards, so a method may compute every row.  At a host check where samples have
stopped, the loop calls ``state.pack(keep)``: the state keeps only the samples ``keep``
(moved to its first rows, in order) and from then on every array the loop passes has
``len(keep)`` rows, so each iteration costs what the samples still iterating cost.  A
state names its per-sample arrays in ``PACKED_ROWS`` for the default ``pack``, or
overrides it; one that does neither keeps all B samples, and the loop keeps them too:
every iteration then costs what the whole batch costs (except g, with ``compact``).

``observe`` and ``step`` must not keep references to ``x``, ``gx`` or ``out`` beyond the call (the loop reuses them),
must not modify the norm arrays ``observe`` returned afterwards (the loop keeps them),
must not allocate arrays of size n (use the buffers made in ``init``) and must not
read values on the host (that would synchronise a GPU); per-sample quantities are
*small state*: arrays of ``kern.sxp`` of shape ``(B,)`` in ``kern.sdtype``
(:class:`fixedpoint.kernels.Kernels`).  docs/algorithm.md ("Writing a method") shows a
complete method written from scratch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeAlias

import numpy as np

from .backend import Array
from .checks import check_options
from .kernels import Kernels

__all__ = ["Method", "MethodState"]

#: What :meth:`MethodState.observe` may return besides None: ‖f_k‖₂ per sample, or the pair (‖f_k‖₂, ‖g_k‖₂);
#: small-state arrays of shape ``(B,)``.
ObservedNorms: TypeAlias = "Array | tuple[Array, Array]"

#: The restart flags a one-sample host path returns from :meth:`MethodState.step`, indexed by whether the
#: sample restarted: read-only NumPy bool arrays of shape (1,), made once (host small state).
ONE_SAMPLE_RESTARTED = (np.zeros(1, dtype=bool), np.ones(1, dtype=bool))
for _flag in ONE_SAMPLE_RESTARTED:
    _flag.flags.writeable = False


class MethodState:
    """The per-solve state of a method: its buffers and what it remembers between iterations.

    Subclasses implement :meth:`step`; the defaults of :meth:`residual_buffer` and
    :meth:`observe` suit a method that needs no more than the current residual.

    Parameters
    ----------
    kern : Kernels
        In-place array operations for the vectors' library and device, and the small-state
        namespace (:attr:`Kernels.sxp`, :attr:`Kernels.sdtype`).
    B, n : int
        Number of samples and length of each sample's vector.
    dtype
        Dtype of the vectors (the iterate's floating dtype).
    residual : bool, default True
        Allocate the residual buffer ``self.f`` (False: :meth:`residual_buffer` returns None).
    """

    def __init__(self, kern: Kernels, B: int, n: int, dtype: Any, *, residual: bool = True) -> None:
        self.kern, self.B, self.n, self.dtype = kern, B, n, dtype
        f: Array | None = kern.xp.empty((B, n), dtype=dtype, device=kern.device) if residual else None
        self.f = f

    def residual_buffer(self) -> Array | None:
        """Return the ``(B, n)`` buffer into which the loop writes f_k = g(x_k) − x_k before :meth:`observe`.

        A method that needs no more than the norms of f_k may return None: the loop then computes
        ‖g(x_k) − x_k‖ without forming f_k (:meth:`Kernels.diff_norms`), and ``observe`` and
        ``step`` receive ``f=None``.
        """
        return self.f

    def observe(self, x: Array, gx: Array, f: Array | None, need_gnorm: bool = False) -> ObservedNorms | None:
        """Record the pair (g_k, f_k); return ‖f_k‖₂ per sample (small state, shape ``(B,)``), or None.

        Return None to let the loop compute the norms itself.  A method that reduces over the
        vectors anyway (Anderson's Gram row holds ‖f_k‖²) returns ‖f_k‖₂ to save a pass, and, when
        ``need_gnorm`` (the relative stopping test), the pair (‖f_k‖₂, ‖g_k‖₂) computed in the
        same :meth:`Kernels.sums` call: a sharded solve then needs one collective per iteration.
        """
        return None

    #: Names of the state's arrays whose leading axis is the sample (``(B, n)`` vectors, ``(B,)`` or
    #: ``(B, m)`` small state): the default :meth:`pack` moves their rows and keeps views of the first ones
    #: (the residual buffer ``f`` is included by itself).  None: the state cannot pack.
    PACKED_ROWS: ClassVar[tuple[str, ...] | None] = None

    def pack(self, keep: np.ndarray) -> bool:
        """Keep only the samples ``keep``, moved to the front in order; return True (False: not supported).

        Parameters
        ----------
        keep : numpy.ndarray of int64, shape (k,)
            Increasing indices, among the state's current samples, of those still iterating (on
            the host whatever the device).  Sample ``keep[i]`` becomes sample ``i``, and the
            arrays of later calls have ``k`` rows.

        Returns
        -------
        bool
            True once the state works on the k samples; False, changing nothing, when the class
            sets no :attr:`PACKED_ROWS` (the loop then keeps every sample in every iteration).

        Notes
        -----
        The default moves the rows of the arrays named in :attr:`PACKED_ROWS` (and ``f``) in place
        with :meth:`Kernels.pack_rows` and keeps views of their first ``k`` rows: nothing of size n
        is allocated.  A state with other layouts (stacks ``(m, B, n)``, per-sample matrices)
        overrides it.  A sample's results must not depend on which other samples share the state:
        that is what makes the answers independent of how the samples were batched.
        """
        names = type(self).PACKED_ROWS
        if names is None:
            return False
        k = len(keep)
        for name in (("f",) if self.f is not None else ()) + tuple(names):
            a = getattr(self, name)
            self.kern.pack_rows(a, keep)
            setattr(self, name, a[:k, ...])
        self.B = k
        return True

    def hold(self, held: Array) -> None:
        """Mark the samples whose point just observed is a trial point, not to be learnt from (this iteration only).

        Called, if at all, by a wrapper between :meth:`observe` and :meth:`step` of one iteration (e.g.
        :class:`fixedpoint.Backtracking`, whose rejected trial points are such points).  For a held sample
        the following :meth:`step` must leave what the method has learnt as it was before :meth:`observe`:
        the point x_k and its residual f_k enter no secant pair, Gram row or restart test, and the next
        point observed is related to the sample's last point not held (the one a line search backtracks
        from).  What ``step`` writes into a held sample's row of ``out`` is discarded by the caller and
        may be anything (it is not read).  Samples not held are unaffected, to the bit.

        Parameters
        ----------
        held : small-state bool array, shape (B,)
            True for the samples whose current point is not to be learnt from.

        Notes
        -----
        The default does nothing: the method then learns from every point it observes, held or not
        (forward iteration learns nothing anyway).  :class:`fixedpoint.Anderson` and
        :class:`fixedpoint.Broyden` implement it.  The mask must not be read on the host on a device.
        """

    def step(self, x: Array, gx: Array, f: Array | None, active: Array, out: Array) -> Array | None:
        """Write the next iterate x_{k+1} into ``out`` (shape ``(B, n)``).

        Parameters
        ----------
        x, gx : array, shape (B, n)
            x_k and g(x_k).
        f : array, shape (B, n), or None
            f_k, in the buffer of :meth:`residual_buffer` (None where that returned None).
        active : small-state bool array, shape (B,)
            Samples still iterating after this step's stopping test.
        out : array, shape (B, n)
            Where to write x_{k+1}; it does not overlap x, gx or f.

        Returns
        -------
        small-state bool array of shape (B,), or None
            The samples whose method restarted at this step (the loop counts them in
            :attr:`fixedpoint.FixedPointResult.n_restarts`); None when nothing restarts.
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class of the fixed-point methods: a frozen dataclass of options with :meth:`init`.

    Subclasses declare their options as dataclass fields (each default written there
    once), validate them in ``__post_init__`` (raising ``TypeError``/``ValueError``
    that names the parameter), set :attr:`name`, and implement :meth:`init`.
    """

    #: Short name, used in results (:attr:`fixedpoint.FixedPointResult.method`) and as the string alias.
    name: ClassVar[str] = "method"
    #: Whether the method takes complex vectors (complex64, complex128).  False: the loop refuses a complex
    #: ``x0`` with a TypeError naming the method.  A method that sets it True works with the Hermitian
    #: products of :meth:`Kernels.sums` and small state in :meth:`Kernels.small_dtype`, and compares only
    #: real quantities (norms, moduli).
    supports_complex: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Method:
        """Refuse an unknown keyword option, listing the valid ones (``Anderson(window=5)``).

        As :func:`fixedpoint.solve` does, instead of Python's bare "unexpected keyword argument".
        """
        if kwargs and dataclasses.is_dataclass(cls):
            check_options(f"{cls.__name__}()", kwargs, tuple(f.name for f in dataclasses.fields(cls)))
        return super().__new__(cls)

    def init(self, kern: Kernels, B: int, n: int, dtype: Any) -> MethodState:
        """Allocate the state of one solve of ``B`` samples of length ``n`` in ``dtype``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Return the method's options by name (its dataclass fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _set(self, **values: Any) -> None:
        """Store validated, normalised option values on the frozen instance (for ``__post_init__``)."""
        for key, value in values.items():
            object.__setattr__(self, key, value)
