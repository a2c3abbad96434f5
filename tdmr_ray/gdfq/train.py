"""GDFQ's alternating training as one-step functions a plain loop or a Ray Train worker can call.

Per iteration (reference ``trainer.py: Trainer.train``): sample ``z ~ N(0, I)`` and uniform labels;
the generator makes images; the frozen full-precision (FP) model scores them; the generator takes
one Adam step on ``CE(fp(G(z, y)), y) + 0.1 * BNS``; the quantized model, in eval mode (BN uses
running statistics), sees the same images (detached) and, after the warm-up epochs, takes one SGD
step on ``KL(T=20) * T^2 + CE``. Activation ranges follow their EMA during the first 4 epochs and
are frozen afterwards.

For data-parallel training: wrap ``state.qmodel`` in DDP after :func:`make_state` (the optimizer
already holds its parameters) and keep ``state.teacher`` out of DDP (it is frozen: no gradients to
sync). :func:`make_state` seeds the latent sampler with ``seed + rank``, so every worker generates
its own batch; the generator and the quantized model start identical on all ranks (both are built
under ``seed``). During the range-update epochs each rank's activation ranges follow its own
batches; at the end of each such epoch :func:`train_epoch` averages them over the ranks (when a
process group is initialised), so all ranks quantize alike afterwards.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .fake_quant import EMA_BIAS_CORRECTIONS, check_bits
from .generator import BNStatisticsLoss, Generator
from .quantize import (QuantReport, calibrate_activation_ranges, freeze_activation_ranges, quantize_model,
                       sync_activation_ranges)

KL_REDUCTIONS = ("mean", "batchmean")


@dataclass
class GDFQConfig:
    """Every knob of GDFQ; defaults are the reference's (CIFAR hocon + trainer.py) unless noted."""

    w_bits: int = 4
    a_bits: int = 4
    epochs: int = 400
    iters_per_epoch: int = 200
    batch_size: int = 200
    warmup_epochs: int = 4  # generator-only epochs: the quantized model is not updated
    range_update_epochs: int = 4  # activation ranges follow their EMA in these first epochs, then freeze
    latent_dim: int = 100
    img_size: int = 32
    generator_bn_eps: float = 0.8  # the reference's BatchNorm2d(128, 0.8) quirk (see Generator)
    bns_weight: float = 0.1
    temperature: float = 20.0
    kd_weight: float = 1.0  # the reference's "alpha": KL term scaled by alpha * T^2
    # 'mean' (reference: nn.KLDivLoss() default) averages over batch AND classes, i.e. the true KL
    # divided by the number of classes; we keep it because the published accuracies depend on this
    # KD/CE balance. 'batchmean' is the mathematically proper per-sample KL (C times larger).
    kl_reduction: str = "mean"
    ce_weight: float = 1.0  # the reference's CE(q(G(z, y)), y) next to the KL; 0 distils from the FP model alone
    # Ours (off = reference): the CE only on images the FP model labels y. A weak generator makes
    # images the FP model puts in another class, and the CE to y then trains against the KL.
    ce_agreed_only: bool = False
    # Ours (0 = reference: never): at this many bits and more (weights and activations) the quantized
    # model learns from the KL alone. At 8 bits the grid costs almost nothing, so fine-tuning can only
    # keep the model near the FP one; the CE to a short-trained generator's labels moves it away.
    kd_only_from_bits: int = 0
    lr_q: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    lr_g: float = 1e-3
    betas_g: tuple[float, float] = (0.5, 0.999)
    lr_milestones: tuple[int, ...] = (100, 200, 300)  # both learning rates x lr_decay at these epochs
    lr_decay: float = 0.1
    per_channel: bool = True
    act_ema_momentum: float = 0.9
    ema_bias_correction: str = "adam"  # departure: the reference's compounding rule is "reference"
    seed: int = 0  # ours (the reference uses manualSeed = run id + 1)

    def __post_init__(self):
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        self.betas_g, self.lr_milestones = tuple(self.betas_g), tuple(self.lr_milestones)
        if self.ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {self.ce_weight}")
        if self.kd_only_from_bits:
            check_bits(self.kd_only_from_bits, "kd_only_from_bits (or 0: never)")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}")
        if self.ema_bias_correction not in EMA_BIAS_CORRECTIONS:
            raise ValueError(f"ema_bias_correction must be one of {EMA_BIAS_CORRECTIONS}")
        for name in ("epochs", "iters_per_epoch", "batch_size", "range_update_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")

    @classmethod
    def from_dict(cls, d: dict) -> "GDFQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GDFQ config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def ce_weight_at(self, w_bits: int, a_bits: int) -> float:
        """``ce_weight``, or 0 where ``kd_only_from_bits`` turns the CE off for a WkAk student."""
        kd_only = self.kd_only_from_bits and min(w_bits, a_bits) >= self.kd_only_from_bits
        return 0.0 if kd_only else self.ce_weight

    def lr_factor(self, epoch: int) -> float:
        return self.lr_decay ** sum(epoch >= m for m in self.lr_milestones)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            cfg: GDFQConfig, bits: tuple[int, int] | None = None) -> torch.Tensor:
    """``kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) + ce_weight * CE(s, y)`` with ``cfg.kl_reduction``;
    ``ce_weight`` as :meth:`GDFQConfig.ce_weight_at` gives it for the student's ``bits`` (default the
    config's own ``(w_bits, a_bits)``)."""
    t = cfg.temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1), reduction="none")
    # Spelled out: torch warns that its 'mean' will become 'batchmean' in a future release.
    kl = kl.mean() if cfg.kl_reduction == "mean" else kl.sum() / kl.shape[0]
    loss = cfg.kd_weight * t * t * kl
    ce_weight = cfg.ce_weight_at(*(bits or (cfg.w_bits, cfg.a_bits)))
    if not ce_weight:
        return loss
    if cfg.ce_agreed_only:  # the mean over the agreeing images (each rank its own; 0 when none agrees)
        agreed = (teacher_logits.argmax(1) == labels).to(student_logits.dtype)
        ce = (F.cross_entropy(student_logits, labels, reduction="none") * agreed).sum() / agreed.sum().clamp_min(1)
    else:
        ce = F.cross_entropy(student_logits, labels)
    return loss + ce_weight * ce


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (DDP keeps it as ``.module``)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@dataclass
class Student:
    """One quantized model being fine-tuned, with its optimizer."""

    qmodel: nn.Module  # may be replaced by a DDP wrapper of itself
    opt_q: torch.optim.Optimizer
    report: QuantReport

    @property
    def name(self) -> str:
        return f"W{self.report.w_bits}A{self.report.a_bits}"


