"""Training problems of the stable-Anderson demo: MLP regression on tabular data and a Burgers PINN.

Each problem holds its data as tensors, builds its model from a seed, draws mini-batches from a
``torch.Generator`` (so that every method sees the same batches) and evaluates a model on fixed
sets.  Mini-batch size ``None`` means the full training set (deterministic gradient descent).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from demos.burgers_reference import NU, burgers_exact

__all__ = ["DiabetesMLP", "BurgersPINN", "PROBLEMS"]


def _mlp(sizes, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class _Problem:
    """What both problems share: an MLP of ``self.sizes`` and mini-batches of ``self.n_train`` points."""

    sizes: tuple
    n_train: int

    def model(self, seed):
        return _mlp(self.sizes, seed)

    def sample(self, gen, batch):
        """Indices of one mini-batch (all points when ``batch`` is None or covers the set)."""
        if batch is None or batch >= self.n_train:
            return slice(None)
        return torch.randint(0, self.n_train, (batch,), generator=gen)


class DiabetesMLP(_Problem):
    """MLP regression of disease progression from 10 clinical features (scikit-learn's diabetes data).

    442 patients, split 80/20 with a fixed seed; features and target standardised with the
    training statistics; loss = mean squared error of the standardised target.  Stands in for the
    graduate-admissions data of arXiv 2110.14813, which is not available offline.
    """

    name = "mlp_diabetes"
    metric = "test_mse"

    def __init__(self, hidden=(64, 64), split_seed=0):
        from sklearn.datasets import load_diabetes

        X, y = load_diabetes(return_X_y=True)
        order = np.random.default_rng(split_seed).permutation(len(y))
        n_train = int(0.8 * len(y))
        tr, te = order[:n_train], order[n_train:]
        mx, sx = X[tr].mean(0), X[tr].std(0)
        my, sy = y[tr].mean(), y[tr].std()
        t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.x_train, self.y_train = t((X[tr] - mx) / sx), t((y[tr] - my) / sy)[:, None]
        self.x_test, self.y_test = t((X[te] - mx) / sx), t((y[te] - my) / sy)[:, None]
        self.sizes = (X.shape[1], *hidden, 1)
        self.n_train = n_train

    def loss(self, model, idx):
        return torch.mean((model(self.x_train[idx]) - self.y_train[idx]) ** 2)

    @torch.no_grad()
    def evaluate(self, model):
        train = torch.mean((model(self.x_train) - self.y_train) ** 2).item()
        test = torch.mean((model(self.x_test) - self.y_test) ** 2).item()
        return {"train_loss": train, "test_mse": test}


class BurgersPINN(_Problem):
    """Physics-informed network for u_t + u u_x = ν u_xx on [0, 1] × [−1, 1], ν = 0.01/π.

    u(0, x) = −sin(πx), u(t, ±1) = 0.  Loss = mean squared PDE residual on a mini-batch of the
    collocation pool + mean squared initial and boundary misfits (all of those points every step).
    The error is the relative L2 error against the Cole–Hopf solution on a 101 × 201 (t, x) grid.
    """

    name = "burgers_pinn"
    metric = "rel_l2_error"

    def __init__(self, n_collocation=8192, n_initial=256, n_boundary=256, hidden=(32, 32, 32, 32), data_seed=0):
        g = torch.Generator().manual_seed(data_seed)
        self.tx = torch.stack([torch.rand(n_collocation, generator=g),
                               2 * torch.rand(n_collocation, generator=g) - 1], 1)
        x0 = 2 * torch.rand(n_initial, generator=g) - 1
        self.ic = torch.stack([torch.zeros_like(x0), x0], 1)
        self.ic_u = -torch.sin(np.pi * x0)[:, None]
        tb = torch.rand(n_boundary, generator=g)
        xb = torch.where(torch.arange(n_boundary) % 2 == 0, 1.0, -1.0)
        self.bc = torch.stack([tb, xb], 1)
        t, x = np.meshgrid(np.linspace(0, 1, 101), np.linspace(-1, 1, 201), indexing="ij")
        self.grid = torch.tensor(np.stack([t.ravel(), x.ravel()], 1), dtype=torch.float32)
        self.exact = torch.tensor(burgers_exact(t, x).ravel(), dtype=torch.float32)[:, None]
        self.sizes = (2, *hidden, 1)
        self.n_train = n_collocation

    def residual(self, model, tx):
        tx = tx.clone().requires_grad_(True)
        u = model(tx)
        du = torch.autograd.grad(u.sum(), tx, create_graph=True)[0]
        u_t, u_x = du[:, :1], du[:, 1:]
        u_xx = torch.autograd.grad(u_x.sum(), tx, create_graph=True)[0][:, 1:]
        return u_t + u * u_x - NU * u_xx

    def loss(self, model, idx):
        r = self.residual(model, self.tx[idx])
        return (r ** 2).mean() + ((model(self.ic) - self.ic_u) ** 2).mean() + (model(self.bc) ** 2).mean()

    def evaluate(self, model):
        with torch.enable_grad():
            train = self.loss(model, slice(None)).item()
        with torch.no_grad():
            err = torch.linalg.vector_norm(model(self.grid) - self.exact) / torch.linalg.vector_norm(self.exact)
            err = err.item()
        return {"train_loss": train, "rel_l2_error": err}


PROBLEMS = {p.name: p for p in (DiabetesMLP, BurgersPINN)}
