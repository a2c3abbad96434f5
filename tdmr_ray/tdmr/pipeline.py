"""TDMR and its baselines end to end in one process: teacher phase, distillation phase, evaluation.

This is the single-process composition of the components (used by tests and the bench); a Ray
Train job composes the same pieces (``build_teacher``, ``reprogram_step``, ``DistillStudent``,
``distill_step``, ``evaluate``) with DDP on the trainable parts.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..data import ImageSet
from ..models import NormalizedModel, create_model, list_models
from .compute import ComputeMeter, forward_flops
from .config import TDMRConfig, method_config
from .data import DownstreamBatches
from .distill import DistillStudent, alpha_at
from .reprogram import FoundationTeacher, build_teacher
from .steps import (FOUNDATION, TARGET, distill_step, evaluate, make_optimizer, reprogram_step, run_phase,
                    teacher_param_groups)

DEFAULT_TARGET = "resnet20"  # CIFAR ResNet-20 trained from scratch: 0.27 M parameters, 41 MMACs/img at 32x32
# (the ResNet-56 foundation: 0.85 M, 125 MMACs; timm's resnet10t, the old default: 4.9 M, 22 MMACs). It is
# also the fleet's edge model, so a TDMR target deploys to CEMA devices as it is.

LogFn = Callable[[str, int, dict], None]  # (phase, step, metrics)


def train_teacher(foundation: NormalizedModel, labelled: ImageSet, cfg: TDMRConfig,
                  meter: ComputeMeter | None = None, log: LogFn | None = None) -> FoundationTeacher:
    """Phase 1: build the teacher for ``labelled``'s task and fit its trainable parts; returns it frozen."""
    torch.manual_seed(cfg.seed)
    tc = cfg.teacher
    teacher = build_teacher(foundation, labelled.x.shape[-1], labelled.num_classes, tc)
    if meter is not None:
        meter.register(FOUNDATION, forward_flops(teacher, _example(labelled, foundation.mean.device)))
    batches = DownstreamBatches(labelled, tc.batch_size, crop_padding=cfg.augment.crop_padding,
                                flip=cfg.augment.flip, seed=cfg.seed)
    if tc.steps:
        opt, sched = make_optimizer(teacher_param_groups(teacher, tc), tc.optim, tc.steps)
        run_phase(lambda s: reprogram_step(teacher, *batches.batch(s), opt, sched, tc.optim.grad_clip, meter),
                  tc.steps, log_every=max(tc.steps // 5, 1), log=_phase_log(log, "teacher"))
    teacher.requires_grad_(False)
    return teacher.eval()


def train_target(target: NormalizedModel, teacher: FoundationTeacher | None, labelled: ImageSet,
                 unlabelled: ImageSet | None, cfg: TDMRConfig, meter: ComputeMeter | None = None,
                 log: LogFn | None = None) -> DistillStudent:
    """Phase 2: distil ``teacher`` (None: labels only) into ``target``; returns the student."""
    torch.manual_seed(cfg.seed)
    dc = cfg.distill
    if teacher is None and (dc.kd_weight > 0 or dc.uses_proxy):
        raise ValueError("distillation terms need a teacher: set kd/feature/proxy_pred weights to 0")
    proxy_dim = teacher.proxy_dim if (teacher is not None and dc.uses_proxy) else None
    device = target.mean.device
    student = DistillStudent(target, proxy_dim, dc.projector_hidden).to(device)
    if meter is not None:
        meter.register(TARGET, forward_flops(target, _example(labelled, device)))
    batches = DownstreamBatches(labelled, dc.labelled_batch_size, unlabelled if teacher is not None else None,
                                dc.unlabelled_batch_size, cfg.augment.crop_padding, cfg.augment.flip,
                                seed=cfg.seed + 1000)
    opt, sched = make_optimizer(student.parameters(), dc.optim, dc.steps)

    def step(s: int) -> dict:
        alpha = alpha_at(s / max(dc.steps, 1), dc.schedule)
        return distill_step(student, teacher, *batches.batch(s), opt, alpha, dc, sched, meter)

    run_phase(step, dc.steps, log_every=max(dc.steps // 10, 1), log=_phase_log(log, "distill"))
    return student.eval()


def run_method(method: str, make_foundation: Callable[[], NormalizedModel],
               make_target: Callable[[int, int], NormalizedModel], labelled: ImageSet, test: ImageSet,
               unlabelled: ImageSet | None = None, cfg: TDMRConfig | None = None,
               eval_max_images: int | None = None, log: LogFn | None = None,
               device: str | torch.device = "cpu") -> dict:
    """Run ``method`` (tdmr, ft-kd, lp-kd, scratch) with ``cfg`` (TDMR's; baselines derived by
    :func:`method_config`). ``make_target(num_classes, in_chans)`` builds a fresh target.

    Models are built on the CPU and moved to ``device``. Returns accuracies of the final models
    (never the best over evaluations), wall-clock seconds per phase and the compute meter's
    summary (training only; evaluation is not counted).
    """
    mcfg = method_config(method, cfg or TDMRConfig())
    meter = ComputeMeter()
    result: dict = {"method": method}
    teacher = None
    t0 = time.monotonic()
    if method != "scratch":
        teacher = train_teacher(make_foundation().to(device), labelled, mcfg, meter, log)
        result["teacher_seconds"] = time.monotonic() - t0
        result["teacher_acc"] = evaluate(teacher, test, mcfg.eval_batch_size, eval_max_images)["acc"]
    t1 = time.monotonic()
    torch.manual_seed(mcfg.seed)  # the same initial target for every method
    student = train_target(make_target(labelled.num_classes, labelled.x.shape[-1]).to(device), teacher, labelled,
                           unlabelled, mcfg, meter, log)
    result["distill_seconds"] = time.monotonic() - t1
    result["train_seconds"] = result.get("teacher_seconds", 0.0) + result["distill_seconds"]
    result["target_acc"] = evaluate(student.target, test, mcfg.eval_batch_size, eval_max_images)["acc"]
    result["compute"] = meter.summary()
    result["student"] = student
    result["teacher"] = teacher
    return result


def pretrained_foundation(name: str, pretrained: bool = True,
                          num_classes: int | None = None) -> Callable[[], NormalizedModel]:
    """A factory of fresh copies of a (pretrained) foundation model with its own head.

    ``num_classes`` defaults to the head the weights come with: 10 for the CIFAR ResNets, timm's
    pretrained config (1000 for ImageNet models) otherwise.
    """
    if num_classes is None:
        num_classes = 10 if name in list_models() else _timm_num_classes(name)
    return lambda: create_model(name, num_classes=num_classes, pretrained=pretrained)


def _timm_num_classes(name: str) -> int:
    import timm

    cfg = timm.get_pretrained_cfg(name.removeprefix("timm/"))
    return int(getattr(cfg, "num_classes", None) or 1000) if cfg is not None else 1000


def target_factory(name: str = DEFAULT_TARGET) -> Callable[[int, int], NormalizedModel]:
    return lambda num_classes, in_chans: create_model(name, num_classes=num_classes, in_chans=in_chans)


def _example(data: ImageSet, device: torch.device) -> torch.Tensor:
    return data.tensors(slice(0, 1))[0].to(device)


def _phase_log(log: LogFn | None, phase: str):
    return None if log is None else (lambda step, metrics: log(phase, step, metrics))