@dataclass
class GDFQState:
    """Everything one worker's training needs; ``state_dict`` is what a checkpoint holds.

    Usually one student (``cfg.w_bits``/``cfg.a_bits``). The generator's loss involves only the FP
    model, never a quantized one, so one generator stream can train several students (bit widths)
    at once, exactly as separate runs with the same seed would; the benchmark uses that.
    """

    cfg: GDFQConfig
    teacher: nn.Module
    generator: nn.Module
    opt_g: torch.optim.Optimizer
    bns: BNStatisticsLoss
    rng: torch.Generator
    students: list[Student]
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)
    rank: int = 0  # Ray Train world rank: each rank draws its own latents

    @property
    def qmodel(self) -> nn.Module:
        """The (first) student's quantized model; assign to wrap it (``state.qmodel = DDP(state.qmodel)``)."""
        return self.students[0].qmodel

    @qmodel.setter
    def qmodel(self, module: nn.Module) -> None:
        self.students[0].qmodel = module

    @property
    def device(self) -> torch.device:
        return next(_unwrap(self.generator).parameters()).device

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "generator": _unwrap(self.generator).state_dict(),
                "opt_g": self.opt_g.state_dict(), "history": list(self.history),
                "cfg": self.cfg.to_dict(),
                "students": [{"name": s.name, "qmodel": _unwrap(s.qmodel).state_dict(), "opt_q": s.opt_q.state_dict()}
                             for s in self.students]}

    def load_state_dict(self, d: dict) -> None:
        current = self.cfg.to_dict()
        # a setting added after the checkpoint was written ran at its default there
        saved_cfg = {**{k: v for k, v in GDFQConfig().to_dict().items() if k not in d["cfg"]}, **d["cfg"]}
        if saved_cfg.get("kd_only_from_bits") != current["kd_only_from_bits"]:
            # a different rule that gives every student of this run the same CE weight changed nothing
            then = GDFQConfig.from_dict({**current, "kd_only_from_bits": saved_cfg["kd_only_from_bits"]})
            bits = [(s.report.w_bits, s.report.a_bits) for s in self.students]
            if all(then.ce_weight_at(*b) == self.cfg.ce_weight_at(*b) for b in bits):
                saved_cfg["kd_only_from_bits"] = current["kd_only_from_bits"]
        if saved_cfg != current:
            diff = {k: (v, current.get(k)) for k, v in saved_cfg.items() if current.get(k) != v}
            raise ValueError(f"checkpoint was made with a different GDFQ config (checkpoint, current): {diff}")
        names = [s["name"] for s in d["students"]]
        if names != [s.name for s in self.students]:
            raise ValueError(f"checkpoint holds students {names}, this run has {[s.name for s in self.students]}")
        _unwrap(self.generator).load_state_dict(d["generator"])
        self.opt_g.load_state_dict(d["opt_g"])
        for student, saved in zip(self.students, d["students"]):
            _unwrap(student.qmodel).load_state_dict(saved["qmodel"])
            student.opt_q.load_state_dict(saved["opt_q"])
        # No RNG state is restored (older checkpoints hold rank 0's, which once made every rank draw
        # the same latents after a resume, and a CUDA state cannot load into a CPU generator):
        # train_epoch reseeds from (seed, rank, epoch).
        self.epoch, self.history = int(d["epoch"]), list(d["history"])


