"""Forward (Picard) iteration, optionally damped: x_{k+1} = (1 − ω) x_k + ω g(x_k)."""

from __future__ import annotations

from .checks import check_real
from .iteration import COMMON_DEFAULTS, Stepper, run

__all__ = ["forward_iteration", "FORWARD_DEFAULTS"]

#: Options of :func:`forward_iteration` beyond :data:`fixedpoint.iteration.COMMON_DEFAULTS`.
FORWARD_DEFAULTS = dict(damping=1.0)


class _ForwardStepper(Stepper):
    def __init__(self, kern, B, n, dtype, damping):
        self.kern, self.damping = kern, damping
        self.f = kern.xp.empty((B, n), dtype=dtype, device=kern.device)

    def residual_buffer(self, k):
        return self.f

    def observe(self, k, gx):
        return self.kern.sxp.sqrt(self.kern.sqnorm(self.f))

    def step(self, k, x, gx, active, out):
        if self.damping == 1.0:
            self.kern.copy(out, gx)
        else:
            self.kern.add_scaled(out, x, self.damping, self.f)


def forward_iteration(g, x0, *, damping=1.0, tol=1e-5, max_iter=1000, stop_mode="rel", batch=False,
                      check_every=None, callback=None, backend=None):
    """Solve x = g(x) by forward (Picard) iteration, x_{k+1} = (1 − ω) x_k + ω g(x_k).

    Converges for any x0 when the damped map is a contraction (Banach fixed-point
    theorem), and locally, at a linear rate equal to the spectral radius of the
    damped map's Jacobian at the fixed point, whenever that radius is below 1.

    Parameters
    ----------
    g : callable
        The fixed-point map, ``g(x) -> array`` of the same library, shape, dtype
        and device as ``x`` (which has ``x0``'s shape).  In batch mode it maps the
        whole batch at once, each sample independently.
    x0 : array
        Initial guess, any shape, a NumPy/CuPy/PyTorch/array-api-strict array.
        Integer and boolean inputs are promoted to the library's default float
        dtype (:func:`fixedpoint.backend.working_dtype`).
    damping : float, default 1.0
        ω in (0, 1]; 1 is the plain iteration x_{k+1} = g(x_k).
    tol : float, default 1e-5
        Stop a sample once its residual (``stop_mode``) is at most ``tol``.
    max_iter : int, default 1000
        Maximum evaluations of ``g``.
    stop_mode : {"rel", "abs"}, default "rel"
        "rel": ‖g(x) − x‖₂ / (‖g(x)‖₂ + 1e-12), the measure of the DEQ literature
        (Bai et al. 2019; Al Dajani & Keyes 2024, arXiv 2410.19460);
        "abs": ‖g(x) − x‖₂.  Norms are per sample in batch mode.
    batch : bool, default False
        Treat the leading axis of ``x0`` as a batch of independent problems: each
        sample has its own residual, convergence flag, iteration count and best
        iterate, and is frozen once converged.
    check_every : int, optional
        Test for the end of the loop (a host synchronisation) every this many
        iterations.  Default: 1 on the CPU, 10 on GPUs.
    callback : callable, optional
        ``callback(info)`` after each evaluation of ``g`` with an
        :class:`fixedpoint.iteration.IterationInfo`; returning True stops the solve
        (status "stopped").
    backend : str or module, optional
        Run the solver in another array library ("numpy", "cupy", "torch",
        "array_api_strict"); ``g`` is still called with arrays of ``x0``'s library,
        converted through DLPack (:mod:`fixedpoint.interop`).

    Returns
    -------
    FixedPointResult
        See :class:`fixedpoint.FixedPointResult`; ``n_restarts`` is always 0.

    Raises
    ------
    ValueError, TypeError
        For a bad option (the message names it), NaN/Inf in ``x0``, or a ``g``
        that returns another library, shape, dtype or device.  Any exception raised
        by ``g`` or ``callback`` propagates with the partial result attached as
        ``exc.fixedpoint_result``.
    """
    opts = dict(COMMON_DEFAULTS, tol=tol, max_iter=max_iter, stop_mode=stop_mode, batch=batch,
                check_every=check_every, callback=callback, backend=backend)
    opts["damping"] = damping = check_real("damping", damping, 0.0, 1.0, low_open=True)

    def make(kern, B, n, dtype):
        return _ForwardStepper(kern, B, n, dtype, damping)

    return run("forward", make, g, x0, opts)
