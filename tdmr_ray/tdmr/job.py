"""TDMR as a Ray Train job: ``jobs/tdmr.py`` is a thin entry over this module.

Every worker loads the downstream task (same seeded labelled/unlabelled/test split on all ranks)
and runs the two phases of :mod:`tdmr_ray.tdmr` with its own batches (``DownstreamBatches`` with
its rank): phase 1 trains the teacher's trainable parts (input transformation and output mapping;
the frozen foundation stays outside DDP), phase 2 distils into the target (the student, inside
DDP). Metrics are reported and a checkpoint saved every ``report_every`` steps; a killed or failed
run resumes from the newest checkpoint at the step it reached. The driver evaluates the *final*
target on the test split and publishes it to the registry (GDFQ can quantize it from there; the
fleet and Serve can deploy it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..data import ImageSet, load_dataset
from ..runtime import CommonConfig, resolve_model
from .config import METHODS, TDMRConfig, method_config
from .data import regroup_classes, split_holdout, split_labelled
from .pipeline import DEFAULT_TARGET


@dataclass
class TDMRJobConfig(CommonConfig):
    foundation: str = "resnet56"  # a name (pretrained) or a registry reference name@vN
    target: str = DEFAULT_TARGET  # a timm model name or a CIFAR ResNet (trained from scratch)
    data: str = "cifar10-jpeg"  # a dataset spec: named set, ImageFolder dir/.tar.gz or .npz
    labelled_fraction: float = 0.01  # of the training labels kept (stratified, >= 1 per class)
    holdout_fraction: float = 0.2  # test share held out when the data has no test split
    regroup: str = ""  # relabel CIFAR-10 into superclasses (cifar10-2, cifar10-5): a task-mismatched label space
    method: str = "tdmr"  # tdmr | ft-kd | lp-kd | scratch (baselines through the same code)
    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 2
    report_every: int = 50  # steps between Ray Train reports/checkpoints
    run_name: str = ""
    publish: bool = True
    registry_name: str = ""  # default <target>-tdmr-<data name>
    eval_limit: int = 0  # test images for the final evaluation (0: all)
    # Per-report "accuracy" (teacher in phase 1, target in phase 2) on this many training images
    # outside the labelled set, with their held-back labels (0: off). Sweeps rank trials by it;
    # the test split is never used for that.
    val_images: int = 0
    tdmr: TDMRConfig = field(default_factory=TDMRConfig)


PRESETS = {
    "quick": {"eval_limit": 2000, "report_every": 20,
              "tdmr": {"teacher": {"steps": 60, "batch_size": 32}, "distill": {"steps": 100}}},
    "full": {},
}


def check(cfg: TDMRJobConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {list(METHODS)}")
    if not 0 < cfg.labelled_fraction <= 1 or not 0 < cfg.holdout_fraction < 1:
        raise ValueError("labelled_fraction must be in (0, 1] and holdout_fraction in (0, 1)")


def load_task(cfg: TDMRJobConfig) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(labelled, unlabelled, test) of the downstream task; the same on every rank."""
    try:
        train = load_dataset(cfg.data, "train")
        try:
            test = load_dataset(cfg.data, "test")
        except KeyError:
            train, test = split_holdout(train, cfg.holdout_fraction, cfg.seed)
    except KeyError:  # a single folder / an .npz without splits
        train, test = split_holdout(load_dataset(cfg.data, None), cfg.holdout_fraction, cfg.seed)
    if cfg.regroup:
        train, test = regroup_classes(train, cfg.regroup), regroup_classes(test, cfg.regroup)
    labelled, unlabelled = split_labelled(train, cfg.labelled_fraction, cfg.seed)
    return labelled, unlabelled, test.sample(cfg.eval_limit, cfg.seed)


