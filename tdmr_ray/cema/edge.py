"""The edge: forward-only inference, sample selection, uploads; per-device state kept explicit.

One :class:`EdgeRunner` holds one frozen copy of the edge model and serves any number of devices:
for each batch it loads a device's :class:`EdgeDeviceState` (normalization affine parameters and
TBR statistics, a few thousand floats for a CIFAR ResNet) into the shared model, runs the
forward under ``torch.inference_mode()``, and reads the statistics back. A received update is
validated when it arrives and applied, whole, before the device's next batch; updates that are
not newer than what the device has are ignored (counted as stale).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..data import to_float
from ..models import get_norm_affine, norm_affine_parameters
from . import state_io as sio
from .config import CEMAConfig, check_config
from .class_stats import ClassMomentProbe, balanced_stats, is_bursty, update_burst
from .filters import FilterState, Selection, select_uploads
from .messages import Accounting, UpdateMessage, UploadMessage
from .norm import (check_tbr_stats, convert_to_test_time_bn, load_tbr_stats, read_tbr_stats, set_norm_mode,
                   test_time_bn_modules)
from .shift import ShiftState, channel_stats, observe


@dataclass
class EdgeDeviceState:
    """Everything that differs between devices sharing one edge model."""

    device_id: str
    affine: dict[str, torch.Tensor]  # normalization affine parameters in use
    version: int = 0  # version of ``affine`` (0 = as deployed)
    stats: dict[str, torch.Tensor] | None = None  # TBR statistics; None: start from the next batch
    filter: FilterState = field(default_factory=FilterState)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)  # on-device SGD (Tent baseline only)
    accounting: Accounting = field(default_factory=Accounting)
    batches: int = 0
    pending: UpdateMessage | None = None  # newest valid update, applied before the next batch
    shift: ShiftState = field(default_factory=ShiftState)  # shift detector (ShiftConfig)
    # Per-class channel moments (edge.class_balanced_stats, tdmr_ray.cema.class_stats); None: not started.
    class_stats: dict[str, torch.Tensor] | None = None

    def offer(self, update: UpdateMessage) -> bool:
        """Receive an update; keep it for the next batch if it is newer than anything held.

        Raises ValueError (and keeps nothing) if it does not fit this device's parameters.
        Returns whether it was kept.
        """
        acc = self.accounting
        acc.updates_received += 1
        acc.bytes_down += update.nbytes
        newest = max(self.version, self.pending.version if self.pending else -1)
        if update.version <= newest:
            acc.updates_stale += 1
            return False
        try:
            self.check_update(update)
        except ValueError:
            acc.updates_received -= 1  # a malformed update is not counted as received
            raise
        if self.pending is not None:
            acc.updates_stale += 1  # superseded before it could be applied
        self.pending = update
        return True

    def check_update(self, update: UpdateMessage) -> None:
        """Raise ValueError if ``update`` does not fit this device (names, shapes, finite values)."""
        missing, unexpected = set(self.affine) - set(update.params), set(update.params) - set(self.affine)
        if missing or unexpected:
            raise ValueError(f"update v{update.version} does not fit device {self.device_id}: missing "
                             f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
        for k, v in update.params.items():
            if not isinstance(v, torch.Tensor) or v.shape != self.affine[k].shape:
                raise ValueError(f"update v{update.version}: parameter {k} has the wrong shape")
            if not v.is_floating_point() or not torch.isfinite(v).all():
                raise ValueError(f"update v{update.version}: parameter {k} is not finite")
        if update.stats is not None and self.stats is not None:
            # (with edge.stats_source="split" an update carries the later layers' statistics only)
            partial = set(update.stats) < set(self.stats)
            check_tbr_stats({k: self.stats[k] for k in update.stats} if partial else self.stats, update.stats)
        elif update.stats is not None:  # no statistics yet: check them against the layer widths
            for k, v in update.stats.items():
                weight = self.affine.get(k.rsplit(".", 1)[0] + ".weight")
                if weight is None or (v.dim() == 1 and v.shape != weight.shape):
                    raise ValueError(f"update v{update.version}: statistic {k} does not fit the model")
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise ValueError(f"update v{update.version}: statistic {k} is not finite")

    def apply_pending(self) -> bool:
        """Install the pending update, all at once. Called between batches."""
        update, self.pending = self.pending, None
        if update is None:
            return False
        self.affine = {k: v.detach().to(self.affine[k].device, torch.float32).clone() for k, v in update.params.items()}
        layers = {k.rsplit(".", 1)[0] for k in self.affine}
        if update.stats is not None and (self.stats is not None or {k.rsplit(".", 1)[0] for k in update.stats} == layers):
            self.stats = {**(self.stats or {}), **{k: v.detach().clone() for k, v in update.stats.items()}}
        # (else: some layers' statistics for a device that has run no batch: it starts from its first)
        self.version = update.version
        self.accounting.updates_applied += 1
        return True

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat checkpoint (the pending update is not kept: the newest version can be re-sent)."""
        flat = {"device_id": sio.str_tensor(self.device_id), "version": sio.int_tensor(self.version),
                "batches": sio.int_tensor(self.batches),
                "filter.n_seen": sio.int_tensor(self.filter.n_seen),
                "filter.entropy_sum": sio.float_tensor(self.filter.entropy_sum)}
        if self.filter.warmup_mean is not None:
            flat["filter.warmup_mean"] = sio.float_tensor(self.filter.warmup_mean)
        if self.filter.history_probs is not None:
            flat["filter.history_probs"] = self.filter.history_probs.detach().cpu().clone()
        for k, v in self.accounting.as_dict().items():
            flat[f"accounting.{k}"] = sio.int_tensor(v)
        sio.put(flat, "affine.", self.affine)
        sio.put(flat, "stats.", self.stats)
        sio.put(flat, "momentum.", self.momentum)
        sio.put(flat, "class_stats.", self.class_stats)
        flat.update(self.shift.to_tensors())
        return flat

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> "EdgeDeviceState":
        affine = sio.take(flat, "affine.")
        if affine is None:
            raise ValueError("edge device state has no affine parameters")
        warm = flat.get("filter.warmup_mean")
        filt = FilterState(int(sio.require(flat, "filter.n_seen")), float(sio.require(flat, "filter.entropy_sum")),
                           None if warm is None else float(warm), flat.get("filter.history_probs"))
        acc = Accounting(**{k: int(v) for k, v in (sio.take(flat, "accounting.") or {}).items()})
        return cls(sio.tensor_str(sio.require(flat, "device_id")), affine, int(sio.require(flat, "version")),
                   sio.take(flat, "stats."), filt, sio.take(flat, "momentum.") or {}, acc,
                   int(sio.require(flat, "batches")), shift=ShiftState.from_tensors(flat),
                   class_stats=sio.take(flat, "class_stats."))


