"""Configuration of TDMR and its baselines: dataclasses whose defaults are our reference setting.

The paper's settings are not public (only its abstract is), so every default below is ours and
says why it was picked; the bench (``bench/tdmr.py``) is where they were checked. ``method_config``
turns one :class:`TDMRConfig` into the four methods the bench compares, so that the baselines run
through exactly the same code, data, augmentation and step budgets as TDMR.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PROMPTS = ("pad", "additive", "none")
MAPPING_INPUTS = ("features", "logits", "both")
SCHEDULES = ("linear", "cosine", "step", "constant")
METHODS = ("scratch", "ft-kd", "lp-kd", "tdmr")


@dataclass
class AugmentConfig:
    """Training augmentation for every phase: random crop (zero padding) and horizontal flip."""

    crop_padding: int = 4  # pixels of zero padding before the random crop (the CIFAR standard)
    flip: bool = True  # random horizontal flip with probability 1/2


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``, stepped per batch."""

    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.01
    grad_clip: float = 5.0  # max global grad norm; 0 disables (guards the prompt against large steps)


@dataclass
class TeacherConfig:
    """Phase 1: how the foundation model becomes a teacher for the downstream task.

    TDMR's reading (``prompt`` + ``mapping_inputs`` + ``proxy_dim`` with the foundation frozen) is
    the default; the baselines' teachers are the presets in :func:`method_config`.
    """

    prompt: str = "additive"  # "pad" (learnable frame around the resized image), "additive" (full-size
    # learnable delta on the resized image), "none" (resize/channel adaptation only). "additive" is the
    # default because "pad" must shrink the image when the downstream images already have the
    # foundation's input size (CIFAR-32 into a CIFAR ResNet), which costs accuracy.
    input_size: int | None = None  # foundation input canvas; None = the foundation's native size
    pad_width: int = 4  # width of the "pad" prompt frame in pixels
    mapping_inputs: str = "both"  # what the output mapping reads: pooled "features", "logits", or "both"
    proxy_dim: int = 128  # width of the proxy space; 0 = a linear head on the mapping inputs, whose
    # (normalised) inputs then are the proxy representation
    normalize_mapping_inputs: bool = True  # LayerNorm on each mapping input (features, logits)
    mapping_dropout: float = 0.1  # dropout on the proxy representation before the proxy classifier
    train_foundation: bool = False  # True = full fine-tuning (the fine-tuned-KD baseline only)
    foundation_lr: float = 1e-4  # lr of the foundation's own weights when ``train_foundation``
    transform_lr: float = 3e-4  # lr of the input transformation (prompt, channel map). Lower than the
    # mapping's: with Adam every prompt pixel moves by about lr per step, and at the mapping's lr the
    # prompt overfits a few hundred images (measured: -2 points of teacher accuracy at 1% labels)
    steps: int = 500
    batch_size: int = 64
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, weight_decay=1e-4))

    def __post_init__(self):
        _check_choice("prompt", self.prompt, PROMPTS)
        _check_choice("mapping_inputs", self.mapping_inputs, MAPPING_INPUTS)
        if self.proxy_dim < 0 or self.pad_width < 0 or self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"bad TeacherConfig: {self}")


@dataclass
class ScheduleConfig:
    """alpha(t): the weight of the downstream task loss at training progress t in [0, 1].

    The loss is ``(1 - alpha) * proxy matching + alpha * task loss``, so a schedule from ``start``
    (small) to ``end`` (large) moves training from proxy matching to the task: TDMR's progressive
    distillation. ``linear`` / ``cosine`` ramp from ``start`` to ``end`` over ``ramp_end`` of training
    and hold ``end`` after; ``step`` jumps at ``ramp_end``; ``constant`` stays at ``end``.
    """

    kind: str = "cosine"
    start: float = 0.0
    end: float = 1.0
    ramp_end: float = 0.8  # fraction of training after which alpha stays at ``end``

    def __post_init__(self):
        _check_choice("kind", self.kind, SCHEDULES)
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0 and 0.0 < self.ramp_end <= 1.0):
            raise ValueError(f"bad ScheduleConfig: {self}")


@dataclass
class DistillConfig:
    """Phase 2: training the target model from the teacher (or from labels only, for scratch)."""

    steps: int = 1000
    labelled_batch_size: int = 64
    unlabelled_batch_size: int = 128  # images without labels per step (distillation terms only); 0 = none
    temperature: float = 4.0  # softmax temperature of both KL terms (Hinton et al. 2015), loss * T^2
    feature_weight: float = 1.0  # proxy matching: MSE between L2-normalised projection and proxy
    proxy_pred_weight: float = 1.0  # proxy matching: KL(teacher || proxy classifier(projection))
    ce_weight: float = 1.0  # task loss: CE of the target's head on labelled samples
    kd_weight: float = 1.0  # task loss: KL(teacher || target head), on every sample
    projector_hidden: int = 256  # hidden width of the target->proxy projector MLP; 0 = linear
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        if self.steps < 0 or self.labelled_batch_size < 1 or self.unlabelled_batch_size < 0:
            raise ValueError(f"bad DistillConfig: {self}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def uses_proxy(self) -> bool:
        return self.feature_weight > 0 or self.proxy_pred_weight > 0


@dataclass
class TDMRConfig:
    """Everything one run needs besides the data and model names."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval_batch_size: int = 500
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TDMRConfig":
        """Inverse of ``to_dict``; unknown keys are errors that name the key."""
        return _from_dict(cls, d, "")


def method_config(method: str, base: TDMRConfig | None = None) -> TDMRConfig:
    """The config of ``method`` derived from ``base`` (TDMR's) with the same budgets and data.

    - ``tdmr``: ``base`` as is.
    - ``ft-kd``: classic KD (Hinton et al. 2015) from the fully fine-tuned foundation: new linear
      head on the pooled features, all weights trained; alpha = 1 throughout (task loss = CE + KD).
    - ``lp-kd``: classic KD from a linear probe (linear head on the frozen foundation's features).
    - ``scratch``: the target on the labelled data alone (CE only; no teacher, no unlabelled data).
    """
    base = base or TDMRConfig()
    _check_choice("method", method, METHODS)
    if method == "tdmr":
        return base
    classic = dataclasses.replace(base.distill, feature_weight=0.0, proxy_pred_weight=0.0,
                                  schedule=ScheduleConfig(kind="constant", start=1.0, end=1.0))
    if method == "scratch":
        distill = dataclasses.replace(classic, kd_weight=0.0, unlabelled_batch_size=0)
        return dataclasses.replace(base, distill=distill, teacher=dataclasses.replace(base.teacher, steps=0))
    head_only = dataclasses.replace(base.teacher, prompt="none", mapping_inputs="features", proxy_dim=0,
                                    normalize_mapping_inputs=False, mapping_dropout=0.0)
    teacher = dataclasses.replace(head_only, train_foundation=method == "ft-kd")
    return dataclasses.replace(base, teacher=teacher, distill=classic)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _from_dict(cls, d: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in sorted(unknown))}")
    kwargs = {}
    for name, value in d.items():
        sub = _nested_type(cls, name)
        kwargs[name] = _from_dict(sub, value, f"{prefix}{name}.") if sub and isinstance(value, dict) else value
    return cls(**kwargs)


def _nested_type(cls, name: str):
    nested = {TDMRConfig: {"teacher": TeacherConfig, "distill": DistillConfig, "augment": AugmentConfig},
              TeacherConfig: {"optim": OptimConfig},
              DistillConfig: {"schedule": ScheduleConfig, "optim": OptimConfig}}
    return nested.get(cls, {}).get(name)
