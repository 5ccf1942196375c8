"""Mini-batches for the DEQ demo: a seeded order per epoch, normalisation and crop/flip augmentation.

Batch ``b`` of epoch ``e`` depends only on (seed, e, b), so a run resumed in the
middle of an epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["Batches"]


class Batches:
    """Iterate over (images, labels) mini-batches as float tensors on a device.

    Parameters
    ----------
    x : ndarray of uint8, shape (N, C, H, W)
    y : ndarray of int64, shape (N,)
    batch_size : int
    mean, std : ndarray, shape (C,)
        Per-channel statistics of pixels / ``max_value``, for the normalisation (x − mean) / std.
    max_value : float
        Largest pixel value (255, or 16 for digits).
    device : torch.device
    shuffle : bool
        Seeded random order per epoch (training) or the stored order (testing).
    augment : bool
        Random crop (zero padding of ``pad`` pixels, then a random H×W window) and
        random horizontal flip, per image: the usual CIFAR-10 augmentation.
    seed : int
    pad : int, default 4
    """

    def __init__(self, x, y, batch_size, mean, std, max_value, device, *, shuffle, augment, seed, pad=4):
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.ascontiguousarray(y))
        self.batch_size, self.device = batch_size, device
        self.shuffle, self.augment, self.seed, self.pad = shuffle, augment, seed, pad
        self.scale = 1.0 / float(max_value)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self):
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def _generator(self, *key):
        gen = torch.Generator()
        gen.manual_seed(int(np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]))
        return gen

    def order(self, epoch):
        """Indices of the samples in epoch ``epoch``'s order."""
        if not self.shuffle:
            return torch.arange(len(self.y))
        return torch.randperm(len(self.y), generator=self._generator(0, epoch))

    def _augment(self, x, gen):
        n, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        rows = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        cols = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        out = torch.empty_like(x)
        for i in range(n):
            img = padded[i, :, rows[i]:rows[i] + h, cols[i]:cols[i] + w]
            out[i] = img.flip(-1) if flips[i] else img
        return out

    def batch(self, epoch, index, order=None):
        """Batch ``index`` of epoch ``epoch``: (images float32 (B, C, H, W), labels int64 (B,)) on the device."""
        order = self.order(epoch) if order is None else order
        idx = order[index * self.batch_size:(index + 1) * self.batch_size]
        x = self.x[idx].to(torch.float32) * self.scale
        if self.augment:
            x = self._augment(x, self._generator(1, epoch, index))
        x = (x - self.mean) / self.std
        return x.to(self.device), self.y[idx].to(self.device)

    def epoch(self, epoch, start=0):
        """Yield (index, images, labels) for the batches of epoch ``epoch`` from batch ``start`` on."""
        order = self.order(epoch)
        for index in range(start, len(self)):
            yield (index, *self.batch(epoch, index, order))
