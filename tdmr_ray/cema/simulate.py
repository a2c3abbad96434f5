"""A single-process, synchronous edge <-> cloud loop: one device, one cloud, one stream.

After each edge batch its upload goes to the cloud at once and the cloud's newest update is
offered to the device, so it applies before the next batch (the reference's synchronous
simulation). Used by the benchmark and the tests; the fleet runs the same pieces distributed.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from torch import nn

from .cloud import CloudAdapter
from .config import METHODS, CEMAConfig, method_config
from .edge import EdgeRunner
from .messages import Accounting
from .rdumb import RDumbEdgeRunner
from .tent import TentEdgeRunner

TRACE_KEYS = ("uploaded", "pred_classes", "foundation_correct", "replay", "shift")


@dataclass
class StreamResult:
    method: str
    batch_sizes: list[int] = field(default_factory=list)
    batch_correct: list[int] = field(default_factory=list)
    batch_tags: list[str] = field(default_factory=list)  # e.g. the corruption of each batch
    e_max: list[float] = field(default_factory=list)  # threshold per batch (uploading methods)
    # Per-batch trace (uploading methods): samples uploaded, distinct classes the edge predicted,
    # the cloud foundation's correct predictions on the whole batch (with trace=True), replay
    # buffer size after the batch, and whether a shift was detected or announced.
    trace: dict[str, list] = field(default_factory=lambda: {k: [] for k in TRACE_KEYS})
    accounting: Accounting = field(default_factory=Accounting)
    cloud: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(self.batch_correct) / max(sum(self.batch_sizes), 1)

    @property
    def foundation_accuracy(self) -> float | None:
        """The cloud foundation's online accuracy over the traced batches (None if not traced)."""
        fc = [c for c in self.trace["foundation_correct"] if c is not None]
        if not fc:
            return None
        sizes = [n for n, c in zip(self.batch_sizes, self.trace["foundation_correct"]) if c is not None]
        return sum(fc) / max(sum(sizes), 1)

    def accuracy_by_tag(self) -> dict[str, float]:
        n, c = defaultdict(int), defaultdict(int)
        for tag, size, correct in zip(self.batch_tags, self.batch_sizes, self.batch_correct):
            n[tag] += size
            c[tag] += correct
        return {t: c[t] / n[t] for t in n}

    def merge(self, other: "StreamResult") -> "StreamResult":
        """Concatenate two runs of the same method (e.g. the per-corruption runs of a reset protocol)."""
        cloud = {k: self.cloud.get(k, 0) + other.cloud.get(k, 0) for k in {*self.cloud, *other.cloud}}
        return StreamResult(self.method, self.batch_sizes + other.batch_sizes,
                            self.batch_correct + other.batch_correct, self.batch_tags + other.batch_tags,
                            self.e_max + other.e_max, {k: self.trace[k] + other.trace[k] for k in TRACE_KEYS},
                            self.accounting + other.accounting, cloud, self.seconds + other.seconds)


def make_edge_runner(method: str, edge: nn.Module, cfg: CEMAConfig) -> EdgeRunner:
    """The edge side of ``method`` (``cfg`` already passed through :func:`method_config`)."""
    spec = METHODS[method]
    if spec.edge_learning == "rdumb":
        return RDumbEdgeRunner(edge, cfg)
    if spec.edge_learning:
        return TentEdgeRunner(edge, cfg)
    return EdgeRunner(edge, cfg, uploads=spec.uploads)


def run_stream(method: str, edge: nn.Module, foundation: nn.Module | None,
               stream_batches: Iterable[Sequence], cfg: CEMAConfig | None = None,
               device_id: str = "device-0", trace: bool = False, settings: dict | None = None) -> StreamResult:
    """Run ``method`` over ``stream_batches`` from a fresh start and return online accuracy and
    accounting. Each batch is ``(images uint8 NHWC, labels)`` or ``(images, labels, tag)``.

    ``foundation`` is needed by the methods that upload (``upload_all``, ``eata_filter``,
    ``cema``, ...). Accuracy counts the edge's predictions at inference time. ``trace`` also
    runs the cloud foundation on every whole batch (before the batch's upload reaches it).
    A change of tag between batches announces a shift (used by ``shift.detect="oracle"``).
    ``settings`` (``{"section.key": value}``) apply after the method's own, filter switches included.
    """
    cfg = method_config(method, cfg, settings)
    start = time.perf_counter()
    runner = make_edge_runner(method, edge, cfg)
    if METHODS[method].uploads and foundation is None:
        raise ValueError(f"method {method!r} needs a foundation model")
    cloud = None  # built at the first upload, once the image shape is known
    state = runner.new_device(device_id)
    result = StreamResult(method)
    tr = result.trace
    for batch in stream_batches:
        images, labels = batch[0], np.asarray(batch[1])
        tag = str(batch[2]) if len(batch) > 2 else ""
        if cloud is None and METHODS[method].uploads:
            cloud = CloudAdapter(foundation, edge, cfg, image_shape=tuple(images.shape[1:]))
        if trace and cloud is not None:
            f_pred = cloud.predict(device_id, images).argmax(-1).numpy()
            tr["foundation_correct"].append(int((f_pred == labels).sum()))
        else:
            tr["foundation_correct"].append(None)
        out = runner.infer(state, images, shift=bool(result.batch_tags) and tag != result.batch_tags[-1])
        result.batch_sizes.append(len(labels))
        result.batch_correct.append(int((out.predictions.numpy() == labels).sum()))
        result.batch_tags.append(tag)
        tr["pred_classes"].append(int(out.predictions.unique().numel()))
        tr["shift"].append(out.shifted)
        tr["uploaded"].append(len(out.upload) if out.upload is not None else 0)
        if out.upload is not None:
            result.e_max.append(out.selection.e_max)
            update = cloud.process(out.upload)
            if update is not None:
                state.offer(update)
        tr["replay"].append(len(cloud.keys[device_id].replay) if cloud is not None and device_id in cloud.keys else 0)
    state.accounting.check(pending_updates=int(state.pending is not None))
    result.accounting = state.accounting
    if cloud is not None:
        result.cloud = {**cloud.counters, "steps": sum(k.steps for k in cloud.keys.values()),
                        "replay_only_steps": sum(k.replay_only_steps for k in cloud.keys.values())}
    result.seconds = time.perf_counter() - start
    return result
