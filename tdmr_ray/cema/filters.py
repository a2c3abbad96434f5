"""Edge-side sample selection: which of a batch's samples are worth uploading.

Three rules, applied in the reference's order (``cema.py``: ``EntropyCriterion`` then
``SimilarityCriterion``), each switchable in :class:`FilterConfig`:

1. unreliable exclusion: keep ``H(x) < E_max(t)``. ``E_max(t)`` is ``E_max`` until the warm-up
   has seen ``warmup_samples`` entropies, then ``E_max * mean_so_far / mean_at_warmup * lambda``.
   Every sample's entropy enters the running mean before the threshold is read, as in the reference.
2. low-informative exclusion: keep ``H(x) > E_min``.
3. redundancy (EATA): keep samples whose softmax has ``|cos| < margin`` to a moving average of
   the softmax of earlier uploads; the average starts as the mean of the first kept batch (which
   is kept whole) and then moves by ``m * avg + (1 - m) * mean(kept)``.

:class:`FilterState` is all a device needs to carry between batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import FilterConfig
from .losses import entropy

EXCLUSION_REASONS = ("unreliable", "low_info", "redundant", "over_budget")


@dataclass
class FilterState:
    n_seen: int = 0  # entropies seen so far (all samples, kept or not)
    entropy_sum: float = 0.0
    warmup_mean: float | None = None  # mean entropy once the warm-up ended
    history_probs: torch.Tensor | None = None  # moving average of uploaded softmax outputs

    @property
    def mean_entropy(self) -> float:
        return self.entropy_sum / self.n_seen if self.n_seen else 0.0


@dataclass
class Selection:
    keep: torch.Tensor  # indices into the batch, ascending
    entropies: torch.Tensor  # every sample's entropy
    e_max: float  # the threshold used for this batch (inf when the rule is off)
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> count


def update_entropy_stats(state: FilterState, ent: torch.Tensor, cfg: FilterConfig) -> None:
    state.n_seen += ent.numel()
    state.entropy_sum += float(ent.sum())
    if state.warmup_mean is None and state.n_seen >= cfg.warmup_samples:
        state.warmup_mean = state.mean_entropy


def current_e_max(state: FilterState, cfg: FilterConfig, num_classes: int) -> float:
    """E_max(t): static until the warm-up ends, then scaled by the drift of the mean entropy."""
    e_max = cfg.e_max_frac * math.log(num_classes)
    if cfg.dynamic_e_max and state.warmup_mean:  # None or 0.0 (no drift measurable): static
        e_max *= state.mean_entropy / state.warmup_mean * cfg.e_max_lambda
    return e_max


def redundancy_filter(probs: torch.Tensor, state: FilterState, cfg: FilterConfig) -> torch.Tensor:
    """Indices of ``probs`` rows to keep; moves ``state.history_probs`` by the kept rows."""
    if state.history_probs is None:
        if len(probs):
            state.history_probs = probs.mean(0)
        return torch.arange(len(probs))
    cos = F.cosine_similarity(state.history_probs.unsqueeze(0), probs, dim=1)
    keep = torch.nonzero(cos.abs() < cfg.redundancy_margin).flatten()
    if len(keep):
        m = cfg.redundancy_momentum
        state.history_probs = m * state.history_probs + (1 - m) * probs[keep].mean(0)
    return keep


def select_uploads(logits: torch.Tensor, state: FilterState, cfg: FilterConfig) -> Selection:
    """Apply the enabled rules to one batch of edge logits; updates ``state``."""
    num_classes = logits.shape[-1]
    logits = logits.detach().float()
    ent = entropy(logits)
    starting = state.n_seen < cfg.start_upload_all
    update_entropy_stats(state, ent, cfg)
    keep = torch.arange(len(logits))
    excluded = dict.fromkeys(EXCLUSION_REASONS, 0)
    e_max = current_e_max(state, cfg, num_classes) if cfg.unreliable else math.inf
    if starting:  # filter.start_upload_all: the rules' state still moves, nothing is excluded
        if cfg.redundancy:
            redundancy_filter(logits.softmax(-1), state, cfg)
        return Selection(keep, ent, e_max, excluded)
    if cfg.unreliable:
        kept = keep[ent[keep] < e_max]
        excluded["unreliable"] = len(keep) - len(kept)
        keep = kept
    if cfg.low_info:
        kept = keep[ent[keep] > cfg.e_min_frac * math.log(num_classes)]
        excluded["low_info"] = len(keep) - len(kept)
        keep = kept
    if cfg.redundancy:
        kept = keep[redundancy_filter(logits[keep].softmax(-1), state, cfg)]
        excluded["redundant"] = len(keep) - len(kept)
        keep = kept
    if cfg.budget_fraction:
        kept = budget_pick(keep, ent, math.ceil(cfg.budget_fraction * len(logits)), cfg.budget_pick, state.n_seen)
        excluded["over_budget"] = len(keep) - len(kept)
        keep = kept
    return Selection(keep, ent, e_max, excluded)


def budget_pick(keep: torch.Tensor, ent: torch.Tensor, k: int, pick: str, stream_position: int) -> torch.Tensor:
    """``k`` of the ``keep`` indices (ascending): random, highest or lowest entropy first.

    The random pick is seeded by the stream position, so a stream's picks repeat run to run.
    """
    if len(keep) <= k:
        return keep
    if pick == "random":
        order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(stream_position))
    else:
        order = torch.argsort(ent[keep], descending=pick == "uncertain")
    return keep[order[:k]].sort().values
