"""The DEQ image classifier of the "Deep Implicit Layers" tutorial (chapter 4), as used by arXiv 2410.19460.

stem: Conv2d(C → 48, 3×3) → BatchNorm2d → DEQ over the residual cell f(z, x) below
→ BatchNorm2d → AvgPool2d → flatten → Linear(48·4·4 → classes).

The cell, with GroupNorm (8 groups) and conv weights drawn from N(0, 0.01):

    f(z, x) = GN₃(relu(z + GN₂(x + conv₂(GN₁(relu(conv₁(z)))))))

The pooling window is the image side // 4, so that the head always sees a 4×4
grid (8 for CIFAR-10's 32×32 images, as in the tutorial; 7 for 28×28; 2 for 8×8).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fixedpoint.torch import DEQ


class ResidualCell(nn.Module):
    """The fixed-point map f(z, x) of the DEQ: two 3×3 convolutions with GroupNorm and a skip connection.

    Parameters
    ----------
    channels : int
        Channels of z and x.
    inner : int
        Channels between the two convolutions.
    groups : int
        GroupNorm groups (must divide ``channels`` and ``inner``).
    init_std : float
        Standard deviation of the normal initialisation of the conv weights.
    """

    def __init__(self, channels=48, inner=64, groups=8, init_std=0.01):
        super().__init__()
        if channels % groups or inner % groups:
            raise ValueError(f"groups ({groups}) must divide channels ({channels}) and inner channels ({inner})")
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, inner)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, init_std)

    def forward(self, z, x):
        y = self.norm1(F.relu(self.conv1(z)))
        return self.norm3(F.relu(z + self.norm2(x + self.conv2(y))))


class DEQClassifier(nn.Module):
    """Image classifier with one implicit layer, sized from the data.

    Parameters
    ----------
    in_channels : int
        Channels of the input images (3 for CIFAR-10, 1 for Fashion-MNIST and digits).
    image_size : int
        Side of the square input images, >= 4.
    n_classes : int
        Number of classes.
    channels, inner, groups : int
        Width of the DEQ state, inner width of the cell, GroupNorm groups (48, 64, 8 in the paper).
    deq_options : dict
        Keyword arguments of :class:`fixedpoint.torch.DEQ` (method, backend, tol, max_iter, m, beta, ...).
    """

    def __init__(self, in_channels, image_size, n_classes, channels=48, inner=64, groups=8, deq_options=None):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        pool = image_size // 4
        side = image_size // pool
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=True)
        self.bn_in = nn.BatchNorm2d(channels)
        # unconverged solves are the demo's subject: it records each solve's converged fraction in its metrics
        # instead of warning (fixedpoint.ConvergenceWarning) at every place of the training loop
        self.deq = DEQ(ResidualCell(channels, inner, groups), **{"unconverged": "ignore", **(deq_options or {})})
        self.bn_out = nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(pool, pool)
        self.head = nn.Linear(channels * side * side, n_classes)

    def injection(self, images):
        """The DEQ's input x for a batch of images: stem convolution and batch norm."""
        return self.bn_in(self.stem(images))

    def forward(self, images, jacobian_probes=0):
        """Logits of shape (B, classes); with ``jacobian_probes`` > 0 also the DEQ's estimate of
        ‖∂f/∂z‖²_F per sample at z* (:func:`fixedpoint.torch.jacobian_frobenius`), shape (B,)."""
        out = self.deq(self.injection(images), jacobian_probes=jacobian_probes)
        z, jac = out if jacobian_probes else (out, None)
        logits = self.head(torch.flatten(self.pool(self.bn_out(z)), 1))
        return logits if jac is None else (logits, jac)
