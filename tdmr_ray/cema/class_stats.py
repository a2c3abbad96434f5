"""Class-balanced TBR statistics for a forward-only edge (beyond the paper; ``edge.class_balanced_stats``).

A device's TBR statistics are an EMA of its batches' statistics. When the stream's classes arrive in
bursts (label-correlated streams: a few classes per batch), that EMA follows the burst, and
normalizing with the statistics of the classes in front of the camera removes part of what tells
them apart. Here the edge keeps, per normalization layer and forward only,

- the plain EMA of batch statistics (what TBR keeps), and
- an EMA of the channel moments of each *predicted* class (the per-sample channel means and second
  moments are read on the forward pass; the predictions assign them to classes afterwards), whose
  equal-weight mixture over the classes seen since the statistics started is
  ``mean = 1/K' sum_k m_k``, ``var = 1/K' sum_k s_k - mean^2``,

and normalizes the next batch with a blend of the two, moment by moment: ``lambda`` of the balanced
mixture, ``1 - lambda`` of the plain EMA. ``lambda`` follows how bursty the stream is: the total
variation between each batch's predicted-class histogram and the long-run one (about 0.15 for a
shuffled batch of 64 over 10 classes, 0.6-0.9 for a burst of a few classes), smoothed by an EMA and
ramped from 0 at ``BURST_LOW`` to 1 at ``BURST_HIGH``. A shuffled stream is thus normalized as
before (the balanced mixture alone cost 1.5 points there: the edge's predictions are not balanced
under a corruption, its classes are), a bursty one by the mixture. The idea follows the
category-balanced memory of RoTTA (Yuan et al., CVPR 2023), without a memory of images.

The per-class moments (2 x classes x channels floats per layer, about 55 KB for a CIFAR ResNet-20)
are device state; the blend is written into the TBR statistics the rest of the code reads (and
uploads carry with ``edge.stats_source="upload"``).
"""
from __future__ import annotations

import torch
from torch import nn

from .norm import TestTimeBatchNorm2d, test_time_bn_modules

BURST_LOW, BURST_HIGH = 0.25, 0.45  # total variation of a batch's class histogram: shuffled .. bursty
BURST_MOMENTUM = 0.3


class ClassMomentProbe:
    """Forward pre-hooks that record each TBR layer's per-sample channel moments on every forward."""

    def __init__(self, model: nn.Module):
        self.layers: dict[str, TestTimeBatchNorm2d] = test_time_bn_modules(model)
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for name, module in self.layers.items():
            module.register_forward_pre_hook(self._hook(name))

    def _hook(self, name: str):
        def record(module, args) -> None:
            x = args[0].detach().float()
            self.moments[name] = (x.mean((2, 3)), x.square().mean((2, 3)), x.shape[2] * x.shape[3])
        return record

    def update(self, class_stats: dict[str, torch.Tensor] | None, predictions: torch.Tensor, num_classes: int,
               momentum: float) -> dict[str, torch.Tensor]:
        """Move the plain EMA, the per-class moments and the burst level by this batch (recorded on the
        last forward); return the new state."""
        onehot = nn.functional.one_hot(predictions, num_classes).float()  # (N, K)
        hist = onehot.sum(0)
        seen_now = hist > 0
        counts = hist.clamp_min(1)[:, None]
        first = class_stats is None
        prev_seen = (class_stats["class_count"] if not first else torch.zeros(num_classes)) > 0
        out: dict[str, torch.Tensor] = {}
        # A class seen for the first time starts at its batch moments; a seen one moves by EMA.
        step = (torch.where(prev_seen, momentum, 1.0) * seen_now)[:, None]
        for name, (m1, m2, pixels) in self.moments.items():
            n = len(m1) * pixels
            mean = m1.mean(0)
            var = (m2.mean(0) - mean.square()).clamp_min(0) * (n / max(n - 1, 1))  # TBR's unbiased variance
            batch_m1, batch_m2 = onehot.T @ m1 / counts, onehot.T @ m2 / counts  # (K, C)
            if first:
                out[f"{name}.ema_mean"], out[f"{name}.ema_var"] = mean, var
                old_m1, old_m2 = batch_m1, batch_m2
            else:
                out[f"{name}.ema_mean"] = class_stats[f"{name}.ema_mean"] + momentum * (mean - class_stats[f"{name}.ema_mean"])
                out[f"{name}.ema_var"] = class_stats[f"{name}.ema_var"] + momentum * (var - class_stats[f"{name}.ema_var"])
                old_m1, old_m2 = class_stats[f"{name}.m1"], class_stats[f"{name}.m2"]
            out[f"{name}.m1"] = old_m1 + step * (batch_m1 - old_m1)
            out[f"{name}.m2"] = old_m2 + step * (batch_m2 - old_m2)
        out.update(update_burst(class_stats, hist))
        self.moments = {}
        return out


def update_burst(class_stats: dict[str, torch.Tensor] | None, hist: torch.Tensor) -> dict[str, torch.Tensor]:
    """The long-run predicted-class counts and the burst level after a batch whose predicted-class
    histogram is ``hist`` (``class_stats``: the state before it, None at the start)."""
    if class_stats is None:
        return {"class_count": hist.clone(), "burst": torch.tensor(0.0)}
    long_run = class_stats["class_count"]
    tv = 0.5 * (hist / hist.sum() - long_run / long_run.sum()).abs().sum()
    return {"class_count": long_run + hist, "burst": class_stats["burst"] + BURST_MOMENTUM * (tv - class_stats["burst"])}


def is_bursty(class_stats: dict[str, torch.Tensor] | None) -> bool:
    """Whether the stream's predicted classes come in bursts (the blend's midpoint passed)."""
    return class_stats is not None and burst_weight(class_stats) >= 0.5


def burst_weight(class_stats: dict[str, torch.Tensor]) -> float:
    """The balanced mixture's share of the statistics: 0 on a shuffled stream, 1 on a bursty one."""
    return float(((class_stats["burst"] - BURST_LOW) / (BURST_HIGH - BURST_LOW)).clamp(0, 1))


def balanced_stats(class_stats: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``stats`` (TBR statistics) with each layer's running mean and variance set to the blend of the
    plain EMA and the equal-weight mixture of the seen classes' moments (module docstring)."""
    seen = class_stats["class_count"] > 0
    lam = burst_weight(class_stats)
    out = dict(stats)
    for key in stats:
        if not key.endswith(".running_mean"):
            continue
        name = key[: -len(".running_mean")]
        ema_mean, ema_var = class_stats[f"{name}.ema_mean"], class_stats[f"{name}.ema_var"]
        m1, m2 = class_stats[f"{name}.m1"][seen], class_stats[f"{name}.m2"][seen]
        mean = (1 - lam) * ema_mean + lam * m1.mean(0)
        second = (1 - lam) * (ema_var + ema_mean.square()) + lam * m2.mean(0)
        out[key] = mean.to(stats[key].dtype)
        out[f"{name}.running_var"] = (second - mean.square()).clamp_min(0).to(stats[key].dtype)
    return out
