"""The fleet's upload log: every acknowledged upload, one Parquet row per sample, on the run's store
(local or S3). Adapter shards append a part per upload (``uploads/part-s<shard>-<seq>.parquet``) and
compact them into segments (``segment-s<shard>-<first>-<last>``) at each checkpoint; a restarted
shard reads back the segments after its checkpoint; ``read_uploads`` is also the audit trail.
"""
from __future__ import annotations

import io
import time

import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import RunStore

WAL_SCHEMA = pa.schema([("seq", pa.int64()), ("device_id", pa.string()), ("key", pa.string()),
                        ("batch", pa.int64()), ("param_version", pa.int64()), ("sent_at", pa.float64()),
                        ("height", pa.int32()), ("width", pa.int32()), ("channels", pa.int32()),
                        ("image", pa.binary()),
                        # the device's TBR statistics (safetensors bytes, first row of an upload only;
                        # EdgeConfig.stats_source="upload"/"split"), its shift count (ShiftConfig) and
                        # whether it takes its later layers' statistics from the cloud (UploadMessage.split)
                        ("stats", pa.binary()), ("shift_epoch", pa.int64()), ("shard", pa.int32()),
                        ("split", pa.bool_())])


def retry(fn, what: str, attempts: int = 4, first_wait_s: float = 0.2):
    """Call ``fn`` until it succeeds, waiting 0.2, 0.8, 3.2 s between attempts (storage hiccups:
    S3 5xx, timeouts); the last error propagates, naming ``what``."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # storage errors come in many types (OSError, pyarrow, botocore)
            if attempt == attempts - 1:
                raise OSError(f"{what} failed after {attempts} attempts: {exc}") from exc
            time.sleep(first_wait_s * 4 ** attempt)


def write_parquet(store: RunStore, name: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write(name, buf.getvalue())


def log_files(store: RunStore, shard: int | None) -> list[str]:
    tags = ("part-", "segment-") if shard is None else (f"part-s{shard:03d}-", f"segment-s{shard:03d}-")
    return [f for f in store.list("uploads") if f.endswith(".parquet") and f.split("/")[-1].startswith(tags)]


def last_seq(name: str) -> int:
    return int(name.rsplit("-", 1)[-1].split(".")[0])


def compact(store: RunStore, shard: int) -> None:
    """Merge a shard's per-upload parts into one segment (for audit and restarts)."""
    parts = [f for f in log_files(store, shard) if "/part-" in f]
    if len(parts) < 2:
        return
    table = pa.concat_tables([pq.read_table(io.BytesIO(store.read(p))) for p in parts])
    first, last = (p.rsplit("-", 1)[-1].split(".")[0] for p in (parts[0], parts[-1]))
    write_parquet(store, f"uploads/segment-s{shard:03d}-{first}-{last}.parquet", table)
    for p in parts:
        store.delete(p)


def read_uploads(run_uri: str, after_seq: int = -1, shard: int | None = None) -> pa.Table:
    """The logged uploads (one row per sample) of a fleet run (or of one shard), in order of
    (shard, seq). Segments that end at or before ``after_seq`` are not read."""
    store = RunStore(run_uri)
    files = [f for f in log_files(store, shard) if last_seq(f) > after_seq]
    if not files:
        return WAL_SCHEMA.empty_table()
    # (promote: parts written before a column existed read back with nulls there)
    table = pa.concat_tables([pq.read_table(io.BytesIO(store.read(f))) for f in files], promote_options="default")
    table = table.filter(pa.compute.greater(table["seq"], after_seq))
    return table.sort_by([("shard", "ascending"), ("seq", "ascending")])


def group_by_seq(table: pa.Table):
    cols = table.to_pydict()
    start = 0
    seqs = cols["seq"]
    for i in range(1, len(seqs) + 1):
        if i == len(seqs) or seqs[i] != seqs[start]:
            yield seqs[start], {k: v[start:i] for k, v in cols.items()}
            start = i
