"""Phase 2: progressive distillation of the target model from the proxy space.

Per batch (labelled images with targets, unlabelled images with target -1), with the teacher frozen:

- proxy matching, through a projector on the target's pooled features:
  ``feature_weight * MSE(l2norm(projector(f_T)), l2norm(proxy))`` (FitNets-style hint on the proxy
  space, normalised so its scale does not depend on the proxy's) and
  ``proxy_pred_weight * T^2 * KL(softmax(teacher_logits / T) || softmax(proxy_classifier(projector(f_T)) / T))``
  (the projection, read through the teacher's frozen proxy classifier, must predict what the
  reprogrammed foundation predicts);
- the task loss on the target's own head: ``ce_weight * CE(labels)`` on labelled samples plus
  ``kd_weight * T^2 * KL(teacher || target head)`` on every sample;
- ``loss = (1 - alpha(t)) * proxy matching + alpha(t) * task loss`` with ``alpha`` from
  :func:`alpha_at` (progress ``t`` = step / steps).

Classic KD is the same loss with alpha = 1 and no projector; training from scratch, with
``kd_weight = 0`` and no teacher. All terms stay in the graph even at weight 0 so that DDP never
sees unused parameters.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models import NormalizedModel
from .config import DistillConfig, ScheduleConfig
from .reprogram import TeacherOutput


def alpha_at(progress: float, schedule: ScheduleConfig) -> float:
    """Weight of the task loss at training progress ``progress`` in [0, 1]."""
    if schedule.kind == "constant":
        return schedule.end
    r = min(max(progress / schedule.ramp_end, 0.0), 1.0)
    if schedule.kind == "step":
        ramp = 1.0 if progress >= schedule.ramp_end else 0.0
    elif schedule.kind == "linear":
        ramp = r
    else:  # cosine: slow start and end, (1 - cos(pi r)) / 2
        ramp = 0.5 * (1.0 - math.cos(math.pi * r))
    return schedule.start + (schedule.end - schedule.start) * ramp


class Projector(nn.Module):
    """Target features -> proxy space: an MLP (Linear-BN-ReLU-Linear) or a single Linear."""

    def __init__(self, in_dim: int, proxy_dim: int, hidden: int = 256):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                     nn.Linear(hidden, proxy_dim))
        else:
            self.net = nn.Linear(in_dim, proxy_dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class StudentOutput(NamedTuple):
    logits: torch.Tensor  # target head
    projection: torch.Tensor | None  # projector(features), in the proxy space


class DistillStudent(nn.Module):
    """The target model plus (for TDMR) its projector into the proxy space. Everything trains.

    The projector exists for training only; the deployed model is ``student.target``.
    """

    def __init__(self, target: NormalizedModel, proxy_dim: int | None = None, projector_hidden: int = 256):
        super().__init__()
        self.target = target
        self.projector = Projector(target.num_features, proxy_dim, projector_hidden) if proxy_dim else None

    def forward(self, x: torch.Tensor) -> StudentOutput:
        features = self.target.features(x)
        logits = self.target.head(features)
        return StudentOutput(logits, self.projector(features) if self.projector is not None else None)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over samples ('batchmean')."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True) * t * t


def distill_loss(out: StudentOutput, teacher: TeacherOutput | None, proxy_classifier: nn.Module | None,
                 targets: torch.Tensor, alpha: float, cfg: DistillConfig) -> tuple[torch.Tensor, dict]:
    """The combined loss and its terms (floats) for one batch; ``targets`` < 0 mark unlabelled."""
    labelled = targets >= 0
    zero = out.logits.sum() * 0.0  # keeps the head in the graph when a term is absent
    ce = F.cross_entropy(out.logits[labelled], targets[labelled]) if labelled.any() else zero
    kd = feat = proxy_pred = zero
    if teacher is not None:
        kd = soft_kl(out.logits, teacher.logits, cfg.temperature)
        if out.projection is not None:
            feat = F.mse_loss(F.normalize(out.projection, dim=1), F.normalize(teacher.proxy, dim=1),
                              reduction="sum") / len(targets)
            proxy_pred = soft_kl(proxy_classifier(out.projection), teacher.logits, cfg.temperature)
    proxy_term = cfg.feature_weight * feat + cfg.proxy_pred_weight * proxy_pred
    task_term = cfg.ce_weight * ce + cfg.kd_weight * kd
    loss = (1.0 - alpha) * proxy_term + alpha * task_term
    terms = {"loss": loss.item(), "ce": ce.item(), "kd": kd.item(), "feature": feat.item(),
             "proxy_pred": proxy_pred.item(), "alpha": alpha}
    return loss, terms
