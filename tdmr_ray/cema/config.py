"""CEMA settings: every constant of the method is a field, with the reference value as default.

Reference: Chen et al., "Towards Robust and Efficient Cloud-Edge Elastic Model Adaptation via
Selective Entropy Distillation", ICLR 2024, and its code (chenyaofo/CEMA, ``conf/cema.conf``,
``codebase/core/tta/cema.py``). Departures from the reference are named where the field is.

Methods (``METHODS``) are presets over these settings, so every baseline runs through the same
edge and cloud code:

====================  =====================================================================
``none``              frozen edge model, source statistics, nothing uploaded
``bn_adapt``          forward-only BN statistics adaptation on the edge (reference
                      ``bn_adapt.py``: 0.5 * source + 0.5 * batch statistics), no upload
``tbr_stats``         forward-only TBR statistics on the edge, no upload: CEMA's edge without
                      the cloud (an ablation: what the cloud's updates add)
``tent``              Tent on the edge (entropy minimization of the normalization affine
                      parameters, needs edge backward): an upper reference, not cloud-edge
``rdumb``             RDumb on the edge (ETA's filtered, weighted entropy minimization plus a
                      reset every 1,000 steps): a continual-safe TTA baseline, edge backward
``upload_all``        CEMA's cloud side with every sample uploaded (filters off)
``eata_filter``       static E_max + redundancy filter, no E_min: EATA's sample selection, and
                      also what the released CEMA config runs (``cema_released`` is an alias)
``cema``              the paper's method: dynamic E_max(t), E_min, redundancy filter
``cema_plus``         ``cema`` with the fixes beyond the paper (``CEMA_PLUS_SETTINGS``): device
                      statistics with uploads, shift detection and resets, pull to the source
====================  =====================================================================
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import apply_overrides


@dataclass
class FilterConfig:
    """Edge-side sample selection (which samples are uploaded). Defaults: the paper's method."""

    # Unreliable-sample exclusion: upload only if H(x) < E_max(t), E_max = e_max_frac * ln(C).
    unreliable: bool = True
    e_max_frac: float = 0.4
    # Dynamic E_max(t) = E_max * (mean entropy so far / mean entropy over the warm-up) * lambda.
    # The released config switches it off (warm_up_batch_size: null); the paper's method has it on.
    dynamic_e_max: bool = True
    e_max_lambda: float = 1.0  # the reference logs settle on 1.0 (swept 0.6-1.3)
    # Warm-up length in samples. Not stated in the released code (null there = never ends);
    # 640 (ten edge batches of 64) is our choice.
    warmup_samples: int = 640
    # Low-informative exclusion: upload only if H(x) > E_min = e_min_frac * ln(C). Off in the
    # released config; 0.02 is the value the reference logs settle on (swept 0.01-0.06).
    low_info: bool = True
    e_min_frac: float = 0.02
    # Redundancy (EATA): drop samples whose softmax has |cosine| >= margin to a moving average
    # (momentum 0.9) of previously uploaded softmax outputs. 0.05 is the reference value for
    # 1,000 classes. With C classes a one-hot softmax has cosine 1/sqrt(C) to a uniform average
    # (0.03 at C=1000, 0.32 at C=10), so 0.05 drops almost everything on 10 classes: use
    # ``redundancy_margin_for(num_classes)`` (0.4 for CIFAR-10, EATA's CIFAR-10 setting).
    redundancy: bool = True
    redundancy_margin: float = 0.05
    redundancy_momentum: float = 0.9
    # Diagnostic (beyond the paper, off in every preset): after the rules above, keep
    # ceil(budget_fraction * batch) of the batch, picked by ``budget_pick``: "random",
    # "uncertain" (highest entropy first) or "confident" (lowest first). With the rules off it
    # separates how many samples the cloud gets from which ones.
    budget_fraction: float = 0.0
    budget_pick: str = "random"
    # Diagnostic (off in every preset): upload every sample of the first ``start_upload_all`` samples
    # after the filter state starts or is reset at a detected shift, where the edge lags upload_all most.
    start_upload_all: int = 0

    def with_preset(self, preset: str) -> "FilterConfig":
        """These settings with the on/off switches of a preset from ``FILTER_PRESETS``."""
        if preset not in FILTER_PRESETS:
            raise ValueError(f"unknown filter preset {preset!r}; choose from {sorted(FILTER_PRESETS)}")
        return dataclasses.replace(self, **FILTER_PRESETS[preset])