@dataclass
class EdgeResult:
    logits: torch.Tensor
    upload: UploadMessage | None  # None for methods that never upload
    selection: Selection | None
    shifted: bool = False  # a shift was detected (or, with detect="oracle", announced) at this batch

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(-1)


def images_to_input(images: np.ndarray, image_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Validate a uint8 NHWC batch and turn it into float NCHW in [0, 1]."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"edge input must be a uint8 (N, H, W, C) array, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"edge input must be (N, {image_shape}), got {images.shape}")
    return to_float(images)


class EdgeRunner:
    """Forward-only edge inference for many devices over one shared, frozen edge model.

    ``cfg`` is a method's config (:func:`method_config`): ``cfg.edge.norm`` picks the
    normalization, ``uploads`` whether selected samples are sent to a cloud.
    """

    def __init__(self, model: nn.Module, cfg: CEMAConfig, uploads: bool = True):
        self.cfg = cfg
        self.uploads = uploads
        self.model = convert_to_test_time_bn(model).requires_grad_(False).eval()
        self.params = norm_affine_parameters(self.model)  # live tensors, refilled per batch
        self.initial_affine = get_norm_affine(self.model)
        self.uses_tbr = cfg.edge.norm == "tbr"
        check_config(cfg)
        # Statistics the edge moves itself: always without a cloud, else unless they come from it.
        self.local_stats = not uploads or cfg.edge.stats_source != "cloud"
        # Class-balanced statistics replace the EMA of batch statistics where the edge moves its own.
        self._class_probe = ClassMomentProbe(self.model) \
            if cfg.edge.class_balanced_stats and self.uses_tbr and self.local_stats else None
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.shift.detect == "stats":
            first = next(iter(test_time_bn_modules(self.model).values()), None)
            if first is None:
                raise ValueError("shift.detect='stats' needs a model with BatchNorm2d layers")
            first.register_forward_pre_hook(self._probe_first_layer)

    def _probe_first_layer(self, module, args) -> None:
        self._probe = channel_stats(args[0].detach())

    def new_device(self, device_id: str) -> EdgeDeviceState:
        return EdgeDeviceState(device_id, {k: v.clone() for k, v in self.initial_affine.items()})

    def _load(self, state: EdgeDeviceState) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state.affine[k])
        if self.uses_tbr:
            load_tbr_stats(self.model, state.stats)
        set_norm_mode(self.model, self.cfg.edge.norm,
                      update_stats=self.uses_tbr and self.local_stats and self._class_probe is None,
                      mix_weight=self.cfg.edge.mix_weight, momentum=self.cfg.edge.tbr_momentum,
                      cumulative=self.cfg.edge.tbr_cumulative, total_var=self.cfg.edge.tbr_total_var,
                      source_share=self.cfg.edge.source_share)

    def forward(self, state: EdgeDeviceState, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` with the device's parameters (and its TBR statistics, moved here when local)."""
        self._load(state)
        with torch.inference_mode():
            logits = self.model(x)  # (the class probe's hooks record the layers' moments)
        if self.uses_tbr:
            state.stats = read_tbr_stats(self.model)
        logits = logits.clone()  # a normal tensor, usable outside inference mode
        if self._class_probe is not None:
            state.class_stats = self._class_probe.update(state.class_stats, logits.argmax(-1), logits.shape[-1],
                                             self.cfg.edge.tbr_momentum)
            state.stats = balanced_stats(state.class_stats, state.stats)
        elif self.cfg.edge.split_gate == "burst":  # the burst level alone
            hist = torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]).float()
            state.class_stats = update_burst(state.class_stats, hist)
        return logits

    def split_now(self, state: EdgeDeviceState) -> bool:
        """Whether the device takes its later layers' statistics from the cloud now (stats_source "split")."""
        if self.cfg.edge.stats_source != "split":
            return False
        return self.cfg.edge.split_gate == "always" or is_bursty(state.class_stats)

    def _shift_reset(self, state: EdgeDeviceState) -> bool:
        """Reset the edge's parts of ``shift.reset``; True when the batch must be predicted again."""
        parts = self.cfg.shift.reset
        if "filter" in parts:
            state.filter = type(state.filter)()
        if "edge_affine" in parts:
            state.affine = {k: v.clone() for k, v in self.initial_affine.items()}
            state.momentum = {}
            if state.pending is not None:  # adapted to the old domain
                state.pending = None
                state.accounting.updates_stale += 1
        if "edge_stats" in parts and self.uses_tbr:
            state.stats = state.class_stats = None  # restart from the batch that showed the shift
            return True
        return "edge_affine" in parts

    def infer(self, state: EdgeDeviceState, images: np.ndarray, shift: bool = False) -> EdgeResult:
        """Apply any pending update, predict one batch, select and package its uploads.
        ``shift`` announces a shift at this batch (used with ``shift.detect="oracle"`` only)."""
        state.apply_pending()
        x = images_to_input(images)
        before = state.stats, state.class_stats  # forward() replaces them: keep the pre-batch ones
        logits = self.forward(state, x)
        shifted = False
        if self.cfg.shift.detect == "oracle":
            shifted = bool(shift) and state.batches > 0
            if shifted:
                state.shift.epoch += 1
        elif self.cfg.shift.detect == "stats" and self._probe is not None:
            shifted, state.shift.last_distance = observe(state.shift, *self._probe, len(images), self.cfg.shift)
        if shifted and self._shift_reset(state):
            if state.stats is not None:
                state.stats, state.class_stats = before  # the pass above moved them: predict again from there
            logits = self.forward(state, x)
        state.batches += 1
        acc = state.accounting
        acc.seen += len(images)
        if not self.uploads:
            acc.not_uploaded += len(images)
            return EdgeResult(logits, None, None, shifted)
        sel = select_uploads(logits, state.filter, self.cfg.filter)
        keep = sel.keep.numpy()
        stats = state.stats if self.cfg.edge.stats_source in ("upload", "split") and self.uses_tbr else None
        upload = UploadMessage(state.device_id, np.ascontiguousarray(images[keep]), state.version,
                               sel.entropies[sel.keep].numpy().astype(np.float32), state.batches,
                               shift_epoch=state.shift.epoch,
                               stats={k: v.clone() for k, v in stats.items()} if stats is not None else None,
                               split=self.split_now(state))
        acc.uploaded += len(keep)
        acc.excluded_unreliable += sel.excluded.get("unreliable", 0)
        acc.excluded_low_info += sel.excluded.get("low_info", 0)
        acc.excluded_redundant += sel.excluded.get("redundant", 0)
        acc.excluded_over_budget += sel.excluded.get("over_budget", 0)
        if len(keep):
            acc.uploads += 1
            acc.bytes_up += upload.nbytes
        return EdgeResult(logits, upload, sel, shifted)

