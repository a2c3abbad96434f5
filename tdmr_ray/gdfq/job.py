"""GDFQ as a Ray Train job: ``jobs/gdfq.py`` is a thin entry over this module.

Each worker builds the frozen FP teacher, the generator and the quantized student
(:func:`tdmr_ray.gdfq.train.make_state`), wraps only the student in DDP (the teacher is frozen and
the generator's loss never involves the student, so each worker trains its own generator copy from
the same seed on its own latent stream, as the reference's single process would), and runs
:func:`train_epoch` per epoch, reporting metrics and a checkpoint through Ray Train. A killed run
resumes from its newest checkpoint (same ``--run-name``). The driver then evaluates the *final*
model on the clean CIFAR-10 subset and the JPEG test set, and publishes it (integer export) to the
registry.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..runtime import CommonConfig, resolve_model
from .train import GDFQConfig


@dataclass
class GDFQJobConfig(CommonConfig):
    model: str = "resnet20"  # full-precision model: a name (pretrained) or a registry reference name@vN
    w_bits: int = 4
    a_bits: int = 4
    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 2
    run_name: str = ""  # Ray Train run name (default: from the output directory); the same name resumes
    publish: bool = True
    # Export the ONNX QDQ copy, check it under onnxruntime and publish it beside the tensors (off: the
    # safetensors export only, e.g. for a model the exporter does not handle)
    onnx: bool = True
    registry_name: str = ""  # default <model>-w<w>a<a>
    eval_limit: int = 0  # JPEG test images for the final evaluation (0: all 10,000)
    # Per-epoch "accuracy" on this many clean CIFAR-10 *training* images (0: off); sweeps rank
    # trials by it, never by test data.
    val_images: int = 0
    gdfq: GDFQConfig = field(default_factory=GDFQConfig)


# The CPU presets take the CE to the generator's label only where the FP model agrees with it
# (``ce_agreed_only``, ours): their short schedules leave a generator whose images the FP model puts in
# the intended class ~60% of the time, and the reference's CE on the rest trains against the KL. On
# ResNet-20 (quick, seed 0) that CE cost W8A8 0.9 points on JPEG where calibration alone costs none,
# and over 3 seeds the switch gained 0.8 / 1.2 (clean / JPEG) at W4A4 (bench/results/gdfq_variants_r20_*.md;
# `medium` with this loss: bench/gdfq.py --cpu-loss, README). At W8A8 they drop the CE altogether (``kd_only_from_bits``,
# ours): the 8-bit grid costs almost nothing, and on the pipeline's weak TDMR target (its generator's
# images agree with their labels ~35% of the time) the agreed CE's W8A8 drop was 1.18 points clean, the
# KL alone's 0.33 (3 seeds, bench/results/gdfq_variants_pipeline_target_w8_kd3.md). A checkpoint of these
# presets written before ce_agreed_only resumes with --gdfq.ce_agreed_only false; one written before
# kd_only_from_bits resumes as it is below 8 bits, with --gdfq.kd_only_from_bits 0 at 8 bits.
CPU_DEPARTURES = {"ce_agreed_only": True, "kd_only_from_bits": 8}

PRESETS = {
    # A few minutes on 2 CPU cores: short schedule, small batches. The generator trains alone for 4
    # epochs (80 steps) before the quantized model learns from it: with 2 (40 steps) the pipeline's
    # W8A8 target lost 1.58 points clean, with 4 0.99 (reference loss; bench/results/pipeline_gdfq-warmup4.md).
    "quick": {"eval_limit": 2000, "gdfq": {"epochs": 8, "iters_per_epoch": 20, "batch_size": 64,
                                           "warmup_epochs": 4, "range_update_epochs": 4,
                                           "lr_milestones": [6], **CPU_DEPARTURES}},
    # About an hour on 2 CPU cores (2 workers): 1/125 of the reference's generated images.
    "medium": {"eval_limit": 0, "gdfq": {"epochs": 40, "iters_per_epoch": 50, "batch_size": 64, "warmup_epochs": 4,
                                          "range_update_epochs": 4, "lr_milestones": [24, 32], **CPU_DEPARTURES}},
    # The reference schedule: 400 epochs x 200 iterations x global batch 200 (16 M generated images,
    # 1,250x the quick bench's), a GPU job: about 60 minutes for ResNet-20 on one H200 (9.0 s/epoch,
    # bench/results/gdfq_paper_h200.md).
    "paper": {},
    "full": {},  # = paper (kept for existing commands)
}


def job_config(preset: str = "quick") -> GDFQJobConfig:
    from ..config import apply_overrides, flatten

    return apply_overrides(GDFQJobConfig(preset=preset), flatten(PRESETS[preset]), f"preset {preset}")


def gdfq_config(cfg: GDFQJobConfig) -> GDFQConfig:
    """One worker's algorithm settings: the job's bit widths (the flags users reach for first) and
    its share of the batch. ``gdfq.batch_size`` is the *global* batch: each of the ``num_workers``
    generates ``batch_size / num_workers`` images per step and DDP averages the gradients, so the
    reference's batch of 200 and its learning rates hold for any worker count."""
    if cfg.num_workers < 1 or cfg.gdfq.batch_size % cfg.num_workers:
        raise ValueError(f"gdfq.batch_size ({cfg.gdfq.batch_size}) is the global batch and must be a multiple of "
                         f"num_workers ({cfg.num_workers})")
    return dataclasses.replace(cfg.gdfq, w_bits=cfg.w_bits, a_bits=cfg.a_bits,
                               batch_size=cfg.gdfq.batch_size // cfg.num_workers)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train.torch

    from ..train_utils import report, restore_state, unwrap, worker_nodes, worker_setup
    from .train import make_state, train_epoch

    cfg: GDFQJobConfig = config["cfg"]
    device, rank, world = worker_setup(cfg.seed)
    nodes = worker_nodes()
    state = make_state(resolve_model(cfg.model, cfg.storage), gdfq_config(cfg), device, rank=rank)
    saved = restore_state()
    if saved is not None:
        state.load_state_dict(saved)
    started_at = state.epoch  # > 0 when this worker resumed from a checkpoint
    if world > 1:
        # Activation ranges are averaged over ranks after each calibrating epoch (train_epoch), so
        # DDP must not overwrite them with rank 0's buffers on every forward.
        state.qmodel = ray.train.torch.prepare_model(state.qmodel, parallel_strategy_kwargs={"broadcast_buffers": False})
    val = None
    if cfg.val_images:
        from ..data import load_dataset

        val = load_dataset("cifar10-clean-subset", "train").sample(cfg.val_images, cfg.seed)
    while state.epoch < state.cfg.epochs:
        metrics = train_epoch(state)  # ends with the activation ranges frozen: evaluation won't move them
        state.history[-1]["started_at_epoch"] = metrics["started_at_epoch"] = started_at
        if val is not None:
            from ..evaluation import accuracy

            metrics["accuracy"] = accuracy(unwrap(state.qmodel), val) / 100
        report({**metrics, "epoch": state.epoch, "world_size": world, "worker_nodes": nodes,
                "images_per_s": world * state.cfg.iters_per_epoch * state.cfg.batch_size / metrics["seconds"]},
               state=state.state_dict())


def train(cfg: GDFQJobConfig, callbacks=None, run_name: str | None = None, cpus_per_worker: float = 1):
    from ..train_utils import fit

    return fit(train_loop, {"cfg": cfg}, run_name=run_name or cfg.run_name, num_workers=cfg.num_workers,
               use_gpu=cfg.use_gpu, storage=cfg.storage, max_failures=cfg.max_failures, callbacks=callbacks,
               cpus_per_worker=cpus_per_worker)


def final_model(cfg: GDFQJobConfig, result):
    """The quantized model of the run's newest checkpoint (the final epoch)."""
    from pathlib import Path

    from ..train_utils import STATE_FILE, load_state
    from .quantize import freeze_activation_ranges
    from .train import make_state

    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run left no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        saved = load_state(Path(d) / STATE_FILE)
    state = make_state(resolve_model(cfg.model, cfg.storage), gdfq_config(cfg), "cpu")
    state.load_state_dict(saved)
    freeze_activation_ranges(state.qmodel)  # evaluation must not move the ranges
    return state.qmodel.eval(), state.students[0].report, saved["history"]


def evaluate(model, eval_limit: int, seed: int) -> dict:
    from ..data import load_dataset
    from ..evaluation import accuracy

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return {"clean": round(accuracy(model, load_dataset("cifar10-clean-subset", "test")), 2),
            "jpeg": round(accuracy(model, load_dataset("cifar10-jpeg", "test").sample(eval_limit, seed)), 2)}
