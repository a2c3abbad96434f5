"""Shift detection on the edge, forward only (beyond the paper; see :class:`ShiftConfig`).

A corruption change moves the low-level statistics of the images, which the first normalization
layer's input shows directly, while a change of the class mix (label-correlated streams) moves
them little. Per batch the detector measures the symmetric KL divergence between the per-channel
Gaussians of that input and a moving average of earlier batches' (the reference), averaged over
channels and scaled by the batch size. A shift is reported when the distance exceeds ``threshold`` x its own running mean,
no sooner than ``min_batches`` batches after the previous shift (or the start); the reference
statistics then restart from the batch that showed the shift.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ShiftConfig


@dataclass
class ShiftState:
    """A device's detector: the reference statistics, the distance's running mean, the count."""

    mean: torch.Tensor | None = None  # per-channel reference mean of the first layer's input
    var: torch.Tensor | None = None
    distance_mean: float | None = None  # running mean of within-domain distances
    since: int = 0  # batches since the last shift (or the start)
    epoch: int = 0  # shifts detected so far; travels with every upload
    last_distance: float = 0.0  # (for traces)

    def to_tensors(self, prefix: str = "shift.") -> dict[str, torch.Tensor]:
        flat = {prefix + "since": torch.tensor(self.since), prefix + "epoch": torch.tensor(self.epoch)}
        if self.mean is not None:
            flat[prefix + "mean"], flat[prefix + "var"] = self.mean.clone(), self.var.clone()
        if self.distance_mean is not None:
            flat[prefix + "distance_mean"] = torch.tensor(self.distance_mean, dtype=torch.float64)
        return flat

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor], prefix: str = "shift.") -> "ShiftState":
        if prefix + "since" not in flat:
            return cls()
        dm = flat.get(prefix + "distance_mean")
        return cls(flat.get(prefix + "mean"), flat.get(prefix + "var"), None if dm is None else float(dm),
                   int(flat[prefix + "since"]), int(flat[prefix + "epoch"]))


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of an NCHW tensor."""
    var, mean = torch.var_mean(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1)
    return mean, var


def gaussian_distance(mean_a, var_a, mean_b, var_b, eps: float = 1e-5) -> float:
    """Symmetric KL divergence between diagonal Gaussians, averaged over channels."""
    va, vb = var_a + eps, var_b + eps
    d2 = (mean_a - mean_b).square()
    kl = 0.5 * (va / vb + vb / va - 2 + d2 * (1 / va + 1 / vb))
    return float(kl.mean() / 2)


def observe(state: ShiftState, mean: torch.Tensor, var: torch.Tensor, n: int,
            cfg: ShiftConfig) -> tuple[bool, float]:
    """Feed the first-layer statistics of one batch of ``n`` samples; return (shift detected, distance)."""
    state.since += 1
    if state.mean is None:
        state.mean, state.var = mean.clone(), var.clone()
        return False, 0.0
    # A batch's statistics scatter as 1/n: scaled by the batch size, small (last) batches of a
    # stream do not look like shifts.
    dist = gaussian_distance(mean, var, state.mean, state.var) * n
    m = cfg.momentum
    shifted = (state.distance_mean is not None and state.since > cfg.min_batches
               and dist > cfg.threshold * state.distance_mean)
    if shifted:
        state.epoch += 1
        state.since = 0
        state.mean, state.var = mean.clone(), var.clone()
        return True, dist
    # The first distance is that of two single batches; later ones the EMA's: both in-domain.
    state.distance_mean = dist if state.distance_mean is None else (1 - m) * state.distance_mean + m * dist
    state.mean = (1 - m) * state.mean + m * mean
    state.var = (1 - m) * state.var + m * var
    return False, dist
