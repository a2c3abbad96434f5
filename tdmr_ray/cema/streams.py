"""Test streams for CEMA runs: a labelled image set under a sequence of corruptions.

Modes (``STREAM_MODES``):
- ``reset``: one run per corruption, each from a fresh model (the reference protocol);
- ``continual``: one run, the corruptions back to back, never reset;
- ``label``: like ``reset``, but each corruption's samples arrive in a label-correlated order:
  every class's samples are spread over the stream's time slots by proportions drawn from
  Dirichlet(alpha) (alpha = 0.1: a class shows up in a few bursts, as data at one site does).

Samples are drawn from the set by a seeded permutation, so a run is a random class mix (the
JPEG CIFAR-10 folder is stored class by class), and each corruption is applied with
:func:`tdmr_ray.data.corruptions.corrupt` seeded per run.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..data import ImageSet
from ..data.corruptions import CORRUPTIONS, corrupt

STREAM_MODES = ("reset", "continual", "label")


class StreamBatch(NamedTuple):
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    tag: str  # the corruption ("clean" for none)


def dirichlet_order(labels: np.ndarray, alpha: float, n_slots: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(len(labels))`` whose classes arrive in bursts.

    Each class's (shuffled) samples are split over ``n_slots`` consecutive time slots in
    proportions drawn from Dirichlet(alpha, ..., alpha); slots are then shuffled internally.
    """
    if alpha <= 0 or n_slots < 1:
        raise ValueError(f"need alpha > 0 and n_slots >= 1, got {alpha}, {n_slots}")
    slots: list[list[int]] = [[] for _ in range(n_slots)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.floor(np.cumsum(rng.dirichlet(np.full(n_slots, alpha)))[:-1] * len(idx)).astype(int)
        for slot, part in zip(slots, np.split(idx, cuts)):
            slot.extend(part.tolist())
    return np.concatenate([rng.permutation(np.asarray(s, dtype=np.int64)) for s in slots])


def batches_of(x: np.ndarray, y: np.ndarray, tag: str, batch_size: int) -> list[StreamBatch]:
    return [StreamBatch(x[i:i + batch_size], y[i:i + batch_size], tag) for i in range(0, len(y), batch_size)]


def build_runs(images: ImageSet, corruptions: list[str] | tuple[str, ...], severity: int, mode: str,
               batch_size: int = 64, n_per_corruption: int | None = None, dirichlet_alpha: float = 0.1,
               seed: int = 0) -> list[list[StreamBatch]]:
    """The stream as a list of runs; each run starts from a fresh model. See the module docstring.

    ``corruptions`` may include ``"clean"`` (no corruption). ``n_per_corruption`` samples (all if
    None) are drawn per corruption, a different seeded draw for each.
    """
    if mode not in STREAM_MODES:
        raise ValueError(f"unknown stream mode {mode!r}; choose from {STREAM_MODES}")
    unknown = [c for c in corruptions if c != "clean" and c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {('clean',) + CORRUPTIONS}")
    n = len(images) if n_per_corruption is None else min(n_per_corruption, len(images))
    runs: list[list[StreamBatch]] = []
    for i, name in enumerate(corruptions):
        rng = np.random.default_rng([seed, i])
        idx = rng.permutation(len(images))[:n]
        if mode == "label":
            idx = idx[dirichlet_order(images.y[idx], dirichlet_alpha, math.ceil(n / batch_size), rng)]
        x = images.x[idx] if name == "clean" else corrupt(images.x[idx], name, severity, seed=seed + i)
        runs.append(batches_of(x, images.y[idx], name, batch_size))
    if mode == "continual":
        return [[b for run in runs for b in run]]
    return runs