BUDGET_PICKS = ("random", "uncertain", "confident")

# The switches of each selection rule; thresholds stay as configured.
FILTER_PRESETS: dict[str, dict[str, bool]] = {
    "paper": {"unreliable": True, "dynamic_e_max": True, "low_info": True, "redundancy": True},
    # chenyaofo/CEMA conf/cema.conf: static E_max (warm_up_batch_size null), no E_min.
    "released": {"unreliable": True, "dynamic_e_max": False, "low_info": False, "redundancy": True},
    "upload_all": {"unreliable": False, "dynamic_e_max": False, "low_info": False, "redundancy": False},
}


def redundancy_margin_for(num_classes: int) -> float:
    """A redundancy margin that fits the class count: the reference's 0.05 for 1,000 classes or
    more, else 0.4 (the margin of EATA's CIFAR-10-C setting, as in common TTA benchmarks)."""
    return 0.05 if num_classes >= 1000 else 0.4


@dataclass
class EdgeConfig:
    """Edge-side normalization."""

    # Statistics mode of the edge model: "tbr", "source", "mix" or "batch". Set by the method
    # (METHODS): the uploading methods use "tbr" on the edge and for both cloud models, as the reference.
    norm: str = "tbr"
    tbr_momentum: float = 0.1  # BatchNorm's default momentum, as in the reference's TBR layers
    # Beyond the paper: the edge's own TBR statistics (local/upload) average every batch since they
    # started (a shift reset restarts them) until 1/n reaches tbr_momentum, which is then the floor:
    # a stationary domain's statistics average over many batches instead of the last ~10, which
    # label-correlated batches (a few classes each) bias. False: the reference's EMA.
    tbr_cumulative: bool = False
    # Beyond the paper: the edge's own TBR variance is the EMA of the total variance (batch variance
    # plus the spread of batch means; TestTimeBatchNorm2d.total_var). With label-correlated batches
    # (a few classes each) the reference's EMA of batch variances misses the between-class spread.
    # A diagnostic switch: it did not close the label-mode gap (README, CEMA diagnosis).
    tbr_total_var: bool = False
    # Beyond the paper, off in every preset (an opt-in for label-correlated streams): where the edge
    # moves its own TBR statistics, blend the EMA of batch statistics with the equal-weight mixture of
    # per-predicted-class moment EMAs, by how bursty the predicted classes are
    # (tdmr_ray.cema.class_stats). In cema_plus, 3 seeds: label-correlated +1.00 (per seed +2.42 /
    # +0.57 / 0.00), reset -0.11, continual -0.10; ~59 KiB more state per ResNet-20 device.
    class_balanced_stats: bool = False
    mix_weight: float = 0.5  # batch share in "mix" mode (reference bn_adapt.conf momentum 0.5)
    # Beyond the paper: the edge model (on the device and its copy in the cloud) normalizes with
    # (1 - source_share) * its TBR statistics + source_share * the source statistics: bn_adapt's prior
    # on the source (Schneider et al. 2020) applied to TBR's statistics. 0: the reference; cema_plus 0.5
    # (README: +0.4 to +0.8 for cema_plus in every mode and seed; 0.3 gains nothing on seed 0).
    source_share: float = 0.0
    # Where the edge's TBR statistics come from (methods that upload). "cloud" (default, the
    # reference's behaviour: its edge is a copy of the cloud's edge model, statistics included):
    # updates carry the cloud copy's statistics (moved on uploaded and replayed samples) with the
    # affine parameters, about twice the bytes down, and until the first update the edge keeps
    # the statistics of its first batch. "local" (a departure, as an option): the edge moves its
    # statistics itself by EMA over every batch it infers (forward only) and updates carry
    # affine parameters only. On the quick benchmark "cloud" is ahead in every mode (mean
    # accuracy, CEMA: reset 61.2 vs 60.5, label-correlated 60.1 vs 56.3), as the affine
    # parameters are distilled under exactly these statistics. Methods without a cloud
    # ("tbr_stats") always use "local". "upload" (beyond the paper): the edge moves its own
    # statistics as with "local" and every upload carries them (about 5 KB for ResNet-20), so the
    # cloud distils under exactly the statistics the device applies the parameters with, also when
    # uploads starve after a shift; updates carry affine parameters only.
    stats_source: str = "cloud"
    # Beyond the paper: stats_source="split" takes the first `split_layer` normalization layers'
    # statistics as "upload" does (the device's own, sent with each upload) and the later layers' as
    # "cloud" does (the cloud copy's, moved on uploaded and replayed samples, sent down with the
    # updates): early layers see the corruption, which the device's every batch shows best; later
    # layers see the classes, whose bursts the cloud's replay averages out. Always split, layer 13
    # (ResNet-20's last stage): label-correlated +2.25 over 3 seeds, reset / continual -0.5 / -0.6;
    # gated by burstiness (split_gate="burst", cema_plus): the label gain without the cost (README).
    split_layer: int = 13
    # With stats_source="split": "burst" takes the later layers' statistics from the cloud only while
    # the device's predicted classes come in bursts (class_stats.is_bursty; label-correlated streams),
    # and all from the device otherwise (as "upload"); each upload says which. "always": always split.
    # ("always", not YAML's `off`, which reads as False.) Without stats_source="split": no effect.
    split_gate: str = "always"


