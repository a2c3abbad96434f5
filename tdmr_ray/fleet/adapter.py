"""The cloud adapter actor: one per fleet, serving every device host.

``upload`` is quick: it validates, writes the samples to the write-ahead log (a Parquet part per
upload, under ``uploads/`` of the run's store on the job's storage, local or S3; compacted into segments at each checkpoint), queues them and
acknowledges. A worker thread takes queued uploads in order, runs CEMA's cloud steps
(:class:`tdmr_ray.cema.CloudAdapter`) and publishes each new parameter version to the registry
(``edge-<run>-<key>``), where devices and Serve pick it up.

Durability: an acknowledged upload is on disk. The adapter state is checkpointed to the registry
(``cema-adapter-<run>``) every ``checkpoint_every_s`` with the last WAL sequence it includes; after
a restart the actor loads that checkpoint and re-queues the logged uploads after it, so no
acknowledged sample is lost. Uploads are deduplicated by (device, batch) because Ray retries calls
that were in flight when the actor died. Backpressure: when ``adapter_queue_samples`` are waiting,
``upload`` answers ``busy`` and logs nothing; the device drops the sample and keeps inferring.
"""
from __future__ import annotations

import io
import queue
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..cema import CloudAdapter, UploadMessage, method_config
from ..registry import Registry
from ..runtime import resolve_model
from ..storage import RunStore

WAL_SCHEMA = pa.schema([("seq", pa.int64()), ("device_id", pa.string()), ("key", pa.string()),
                        ("batch", pa.int64()), ("param_version", pa.int64()), ("sent_at", pa.float64()),
                        ("height", pa.int32()), ("width", pa.int32()), ("channels", pa.int32()),
                        ("image", pa.binary()),
                        # the device's TBR statistics (safetensors bytes, first row of an upload only;
                        # EdgeConfig.stats_source="upload") and its shift count (ShiftConfig)
                        ("stats", pa.binary()), ("shift_epoch", pa.int64())])


def write_parquet(store: RunStore, name: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write(name, buf.getvalue())


def read_uploads(run_uri: str, after_seq: int = -1) -> pa.Table:
    """The logged uploads (one row per sample) of a fleet run, in sequence order."""
    store = RunStore(run_uri)
    files = [f for f in store.list("uploads") if f.endswith(".parquet")]
    if not files:
        return WAL_SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(io.BytesIO(store.read(f))) for f in files])
    table = table.filter(pa.compute.greater(table["seq"], after_seq))
    return table.sort_by([("seq", "ascending")])


