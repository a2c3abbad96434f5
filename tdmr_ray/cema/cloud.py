"""The cloud: foundation adaptation and distillation into the edge's normalization parameters.

:class:`CloudAdapter` holds one foundation model and one cloud copy of the edge model (both
with TBR normalization) and keeps the adaptation state per key (a device id, or a group id the
caller chooses) as explicit tensors: both models' normalization affine parameters, TBR
statistics and SGD momentum, the replay buffer, the samples waiting for a full batch, and the
version counter. Per uploaded batch of ``cloud.batch_size`` (reference ``cema.py``):

1. foundation: minimize ``H / exp(H - E_max)`` over the new batch (TBR statistics move);
2. edge copy: distil ``alpha * weighted entropy + beta * KL + gamma * CE`` from the foundation
   (frozen statistics) on the new batch plus ``replay_ratio`` x its size from the replay buffer
   once it holds ``replay_min`` samples; a ``process`` call that completes no batch distils on
   ``replay_only_multiple`` x batch_size replayed samples (once the buffer exceeds replay_min);
3. emit the edge copy's affine parameters (and, with ``edge.stats_source="cloud"``, its TBR
   statistics) as a new version.

Departure: the reference simulates edge and cloud copy as one model object, so the copy's TBR
statistics start from the edge's first batch; here each side starts from its own first batch
(the edge's 64 samples, the cloud's first 32 uploads), since only messages connect them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import get_norm_affine, norm_affine_parameters
from . import state_io as sio
from .config import CEMAConfig, check_config
from .augment import augment
from .losses import distillation_loss, weighted_entropy_loss
from .messages import UpdateMessage, UploadMessage, validate_upload
from .norm import (check_tbr_stats, convert_to_test_time_bn, later_layers, load_tbr_stats, read_tbr_stats,
                   set_norm_mode, set_sample_stats, stats_of_layers, test_time_bn_modules)
from .sample_stats import StatsBank
from .sgd import sgd_momentum_step


@dataclass
class ModelState:
    """One model's adaptable state for one key."""

    affine: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] | None = None  # TBR statistics; None until the first batch
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)

    def put(self, flat: dict, prefix: str) -> None:
        sio.put(flat, prefix + "affine.", self.affine)
        sio.put(flat, prefix + "stats.", self.stats)
        sio.put(flat, prefix + "momentum.", self.momentum)

    @classmethod
    def take(cls, flat: dict, prefix: str, device) -> "ModelState":
        affine = sio.take(flat, prefix + "affine.", device)
        if affine is None:
            raise ValueError(f"cloud state has no {prefix}affine parameters")
        return cls(affine, sio.take(flat, prefix + "stats.", device), sio.take(flat, prefix + "momentum.", device) or {})


@dataclass
class KeyState:
    foundation: ModelState
    edge: ModelState
    replay: torch.Tensor  # uint8 (N, H, W, C), newest last, at most replay_capacity
    pending: torch.Tensor  # uint8 (P, H, W, C), uploaded but not yet in a cloud batch
    version: int = 0
    steps: int = 0
    replay_only_steps: int = 0
    samples_received: int = 0
    shift_resets: int = 0
    last_reset_step: int = 0
    # edge.stats_source="split": 1 while the newest upload asked for the later layers' statistics from
    # the cloud (the cloud copy moves its own there), 0 while it takes all of the device's
    split: int = 0
    # device id -> the newest shift_epoch it uploaded with (ShiftConfig)
    device_epochs: dict[str, int] = field(default_factory=dict)
    # cloud.sample_stats only: the statistics id of each replay / pending sample (None: all unknown)
    replay_ids: torch.Tensor | None = None
    pending_ids: torch.Tensor | None = None
    bank: StatsBank = field(default_factory=StatsBank)

    COUNTERS = ("version", "steps", "replay_only_steps", "samples_received", "shift_resets", "last_reset_step",
                "split")