@dataclass
class CloudConfig:
    batch_size: int = 32  # uploaded samples per cloud step
    adapt_foundation: bool = True
    foundation_lr: float = 2.5e-4  # SGD on the foundation's normalization affine parameters
    edge_lr: float = 2.5e-3  # SGD on the edge copy's normalization affine parameters
    momentum: float = 0.9
    # Sample weights 1/exp(H - E_max) use the static E_max = e_max_frac * ln(C), as the reference,
    # whose one E_max serves the filter and the loss. None (default): the filter's e_max_frac, so
    # a sweep of filter.e_max_frac moves both; a number sets the loss's E_max on its own.
    e_max_frac: float | None = None
    # Distillation loss = alpha * weighted entropy(edge) + beta * KL(foundation || edge) * T^2
    #                     + gamma * CE(edge, argmax foundation), KL and CE weighted by the
    #                     foundation's 1/exp(H - E_max).
    alpha: float = 3.0
    beta: float = 3.0
    gamma: float = 1.0
    temperature: float = 1.0
    # Replay: keep the newest `replay_capacity` uploaded samples; once the buffer holds
    # `replay_min`, a step uses the new batch plus `replay_ratio` x its size from the buffer;
    # a process() call that completes no new batch distils on `replay_only_multiple` x batch_size
    # buffered samples (the reference requires more than `replay_min` for that step).
    # replay_capacity 0: no replay at all.
    replay_capacity: int = 10000
    replay_min: int = 256
    replay_ratio: int = 3
    replay_only_multiple: int = 4
    replay_only_steps: bool = True
    tbr_momentum: float = 0.1
    tbr_total_var: bool = False  # beyond the paper: as edge.tbr_total_var, for both cloud models' statistics
    # Beyond the paper, with edge.stats_source="upload": the edge copy's statistics move this fraction
    # toward each upload's device statistics (1: replaced by them). Below 1 the cloud distils under an
    # average over its recent uploads (bursts of different classes mixed); a shift reset of
    # edge_stats restarts the average from the next upload. A diagnostic switch: below 1 it lost
    # accuracy in every mode tried (README, CEMA diagnosis).
    upload_stats_momentum: float = 1.0
    # Beyond the paper: after every step both models' affine parameters move toward the source
    # parameters, p <- (1 - source_pull) * p + source_pull * p_source (ROID's weight ensembling
    # uses 0.01). 0: off, the reference.
    source_pull: float = 0.0
    # Beyond the paper, a diagnostic (tdmr_ray.cema.sample_stats), with edge.stats_source="upload": "own"
    # distils every sample under the statistics of the upload it came in with (replayed ones too),
    # "newest" under the newest upload's through the same per-sample normalization; "" (default): TBR
    # under the newest upload's statistics.
    sample_stats: str = ""
    # Beyond the paper: more distillation signal per uploaded sample, no more uploads. Each step on new
    # samples also distils on `augment_views` augmented copies of them (random horizontal flip and a
    # shift of up to 4 pixels, zero-padded: the CIFAR training augmentation), and with `augment_replay`
    # the replayed samples are augmented the same way (each replay draw a new view). 0 / False: off.
    # (Where the cloud copy moves its own statistics, edge.stats_source "cloud", the views move them too.)
    augment_views: int = 0
    augment_replay: bool = False
    # Which augmentation those views take (tdmr_ray.cema.augment): "flip_shift" (above), "mixup" (each
    # image blended with another of the same draw, weight ~ U(0, 1)) or "cutmix" (a box of another
    # image pasted in). The foundation labels every view itself, so a mixed view is a new input with
    # its own teacher output: "function matching" (Beyer et al., CVPR 2022), which makes
    # distillation on few images generalize.
    augment: str = "flip_shift"


