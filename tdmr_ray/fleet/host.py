"""A device host: one Ray actor simulating many edge devices over one shared, frozen edge model.

Each device keeps only its own state (:class:`tdmr_ray.cema.EdgeDeviceState`: normalization
affine parameters, TBR statistics, filter state, version, accounting) plus its stream position
and score. Per batch a device applies its newest received parameters, runs the forward pass,
filters, and sends its selected samples to the cloud adapter without waiting for the answer;
at most ``max_in_flight`` uploads per host are unanswered, further ones are dropped (counted).
Between batches the host pulls new parameter versions of its devices' keys from the registry.

After every round the host checkpoints all device states to ``hosts/host-<i>.safetensors`` in the
run's store on the job's storage (local or S3, so a host restarted on another node finds it); a
restarted host (Ray restarts the actor and retries the round) resumes from there.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
import ray
import torch
from safetensors.torch import load, save

from ..cema import EdgeDeviceState, UpdateMessage, make_edge_runner, method_config
from ..registry import Registry
from ..runtime import resolve_model
from ..storage import RunStore
from . import streams
from .streams import DeviceStream

HOST_COUNTERS = ("sent", "acked", "dropped_in_flight", "busy", "rejected", "send_failed")


class DeviceHost:
    def __init__(self, cfg, host_index: int, device_indices: list[int], pools: dict, adapter, run_uri: str):
        torch.set_num_threads(1)
        self.cfg, self.index, self.adapter = cfg, host_index, adapter
        self.pools = pools  # corruption -> (images, labels), shared read-only via the object store
        self.runner = make_edge_runner(cfg.method, resolve_model(cfg.edge, cfg.storage),
                                       method_config(cfg.method, cfg.cema))
        self.registry = Registry.for_storage(cfg.storage)
        self.prefix = f"edge-{cfg.run_name}-"
        self.run_id = getattr(cfg, "run_id", "") or cfg.run_name  # set by run_fleet
        self.devices = [streams.device_id(i) for i in device_indices]
        self.group = {streams.device_id(i): streams.device_group(i, cfg.corruptions) for i in device_indices}
        self.key = {d: (d if cfg.key_by == "device" else g) for d, g in self.group.items()}
        self.control = {d: streams.is_control(d, cfg.control_fraction, cfg.seed) for d in self.devices}
        self.streams = {d: DeviceStream(d, len(pools[g][1]), cfg.batch_size, cfg.seed) for d, g in self.group.items()}
        self.state = {d: self.runner.new_device(d) for d in self.devices}
        self.position = dict.fromkeys(self.devices, 0)
        self.correct = dict.fromkeys(self.devices, 0)
        self.counters = dict.fromkeys(HOST_COUNTERS, 0)
        self.key_version: dict[str, int] = {}
        self.in_flight: list = []  # (ref, n_samples)
        self.latencies: list[float] = []
        self.trigger_sent_at: dict[int, float] = {}  # registry version -> when its trigger upload left
        self.store = RunStore(run_uri)
        self.ckpt = f"hosts/host-{host_index}.safetensors"
        self.restored = self._restore()

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # -- the simulation ---------------------------------------------------------------------
    def run_round(self, n_batches: int) -> dict:
        """Every unfinished device runs up to ``n_batches`` batches; returns this round's numbers."""
        start = time.perf_counter()
        seen0 = sum(s.accounting.seen for s in self.state.values())
        up0 = sum(s.accounting.uploaded for s in self.state.values())
        correct0 = sum(self.correct.values())
        arms0 = self._arms()
        for _ in range(n_batches):
            self._pull_updates()
            for d in self.devices:
                if self.position[d] < self.cfg.batches_per_device:
                    self._device_batch(d)
            self._collect(block=False)
        self._checkpoint()
        return {"host": self.index, "seconds": time.perf_counter() - start,
                "seen": sum(s.accounting.seen for s in self.state.values()) - seen0,
                "uploaded": sum(s.accounting.uploaded for s in self.state.values()) - up0,
                "correct": sum(self.correct.values()) - correct0,
                "arms": {arm: [a - b for a, b in zip(now, arms0[arm])] for arm, now in self._arms().items()},
                "done": all(p >= self.cfg.batches_per_device for p in self.position.values())}

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
        before = state.version
        result = self.runner.infer(state, images[idx])
        if state.version != before and state.version in self.trigger_sent_at:
            self.latencies.append(time.time() - self.trigger_sent_at[state.version])
        self.correct[d] += int((result.predictions.numpy() == labels[idx]).sum())
        self.position[d] = b + 1
        upload = result.upload
        if upload is None or not len(upload) or self.adapter is None:
            return
        if len(self.in_flight) >= self.cfg.max_in_flight:
            self._collect(block=False)
        if len(self.in_flight) >= self.cfg.max_in_flight:
            self.counters["dropped_in_flight"] += len(upload)
            return
        self.counters["sent"] += len(upload)
        self.in_flight.append((self.adapter.upload.remote(upload, self.key[d], time.time()), len(upload)))

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

    def _pull_updates(self) -> None:
        """Offer each key's newest registry version to the key's devices (applied before their next batch)."""
        if self.adapter is None:  # no cloud in this run: nothing of its own to apply
            return
        for key in set(self.key.values()):
            name = self.prefix + key
            version = self.registry.latest_version(name)
            if version is None or version <= self.key_version.get(key, 0):
                continue
            params, meta = self.registry.load_tensors(name, version)
            self.key_version[key] = version
            if meta.get("run_id") != self.run_id:  # another run's parameters (same run name)
                continue
            self.trigger_sent_at[version] = float(meta.get("trigger_sent_at") or time.time())
            update = UpdateMessage(key, version, params)
            for d in self.devices:
                if self.key[d] == key and not self.control[d]:
                    self.state[d].offer(update)

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
        flat = {}
        for i, d in enumerate(self.devices):
            for k, v in self.state[d].to_tensors().items():
                flat[f"{i}.{k}"] = v
            flat[f"{i}.position"] = torch.tensor(self.position[d])
            flat[f"{i}.correct"] = torch.tensor(self.correct[d])
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
        per_device = defaultdict(dict)
        for k, v in flat.items():
            head, _, rest = k.partition(".")
            if head == "counters":
                self.counters[rest] = int(v)
            elif head == "key_version":
                pass  # not restored: updates offered but not yet applied were lost; offer the newest again
            else:
                per_device[int(head)][rest] = v
        for i, d in enumerate(self.devices):
            entry = per_device[i]
            self.position[d] = int(entry.pop("position"))
            self.correct[d] = int(entry.pop("correct"))
            self.state[d] = EdgeDeviceState.from_tensors(entry)
            if self.state[d].device_id != d:
                raise ValueError(f"{self.ckpt}: device {i} is {self.state[d].device_id}, expected {d}")
        return True


def _rss_bytes() -> int:
    """Resident memory of this process (Linux), for the benchmark's memory per device."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
