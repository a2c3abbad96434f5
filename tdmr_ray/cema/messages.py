"""What edge and cloud send each other, and the communication accounting.

Both messages are plain dataclasses of numpy arrays, CPU tensors, strings and ints, so Ray (or
any pickle-free transport that handles arrays) can ship them unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class UploadMessage:
    """Edge -> cloud: the samples a device selected from one batch (possibly none).

    An empty upload still tells the cloud that the device ran a batch: the reference runs a
    replay-only distillation step for such batches.
    """

    device_id: str
    images: np.ndarray  # uint8 (N, H, W, C), as captured: the bytes that travel
    param_version: int  # version of the edge parameters the samples were inferred with
    entropies: np.ndarray | None = None  # float32 (N,), edge entropies (for audit; the cloud recomputes)
    seq: int = 0  # the device's batch counter
    # Beyond the paper (ShiftConfig, EdgeConfig.stats_source="upload"): the device's shift count,
    # and the TBR statistics it applies parameters with (float32 tensors, a few KB).
    shift_epoch: int = 0
    stats: dict[str, torch.Tensor] | None = None
    # edge.stats_source="split": True when the device takes its later layers' statistics from the
    # cloud (always, or while its stream is bursty with edge.split_gate="burst")
    split: bool = False

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes) + sum(t.numel() * t.element_size() for t in (self.stats or {}).values())

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class UpdateMessage:
    """Cloud -> edge: a complete set of normalization affine parameters and its version."""

    key: str  # device or group id the parameters were adapted for
    version: int  # increases by one per cloud step for this key; edges ignore older ones
    params: dict[str, torch.Tensor]  # name -> float32 CPU tensor (norm_affine_parameters names)
    stats: dict[str, torch.Tensor] | None = None  # TBR statistics, only with stats_source="cloud"

    @property
    def nbytes(self) -> int:
        tensors = list(self.params.values()) + list((self.stats or {}).values())
        return int(sum(t.numel() * t.element_size() for t in tensors))


def validate_upload(msg: UploadMessage, image_shape: tuple[int, int, int]) -> None:
    """Raise ValueError, naming the problem, unless ``msg`` is a well-formed upload of
    uint8 images of ``image_shape`` (H, W, C)."""
    if not isinstance(msg, UploadMessage):
        raise ValueError(f"upload must be an UploadMessage, got {type(msg).__name__}")
    if not isinstance(msg.device_id, str) or not msg.device_id:
        raise ValueError(f"upload device_id must be a non-empty string, got {msg.device_id!r}")
    if not isinstance(msg.param_version, (int, np.integer)) or msg.param_version < 0:
        raise ValueError(f"upload param_version must be a non-negative int, got {msg.param_version!r}")
    x = msg.images
    if not isinstance(x, np.ndarray):
        raise ValueError(f"upload images must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise ValueError(f"upload images must be uint8, got {x.dtype}")
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"upload images must have shape (N, {', '.join(map(str, image_shape))}), "
                         f"got {tuple(x.shape)}")
    if msg.entropies is not None:
        e = msg.entropies
        if not isinstance(e, np.ndarray) or e.shape != (len(x),):
            raise ValueError(f"upload entropies must be an array of shape ({len(x)},)")
        if not np.issubdtype(e.dtype, np.floating) or not np.isfinite(e).all():
            raise ValueError("upload entropies must be finite floats (NaN or inf found)")
    if not isinstance(msg.shift_epoch, (int, np.integer)) or msg.shift_epoch < 0:
        raise ValueError(f"upload shift_epoch must be a non-negative int, got {msg.shift_epoch!r}")
    if msg.stats is not None and (not isinstance(msg.stats, dict)
                                  or not all(isinstance(v, torch.Tensor) for v in msg.stats.values())):
        raise ValueError("upload stats must be a dict of tensors")


@dataclass
class Accounting:
    """Per-device (or summed) communication counts. ``seen`` always equals ``uploaded`` plus
    every ``excluded_*`` plus ``not_uploaded`` (samples of methods that never upload)."""

    seen: int = 0
    uploaded: int = 0
    excluded_unreliable: int = 0
    excluded_low_info: int = 0
    excluded_redundant: int = 0
    excluded_over_budget: int = 0  # the diagnostic filter.budget_fraction
    not_uploaded: int = 0
    uploads: int = 0  # upload messages that carried at least one sample
    bytes_up: int = 0  # uint8 image bytes
    bytes_down: int = 0  # parameter-set bytes received (stale ones included: they were sent)
    updates_received: int = 0
    updates_applied: int = 0
    updates_stale: int = 0  # older than the applied or pending version, or superseded while pending

    def __add__(self, other: "Accounting") -> "Accounting":
        return Accounting(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                             for f in dataclasses.fields(self)})

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @property
    def excluded(self) -> int:
        return (self.excluded_unreliable + self.excluded_low_info + self.excluded_redundant
                + self.excluded_over_budget)

    @property
    def upload_fraction(self) -> float:
        return self.uploaded / self.seen if self.seen else 0.0

    def check(self, pending_updates: int = 0) -> None:
        """Raise AssertionError if the counts do not add up (``pending_updates``: received
        updates still waiting for the next batch)."""
        parts = self.uploaded + self.excluded + self.not_uploaded
        assert self.seen == parts, f"seen {self.seen} != uploaded + excluded + not uploaded = {parts}"
        handled = self.updates_applied + self.updates_stale + pending_updates
        assert self.updates_received == handled, \
            f"updates received {self.updates_received} != applied + stale + pending = {handled}"