class CloudAdapter:
    """Cloud side of CEMA for any number of keys (devices or groups). Not thread-safe."""

    def __init__(self, foundation: nn.Module, edge: nn.Module, cfg: CEMAConfig,
                 image_shape: tuple[int, int, int] = (32, 32, 3), device: str | torch.device = "cpu"):
        check_config(cfg)
        self.cfg = cfg
        self.device = torch.device(device)
        self.image_shape = tuple(image_shape)
        self.foundation = convert_to_test_time_bn(foundation).to(self.device)
        self.edge = convert_to_test_time_bn(edge).to(self.device)
        self.num_classes = _num_classes(self.edge, self.image_shape, self.device)
        if _num_classes(self.foundation, self.image_shape, self.device) != self.num_classes:
            raise ValueError("foundation and edge models predict different numbers of classes")
        e_max_frac = cfg.cloud.e_max_frac if cfg.cloud.e_max_frac is not None else cfg.filter.e_max_frac
        self.e_max = e_max_frac * math.log(self.num_classes)
        self.send_stats = cfg.edge.stats_source in ("cloud", "split")
        self.device_stats = cfg.edge.stats_source == "upload"  # the edge copy runs on the uploader's statistics
        # "split": the first edge.split_layer layers run on the uploader's statistics, the later ones
        # on the cloud copy's own (and only those go down with the updates)
        self._cloud_layers = later_layers(self.edge, cfg.edge.split_layer) if cfg.edge.stats_source == "split" else None
        if self._cloud_layers is not None and not self._cloud_layers:
            raise ValueError(f"edge.split_layer {cfg.edge.split_layer}: the edge model has only "
                             f"{len(test_time_bn_modules(self.edge))} normalization layers")
        self.sample_stats = cfg.cloud.sample_stats  # "" | "own" | "newest" (tdmr_ray.cema.sample_stats)
        self._norm_layers = list(test_time_bn_modules(self.edge))
        self._stats_reference = read_tbr_stats(self.edge)  # keys and shapes uploads must match
        self._f_params = norm_affine_parameters(self.foundation)
        self._e_params = norm_affine_parameters(self.edge)
        self._f_init = {k: v.to(self.device) for k, v in get_norm_affine(self.foundation).items()}
        self._e_init = {k: v.to(self.device) for k, v in get_norm_affine(self.edge).items()}
        self.keys: dict[str, KeyState] = {}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.counters = {"uploads": 0, "rejected": 0, "updates_sent": 0, "bytes_down": 0}

    # -- public API -------------------------------------------------------------------------
    def validate(self, upload: UploadMessage) -> None:
        """Raise ValueError if ``upload`` is malformed (wrong type, shape, dtype, NaN entropies)."""
        validate_upload(upload, self.image_shape)
        if upload.stats is not None:
            check_tbr_stats(self._stats_reference, upload.stats)

    def process(self, upload: UploadMessage, key: str | None = None, replay_only: bool = True) -> UpdateMessage | None:
        """Take one upload (the edge's selection from one batch, maybe empty) for ``key``
        (default: its device id); run the cloud steps it completes; return the newest update,
        or None when no step ran. Malformed uploads raise ValueError and change nothing.

        ``replay_only=False`` skips the replay-only step of an upload that completes no batch; the
        caller may run it later with :meth:`replay_step` (the fleet's adapter does, in its idle time,
        so that new samples go first)."""
        try:
            self.validate(upload)
        except ValueError:
            self.counters["rejected"] += 1
            raise
        self.counters["uploads"] += 1
        ks = self._key_state(key or upload.device_id)
        self._maybe_shift_reset(ks, upload)
        if upload.stats is not None and self._cloud_layers is not None:
            ks.split = int(upload.split)
        if upload.stats is not None and self._on_device_stats(ks):
            ks.edge.stats = _follow_stats(ks.edge.stats, upload.stats, self.cfg.cloud.upload_stats_momentum,
                                          self.device)
        elif upload.stats is not None and self._cloud_layers is not None:  # later layers: the cloud's own, once started
            own = stats_of_layers(ks.edge.stats, self._cloud_layers) if ks.edge.stats is not None else {}
            ks.edge.stats = {**{k: v.to(self.device, copy=True) for k, v in upload.stats.items()}, **own}
        new = torch.tensor(upload.images, device=self.device)  # a copy: Ray hands read-only arrays
        ks.samples_received += len(new)
        # As the reference: uploads enter the replay buffer when they arrive.
        capacity = self.cfg.cloud.replay_capacity
        if self.sample_stats:
            sid = ks.bank.add({k: v.to(self.device, copy=True) for k, v in upload.stats.items()}) \
                if upload.stats is not None else -1
            new_ids = torch.full((len(new),), sid)
            if capacity > 0:
                ks.replay_ids = torch.cat([_ids(ks.replay_ids, len(ks.replay)), new_ids])[-capacity:]
            ks.pending_ids = torch.cat([_ids(ks.pending_ids, len(ks.pending)), new_ids])
        if capacity > 0:  # (a [-0:] slice would keep everything)
            ks.replay = torch.cat([ks.replay, new])[-capacity:]
        ks.pending = torch.cat([ks.pending, new])
        stepped = False
        batch = self.cfg.cloud.batch_size
        while len(ks.pending) >= batch:
            self._step(ks, ks.pending[:batch], None if ks.pending_ids is None else ks.pending_ids[:batch])
            ks.pending = ks.pending[batch:]
            if ks.pending_ids is not None:
                ks.pending_ids = ks.pending_ids[batch:]
            stepped = True
        if self.sample_stats:
            ks.bank.prune(_ids(ks.replay_ids, len(ks.replay)), _ids(ks.pending_ids, len(ks.pending)))
        if not stepped and replay_only:
            return self.replay_step(key or upload.device_id)
        return self.update_for(key or upload.device_id) if stepped else None

    def replay_step(self, key: str) -> UpdateMessage | None:
        """One replay-only step for ``key`` (distillation on ``replay_only_multiple`` x batch_size
        buffered samples), if replay-only steps are on and its buffer holds more than ``replay_min``;
        returns the new update, or None when no step ran."""
        ks = self.keys.get(key)
        if ks is None or not self.cfg.cloud.replay_only_steps or len(ks.replay) <= self.cfg.cloud.replay_min:
            return None
        self._step(ks, None)
        return self.update_for(key)

    @torch.no_grad()
    def predict(self, key: str, images) -> torch.Tensor:
        """The foundation's logits for ``images`` (uint8 NHWC array) under ``key``'s current state,
        nothing moved (for traces: the ceiling the distillation approaches)."""
        ks = self._key_state(key)
        _load(self.foundation, self._f_params, ks.foundation)
        set_norm_mode(self.foundation, "tbr", update_stats=False)
        return self.foundation(self._to_input(torch.from_numpy(images).to(self.device))).cpu()

    def update_for(self, key: str) -> UpdateMessage:
        """The current parameters for ``key`` (e.g. for a device that (re)joins)."""
        ks = self._key_state(key)
        self.counters["updates_sent"] += 1
        stats = ks.edge.stats if self.send_stats else None
        if stats is not None and self._cloud_layers is not None:  # the later layers, while split
            stats = stats_of_layers(stats, self._cloud_layers) if ks.split else None
        msg = UpdateMessage(key, ks.version, {k: v.detach().cpu().clone() for k, v in ks.edge.affine.items()},
                            {k: v.detach().cpu().clone() for k, v in stats.items()} if stats is not None else None)
        self.counters["bytes_down"] += msg.nbytes
        return msg

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as a flat dict of CPU tensors (safetensors can store it)."""
        flat = {"rng": self.generator.get_state()}
        for name, v in self.counters.items():
            flat[f"counters.{name}"] = sio.int_tensor(v)
        for i, (key, ks) in enumerate(self.keys.items()):
            p = f"keys.{i}."
            flat[p + "name"] = sio.str_tensor(key)
            for c in KeyState.COUNTERS:
                flat[p + c] = sio.int_tensor(getattr(ks, c))
            for j, (dev, epoch) in enumerate(ks.device_epochs.items()):
                flat[f"{p}device_epochs.{j}.name"] = sio.str_tensor(dev)
                flat[f"{p}device_epochs.{j}.epoch"] = sio.int_tensor(epoch)
            flat[p + "replay"] = ks.replay.cpu().contiguous()
            flat[p + "pending"] = ks.pending.cpu().contiguous()
            ks.foundation.put(flat, p + "foundation.")
            ks.edge.put(flat, p + "edge.")
        return flat

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        keys: dict[str, KeyState] = {}
        n_keys = len({k.split(".")[1] for k in flat if k.startswith("keys.")})
        for i in range(n_keys):
            p = f"keys.{i}."
            ks = KeyState(ModelState.take(flat, p + "foundation.", self.device),
                          ModelState.take(flat, p + "edge.", self.device),
                          sio.require(flat, p + "replay").to(self.device),
                          sio.require(flat, p + "pending").to(self.device))
            for c in KeyState.COUNTERS:
                if p + c in flat or c not in ("shift_resets", "last_reset_step", "split"):  # (older checkpoints)
                    setattr(ks, c, int(sio.require(flat, p + c)))
            n_dev = len({k.split(".")[3] for k in flat if k.startswith(p + "device_epochs.")})
            ks.device_epochs = {sio.tensor_str(flat[f"{p}device_epochs.{j}.name"]):
                                int(flat[f"{p}device_epochs.{j}.epoch"]) for j in range(n_dev)}
            for part, params in (("foundation", self._f_params), ("edge", self._e_params)):
                got = getattr(ks, part).affine
                if set(got) != set(params) or any(got[k].shape != params[k].shape for k in params):
                    raise ValueError(f"checkpoint key {i}: {part} parameters do not fit the model")
            keys[sio.tensor_str(sio.require(flat, p + "name"))] = ks
        self.generator.set_state(sio.require(flat, "rng"))
        self.counters = {k: int(v) for k, v in (sio.take(flat, "counters.") or {}).items()}
        self.keys = keys

    # -- internals ---------------------------------------------------------------------------
    def _key_state(self, key: str) -> KeyState:
        if key not in self.keys:
            empty = torch.empty((0, *self.image_shape), dtype=torch.uint8, device=self.device)
            self.keys[key] = KeyState(ModelState({k: v.clone() for k, v in self._f_init.items()}),
                                      ModelState({k: v.clone() for k, v in self._e_init.items()}),
                                      empty, empty.clone())
        return self.keys[key]

    def _maybe_shift_reset(self, ks: KeyState, upload: UploadMessage) -> None:
        """Reset the key's parts of ``shift.reset`` when the uploader reports a new shift; with many
        devices per key (a group) at most once per ``shift.min_batches`` cloud steps."""
        seen = ks.device_epochs.get(upload.device_id, 0)
        ks.device_epochs[upload.device_id] = max(seen, upload.shift_epoch)
        if upload.shift_epoch <= seen or not self.cfg.shift.reset:
            return
        if ks.shift_resets and ks.steps - ks.last_reset_step < self.cfg.shift.min_batches:
            return
        parts = self.cfg.shift.reset
        if "replay" in parts:
            ks.replay, ks.pending = ks.replay[:0], ks.pending[:0]
            ks.replay_ids = ks.pending_ids = None
        if "foundation_stats" in parts:
            ks.foundation.stats = None
        if "foundation_affine" in parts:
            ks.foundation.affine = {k: v.clone() for k, v in self._f_init.items()}
            ks.foundation.momentum = {}
        if "edge_affine" in parts:
            ks.edge.affine = {k: v.clone() for k, v in self._e_init.items()}
            ks.edge.momentum = {}
        if "edge_stats" in parts:  # (with device statistics: the next upload's replace them)
            ks.edge.stats = None
        ks.shift_resets += 1
        ks.last_reset_step = ks.steps

    def _on_device_stats(self, ks: KeyState) -> bool:
        """Whether the key's edge copy runs on the uploader's statistics in every layer ("upload", or
        "split" while the uploads do not ask for the cloud's later layers)."""
        return self.device_stats or (self._cloud_layers is not None and not ks.split)

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.permute(0, 3, 1, 2).float().div_(255)

    def _replayed_input(self, replayed: torch.Tensor) -> torch.Tensor:
        x = self._to_input(replayed)
        return augment(x, self.generator, self.cfg.cloud.augment) if self.cfg.cloud.augment_replay else x

    def _sample_replay(self, ks: KeyState, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` replayed samples and their statistics ids."""
        idx = torch.randperm(len(ks.replay), generator=self.generator)[:n].to(self.device)
        return ks.replay[idx], _ids(ks.replay_ids, len(ks.replay))[idx.cpu()]

    def _step(self, ks: KeyState, new: torch.Tensor | None, new_ids: torch.Tensor | None = None) -> None:
        """One cloud step on ``new`` (a full batch; ``new_ids``: its statistics ids) or, with None, on
        replayed samples only."""
        c = self.cfg.cloud
        _load(self.foundation, self._f_params, ks.foundation)
        _load(self.edge, self._e_params, ks.edge)
        if new is not None:
            x_new = self._to_input(new)
            # Step 1: the foundation model, entropy minimization; its TBR statistics move here.
            set_norm_mode(self.foundation, "tbr", update_stats=True, momentum=c.tbr_momentum,
                          total_var=c.tbr_total_var)
            if c.adapt_foundation:
                loss = weighted_entropy_loss(self.foundation(x_new), self.e_max)
                _sgd(self._f_params, loss, ks.foundation.momentum, c.foundation_lr, c.momentum)
            else:
                with torch.no_grad():
                    self.foundation(x_new)
            n_replay = c.replay_ratio * len(new) if len(ks.replay) >= c.replay_min else 0
            ids = _ids(new_ids, len(new))
            parts, part_ids = [x_new], [ids]
            for _ in range(c.augment_views):
                parts.append(augment(x_new, self.generator, c.augment))
                part_ids.append(ids)
            if n_replay:
                replayed, replayed_ids = self._sample_replay(ks, n_replay)
                parts.append(self._replayed_input(replayed))
                part_ids.append(replayed_ids)
            x, ids = torch.cat(parts), torch.cat(part_ids)
        else:
            replayed, ids = self._sample_replay(ks, c.replay_only_multiple * c.batch_size)
            x = self._replayed_input(replayed)
            ks.replay_only_steps += 1
        # Step 2: distil into the edge copy (foundation statistics frozen, edge statistics move).
        set_norm_mode(self.foundation, "tbr", update_stats=False)
        with torch.no_grad():
            teacher = self.foundation(x)
        # (With device statistics the edge copy normalizes exactly as the uploader does.)
        set_norm_mode(self.edge, "tbr", update_stats=not self._on_device_stats(ks), momentum=c.tbr_momentum,
                      total_var=c.tbr_total_var, source_share=self.cfg.edge.source_share)
        if self._cloud_layers is not None and ks.split:  # the uploader's layers stay as uploaded
            for name, m in test_time_bn_modules(self.edge).items():
                m.train(name in self._cloud_layers)
        if self.sample_stats and ks.edge.stats is not None:
            ids = ids if self.sample_stats == "own" else torch.full_like(ids, -1)
            set_sample_stats(self.edge, ks.bank.gather(ids, ks.edge.stats, self._norm_layers))
        try:
            logits = self.edge(x)
        finally:
            set_sample_stats(self.edge, None)
        terms = distillation_loss(logits, teacher, self.e_max, c.alpha, c.beta, c.gamma, c.temperature)
        _sgd(self._e_params, terms.total, ks.edge.momentum, c.edge_lr, c.momentum)
        if c.source_pull:
            _pull(self._f_params, self._f_init, c.source_pull)
            _pull(self._e_params, self._e_init, c.source_pull)
        _read_back(self.foundation, self._f_params, ks.foundation)
        _read_back(self.edge, self._e_params, ks.edge)
        ks.steps += 1
        ks.version += 1


def _ids(ids: torch.Tensor | None, n: int) -> torch.Tensor:
    """Statistics ids of ``n`` samples (all -1, unknown, where none were kept)."""
    return ids if ids is not None else torch.full((n,), -1, dtype=torch.long)


def _num_classes(model: nn.Module, image_shape, device) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    h, w, ch = image_shape
    set_norm_mode(model, "source")
    with torch.no_grad():
        return int(model(torch.zeros(2, ch, h, w, device=device)).shape[-1])


def _load(model: nn.Module, params: dict[str, nn.Parameter], state: ModelState) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state.affine[k])
    load_tbr_stats(model, state.stats)


def _pull(params: dict[str, nn.Parameter], source: dict[str, torch.Tensor], weight: float) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.mul_(1 - weight).add_(source[k], alpha=weight)


def _read_back(model: nn.Module, params: dict[str, nn.Parameter], state: ModelState) -> None:
    state.affine = {k: p.detach().clone() for k, p in params.items()}
    state.stats = read_tbr_stats(model)


def _follow_stats(current: dict | None, uploaded: dict, momentum: float, device) -> dict:
    """``uploaded`` statistics (a copy) if ``current`` is None or ``momentum`` >= 1, else ``current``
    moved ``momentum`` of the way toward them (counters taken from the upload)."""
    new = {k: v.to(device, copy=True) for k, v in uploaded.items()}
    if current is None or momentum >= 1:
        return new
    return {k: v if k.endswith("num_batches_tracked") else current[k] + momentum * (v - current[k])
            for k, v in new.items()}


def _sgd(params: dict[str, nn.Parameter], loss: torch.Tensor, momentum_buffers: dict, lr: float,
         momentum: float) -> None:
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    sgd_momentum_step(params, dict(zip(names, grads)), momentum_buffers, lr, momentum)
