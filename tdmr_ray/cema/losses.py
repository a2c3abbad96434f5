"""CEMA's losses: softmax entropy, the 1/exp(H - E_max) sample weights, and the distillation loss.

Follows the reference's ``criterion/tta.py`` (entropy) and ``criterion/distillation.py``
(``TTADistillationLoss``): KL summed over classes per sample (not KLDivLoss's mean over classes)
and scaled by T^2; every weight is computed from detached entropies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax entropy in nats, ``-sum p log p`` over the last dimension."""
    logits = logits.clamp(min=torch.finfo(logits.dtype).min)  # -inf logits would give 0 * -inf
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def entropy_weights(ent: torch.Tensor, e_max: float) -> torch.Tensor:
    """The reference's sample weights ``1 / exp(H - E_max)`` (no gradient through them)."""
    return torch.exp(e_max - ent.detach())


def weighted_entropy_loss(logits: torch.Tensor, e_max: float) -> torch.Tensor:
    """Mean over the batch of ``H(x) / exp(H(x) - E_max)``: the foundation's adaptation loss."""
    ent = entropy(logits)
    return (ent * entropy_weights(ent, e_max)).mean()


@dataclass
class DistillationTerms:
    total: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, e_max: float,
                      alpha: float = 3.0, beta: float = 3.0, gamma: float = 1.0,
                      temperature: float = 1.0) -> DistillationTerms:
    """``alpha * weighted entropy(student) + beta * KL(teacher || student) + gamma * CE(student,
    argmax teacher)``; KL and CE weighted per sample by the teacher's ``1/exp(H - E_max)``.

    The teacher's logits are treated as constants.
    """
    teacher_logits = teacher_logits.detach()
    ent = entropy(student_logits)
    ent_term = (ent * entropy_weights(ent, e_max)).mean()
    teacher_w = entropy_weights(entropy(teacher_logits), e_max)
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1),
                  reduction="none").sum(-1) * t * t
    kl_term = (kl * teacher_w).mean()
    ce = F.cross_entropy(student_logits, teacher_logits.argmax(-1), reduction="none")
    ce_term = (ce * teacher_w).mean()
    total = alpha * ent_term + beta * kl_term + gamma * ce_term
    return DistillationTerms(total, ent_term.detach(), kl_term.detach(), ce_term.detach())
