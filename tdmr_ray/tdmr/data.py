"""Downstream data for TDMR: held-out test splits, limited labels, regrouped label spaces, batches.

Everything is seeded and stratified so that every method of a benchmark sees the same images and
labels. Batches are drawn by :class:`StepSampler`, a pure function of (seed, step, rank), so a
resumed or distributed run draws exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageSet

# Task-mismatched label spaces over CIFAR-10 (groups of CIFAR-10 class indices).
CIFAR10_REGROUPINGS: dict[str, dict[str, list[int]]] = {
    # vehicles vs animals
    "cifar10-2": {"vehicle": [0, 1, 8, 9], "animal": [2, 3, 4, 5, 6, 7]},
    # five superclasses that cut across the foundation's classes
    "cifar10-5": {"air-or-sea": [0, 8], "road": [1, 9], "bird-or-frog": [2, 6],
                  "cat-or-dog": [3, 5], "deer-or-horse": [4, 7]},
}


def _stratified_pick(y: np.ndarray, fraction: float, seed: int, at_least_one: bool) -> np.ndarray:
    """Indices taking ``fraction`` of each class (rounded; at least one per class if asked)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = int(round(fraction * len(members)))
        k = max(k, 1) if at_least_one else k
        picked.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def split_holdout(imageset: ImageSet, fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, test): a seeded, stratified ``fraction`` held out as the test set.

    For downstream sets that come without a test split.
    """
    test_idx = _stratified_pick(imageset.y, fraction, seed, at_least_one=False)
    train_mask = np.ones(len(imageset), dtype=bool)
    train_mask[test_idx] = False
    if not train_mask.any() or not len(test_idx):
        raise ValueError(f"holding out {fraction} of {len(imageset)} images leaves an empty split")
    return imageset.subset(np.flatnonzero(train_mask)), imageset.subset(test_idx)


def split_labelled(imageset: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(labelled, unlabelled): keep the labels of a stratified ``fraction`` (>= 1 per class).

    The unlabelled part keeps its labels in the array (for bookkeeping) but training never reads
    them: the step functions receive them as -1 (see :func:`unlabelled_targets`).
    """
    idx = _stratified_pick(imageset.y, fraction, seed, at_least_one=True)
    rest = np.ones(len(imageset), dtype=bool)
    rest[idx] = False
    return imageset.subset(idx), imageset.subset(np.flatnonzero(rest))


def labelled_fraction(imageset: ImageSet, fraction: float, seed: int = 0) -> ImageSet:
    """The labelled part of :func:`split_labelled`."""
    return split_labelled(imageset, fraction, seed)[0]


def regroup_classes(imageset: ImageSet, groups: dict[str, list[int]] | str) -> ImageSet:
    """Relabel into a coarser label space: ``groups`` maps new class name -> old class indices.

    ``groups`` may name an entry of :data:`CIFAR10_REGROUPINGS`. Every old class must appear once.
    """
    if isinstance(groups, str):
        groups = CIFAR10_REGROUPINGS[groups]
    lookup = np.full(imageset.num_classes, -1, dtype=np.int64)
    for new, olds in enumerate(groups.values()):
        for old in olds:
            if lookup[old] != -1:
                raise ValueError(f"class {old} appears in two groups")
            lookup[old] = new
    if (lookup < 0).any():
        raise ValueError(f"classes {np.flatnonzero(lookup < 0).tolist()} are in no group")
    return ImageSet(imageset.x, lookup[imageset.y], list(groups), f"{imageset.source}:regrouped")


def augment(x: torch.Tensor, crop_padding: int = 4, flip: bool = True,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding ``crop_padding``) + horizontal flip, per sample.

    ``x``: uint8 or float NCHW on any device; returns float32 (uint8 is divided by 255). The random
    draws come from ``generator`` (a CPU generator) so they do not depend on the device.
    """
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    n, _, h, w = x.shape
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        c = x.shape[1]
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * p)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
        x = padded.gather(2, rows).gather(3, cols)
    if flip:
        flipped = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    return x


def unlabelled_targets(n: int) -> torch.Tensor:
    """Targets of images without labels: -1, which the losses skip."""
    return torch.full((n,), -1, dtype=torch.int64)


class StepSampler:
    """Indices of the batch at ``step``: shuffled epochs, drawn as a pure function of the step.

    ``batch_size`` is the global batch; with ``world_size`` > 1 each rank gets its contiguous
    slice of it (``batch_size`` must be divisible by ``world_size``).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError("cannot sample batches from an empty set")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} workers")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        per_rank = self.batch_size // self.world_size
        start = step * self.batch_size + self.rank * per_rank
        pos = np.arange(start, start + per_rank)
        epochs, offsets = np.divmod(pos, self.n)
        return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)


class DownstreamBatches:
    """Per-step training batches: labelled images (+ unlabelled ones with target -1), augmented.

    ``batch(step)`` -> (float images NCHW in [0, 1], int64 targets); deterministic in (seed, step, rank).
    """

    def __init__(self, labelled: ImageSet, labelled_batch_size: int, unlabelled: ImageSet | None = None,
                 unlabelled_batch_size: int = 0, crop_padding: int = 4, flip: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.labelled, self.unlabelled = labelled, unlabelled
        self.crop_padding, self.flip, self.seed, self.rank = crop_padding, flip, seed, rank
        self.lab = StepSampler(len(labelled), labelled_batch_size, seed, rank, world_size)
        use_unlabelled = unlabelled is not None and len(unlabelled) and unlabelled_batch_size > 0
        self.unlab = (StepSampler(len(unlabelled), unlabelled_batch_size, seed + 1, rank, world_size)
                      if use_unlabelled else None)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.lab.indices(step)
        x = torch.from_numpy(np.ascontiguousarray(self.labelled.x[idx])).permute(0, 3, 1, 2)
        y = torch.from_numpy(self.labelled.y[idx])
        if self.unlab is not None:
            uidx = self.unlab.indices(step)
            ux = torch.from_numpy(np.ascontiguousarray(self.unlabelled.x[uidx])).permute(0, 3, 1, 2)
            x, y = torch.cat([x, ux]), torch.cat([y, unlabelled_targets(len(uidx))])
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, step, self.rank]).generate_state(1)[0]))
        return augment(x, self.crop_padding, self.flip, gen), y
