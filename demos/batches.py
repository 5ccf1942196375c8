"""Mini-batches for the DEQ demo: a seeded order per epoch, normalisation and crop/flip augmentation.

Batch ``b`` of epoch ``e`` depends only on (seed, e, b), so a run resumed in the
middle of an epoch sees exactly the batches it would have seen.  Under data-parallel
training every rank draws the same batch, augmentation included, and keeps its share
of the rows (``rank``, ``world_size``): together the ranks see what one process sees.
"""

from __future__ import annotations

import copy

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
    rank, world_size : int, default 0 and 1
        Data-parallel training: of every batch of ``batch_size`` images (the global
        batch, drawn alike on every rank) this rank keeps the rows ``rank``,
        ``rank + world_size``, ``rank + 2 world_size``, ... (strided, so that shares
        differ in size by at most one).  The defaults keep every row.
    """

    def __init__(self, x, y, batch_size, mean, std, max_value, device, *, shuffle, augment, seed, pad=4, rank=0,
                 world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.ascontiguousarray(y))
        self.batch_size, self.device = batch_size, device
        self.shuffle, self.augment, self.seed, self.pad = shuffle, augment, seed, pad
        self.share = slice(rank, None, world_size)  # this rank's rows of every batch
        self.scale = 1.0 / float(max_value)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self):
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def whole(self):
        """These batches with every rank's rows (e.g. for a figure that one rank draws)."""
        every = copy.copy(self)
        every.share = slice(None)
        return every

    def rows(self, index):
        """Images in batch ``index`` on all ranks together: ``batch_size``, or fewer in the last batch."""
        return min(self.batch_size, len(self.y) - index * self.batch_size)

    def _generator(self, *key):
        gen = torch.Generator()
        gen.manual_seed(int(np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]))
        return gen

    def order(self, epoch):
        """Indices of the samples in epoch ``epoch``'s order."""
        if not self.shuffle:
            return torch.arange(len(self.y))
        return torch.randperm(len(self.y), generator=self._generator(0, epoch))

    def _augment(self, x, gen, n):
        """Crop and flip ``x``, this rank's share of a batch of ``n`` images, drawing for all ``n``."""
        _, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        rows = torch.randint(0, 2 * p + 1, (n,), generator=gen)[self.share]
        cols = torch.randint(0, 2 * p + 1, (n,), generator=gen)[self.share]
        flips = (torch.rand(n, generator=gen) < 0.5)[self.share]
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            img = padded[i, :, rows[i]:rows[i] + h, cols[i]:cols[i] + w]
            out[i] = img.flip(-1) if flips[i] else img
        return out

    def batch(self, epoch, index, order=None):
        """Batch ``index`` of epoch ``epoch``, this rank's share: (images float32 (B, C, H, W), labels int64 (B,)) on
        the device; B is 0 where the batch has fewer images than there are ranks."""
        order = self.order(epoch) if order is None else order
        batch = order[index * self.batch_size:(index + 1) * self.batch_size]
        idx = batch[self.share]
        x = self.x[idx].to(torch.float32) * self.scale
        if self.augment:
            x = self._augment(x, self._generator(1, epoch, index), len(batch))
        x = (x - self.mean) / self.std
        return x.to(self.device), self.y[idx].to(self.device)

    def epoch(self, epoch, start=0):
        """Yield (index, images, labels) for the batches of epoch ``epoch`` from batch ``start`` on."""
        order = self.order(epoch)
        for index in range(start, len(self)):
            yield (index, *self.batch(epoch, index, order))