class CloudAdapterActor:
    def __init__(self, cfg, run_uri: str, base_ref: str):
        self.cfg = cfg
        self.base_ref = base_ref  # the edge model version the parameter sets apply to
        self.run_uri = run_uri
        self.store = RunStore(run_uri)
        self.registry = Registry.for_storage(cfg.storage)
        self.prefix = f"edge-{cfg.run_name}-"
        self.run_id = getattr(cfg, "run_id", "") or cfg.run_name  # set by run_fleet
        self.state_name = f"cema-adapter-{self.run_id}"  # per run: a fresh run never restores another's
        device = "cuda" if cfg.adapter_gpu and torch.cuda.is_available() else "cpu"
        torch.set_num_threads(1)
        cema_cfg = method_config(cfg.method, cfg.cema)
        self.core = CloudAdapter(resolve_model(cfg.foundation, cfg.storage), resolve_model(cfg.edge, cfg.storage),
                                 cema_cfg, device=device)
        self.counters = {"acked_uploads": 0, "acked_samples": 0, "busy": 0, "rejected": 0, "duplicates": 0,
                         "processed_samples": 0, "published": 0, "checkpoints": 0, "restored_from": 0,
                         "replayed_samples": 0}
        self.rejections: list[str] = []
        self.seq = 0
        self.seen: set[tuple[str, int]] = set()
        self.queue: queue.Queue = queue.Queue()
        self.queued_samples = 0
        self.lock = threading.Lock()  # bookkeeping: WAL, queue size, counters (held briefly)
        self.core_lock = threading.Lock()  # the adaptation state (held for a whole cloud step)
        self.processed_through = 0
        self.last_checkpoint = time.monotonic()
        self.latencies: list[float] = []
        self._restore()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    # -- called by device hosts --------------------------------------------------------------
    def upload(self, msg: UploadMessage, key: str, sent_at: float) -> dict:
        try:
            self.core.validate(msg)
            if not len(msg):
                raise ValueError("empty upload")
        except Exception as exc:  # anything malformed is counted, never fatal
            self.counters["rejected"] += 1
            if len(self.rejections) < 20:
                self.rejections.append(str(exc)[:200])
            return {"status": "rejected", "error": str(exc)}
        ident = (msg.device_id, int(msg.seq))
        with self.lock:
            if ident in self.seen:
                self.counters["duplicates"] += 1
                return {"status": "ok", "duplicate": True}
            if self.queued_samples + len(msg) > self.cfg.adapter_queue_samples:
                self.counters["busy"] += 1
                return {"status": "busy"}
            self.seq += 1
            seq = self.seq
            self._log(seq, msg, key, sent_at)  # durable before the acknowledgement
            self.seen.add(ident)
            self.queued_samples += len(msg)
            self.counters["acked_uploads"] += 1
            self.counters["acked_samples"] += len(msg)
        self.queue.put((seq, msg, key, sent_at))
        return {"status": "ok", "seq": seq}

    def stats(self) -> dict:
        from .host import _rss_bytes

        return {**self.counters, "queued_samples": self.queued_samples, "seq": self.seq, "rss_bytes": _rss_bytes(),
                "processed_through": self.processed_through, "rejection_examples": self.rejections[:5],
                "publish_latency_s": list(self.latencies)}

    def drain(self, timeout_s: float = 600) -> dict:
        """Wait until every queued upload is processed, checkpoint, and return the stats."""
        deadline = time.monotonic() + timeout_s
        while self.queued_samples and time.monotonic() < deadline:
            time.sleep(0.05)
        self.checkpoint()
        return self.stats()

    def checkpoint(self) -> None:
        with self.core_lock:  # between two steps: the state and processed_through agree
            through = self.processed_through
            state = self.core.state_dict()
        self.registry.publish(self.state_name, state, kind="adapter-state", format="cema-cloud",
                              extra={"wal_through": through, "seq": self.seq})
        with self.lock:
            self._compact()
            self.counters["checkpoints"] += 1
        self.last_checkpoint = time.monotonic()

    # -- internals ---------------------------------------------------------------------------
    def _log(self, seq: int, msg: UploadMessage, key: str, sent_at: float) -> None:
        n, (h, w, c) = len(msg), msg.images.shape[1:]
        stats = [save_tensors(msg.stats) if msg.stats is not None else None] + [None] * (n - 1)
        table = pa.table({"stats": stats, "shift_epoch": [int(msg.shift_epoch)] * n, "seq": [seq] * n, "device_id": [msg.device_id] * n, "key": [key] * n,
                          "batch": [int(msg.seq)] * n, "param_version": [int(msg.param_version)] * n,
                          "sent_at": [sent_at] * n, "height": [h] * n, "width": [w] * n, "channels": [c] * n,
                          "image": [img.tobytes() for img in msg.images]}, schema=WAL_SCHEMA)
        write_parquet(self.store, f"uploads/part-{seq:010d}.parquet", table)

    def _compact(self) -> None:
        """Merge the per-upload parts into one segment (for audit and replay)."""
        parts = [f for f in self.store.list("uploads") if f.startswith("uploads/part-")]
        if len(parts) < 2:
            return
        table = pa.concat_tables([pq.read_table(io.BytesIO(self.store.read(p))) for p in parts])
        first, last = (p.split("-")[1].split(".")[0] for p in (parts[0], parts[-1]))
        write_parquet(self.store, f"uploads/segment-{first}-{last}.parquet", table)
        for p in parts:
            self.store.delete(p)

    def _restore(self) -> None:
        through = 0
        if self.registry.latest_version(self.state_name) is not None:
            state, meta = self.registry.load_tensors(self.state_name)
            self.core.load_state_dict(state)
            through = int(meta["wal_through"])
            self.counters["restored_from"] = meta["version"]
        logged = read_uploads(self.run_uri)
        if logged.num_rows:
            self.seq = int(pa.compute.max(logged["seq"]).as_py())
            ids = set(zip(logged["device_id"].to_pylist(), logged["batch"].to_pylist()))
            self.seen = ids
            self.counters["acked_samples"] = logged.num_rows
            self.counters["acked_uploads"] = len(ids)
        self.processed_through = through
        todo = logged.filter(pa.compute.greater(logged["seq"], through))
        self.counters["processed_samples"] = logged.num_rows - todo.num_rows  # in the checkpointed state
        for seq, rows in _group_by_seq(todo):
            images = np.stack([np.frombuffer(b, np.uint8).reshape(h, w, c) for b, h, w, c in
                               zip(rows["image"], rows["height"], rows["width"], rows["channels"])])
            stats = rows.get("stats", [None])[0]
            msg = UploadMessage(rows["device_id"][0], images, rows["param_version"][0], None, rows["batch"][0],
                                shift_epoch=int((rows.get("shift_epoch") or [0])[0] or 0),
                                stats=load_tensors(stats) if stats else None)
            self.queued_samples += len(images)
            self.counters["replayed_samples"] += len(images)
            self.queue.put((seq, msg, rows["key"][0], rows["sent_at"][0]))

    def _work(self) -> None:
        while True:
            seq, msg, key, sent_at = self.queue.get()
            published = False
            try:
                with self.core_lock:
                    update = self.core.process(msg, key)
                    if update is not None:
                        self.registry.publish_edge_params(
                            self.prefix + key, update.params, base=self.base_ref,
                            extra={"adapter_version": update.version, "trigger_sent_at": sent_at,
                                   "run_id": self.run_id,
                                   "trigger": f"{msg.device_id}#{msg.seq}"})
                        published = True
                    self.processed_through = seq
            except Exception as exc:  # a failing step must not stop the adapter
                print(f"[adapter] step on upload {seq} failed: {exc}", flush=True)
                with self.core_lock:
                    self.processed_through = seq
            with self.lock:
                self.counters["processed_samples"] += len(msg)
                self.queued_samples -= len(msg)
                if published:
                    self.counters["published"] += 1
                    self.latencies.append(time.time() - sent_at)
            if time.monotonic() - self.last_checkpoint > self.cfg.checkpoint_every_s:
                self.checkpoint()


def _group_by_seq(table: pa.Table):
    cols = table.to_pydict()
    start = 0
    seqs = cols["seq"]
    for i in range(1, len(seqs) + 1):
        if i == len(seqs) or seqs[i] != seqs[start]:
            yield seqs[start], {k: v[start:i] for k, v in cols.items()}
            start = i
