"""TDMR: task-driven model reprogramming (Xu et al., arXiv 2304.02263), in plain PyTorch.

Only the paper's abstract is public: it reprograms a frozen foundation model to "project the
knowledge into a proxy space" and then reprograms a target model "via progressive distillation from
the proxy space", for CNN and transformer foundations and limited target data. What follows is OUR
reading; every choice below is ours, named, and set in :mod:`.config`.

Phase 1, foundation reprogramming (:mod:`.reprogram`, :func:`reprogram_step`), foundation frozen:

- C1 input transformation (:class:`InputTransform`): learnable channel adaptation (1x1 conv from
  any channel count, initialised to replicate/average, so grayscale works), bilinear resize to the
  foundation's input size (32 for CIFAR ResNets, timm's ``input_size``/``patch_embed.img_size``),
  then a visual prompt: ``additive`` (default: a learnt full-canvas delta) or ``pad`` (image
  shrunk into the centre, learnt frame of ``pad_width``) or ``none``. The transformation learns at
  ``transform_lr`` (10x below the mapping's lr): faster, the prompt overfits a few hundred images.
- C2 output mapping (:class:`OutputMapping`): the proxy space is a learnt ``proxy_dim``-wide
  embedding ReLU(Linear(LayerNorm(pooled features) ++ LayerNorm(foundation logits))); a proxy
  classifier (Linear) reads the downstream labels from it. Both features and logits are read by
  default ("both"): logits carry the foundation's task knowledge, features what its head discards.
- C3 trained with cross-entropy on the labelled images only (augmented: random crop + flip);
  the foundation runs with its running BN statistics and gets no weight updates.

Phase 2, progressive distillation into the target (:mod:`.distill`, :func:`distill_step`):

- C4 a projector (MLP) on the target's pooled features predicts the proxy representation:
  MSE between L2-normalised projection and proxy ("feature" term), and the projection read through
  the teacher's frozen proxy classifier must match the teacher's softened predictions
  (KL at temperature T, "proxy_pred" term).
- C5 the task loss on the target's own head: CE on labelled images + KL(teacher || head) at T.
- C6 progressive: ``loss = (1 - alpha(t)) * proxy matching + alpha(t) * task loss`` with alpha rising
  from ``schedule.start`` to ``schedule.end`` (cosine by default) over ``ramp_end`` of training.
- C7 distillation terms also read unlabelled downstream images (the images whose labels the
  labelled fraction dropped), set by ``unlabelled_batch_size`` (0: labelled images only).
- C8 the deployed model is the target alone (the projector exists for training only).
- C9 the target is a different, small architecture, built with the downstream channel count and
  classes (default a CIFAR ResNet-20 from scratch: 0.27 M parameters and 41 MMACs at 32x32 against
  the ResNet-56 foundation's 0.85 M and 125; any timm model by name).

Baselines (:func:`method_config`), through the same code, data, step budgets and initial target:
target from scratch (CE on the labelled images), classic KD (Hinton et al. 2015: CE + T^2 KL, alpha
= 1 throughout) from a fully fine-tuned foundation (new linear head) and from a linear probe of the
frozen foundation.

Departures and gaps: the paper's loss weights, schedule, proxy dimension and prompt are unknown;
ours are listed in :mod:`.config` with the reason for each. Ray Train composition (DDP on
:meth:`FoundationTeacher.trainable_modules` and on the student) is left to the job.
"""
from .compute import ComputeMeter, forward_flops
from .config import (METHODS, AugmentConfig, DistillConfig, OptimConfig, ScheduleConfig, TDMRConfig,
                     TeacherConfig, method_config)
from .data import (CIFAR10_REGROUPINGS, DownstreamBatches, StepSampler, augment, labelled_fraction,
                   regroup_classes, split_holdout, split_labelled)
from .distill import DistillStudent, Projector, alpha_at, distill_loss, soft_kl
from .pipeline import (DEFAULT_TARGET, pretrained_foundation, run_method, target_factory, train_target,
                       train_teacher)
from .reprogram import (FoundationTeacher, InputTransform, OutputMapping, TeacherOutput, build_teacher,
                        foundation_input_size)
from .steps import distill_step, evaluate, make_optimizer, reprogram_step, run_phase, teacher_param_groups

__all__ = [
    "ComputeMeter", "forward_flops", "METHODS", "AugmentConfig", "DistillConfig", "OptimConfig",
    "ScheduleConfig", "TDMRConfig", "TeacherConfig", "method_config", "CIFAR10_REGROUPINGS",
    "DownstreamBatches", "StepSampler", "augment", "labelled_fraction", "regroup_classes", "split_holdout",
    "split_labelled", "DistillStudent", "Projector", "alpha_at", "distill_loss", "soft_kl", "DEFAULT_TARGET",
    "pretrained_foundation", "run_method", "target_factory", "train_target", "train_teacher",
    "FoundationTeacher", "InputTransform", "OutputMapping", "TeacherOutput", "build_teacher",
    "foundation_input_size", "distill_step", "evaluate", "make_optimizer", "reprogram_step", "run_phase",
    "teacher_param_groups",
]
