"""The cloud adapter actor: one shard of the fleet's cloud side, owning a set of keys.

Keys (groups or devices) are spread over ``--adapters`` shards by a stable hash
(:func:`shard_of`); hosts send each upload to its key's shard.

``upload`` is quick: it validates, writes the samples to the shard's write-ahead log (a Parquet
part per upload under ``uploads/`` of the run's store, local or S3; compacted into segments at each
checkpoint), queues them on the key's queue and acknowledges. A worker thread serves the keys'
queues round-robin (fair share: one busy group cannot starve another), takes up to
``coalesce`` cloud batches of one key at a time, runs CEMA's cloud steps
(:class:`tdmr_ray.cema.CloudAdapter`; replay-only steps only once the shard has been idle for
``adapter_replay_idle_s``) and publishes the
newest parameters once per turn to the registry (``edge-<run>-<key>``, what Serve reads) and to the
shard's *version board*, which hosts read with :meth:`CloudAdapterActor.poll` between device
batches: new versions reach devices without any registry polling.

Capacity: the shard measures how many samples per busy second its steps process and advertises
a rate per key (in every acknowledgement and poll): its capacity split over the active keys,
scaled up when the key's queue is short and down when it is long. Hosts spend it as a token
bucket: a device sends its lowest-entropy candidates within the budget and never sends the rest
(counted as unsent), instead of sending them to be refused. Uploads beyond a key's queue share
are still refused ("busy", counted).

Durability: an acknowledged upload is in the log. The state is checkpointed to the registry
(``cema-adapter-<run>[-shard<i>]``) every ``checkpoint_every_s`` with the log position it includes
(every sequence number up to ``wal_low`` and those listed in ``processed_above``); a restarted
shard loads the newest checkpoint that reads back (a corrupt one falls back to the previous),
re-queues the logged uploads it does not include, and deduplicates the calls Ray retries
(per-device recent batch numbers). Storage writes are retried with backoff; an upload whose log
write keeps failing is answered ``error`` (not acknowledged), a failing checkpoint or publish is
counted and retried later: none of them stops the worker.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import deque

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..cema import CloudAdapter, UploadMessage
from ..registry import Registry
from ..runtime import resolve_model
from ..storage import RunStore
from .upload_log import WAL_SCHEMA, compact, group_by_seq, last_seq, log_files, read_uploads, retry, write_parquet

RECENT_BATCHES = 64  # per device: batch numbers remembered to drop retried calls
REPLAY_CREDIT_CAP = 4  # replay-only steps a key may be owed (a busy shard does not pile up a backlog)


def shard_of(key: str, shards: int) -> int:
    """The shard that owns ``key``: a stable hash, the same in every process and run."""
    # (sha1, not crc32: crc32 is linear, and names that differ in one character share its low bits)
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % max(1, shards)


class CloudAdapterActor:
    def __init__(self, cfg, run_uri: str, base_ref: str, shard: int = 0, shards: int = 1):
        self.cfg = cfg
        self.base_ref = base_ref  # the edge model version the parameter sets apply to
        self.run_uri, self.shard, self.shards = run_uri, shard, shards
        self.store = RunStore(run_uri)
        self.registry = Registry.for_storage(cfg.storage)
        self.prefix = f"edge-{cfg.run_name}-"
        self.run_id = getattr(cfg, "run_id", "") or cfg.run_name  # set by run_fleet
        # per run (a fresh run never restores another's) and per shard (one writer per name)
        self.state_name = f"cema-adapter-{self.run_id}" + (f"-shard{shard}" if shards > 1 else "")
        device = "cuda" if cfg.adapter_gpus and torch.cuda.is_available() else "cpu"
        torch.set_num_threads(1)
        cema_cfg = cfg.cema_config()
        self.batch = cema_cfg.cloud.batch_size
        self.core = CloudAdapter(resolve_model(cfg.foundation, cfg.storage), resolve_model(cfg.edge, cfg.storage),
                                 cema_cfg, device=device)
        self.counters = {"acked_uploads": 0, "acked_samples": 0, "busy": 0, "rejected": 0, "duplicates": 0,
                         "log_failures": 0, "processed_samples": 0, "failed_steps": 0, "steps": 0, "published": 0,
                         "publish_failures": 0, "checkpoints": 0, "checkpoint_failures": 0, "restored_from": 0,
                         "replayed_samples": 0, "busy_s": 0.0, "replay_only_steps": 0, "replay_only_s": 0.0}
        self.rejections: list[str] = []
        self.seq = 0
        self.recent: dict[str, set[int]] = {}  # device -> recent batch numbers (dedup of retried calls)
        self.queues: dict[str, deque] = {}  # key -> (seq, msg, sent_at), oldest first
        self.queued: dict[str, int] = {}  # key -> queued samples
        self.last_seen: dict[str, float] = {}  # key -> last upload (active keys share the capacity)
        self.order: deque[str] = deque()  # round-robin order of keys
        self.in_process: set[int] = set()  # seqs taken by the worker, not yet done
        self.processed_above: set[int] = set()  # done seqs above wal_low
        self.wal_low = 0  # every seq <= wal_low is processed
        # key -> (version, params, sent_at, trigger version): sent_at = when the oldest upload of the newest
        # version that included new uploads (the trigger) left its device (None before any)
        self.board: dict[str, tuple[int, dict, float | None, int]] = {}
        self.replay_credit: dict[str, int] = {}  # key -> replay-only steps owed (uploads that completed no batch)
        self.capacity = 2.0 * self.batch  # samples per busy second, measured from the first turn on
        self._work_ema = [2.0 * self.batch, 1.0]  # moving sums of (samples, busy seconds) per turn
        self.cv = threading.Condition()  # guards the bookkeeping above (held briefly)
        self.core_lock = threading.Lock()  # the adaptation state (held for a whole turn)
        self.last_checkpoint = time.monotonic()
        self.last_work = time.monotonic()  # the end of the last turn on new samples (idle replay waits on it)
        self.cpu_start = time.process_time()
        self.latencies: list[float] = []
        self._restore()
        self.stopping = threading.Event()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    # -- called by device hosts --------------------------------------------------------------
    def upload(self, msg: UploadMessage, key: str, sent_at: float) -> dict:
        try:
            self.core.validate(msg)
            if not len(msg):
                raise ValueError("empty upload")
            if shard_of(key, self.shards) != self.shard:
                raise ValueError(f"key {key!r} belongs to shard {shard_of(key, self.shards)}, not {self.shard}")
        except Exception as exc:  # anything malformed is counted, never fatal
            with self.cv:
                self.counters["rejected"] += 1
                if len(self.rejections) < 20:
                    self.rejections.append(str(exc)[:200])
            return {"status": "rejected", "error": str(exc)}
        with self.cv:
            recent = self.recent.setdefault(msg.device_id, set())
            if int(msg.seq) in recent:
                self.counters["duplicates"] += 1
                return {"status": "ok", "duplicate": True, "rate": self._rate(key)}
            if self.queued.get(key, 0) + len(msg) > self._key_share():
                self.counters["busy"] += 1
                return {"status": "busy", "rate": self._rate(key)}
            self.seq += 1
            seq = self.seq
            try:  # durable before the acknowledgement; the log holds the lock so seqs stay ordered
                retry(lambda: self._log(seq, msg, key, sent_at), f"upload log write (seq {seq})")
            except OSError as exc:
                self.seq -= 1
                self.counters["log_failures"] += 1
                return {"status": "error", "error": str(exc)[:300]}
            recent.add(int(msg.seq))
            if len(recent) > 2 * RECENT_BATCHES:
                top = max(recent)
                recent.intersection_update(range(top - RECENT_BATCHES, top + 1))
            self._enqueue(seq, msg, key, sent_at)
            self.counters["acked_uploads"] += 1
            self.counters["acked_samples"] += len(msg)
            return {"status": "ok", "seq": seq, "rate": self._rate(key)}

    def poll(self, have: dict[str, int], keys: list[str]) -> dict:
        """The version board: newer parameter sets than ``have`` (key -> version) for ``keys``, as
        {key: (version, params, stats, sent_at, trigger version)} (see ``self.board``), and the upload rate
        (samples/s) per key."""
        with self.cv:
            updates = {k: self.board[k] for k in keys if k in self.board and self.board[k][0] > have.get(k, 0)}
            return {"updates": updates, "rates": {k: self._rate(k) for k in keys}}

    def stats(self) -> dict:
        from .host import _rss_bytes

        with self.cv:
            return {**self.counters, "queued_samples": sum(self.queued.values()), "seq": self.seq,
                    "shard": self.shard, "rss_bytes": _rss_bytes(), "wal_low": self.wal_low,
                    "capacity_samples_per_s": round(self.capacity, 1),
                    "cpu_s": round(time.process_time() - self.cpu_start, 3),  # the whole process
                    "rejection_examples": self.rejections[:5], "publish_latency_s": list(self.latencies)}

    def drain(self, timeout_s: float = 600) -> dict:
        """Wait until every queued upload is processed, checkpoint, and return the stats."""
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while (any(self.queued.values()) or self.in_process) and time.monotonic() < deadline:
                self.cv.wait(0.5)
        self.checkpoint()
        return self.stats()

    def stop(self, timeout_s: float = 60) -> None:
        """Stop the worker thread after its current step (an in-process shard; an actor ends with its
        process). Queued uploads stay in the log for a restart."""
        self.stopping.set()
        with self.cv:
            self.cv.notify_all()
        self.worker.join(timeout_s)

    def checkpoint(self) -> None:
        with self.core_lock:  # between two turns: the state and the processed seqs agree
            with self.cv:
                low, above = self.wal_low, sorted(self.processed_above)
                # read with the counts: an upload acknowledged after them must count again on restore
                counts = {k: self.counters[k] for k in ("processed_samples", "acked_samples", "acked_uploads")}
                seq = self.seq
            state = self.core.state_dict()
        retry(lambda: self.registry.publish(self.state_name, state, kind="adapter-state", format="cema-cloud",
                                            extra={"wal_low": low, "processed_above": above, "seq": seq,
                                                   "shard": self.shard, **counts}),
              f"adapter checkpoint {self.state_name}")
        with self.cv:
            self.counters["checkpoints"] += 1
        try:
            compact(self.store, self.shard)
        except Exception as exc:  # the parts stay and are compacted next time
            print(f"[adapter {self.shard}] compacting the upload log failed: {exc}", flush=True)
        self.last_checkpoint = time.monotonic()

    # -- internals ---------------------------------------------------------------------------
    def _key_share(self) -> int:
        """Queued samples one key may hold: the queue split over the active keys (fair share)."""
        return max(2 * self.batch, self.cfg.adapter_queue_samples // max(1, self._active_keys()))

    def _active_keys(self) -> int:
        now = time.monotonic()
        return sum(1 for t in self.last_seen.values() if now - t < 30) or 1

    def _rate(self, key: str) -> float:
        """Samples/s the hosts may send for ``key``: 90% of the measured capacity split over the
        active keys, scaled from x2 with an empty queue down to x0 at twice the target queue
        (``adapter_target_queue_s`` of the key's capacity, at least one cloud batch): the queue,
        and so the upload->applied latency, stays short."""
        share = self.capacity / self._active_keys()
        target = max(self.batch, share * self.cfg.adapter_target_queue_s)
        scale = min(2.0, max(0.0, 2.0 - self.queued.get(key, 0) / target))
        return round(0.9 * share * scale, 2)

    def _enqueue(self, seq: int, msg: UploadMessage, key: str, sent_at: float) -> None:
        if key not in self.queues:
            self.queues[key] = deque()
            self.order.append(key)
        self.queues[key].append((seq, msg, sent_at))
        self.queued[key] = self.queued.get(key, 0) + len(msg)
        self.last_seen[key] = time.monotonic()
        self.cv.notify_all()

    def _log(self, seq: int, msg: UploadMessage, key: str, sent_at: float) -> None:
        n, (h, w, c) = len(msg), msg.images.shape[1:]
        stats = [save_tensors(msg.stats) if msg.stats is not None else None] + [None] * (n - 1)
        table = pa.table({"stats": stats, "shift_epoch": [int(msg.shift_epoch)] * n, "seq": [seq] * n,
                          "device_id": [msg.device_id] * n, "key": [key] * n,
                          "batch": [int(msg.seq)] * n, "param_version": [int(msg.param_version)] * n,
                          "sent_at": [sent_at] * n, "height": [h] * n, "width": [w] * n, "channels": [c] * n,
                          "image": [img.tobytes() for img in msg.images], "shard": [self.shard] * n,
                          "split": [bool(msg.split)] * n},
                         schema=WAL_SCHEMA)
        write_parquet(self.store, f"uploads/part-s{self.shard:03d}-{seq:010d}.parquet", table)

    def _load_checkpoint(self) -> dict:
        """Load the newest checkpoint that reads back whole; a corrupt one falls back to the previous."""
        for version in reversed(self.registry.versions(self.state_name)):
            try:
                state, meta = self.registry.load_tensors(self.state_name, version)
                self.core.load_state_dict(state)
                return meta
            except Exception as exc:
                print(f"[adapter {self.shard}] checkpoint {self.state_name} v{version} unreadable ({exc}); "
                      "trying the previous one", flush=True)
        return {}

    def _restore(self) -> None:
        meta = self._load_checkpoint()
        low, done = int(meta.get("wal_low", 0)), set(meta.get("processed_above", []))
        self.counters["restored_from"] = meta.get("version", 0)
        for k in ("processed_samples", "acked_samples", "acked_uploads"):
            self.counters[k] = int(meta.get(k, 0))
        files = log_files(self.store, self.shard)
        self.seq = max([int(meta.get("seq", 0))] + [last_seq(f) for f in files])
        todo = read_uploads(self.run_uri, after_seq=low, shard=self.shard)
        self.wal_low, self.processed_above = low, done
        for seq, rows in group_by_seq(todo):
            self.recent.setdefault(rows["device_id"][0], set()).add(int(rows["batch"][0]))
            if seq in done:
                continue
            images = np.stack([np.frombuffer(b, np.uint8).reshape(h, w, c) for b, h, w, c in
                               zip(rows["image"], rows["height"], rows["width"], rows["channels"])])
            stats = rows["stats"][0]
            msg = UploadMessage(rows["device_id"][0], images, rows["param_version"][0], None, rows["batch"][0],
                                shift_epoch=int(rows["shift_epoch"][0] or 0),
                                stats=load_tensors(stats) if stats else None,
                                split=bool((rows.get("split") or [False])[0]))
            if seq > int(meta.get("seq", 0)):  # acknowledged after the checkpoint
                self.counters["acked_samples"] += len(images)
                self.counters["acked_uploads"] += 1
            self.counters["replayed_samples"] += len(images)
            with self.cv:
                self._enqueue(seq, msg, rows["key"][0], rows["sent_at"][0])

    def _take_turn(self) -> tuple[str, list] | None:
        """The next key round-robin and up to ``coalesce`` cloud batches of its queued uploads."""
        for _ in range(len(self.order)):
            key = self.order[0]
            self.order.rotate(-1)
            q = self.queues[key]
            if q:
                taken, n = [], 0
                while q and (not taken or n + len(q[0][1]) <= self.cfg.adapter_coalesce * self.batch):
                    taken.append(q.popleft())
                    n += len(taken[-1][1])
                self.in_process.update(seq for seq, _, _ in taken)
                return key, taken
        return None

    def _work(self) -> None:
        while not self.stopping.is_set():
            replay_key = None
            with self.cv:
                turn = self._take_turn()
                if turn is None:
                    idle_s = self.cfg.adapter_replay_idle_s
                    self.cv.wait(1.0 if idle_s < 0 else min(1.0, max(0.05, idle_s)))
                    replay_key = self._idle_replay_key()
            if self.stopping.is_set():
                break
            if turn is not None:
                self._run_turn(*turn)
            elif replay_key is not None:
                self._run_replay_turn(replay_key)
            if time.monotonic() - self.last_checkpoint > self.cfg.checkpoint_every_s:
                try:
                    self.checkpoint()
                except Exception as exc:  # counted; the log still holds everything, retried next time
                    self.counters["checkpoint_failures"] += 1
                    self.last_checkpoint = time.monotonic()
                    print(f"[adapter {self.shard}] checkpoint failed: {exc}", flush=True)

    def _idle_replay_key(self) -> str | None:
        """The next key (round-robin) owed a replay-only step, once nothing has been queued for
        ``adapter_replay_idle_s``; None while uploads wait or came recently, or none is owed (under
        the cv). As the reference, a key is owed one step per upload that completed no cloud batch
        (at most ``REPLAY_CREDIT_CAP`` kept), so replay work follows uploads, not idle wall time."""
        if self.cfg.adapter_replay_idle_s < 0 or any(self.queued.values()) or self.in_process:
            return None
        if time.monotonic() - self.last_work < self.cfg.adapter_replay_idle_s:
            return None
        for _ in range(len(self.order)):
            key = self.order[0]
            self.order.rotate(-1)
            if self.replay_credit.get(key, 0) > 0:
                self.replay_credit[key] -= 1
                return key
        return None

    def _run_turn(self, key: str, taken: list) -> None:
        """The cloud steps of ``taken`` (queued uploads of ``key``) and one publish of the result.
        No replay-only step here: those run only when the shard is idle (:meth:`_run_replay_turn`), so
        new samples always go first and the measured capacity is that of new samples."""
        start = time.perf_counter()
        update, steps, failed = None, 0, 0
        with self.core_lock:
            owed = 0
            for seq, msg, _ in taken:
                try:
                    before = self.core.keys[key].steps if key in self.core.keys else 0
                    out = self.core.process(msg, key, replay_only=False)
                    steps += self.core.keys[key].steps - before
                    owed += out is None  # (the reference would run a replay-only step for it now)
                    update = out or update
                except Exception as exc:  # a failing step must not stop the adapter
                    failed += 1
                    print(f"[adapter {self.shard}] step on upload {seq} failed: {exc}", flush=True)
            busy = time.perf_counter() - start
            trigger = (taken[0][2], f"{taken[0][1].device_id}#{taken[0][1].seq}")
            published = self._publish(key, update, trigger) if update is not None else None
            n = sum(len(m) for _, m, _ in taken)
            with self.cv:
                for seq, _, _ in taken:
                    self.in_process.discard(seq)
                    self.processed_above.add(seq)
                self._advance_low()
                self.queued[key] -= n
                self.counters["processed_samples"] += n
                self.counters["steps"] += steps
                self.counters["failed_steps"] += failed
                self.counters["busy_s"] += busy
                # a ratio of moving sums: a turn that only fills a batch costs ~0 s, the next one pays
                self._work_ema = [0.9 * self._work_ema[0] + 0.1 * n, 0.9 * self._work_ema[1] + 0.1 * busy]
                self.capacity = self._work_ema[0] / max(self._work_ema[1], 1e-6)
                self.last_work = time.monotonic()
                self.replay_credit[key] = min(REPLAY_CREDIT_CAP, self.replay_credit.get(key, 0) + owed)
                self._board(key, update, published, trigger[0])
                self.cv.notify_all()

    def _run_replay_turn(self, key: str) -> None:
        """One replay-only step for ``key`` (the reference distils on replayed samples whenever an edge
        batch completes no cloud batch); the shard runs them only in its idle time, timed apart from
        the capacity it advertises."""
        start = time.perf_counter()
        with self.core_lock:
            try:
                update = self.core.replay_step(key)
            except Exception as exc:  # a failing step must not stop the adapter
                update = None
                with self.cv:
                    self.counters["failed_steps"] += 1
                print(f"[adapter {self.shard}] replay-only step of {key} failed: {exc}", flush=True)
            published = self._publish(key, update, None) if update is not None else None
            with self.cv:
                if update is not None:
                    self.counters["replay_only_steps"] += 1
                    self.counters["replay_only_s"] += time.perf_counter() - start
                self._board(key, update, published, None)

    def _publish(self, key: str, update, trigger: tuple[float, str] | None):
        """``update`` to the registry (what Serve reads); the version, or None when the write failed."""
        extra = {"adapter_version": update.version, "run_id": self.run_id,
                 "trigger": trigger[1] if trigger else "replay-only step"}
        if trigger:
            extra["trigger_sent_at"] = trigger[0]
        try:
            return retry(lambda: self.registry.publish_edge_params(self.prefix + key, update.params,
                                                                   base=self.base_ref, extra=extra),
                         f"publishing {self.prefix + key}")
        except Exception as exc:  # counted as a publish failure; the worker must go on
            print(f"[adapter {self.shard}] publishing {self.prefix + key} failed: {exc}", flush=True)
            return None

    def _board(self, key: str, update, published, sent_at: float | None) -> None:
        """Post a published version on the board (under the cv). ``sent_at``: when the oldest upload it
        is the first to include left its device; None for a replay-only step, whose entry carries the
        previous trigger on (a host that missed that version still measures its upload's latency)."""
        if published is not None:
            self.counters["published"] += 1
            if sent_at is not None:
                self.board[key] = (published.version, update.params, update.stats, sent_at, published.version)
                self.latencies.append(time.time() - sent_at)
            else:
                _, _, _, trigger_at, trigger_version = self.board.get(key, (0, None, None, None, 0))
                self.board[key] = (published.version, update.params, update.stats, trigger_at, trigger_version)
        elif update is not None:
            self.counters["publish_failures"] += 1

    def _advance_low(self) -> None:
        while self.wal_low + 1 in self.processed_above:
            self.wal_low += 1
            self.processed_above.discard(self.wal_low)
