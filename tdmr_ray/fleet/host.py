"""A device host: one Ray actor simulating many edge devices over one shared, frozen edge model.

Each device keeps only its own state (:class:`tdmr_ray.cema.EdgeDeviceState`: normalization
affine parameters, TBR statistics, filter state, version, accounting) plus its stream position
and score; between batches its parameters and statistics are rows of the host's
:class:`~tdmr_ray.fleet.state_bank.StateBank` (a few stacked matrices, not ~100 tensors per
device). Per batch a device runs the forward pass, filters, and sends its selected samples to its
key's adapter shard without waiting for the answer; at most ``max_in_flight`` uploads per host are unanswered, further ones are dropped (counted).

Budget: every ``poll_interval_s`` the host reads each shard's version board
(:meth:`CloudAdapterActor.poll`): the newest parameter version per key, which the host applies at
once to all of the key's treatment devices (as a device applies a pushed update on receipt: one
validation and one indexed write into the bank per version, whatever the key's size), and the
upload rate per key the shard can process.
The host spends that rate (split over the hosts) as a token bucket per key
(:mod:`tdmr_ray.fleet.budget`): a device sends its lowest-entropy candidates (the most reliable, as
CEMA's filter ranks them) within the budget and keeps the rest ("unsent", counted), so bandwidth goes
only to samples the cloud will use.

After every ``round_batches`` batches per device the host checkpoints all device states (as columns:
one stacked tensor per state key) to ``hosts/host-<i>.safetensors`` in the run's store on the job's storage (local or S3, so a host restarted on another node finds it); a
restarted host (Ray restarts the actor and retries its call) resumes from there.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from collections import defaultdict

import numpy as np
import ray
import torch
from safetensors.torch import load, save

from ..cema import EdgeDeviceState, UpdateMessage, UploadMessage, make_edge_runner
from ..runtime import resolve_model
from ..storage import RunStore
from . import streams
from .adapter import shard_of
from .budget import UploadBudget
from .state_bank import StateBank, pack_columns, unpack_columns
from .streams import DeviceStream

# Freed heap pages go back to the OS this often (and at every checkpoint). Measured at 10,000 devices
# x 1 batch, trimming only at the end: the host grew to 2.8 GiB mid-stream and fell to ~1 GiB after
# the final trim, i.e. mostly freed pages held by fragmentation; a trim costs milliseconds.
TRIM_EVERY_BATCHES = 256
HOST_COUNTERS = ("sent", "acked", "unsent", "dropped_in_flight", "busy", "rejected", "send_failed", "bad_updates")


def lowest_entropy(upload: UploadMessage, n: int) -> UploadMessage:
    """``upload`` cut to its ``n`` lowest-entropy samples (kept in batch order)."""
    keep = np.sort(np.argsort(upload.entropies, kind="stable")[:n])
    return dataclasses.replace(upload, images=upload.images[keep], entropies=upload.entropies[keep])


class DeviceHost:
    def __init__(self, cfg, host_index: int, device_indices: list[int], pools: dict, adapters: list,
                 run_uri: str, n_hosts: int = 1, progress=None):
        torch.set_num_threads(1)
        self.cfg, self.index, self.adapters, self.n_hosts = cfg, host_index, adapters, n_hosts
        self.progress, self.posted_at = progress, 0.0  # a FleetProgress actor (None: no progress posts)
        self.pools = pools  # corruption -> (images, labels), shared read-only via the object store
        self.runner = make_edge_runner(cfg.method, resolve_model(cfg.edge, cfg.storage),
                                       cfg.cema_config())
        self.devices = [streams.device_id(i) for i in device_indices]
        self.group = {streams.device_id(i): streams.device_group(i, cfg.corruptions) for i in device_indices}
        self.key = {d: (d if cfg.key_by == "device" else g) for d, g in self.group.items()}
        self.keys = sorted(set(self.key.values()))
        self.shard = {k: shard_of(k, len(adapters)) for k in self.keys}
        self.keys_by_shard: dict[int, list[str]] = defaultdict(list)
        for k in self.keys:
            self.keys_by_shard[self.shard[k]].append(k)
        self.control = {d: streams.is_control(d, cfg.control_fraction, cfg.seed) for d in self.devices}
        # key -> bank rows of this host's treatment devices: a new version is written into all of them
        # at once when the board delivers it (one validation and one indexed write per version)
        self.treatment_rows: dict[str, np.ndarray] = {
            k: np.array([i for i, d in enumerate(self.devices) if self.key[d] == k and not self.control[d]],
                        dtype=np.int64) for k in self.keys}
        self.streams = {d: DeviceStream(d, len(pools[g][1]), cfg.batch_size, cfg.seed) for d, g in self.group.items()}
        # device states, their affine parameters and statistics parked in the bank between batches
        self.bank = StateBank(len(self.devices))
        self.row = {d: i for i, d in enumerate(self.devices)}
        self.state = {}
        for d in self.devices:
            self.state[d] = self.runner.new_device(d)
            self.bank.park(self.row[d], self.state[d])
        self.position = dict.fromkeys(self.devices, 0)
        self.correct = dict.fromkeys(self.devices, 0)
        self.counters = dict.fromkeys(HOST_COUNTERS, 0)
        self.key_version: dict[str, int] = {}
        self.budget = UploadBudget(cfg.min_upload, cfg.burst_s)  # per key: this host's share of its shard's rate
        self.last_poll = 0.0
        self.batches_since_trim = 0
        self.in_flight: list = []  # (ref, n_samples)
        self.latencies: list[float] = []
        # key -> the newest trigger version (one that included new uploads) whose latency this host measured
        self.measured_trigger: dict[str, int] = {}
        self.store = RunStore(run_uri)
        self.ckpt = f"hosts/host-{host_index}.safetensors"
        self.restored = self._restore()

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # -- the simulation ---------------------------------------------------------------------
    def run_round(self, n_batches: int) -> dict:
        """Every unfinished device runs up to ``n_batches`` batches, the host checkpointing after every
        ``round_batches`` of them and posting its running totals to the progress actor every
        ``progress_interval_s``; returns when it is done (the totals go to the progress actor). (The driver gives each host its whole
        stream in one call: hosts run free, no barrier between them.)"""
        start = time.perf_counter()
        # (a host Ray restarted and retried from its checkpoint runs only the sweeps still missing)
        sweeps = max(0, min(n_batches, self.cfg.batches_per_device - min(self.position.values(), default=0)))
        for sweep_index in range(sweeps):
            sweep = time.monotonic()
            for j, d in enumerate(self.devices):
                # device_interval_s: each device runs a batch that often (a camera's pace), spread evenly
                due = sweep + j * self.cfg.device_interval_s / len(self.devices)
                while time.monotonic() < due:  # keep reading the boards while waiting
                    time.sleep(min(due - time.monotonic(), self.cfg.poll_interval_s))
                    self._poll()
                if time.monotonic() - self.last_poll >= self.cfg.poll_interval_s:
                    self._poll()
                if self.position[d] < self.cfg.batches_per_device:
                    self._device_batch(d)
                    self.batches_since_trim += 1
                    if self.batches_since_trim >= TRIM_EVERY_BATCHES:
                        release_freed_memory()
                        self.batches_since_trim = 0
                if time.monotonic() - self.posted_at >= self.cfg.progress_interval_s:
                    self._post_progress()
            self._collect(block=False)
            if (sweep_index + 1) % self.cfg.round_batches == 0 or sweep_index + 1 == sweeps:
                self._checkpoint()
                release_freed_memory()
                self.batches_since_trim = 0
        self._post_progress(wait=True)  # (the driver reads the totals once this call returns)
        return {"host": self.index, "seconds": time.perf_counter() - start,
                "done": all(p >= self.cfg.batches_per_device for p in self.position.values())}

    def totals(self) -> dict:
        """Running totals of this host's devices (cumulative, so a lost or repeated post is harmless)."""
        return {"seen": sum(s.accounting.seen for s in self.state.values()),
                "uploaded": sum(s.accounting.uploaded for s in self.state.values()),
                "correct": sum(self.correct.values()), "arms": self._arms(),
                "done": all(p >= self.cfg.batches_per_device for p in self.position.values())}

    def _post_progress(self, wait: bool = False) -> None:
        self.posted_at = time.monotonic()
        if self.progress is None:
            return
        ref = self.progress.post.remote(self.index, self.totals())  # fire and forget, except the last
        if wait:
            try:
                ray.get(ref, timeout=30)
            except (ray.exceptions.RayError, TimeoutError):  # progress lines are not worth failing the run
                pass

    def _arms(self) -> dict[str, list[int]]:
        """(seen, correct) of the treatment and the control devices."""
        out = {"treatment": [0, 0], "control": [0, 0]}
        for d in self.devices:
            arm = out["control" if self.control[d] else "treatment"]
            arm[0] += self.state[d].accounting.seen
            arm[1] += self.correct[d]
        return out

    def _device_batch(self, d: str) -> None:
        state, b = self.state[d], self.position[d]
        images, labels = self.pools[self.group[d]]
        idx = self.streams[d].indices(b)
        self.bank.unpark(self.row[d], state)
        try:
            result = self.runner.infer(state, images[idx])
        finally:
            self.bank.park(self.row[d], state)
        self.correct[d] += int((result.predictions.numpy() == labels[idx]).sum())
        self.position[d] = b + 1
        upload = result.upload
        if upload is None or not len(upload) or not self.adapters:
            return
        upload = self._within_budget(self.key[d], upload)
        if upload is None:
            return
        if len(self.in_flight) >= self.cfg.max_in_flight:
            self._collect(block=False)
        if len(self.in_flight) >= self.cfg.max_in_flight:
            self.counters["dropped_in_flight"] += len(upload)
            return
        self.counters["sent"] += len(upload)
        adapter = self.adapters[self.shard[self.key[d]]]
        self.in_flight.append((adapter.upload.remote(upload, self.key[d], time.time()), len(upload)))

    def _within_budget(self, key: str, upload: UploadMessage) -> UploadMessage | None:
        """The part of ``upload`` the key's budget pays for (None: nothing is sent)."""
        n = self.budget.allow(key, len(upload))
        self.counters["unsent"] += len(upload) - n
        if n == 0:
            return None
        return upload if n == len(upload) else lowest_entropy(upload, n)

    def _collect(self, block: bool) -> None:
        if not self.in_flight:
            return
        refs = [r for r, _ in self.in_flight]
        ready, _ = ray.wait(refs, num_returns=len(refs) if block else len(refs), timeout=None if block else 0)
        ready = set(ready)
        still = []
        for ref, n in self.in_flight:
            if ref not in ready:
                still.append((ref, n))
                continue
            try:
                status = ray.get(ref).get("status")
            except ray.exceptions.RayError:
                status = "send_failed"
            self.counters[{"ok": "acked", "busy": "busy", "rejected": "rejected"}.get(status, "send_failed")] += n
        self.in_flight = still

    def _poll(self) -> None:
        """Read each shard's version board: apply new versions to the keys' treatment devices and
        take the shards' upload rates."""
        self.last_poll = time.monotonic()
        if not self.adapters:  # no cloud in this run: nothing of its own to apply
            return
        refs = [self.adapters[i].poll.remote(dict(self.key_version), keys) for i, keys in self.keys_by_shard.items()]
        try:
            boards = ray.get(refs, timeout=self.cfg.poll_timeout_s)
        except (ray.exceptions.RayError, TimeoutError):  # a shard restarting: try again next time
            return
        for board in boards:
            for key, rate in board["rates"].items():
                self.budget.set_rate(key, rate / self.n_hosts)
            for key, (version, params, stats, sent_at, trigger_version) in board["updates"].items():
                if version <= self.key_version.get(key, 0):
                    continue
                self.key_version[key] = version
                if not self._apply(UpdateMessage(key, version, params, stats)):
                    continue
                if sent_at is not None and self.measured_trigger.get(key, 0) < trigger_version <= version:
                    # the first version applied here with the uploads of that trigger in it
                    self.measured_trigger[key] = trigger_version
                    self.latencies.append(time.time() - sent_at)

    def _apply(self, update: UpdateMessage) -> bool:
        """Apply ``update`` to every treatment device of its key on this host, as a device applies a
        pushed update on receipt (its next frame uses it); False if none needs it or it is malformed.
        Devices that already hold this version or a newer one (a host restored from its checkpoint)
        are left alone. Statistics on the board (edge.stats_source="split": the cloud's later layers)
        replace those layers' in the devices that have statistics; a device that has run no batch yet
        starts its own from its first one. (Devices are parked here: polls run between batches.)"""
        rows = self.treatment_rows.get(update.key)
        if rows is None:
            return False
        rows = rows[[self.state[self.devices[i]].version < update.version for i in rows]]
        if not len(rows):
            return False
        first = self.state[self.devices[rows[0]]]
        self.bank.unpark(int(rows[0]), first)
        try:
            first.check_update(update)  # one device checks for all: the key's devices share a layout
        except ValueError as exc:
            self.counters["bad_updates"] += 1
            print(f"[host {self.index}] {exc}; not applied", flush=True)
            return False
        finally:
            self.bank.park(int(rows[0]), first)
        self.bank.fill("affine", rows, {k: v.float() for k, v in update.params.items()})
        if update.stats:
            self.bank.fill("stats", rows, update.stats, partial=True)
        nbytes = update.nbytes  # (a sum over the parameter set: once per version, not per device)
        for i in rows.tolist():
            state = self.state[self.devices[i]]
            acc = state.accounting
            acc.updates_received += 1
            acc.updates_applied += 1
            acc.bytes_down += nbytes
            state.version = update.version
        return True

    # -- reporting and checkpoints -------------------------------------------------------------
    def finish(self) -> dict:
        """Wait for every in-flight upload; return per-device results and host counters."""
        self._collect(block=True)
        self._checkpoint()
        return {"host": self.index, "counters": dict(self.counters), "latencies": list(self.latencies),
                "restored": self.restored, "node": ray.get_runtime_context().get_node_id(),
                "rss_bytes": _rss_bytes(),
                "devices": {d: {"group": self.group[d], "control": self.control[d],
                                "seen": self.state[d].accounting.seen,
                                "correct": self.correct[d], "version": self.state[d].version,
                                "accounting": self.state[d].accounting.as_dict()} for d in self.devices}}

    def _checkpoint(self) -> None:
        self._collect(block=True)  # no upload in flight: the saved counters are final (acks are quick)
        per_device = []
        for d in self.devices:
            entry = self.state[d].to_tensors()
            entry["position"] = torch.tensor(self.position[d])
            entry["correct"] = torch.tensor(self.correct[d])
            per_device.append(entry)
        flat = pack_columns(per_device) | self.bank.columns()  # (parked states: no affine or stats entries)
        for k, v in self.counters.items():
            flat[f"counters.{k}"] = torch.tensor(v)
        for k, v in self.key_version.items():
            flat[f"key_version.{k}"] = torch.tensor(v)
        self.store.write(self.ckpt, save(flat))

    def _restore(self) -> bool:
        data = self.store.read(self.ckpt)
        if data is None:
            return False
        flat = load(data)
        for k, v in flat.items():
            head, _, rest = k.partition(".")
            if head == "counters":
                self.counters[rest] = int(v)
            elif head == "key_version":  # the devices' rows below hold what was applied up to it
                self.key_version[rest] = self.measured_trigger[rest] = int(v)
        per_device = unpack_columns(flat, len(self.devices))
        for i, d in enumerate(self.devices):
            entry = per_device[i]
            self.position[d] = int(entry.pop("position"))
            self.correct[d] = int(entry.pop("correct"))
            self.state[d] = EdgeDeviceState.from_tensors(entry)
            if self.state[d].device_id != d:
                raise ValueError(f"{self.ckpt}: device {i} is {self.state[d].device_id}, expected {d}")
            self.bank.park(i, self.state[d])
        return True


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc). A host interleaves each batch's large,
    short-lived buffers with every device's small, long-lived state tensors, so freed pages stay
    pinned in the heap: measured in one process, 316 KiB of resident memory per device after two
    batches, 113 KiB after ``malloc_trim``. A no-op where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    """Resident memory of this process (Linux), for the benchmark's memory per device."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