def make_state(fp_model: nn.Module, cfg: GDFQConfig, device: str | torch.device = "cpu", rank: int = 0,
               bit_widths: list[tuple[int, int]] | None = None) -> GDFQState:
    """Quantize ``fp_model`` (a NormalizedModel), build the generator and the optimizers.

    ``bit_widths`` (``[(w_bits, a_bits), ...]``) trains several students on one generator stream;
    default ``[(cfg.w_bits, cfg.a_bits)]``. ``fp_model`` itself becomes the frozen teacher (eval
    mode, no gradients); it is not copied.
    """
    device = torch.device(device)
    teacher = fp_model.to(device).eval().requires_grad_(False)
    students = []
    for w_bits, a_bits in bit_widths or [(cfg.w_bits, cfg.a_bits)]:
        qmodel, report = quantize_model(teacher, w_bits, a_bits, per_channel=cfg.per_channel,
                                        ema_momentum=cfg.act_ema_momentum,
                                        ema_bias_correction=cfg.ema_bias_correction)
        qmodel.requires_grad_(True)
        opt_q = torch.optim.SGD(qmodel.parameters(), lr=cfg.lr_q, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        students.append(Student(qmodel, opt_q, report))
    if len({s.name for s in students}) != len(students):
        raise ValueError(f"duplicate bit widths in {bit_widths}")
    torch.manual_seed(cfg.seed)  # same generator initialisation on every rank
    generator = Generator.for_model(teacher, cfg.img_size, cfg.latent_dim, cfg.generator_bn_eps).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_g, betas=cfg.betas_g)
    rng = torch.Generator(device=device)
    state = GDFQState(cfg, teacher, generator, opt_g, BNStatisticsLoss(teacher), rng, students, rank=rank)
    seed_epoch(state)
    return state


def seed_epoch(state: GDFQState) -> None:
    """Seed the latent stream from (seed, rank, epoch): distinct on every rank, and a run resumed at
    epoch e draws exactly what an uninterrupted run draws there, on any device."""
    state.rng.manual_seed((state.cfg.seed * 1_000_003 + state.rank) * 100_003 + state.epoch)


def sample_latent(state: GDFQState) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, device = state.cfg, state.device
    z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=state.rng, device=device)
    labels = torch.randint(0, state.teacher.num_classes, (cfg.batch_size,), generator=state.rng, device=device)
    return z, labels


