"""Per-device shifted data streams for the fleet.

Each corruption gets one *pool*: ``pool_size`` images of the test set, corrupted once (seeded)
and shared by every device host through Ray's object store (zero-copy on a node). Device ``i``
is assigned corruption ``i mod len(corruptions)`` (its group) and draws batches from its pool in
its own seeded order, so two devices of a group see different sequences of the same shift.
"""
from __future__ import annotations

import zlib

import numpy as np

from ..data import load_dataset


def build_pool(dataset: str, corruption: str, severity: int, pool_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, labels) of one corruption's pool; ``clean`` means no corruption."""
    data = load_dataset(dataset, "test").sample(pool_size, seed)
    if corruption == "clean":
        return data.x, data.y
    from ..data.corruptions import corrupt

    return corrupt(data.x, corruption, severity, seed=seed), data.y


def device_group(index: int, corruptions: list[str]) -> str:
    return corruptions[index % len(corruptions)]


def is_control(device: str, fraction: float, seed: int) -> bool:
    """Whether ``device`` is in the control group: a seeded draw per device, so about ``fraction``
    of every group, the same devices in every run with the same seed."""
    return bool(fraction > 0 and np.random.default_rng([seed, 7, zlib.crc32(device.encode())]).random() < fraction)


def device_id(index: int) -> str:
    return f"dev-{index:05d}"


class DeviceStream:
    """Batch ``b`` of one device: a window of its seeded permutation of the pool (wrapping).

    The permutation is drawn again per batch (~20 us for 1,000 images) rather than kept: kept, it
    cost 8 KB per device, 80 MB on a host of 10,000 devices."""

    def __init__(self, device: str, pool_len: int, batch_size: int, seed: int):
        self.seed = (seed, zlib.crc32(device.encode()))
        self.pool_len, self.batch_size = pool_len, batch_size

    @property
    def order(self) -> np.ndarray:
        return np.random.default_rng(list(self.seed)).permutation(self.pool_len)

    def indices(self, b: int) -> np.ndarray:
        start = (b * self.batch_size) % self.pool_len
        return np.take(self.order, np.arange(start, start + self.batch_size), mode="wrap")