# cloud.augment's choices (tdmr_ray.cema.augment).
AUGMENTATIONS = ("flip_shift", "mixup", "cutmix")


# The state a detected shift can reset (ShiftConfig.reset).
SHIFT_PARTS = ("filter", "edge_stats", "edge_affine", "replay", "foundation_stats", "foundation_affine")


@dataclass
class ShiftConfig:
    """Beyond the paper: what happens when a device's input distribution shifts.

    The reference resets every corruption stream by hand; a device in the field sees shifts one
    after another, and the state built on the old domain (filter means, replay buffer, both models'
    statistics, adapted parameters) then works against the new one. ``detect``:

    - ``off``: the reference, nothing is reset;
    - ``oracle``: the stream's own tags mark the shifts (diagnosis only: a device does not know);
    - ``stats``: the edge compares each batch's first-normalization-layer input statistics with
      a moving average of them (forward only, 16 numbers per channel pair for ResNet-20) and
      reports a shift when the distance exceeds ``threshold`` x its running mean, at most once
      per ``min_batches`` batches.

    A detected shift resets the ``reset`` parts (names in ``SHIFT_PARTS``) on the edge and, through
    the next upload's ``shift_epoch``, in the cloud's state for the device's key.
    """

    detect: str = "off"
    threshold: float = 6.0
    min_batches: int = 8
    momentum: float = 0.1  # of the reference statistics and the distance's running mean
    reset: list[str] = field(default_factory=list)


@dataclass
class TentConfig:
    """Tent on the edge (upper reference): the reference's conf/tent.conf values."""

    lr: float = 2.5e-4
    momentum: float = 0.9
    # RDumb: reset to the deployed parameters every this many steps (RDumb's 1,000); 0: never.
    reset_every: int = 1000


