"""One-step functions, evaluation and a phase runner: the pieces a training loop (plain or Ray Train) calls.

The step functions take modules that may have DDP-wrapped parts (see
:meth:`FoundationTeacher.trainable_modules`): they only call ``forward`` and ``backward`` and step
the optimiser, so gradient synchronisation stays the wrapper's business.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from .compute import ComputeMeter
from .config import DistillConfig, OptimConfig, TeacherConfig
from .distill import DistillStudent, distill_loss
from .reprogram import FoundationTeacher

FOUNDATION, TARGET = "foundation", "target"  # model names in ComputeMeter


def make_optimizer(param_groups: Iterable[dict] | Iterable[nn.Parameter], cfg: OptimConfig,
                   total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW + per-step linear warm-up and cosine decay (the lr factor is a pure function of the step)."""
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min((step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def teacher_param_groups(teacher: FoundationTeacher, cfg: TeacherConfig) -> list[dict]:
    """The teacher's trainable parameters: the input transformation at ``transform_lr``, the foundation's
    own weights (fine-tuning only) at ``foundation_lr``, the mapping at the optimiser's lr."""
    groups = []
    for name, module in teacher.trainable_modules().items():
        params = [p for p in module.parameters() if p.requires_grad]
        group = {"params": params}
        if name == "body":
            group["lr"] = cfg.foundation_lr
        elif name == "transform":
            group["lr"] = cfg.transform_lr
        groups.append(group)
    if not groups:
        raise ValueError("the teacher has nothing to train")
    return groups


def _to_device(model: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move a CPU batch to the model's device (the data helpers always produce CPU tensors)."""
    first = next(iter(model.parameters()), None)
    first = next(iter(model.buffers()), None) if first is None else first
    device = first.device if first is not None else torch.device("cpu")
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def _clip_and_step(optimizer: torch.optim.Optimizer, scheduler, grad_clip: float) -> None:
    if grad_clip > 0:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def reprogram_step(teacher: FoundationTeacher, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scheduler=None, grad_clip: float = 0.0, meter: ComputeMeter | None = None) -> dict:
    """One supervised step of the teacher's trainable parts (CE on the labelled images of the batch)."""
    teacher.train()
    x, y = _to_device(teacher, x, y)
    keep = y >= 0
    x, y = x[keep], y[keep]
    out = teacher(x)
    loss = F.cross_entropy(out.logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _clip_and_step(optimizer, scheduler, grad_clip)
    if meter is not None:
        meter.forward(FOUNDATION, len(x))
        if teacher.train_foundation:
            meter.backward(FOUNDATION, len(x), "weights")
        elif any(p.requires_grad for p in teacher.transform.parameters()):
            meter.backward(FOUNDATION, len(x), "inputs")
    acc = (out.logits.argmax(1) == y).float().mean().item()
    return {"loss": loss.item(), "acc": acc}


def distill_step(student: DistillStudent, teacher: FoundationTeacher | None, x: torch.Tensor, y: torch.Tensor,
                 optimizer: torch.optim.Optimizer, alpha: float, cfg: DistillConfig, scheduler=None,
                 meter: ComputeMeter | None = None) -> dict:
    """One step of the target (and projector) on a batch; ``y`` < 0 marks unlabelled images.

    ``teacher`` is frozen here (run in eval mode without a graph); None trains from labels only.
    """
    student.train()
    x, y = _to_device(student, x, y)
    teacher_out = None
    if teacher is not None:
        teacher.eval()
        with torch.no_grad():
            teacher_out = teacher(x)
        if meter is not None:
            meter.forward(FOUNDATION, len(x))
    proxy_classifier = teacher.proxy_classifier() if teacher is not None else None
    out = student(x)
    loss, terms = distill_loss(out, teacher_out, proxy_classifier, y, alpha, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _clip_and_step(optimizer, scheduler, cfg.optim.grad_clip)
    if meter is not None:
        meter.forward(TARGET, len(x))
        meter.backward(TARGET, len(x), "weights")
    return terms


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 500, max_images: int | None = None,
             meter: ComputeMeter | None = None, meter_name: str = TARGET) -> dict:
    """Top-1 accuracy and mean CE of ``model`` (logits, or an output with ``.logits``) on ``data``."""
    was_training = model.training
    model.eval()
    n = len(data) if max_images is None else min(max_images, len(data))
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        x, y = _to_device(model, *data.tensors(slice(start, min(start + batch_size, n))))
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    if meter is not None:
        meter.forward(meter_name, n)
    return {"acc": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}


def run_phase(step_fn: Callable[[int], dict], num_steps: int, start_step: int = 0, log_every: int = 0,
              log: Callable[[int, dict], None] | None = None) -> dict:
    """Call ``step_fn(step)`` for steps ``start_step .. num_steps - 1``; average the metrics per log window.

    ``log(step, averaged metrics)`` is called every ``log_every`` steps and after the last step
    (a Ray Train loop reports and checkpoints there). Returns the last window's averages plus
    ``steps`` and ``seconds``.
    """
    window: dict[str, list[float]] = {}
    last: dict = {}
    t0 = time.monotonic()
    for step in range(start_step, num_steps):
        for k, v in step_fn(step).items():
            window.setdefault(k, []).append(float(v))
        done = step + 1
        if (log_every and done % log_every == 0) or done == num_steps:
            last = {k: float(np.mean(v)) for k, v in window.items()}
            window = {}
            if log is not None:
                log(done, last)
    return {**last, "steps": num_steps - start_step, "seconds": time.monotonic() - t0}