def generator_step(state: GDFQState, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One Adam step of the generator; returns (detached images, detached FP logits, metrics)."""
    state.generator.train()
    images = state.generator(z, labels)
    with state.bns.recording():
        logits = state.teacher(images)
    ce = F.cross_entropy(logits, labels)
    bns = state.bns.loss()
    loss = ce + state.cfg.bns_weight * bns
    state.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    state.opt_g.step()
    metrics = {"g_loss": loss.item(), "g_ce": ce.item(), "g_bns": bns.item(),
               "fp_acc_generated": logits.argmax(1).eq(labels).float().mean().item() * 100}
    return images.detach(), logits.detach(), metrics


def quantized_step(student: Student, cfg: GDFQConfig, images: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: torch.Tensor, update: bool = True) -> dict:
    """Forward the quantized model (eval mode) on generated images; one SGD step if ``update``.

    With ``update=False`` (warm-up) it is a forward only, which still moves the activation ranges
    while they are calibrating, as in the reference.
    """
    student.qmodel.eval()
    with torch.set_grad_enabled(update):
        logits = student.qmodel(images)
        loss = kd_loss(logits, teacher_logits, labels, cfg, (student.report.w_bits, student.report.a_bits))
    if update:
        student.opt_q.zero_grad(set_to_none=True)
        loss.backward()
        student.opt_q.step()
    return {"q_loss": loss.item(), "q_acc_generated": logits.argmax(1).eq(labels).float().mean().item() * 100}


def train_epoch(state: GDFQState) -> dict:
    """One epoch of ``cfg.iters_per_epoch`` iterations at epoch index ``state.epoch``; averaged metrics.

    Student metrics are named ``q_loss`` etc. with one student, ``q_loss/W4A4`` etc. with several.
    """
    cfg, epoch = state.cfg, state.epoch
    seed_epoch(state)
    factor = cfg.lr_factor(epoch)
    for group in state.opt_g.param_groups:
        group["lr"] = cfg.lr_g * factor
    for student in state.students:
        for group in student.opt_q.param_groups:
            group["lr"] = cfg.lr_q * factor
        if epoch < cfg.range_update_epochs:
            calibrate_activation_ranges(_unwrap(student.qmodel))
        else:
            freeze_activation_ranges(_unwrap(student.qmodel))
    update = epoch >= cfg.warmup_epochs
    start, sums = time.perf_counter(), {}
    for _ in range(cfg.iters_per_epoch):
        z, labels = sample_latent(state)
        images, teacher_logits, step_metrics = generator_step(state, z, labels)
        for student in state.students:
            q_metrics = quantized_step(student, cfg, images, teacher_logits, labels, update=update)
            suffix = f"/{student.name}" if len(state.students) > 1 else ""
            step_metrics.update({k + suffix: v for k, v in q_metrics.items()})
        for k, v in step_metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    for student in state.students:  # as the reference: frozen after every epoch, reopened while < 4
        freeze_activation_ranges(_unwrap(student.qmodel))
        if epoch < cfg.range_update_epochs:
            sync_activation_ranges(_unwrap(student.qmodel))
    state.epoch += 1
    metrics = {k: v / cfg.iters_per_epoch for k, v in sums.items()}
    metrics.update(epoch=epoch, lr_q=cfg.lr_q * factor, lr_g=cfg.lr_g * factor, quantized_updated=update,
                   seconds=time.perf_counter() - start)
    state.history.append(metrics)
    return metrics


def run_gdfq(fp_model: nn.Module, cfg: GDFQConfig, device: str | torch.device = "cpu", on_epoch=None,
             bit_widths: list[tuple[int, int]] | None = None) -> GDFQState:
    """The whole single-process schedule; ``on_epoch(state, metrics)`` is called after every epoch.

    The result is the *final* model (``state.qmodel``, or each ``state.students[i].qmodel``): no
    epoch is picked by test accuracy.
    """
    state = make_state(fp_model, cfg, device, bit_widths=bit_widths)
    while state.epoch < cfg.epochs:
        metrics = train_epoch(state)
        if on_epoch is not None:
            on_epoch(state, metrics)
    return state