@dataclass
class CEMAConfig:
    filter: FilterConfig = field(default_factory=FilterConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    tent: TentConfig = field(default_factory=TentConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    seed: int = 0


def check_config(cfg: "CEMAConfig") -> None:
    """Raise ValueError naming the setting that is out of range (choices checked here)."""
    c = cfg.cloud
    if c.replay_min < max(c.replay_ratio, c.replay_only_multiple) * c.batch_size:
        raise ValueError(f"cloud.replay_min ({c.replay_min}) must be at least max(replay_ratio, "
                         f"replay_only_multiple) * batch_size = {max(c.replay_ratio, c.replay_only_multiple) * c.batch_size}:"
                         " replay draws are sampled without replacement")
    if cfg.edge.stats_source not in ("local", "cloud", "upload", "split"):
        raise ValueError(f"edge.stats_source must be 'local', 'cloud', 'upload' or 'split', got {cfg.edge.stats_source!r}")
    if cfg.edge.split_gate not in ("always", "burst"):
        raise ValueError(f"edge.split_gate must be 'always' or 'burst', got {cfg.edge.split_gate!r}")
    if cfg.edge.split_layer < 0:
        raise ValueError(f"edge.split_layer must be >= 0, got {cfg.edge.split_layer}")
    if cfg.edge.class_balanced_stats and (cfg.edge.tbr_cumulative or cfg.edge.tbr_total_var):
        raise ValueError("edge.class_balanced_stats computes the edge's statistics itself: it does not combine with "
                         "edge.tbr_cumulative or edge.tbr_total_var")
    if cfg.filter.start_upload_all < 0:
        raise ValueError(f"filter.start_upload_all must be >= 0 (0: off), got {cfg.filter.start_upload_all}")
    if not 0.0 <= cfg.filter.budget_fraction <= 1.0:
        raise ValueError(f"filter.budget_fraction must be in [0, 1] (0: off), got {cfg.filter.budget_fraction}")
    if cfg.filter.budget_pick not in BUDGET_PICKS:
        raise ValueError(f"filter.budget_pick must be one of {BUDGET_PICKS}, got {cfg.filter.budget_pick!r}")
    if cfg.shift.detect not in ("off", "oracle", "stats"):
        raise ValueError(f"shift.detect must be 'off', 'oracle' or 'stats', got {cfg.shift.detect!r}")
    unknown = sorted(set(cfg.shift.reset) - set(SHIFT_PARTS))
    if unknown:
        raise ValueError(f"shift.reset: unknown parts {unknown}; choose from {list(SHIFT_PARTS)}")
    if cfg.cloud.augment_views < 0:
        raise ValueError(f"cloud.augment_views must be >= 0, got {cfg.cloud.augment_views}")
    if cfg.cloud.augment not in AUGMENTATIONS:
        raise ValueError(f"cloud.augment must be one of {AUGMENTATIONS}, got {cfg.cloud.augment!r}")
    if cfg.cloud.sample_stats not in ("", "own", "newest"):
        raise ValueError(f"cloud.sample_stats must be '', 'own' or 'newest', got {cfg.cloud.sample_stats!r}")
    if not 0.0 <= cfg.edge.source_share < 1.0:
        raise ValueError(f"edge.source_share must be in [0, 1), got {cfg.edge.source_share}")
    if cfg.cloud.sample_stats and cfg.edge.stats_source != "upload":
        raise ValueError("cloud.sample_stats needs edge.stats_source='upload' (the uploads carry the statistics)")
    if not 0.0 < cfg.cloud.upload_stats_momentum <= 1.0:
        raise ValueError(f"cloud.upload_stats_momentum must be in (0, 1], got {cfg.cloud.upload_stats_momentum}")
    if not 0.0 <= cfg.cloud.source_pull < 1.0:
        raise ValueError(f"cloud.source_pull must be in [0, 1), got {cfg.cloud.source_pull}")
    if cfg.cloud.replay_capacity < 0:
        raise ValueError(f"cloud.replay_capacity must be >= 0 (0: no replay), got {cfg.cloud.replay_capacity}")


@dataclass(frozen=True)
class MethodSpec:
    """What a method does: its edge normalization, whether it uploads, and its filter preset."""

    edge_norm: str
    uploads: bool = False
    filter_preset: str = "paper"  # a FILTER_PRESETS name, when uploads
    edge_learning: str = ""  # backward on the edge: "tent" or "rdumb" (ETA + periodic reset)
    description: str = ""
    # Settings the method fixes beyond the switches above: dotted CEMAConfig keys -> values.
    settings: tuple[tuple[str, object], ...] = ()


# Beyond the paper, each chosen by an experiment (README, "CEMA: what the diagnosis found"):
# uploads carry the device's statistics (the cloud distils under what the device applies) except,
# while the device's predicted classes come in bursts, the last stage's (from layer 13 of ResNet-20's
# 19), which the cloud copy averages over replayed samples and sends down; a detected shift resets
# everything built on the old domain; both models are pulled 1% per step toward the source
# parameters (ROID's weight ensembling); the edge model normalizes with its statistics mixed half
# and half with the source ones (bn_adapt's prior; 3 seeds: +0.4 to +0.8 in every mode and seed).
CEMA_PLUS_SETTINGS: tuple[tuple[str, object], ...] = (
    ("edge.stats_source", "split"),
    ("edge.split_layer", 13),
    ("edge.split_gate", "burst"),
    ("shift.detect", "stats"),
    # A shift restarts what describes the old domain (statistics, replay, filter state); the adapted
    # affine parameters carry over (pulled toward the source): neighbouring domains share much of
    # them (medium continual stream +1.53, quick +0.47 over 3 seeds against resetting them too).
    ("shift.reset", ["filter", "edge_stats", "replay", "foundation_stats"]),
    ("cloud.source_pull", 0.01),
    ("edge.source_share", 0.5),
)

METHODS: dict[str, MethodSpec] = {
    "none": MethodSpec("source", description="no adaptation"),
    "bn_adapt": MethodSpec("mix", description="forward-only BN statistics adaptation (edge)"),
    "tent": MethodSpec("batch", edge_learning="tent", description="Tent on the edge (edge backward; upper reference)"),
    "rdumb": MethodSpec("batch", edge_learning="rdumb",
                        description="RDumb on the edge: ETA + reset every tent.reset_every steps (edge backward)"),
    "tbr_stats": MethodSpec("tbr", description="edge TBR statistics only: CEMA's edge without cloud updates"),
    "upload_all": MethodSpec("tbr", uploads=True, filter_preset="upload_all",
                             description="distillation, every sample uploaded"),
    "eata_filter": MethodSpec("tbr", uploads=True, filter_preset="released",
                              description="EATA-style filter (static E_max + redundancy), no E_min"),
    "cema_released": MethodSpec("tbr", uploads=True, filter_preset="released",
                                description="released CEMA config (= eata_filter)"),
    "cema": MethodSpec("tbr", uploads=True, filter_preset="paper",
                       description="CEMA: dynamic E_max, E_min, redundancy"),
    "cema_plus": MethodSpec("tbr", uploads=True, filter_preset="paper", settings=CEMA_PLUS_SETTINGS,
                            description="CEMA + device statistics, shift resets, pull to the source"),
}


def method_config(method: str, base: CEMAConfig | None = None, settings: dict | None = None) -> CEMAConfig:
    """``base`` with the method's preset applied: its edge normalization and filter switches.

    Thresholds and margins (E_max, E_min, lambda, redundancy margin, ...) come from ``base``;
    only the on/off switches are set by the method. ``settings`` (``{"section.key": value}``, e.g. a
    bench variant's ``filter.unreliable``) apply last, over the method's own.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CEMA method {method!r}; choose from {sorted(METHODS)}")
    spec = METHODS[method]
    base = base or CEMAConfig()
    edge = dataclasses.replace(base.edge, norm=spec.edge_norm)
    if not spec.uploads:
        cfg = dataclasses.replace(base, edge=edge)
    else:
        cfg = dataclasses.replace(base, edge=edge, filter=base.filter.with_preset(spec.filter_preset))
    # typed as on the CLI ("a,b" for a list field is a list); the caller's settings win over the method's
    cfg = apply_overrides(cfg, {**dict(spec.settings), **(settings or {})}, source=f"method {method!r} settings")
    check_config(cfg)
    return cfg

