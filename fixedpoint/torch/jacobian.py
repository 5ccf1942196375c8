"""Jacobian regularisation of DEQ layers: a differentiable Hutchinson estimate of ‖∂f/∂z‖²_F per sample.

S. Bai, V. Koltun & J. Z. Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization",
ICML 2021: the estimate, added to the loss, keeps the fixed-point map f contractive during training.
"""

from __future__ import annotations

import torch

from ..checks import check_int

__all__ = ["jacobian_frobenius"]


def jacobian_frobenius(fz: torch.Tensor, z: torch.Tensor, n_probes: int = 1, *,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Hutchinson estimate of ‖∂f/∂z‖²_F per sample, differentiable, for Jacobian regularisation.

    For each sample b, with J_b = ∂f_b/∂z_b (d × d, d the entries of a sample) and
    Gaussian probes v ~ N(0, I), E‖J_bᵀ v‖² = tr(J_b J_bᵀ) = ‖J_b‖²_F
    (M. F. Hutchinson, Commun. Stat. Simul. Comput. 18, 1989); each probe is one
    vector–Jacobian product through the graph of ``fz`` with ``create_graph=True``,
    so the estimate can be added to a loss and differentiated with respect to the
    parameters of f (S. Bai, V. Koltun & J. Z. Kolter, "Stabilizing Equilibrium
    Models by Jacobian Regularization", ICML 2021, Eq. 5; unlike their code the
    estimate is per sample and not divided by the number of entries).

    Parameters
    ----------
    fz : torch.Tensor, shape (B, ...)
        f(z, x), computed from ``z`` with autograd.
    z : torch.Tensor, shape of ``fz``
        The tensor ``fz`` was computed from; it must require grad (e.g.
        ``z = z_star.detach().requires_grad_()``).  Samples along the leading axis
        must be mapped independently (as a DEQ's f in batch mode).
    n_probes : int, default 1
        Number of probes averaged; >= 1.
    generator : torch.Generator, optional
        Source of the probes (default: torch's global generator).

    Returns
    -------
    torch.Tensor, shape (B,), fz's dtype
        The estimates, attached to the graph (differentiable with respect to the
        parameters of f, x and z).

    Raises
    ------
    TypeError
        For ``fz`` or ``z`` that is not a tensor, or a non-integer ``n_probes``.
    ValueError
        For ``n_probes < 1``, shapes that differ or lack a batch axis, a ``z`` that does not
        require grad, or an ``fz`` without a graph (computed under ``torch.no_grad()``).

    Notes
    -----
    Variance: for one sample, with A = J_b J_bᵀ, Var‖J_bᵀ v‖² = 2‖A‖²_F = 2 Σ σᵢ⁴ (σᵢ the
    singular values of J_b), so the relative standard deviation of the mean of n probes is

        sqrt(2 Σ σᵢ⁴ / n) / Σ σᵢ²  ∈  [sqrt(2 / (n r)), sqrt(2 / n)],

    r being the number of nonzero singular values: sqrt(2/(n d)) when all singular values
    are equal, sqrt(2/n) (141 % for one probe) when J_b has rank one.  The error of
    the batch mean shrinks by a further sqrt(B).  For a regulariser a single probe is
    usual (the noise averages out over the training steps, as in Bai et al.); to
    *measure* ‖J‖²_F to 10 % for a sample whose Jacobian is dominated by a few
    directions, take n ≈ 200 / r_eff with r_eff = (Σ σᵢ²)² / Σ σᵢ⁴ (then 2/(n r_eff) = 0.01).
    """
    if not isinstance(fz, torch.Tensor) or not isinstance(z, torch.Tensor):
        raise TypeError(f"fz and z must be torch tensors, got {type(fz).__name__} and {type(z).__name__}")
    n_probes = check_int("n_probes", n_probes, 1)
    if fz.shape != z.shape or fz.dim() < 1:
        raise ValueError(f"fz and z must have the same shape with a leading batch axis, got {tuple(fz.shape)} and "
                         f"{tuple(z.shape)}")
    if not z.requires_grad:
        raise ValueError("z must require grad (z = z_star.detach().requires_grad_(), then fz = f(z, x))")
    if fz.grad_fn is None:
        raise ValueError("fz has no autograd graph: compute fz = f(z, x) from z with grad mode on (not under "
                         "torch.no_grad())")
    total = fz.new_zeros(fz.shape[0])
    for _ in range(n_probes):
        v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
        (vj,) = torch.autograd.grad(fz, z, v, create_graph=True, retain_graph=True)
        total = total + vj.square().flatten(1).sum(1)
    return total / n_probes