def build(cfg: TDMRJobConfig, labelled: ImageSet, device):
    """(method config, teacher or None, student) for this task, fresh."""
    from ..models import create_model
    from .distill import DistillStudent
    from .reprogram import build_teacher

    mcfg = method_config(cfg.method, cfg.tdmr)
    torch.manual_seed(mcfg.seed)
    teacher = None
    if cfg.method != "scratch":
        foundation = resolve_model(cfg.foundation, cfg.storage)
        teacher = build_teacher(foundation, labelled.x.shape[-1], labelled.num_classes, mcfg.teacher).to(device)
    target = create_model(cfg.target, num_classes=labelled.num_classes, in_chans=labelled.x.shape[-1])
    proxy_dim = teacher.proxy_dim if teacher is not None and mcfg.distill.uses_proxy else None
    student = DistillStudent(target, proxy_dim, mcfg.distill.projector_hidden).to(device)
    return mcfg, teacher, student


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..train_utils import report, restore_state, unwrap, worker_nodes, worker_setup
    from .data import DownstreamBatches
    from .distill import alpha_at
    from .steps import distill_step, evaluate, make_optimizer, reprogram_step, run_phase, teacher_param_groups

    cfg: TDMRJobConfig = config["cfg"]
    device, rank, world = worker_setup(cfg.seed)
    nodes = worker_nodes()
    labelled, unlabelled, _ = load_task(cfg)
    val = unlabelled.sample(cfg.val_images, cfg.seed + 1) if cfg.val_images else None
    mcfg, teacher, student = build(cfg, labelled, device)
    tc, dc, aug = mcfg.teacher, mcfg.distill, mcfg.augment
    saved = restore_state() or {"phase": "teacher", "step": 0}
    phase, start = saved["phase"], saved["step"]
    history: list = saved.get("history", [])
    if teacher is not None and "teacher" in saved:
        teacher.load_state_dict(saved["teacher"])
    wrap = (lambda m: DDP(m, find_unused_parameters=True)) if world > 1 else (lambda m: m)
    clock = {"t": time.monotonic(), "step": start}

    def images_per_s(step: int, images_per_step: int) -> float:
        """All workers' training images per second since the previous report (the scaling bench reads it)."""
        now = time.monotonic()
        rate = images_per_step * (step - clock["step"]) / max(now - clock["t"], 1e-9)  # (global batches)
        clock["step"] = step
        return round(rate, 1)

    def restart_clock() -> None:  # after a report: its checkpoint and validation are not training time
        clock["t"] = time.monotonic()

    def checkpoint(extra: dict) -> dict:
        state = {"history": history, **extra}
        if teacher is not None:  # keys without DDP's ".module." so they load into an unwrapped teacher
            state["teacher"] = {k.replace(".module.", "."): v for k, v in teacher.state_dict().items()}
        return state

    if phase == "teacher" and teacher is not None and tc.steps:
        opt, sched = make_optimizer(teacher_param_groups(teacher, tc), tc.optim, tc.steps)
        if "teacher_opt" in saved:
            opt.load_state_dict(saved["teacher_opt"])
            sched.load_state_dict(saved["teacher_sched"])
        teacher.wrap_trainable(wrap)
        batches = DownstreamBatches(labelled, tc.batch_size, crop_padding=aug.crop_padding, flip=aug.flip,
                                    seed=mcfg.seed, rank=rank, world_size=world)

        def log_teacher(step: int, metrics: dict) -> None:
            rate = images_per_s(step, tc.batch_size)  # (before the checkpoint and validation below)
            history.append({"phase": "teacher", "step": step, **metrics})
            state = checkpoint({"phase": "teacher" if step < tc.steps else "distill", "step": step % tc.steps,
                                "teacher_opt": opt.state_dict(), "teacher_sched": sched.state_dict()})
            if val is not None:
                metrics["accuracy"] = evaluate(teacher, val)["acc"]
            report({"phase": "teacher", "step": step, **metrics, "world_size": world, "worker_nodes": nodes,
                    "images_per_s": rate}, state)
            restart_clock()

        run_phase(lambda s: reprogram_step(teacher, *batches.batch(s), opt, sched, tc.optim.grad_clip),
                  tc.steps, start_step=start, log_every=cfg.report_every, log=log_teacher)
        teacher.unwrap_trainable()
        phase, start = "distill", 0
    if phase == "teacher":  # no teacher (scratch) or no teacher steps: phase 1 has nothing to train
        phase, start = "distill", 0
    if teacher is not None:
        teacher.requires_grad_(False).eval()
    if phase == "distill":
        if "student" in saved:
            student.load_state_dict(saved["student"])
        opt, sched = make_optimizer(student.parameters(), dc.optim, dc.steps)
        if "student_opt" in saved:
            opt.load_state_dict(saved["student_opt"])
            sched.load_state_dict(saved["student_sched"])
        clock.update(t=time.monotonic(), step=start)
        model = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": True}) \
            if world > 1 else student
        batches = DownstreamBatches(labelled, dc.labelled_batch_size, unlabelled if teacher is not None else None,
                                    dc.unlabelled_batch_size, aug.crop_padding, aug.flip, seed=mcfg.seed + 1000,
                                    rank=rank, world_size=world)

        def step(s: int) -> dict:
            return distill_step(model, teacher, *batches.batch(s), opt, alpha_at(s / max(dc.steps, 1), dc.schedule),
                                dc, sched)

        def log_distill(s: int, metrics: dict) -> None:
            rate = images_per_s(s, dc.labelled_batch_size + (dc.unlabelled_batch_size if teacher is not None else 0))
            history.append({"phase": "distill", "step": s, **metrics})
            state = checkpoint({"phase": "distill" if s < dc.steps else "done", "step": s,
                                "student": unwrap(model).state_dict(), "student_opt": opt.state_dict(),
                                "student_sched": sched.state_dict()})
            if val is not None:
                metrics["accuracy"] = evaluate(unwrap(model).target, val)["acc"]
            report({"phase": "distill", "step": s, **metrics, "world_size": world, "worker_nodes": nodes,
                    "images_per_s": rate}, state)
            restart_clock()

        run_phase(step, dc.steps, start_step=start, log_every=cfg.report_every, log=log_distill)


def train(cfg: TDMRJobConfig, callbacks=None, run_name: str | None = None, cpus_per_worker: float = 1):
    from ..train_utils import fit

    return fit(train_loop, {"cfg": cfg}, run_name=run_name or cfg.run_name, num_workers=cfg.num_workers,
               use_gpu=cfg.use_gpu, storage=cfg.storage, max_failures=cfg.max_failures, callbacks=callbacks,
               cpus_per_worker=cpus_per_worker)


def final_models(cfg: TDMRJobConfig, result, labelled: ImageSet):
    """(target, teacher or None, history) from the run's newest checkpoint (the end of training)."""
    from pathlib import Path

    from ..train_utils import STATE_FILE, load_state

    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run left no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        saved = load_state(Path(d) / STATE_FILE)
    if saved.get("phase") != "done":
        raise RuntimeError(f"the run stopped in phase {saved.get('phase')!r} at step {saved.get('step')}")
    _, teacher, student = build(cfg, labelled, "cpu")
    student.load_state_dict(saved["student"])
    if teacher is not None:
        teacher.load_state_dict(saved["teacher"])
    return student.target.eval(), teacher, saved["history"]


def job_config(preset: str = "quick") -> TDMRJobConfig:
    from ..config import apply_overrides, flatten

    return apply_overrides(TDMRJobConfig(preset=preset), flatten(PRESETS[preset]), f"preset {preset}")
