"""Many devices' tensor state as rows of a few stacked matrices, and host checkpoints as columns.

A device's normalization affine parameters and TBR statistics are ~100 small tensors (one per layer
and buffer). Kept as tensors per device, each costs a Python object, a storage and a small heap
block, and a host interleaves them with each batch's large short-lived buffers: measured at 10,000
devices on one host, ~530 KiB of resident memory per device for 11 KiB of numbers. A
:class:`StateBank` keeps them instead as one row per device of a matrix per (field, dtype): a
device's dicts exist, as views into its row, only while it runs a batch (:meth:`StateBank.unpark`
before, :meth:`StateBank.park` after).

Checkpoints: :func:`pack_columns` / :func:`unpack_columns` store per-device tensors as one stacked
column per key (a safetensors header holds one entry per tensor; one entry per device and key
overflowed it at 10,000 devices). :meth:`StateBank.columns` writes the bank in the same format.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

# EdgeDeviceState fields held as rows (None: nothing stored); class_stats: edge.class_balanced_stats
BANKED_FIELDS = ("affine", "stats", "class_stats")


class _FieldRows:
    """One dict-of-tensors field of every device: a fixed layout (names, shapes, dtypes) and, per
    dtype, an (n_devices, width) matrix; ``present[i]`` is False where device i's field is None."""

    def __init__(self, n: int, example: dict[str, torch.Tensor]):
        self.layout: dict[str, tuple[torch.dtype, int, int, tuple[int, ...]]] = {}  # name -> (dtype, start, end, shape)
        widths: dict[torch.dtype, int] = defaultdict(int)
        for name, v in example.items():
            start = widths[v.dtype]
            widths[v.dtype] += v.numel()
            self.layout[name] = (v.dtype, start, widths[v.dtype], tuple(v.shape))
        self.matrices = {dtype: torch.zeros(n, w, dtype=dtype) for dtype, w in widths.items()}
        self.present = np.zeros(n, dtype=bool)

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        if tensors.keys() != self.layout.keys():
            raise ValueError(f"device state does not fit the bank's layout: missing "
                             f"{sorted(self.layout.keys() - tensors.keys())[:4]}, unexpected "
                             f"{sorted(tensors.keys() - self.layout.keys())[:4]}")
        for name, (dtype, _, _, shape) in self.layout.items():  # (all checked before any row is written)
            v = tensors[name]
            if tuple(v.shape) != shape or v.dtype != dtype:
                raise ValueError(f"device state {name} is {v.dtype} {tuple(v.shape)}, the bank holds {dtype} {shape}")
        with torch.no_grad():
            for name, (dtype, start, end, _) in self.layout.items():
                self.matrices[dtype][i, start:end].copy_(tensors[name].reshape(-1))
        self.present[i] = True

    def fill(self, rows: np.ndarray, tensors: dict[str, torch.Tensor], partial: bool = False) -> None:
        """The same ``tensors`` into every row of ``rows`` (one indexed write per name). ``partial``: some
        of the names, written into the rows already present only (the others keep their values)."""
        if partial:
            unexpected = sorted(tensors.keys() - self.layout.keys())
            if unexpected:
                raise ValueError(f"parameters do not fit the bank's layout: unexpected {unexpected[:4]}")
            rows = np.asarray(rows)[self.present[rows]]
        elif tensors.keys() != self.layout.keys():
            raise ValueError(f"parameters do not fit the bank's layout: missing "
                             f"{sorted(self.layout.keys() - tensors.keys())[:4]}, unexpected "
                             f"{sorted(tensors.keys() - self.layout.keys())[:4]}")
        for name in tensors:
            shape = self.layout[name][3]
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"parameter {name} is {tuple(tensors[name].shape)}, the bank holds {shape}")
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        with torch.no_grad():
            for name, v in tensors.items():
                dtype, start, end, _ = self.layout[name]
                self.matrices[dtype][index, start:end] = v.detach().reshape(1, -1).to(dtype)
        self.present[rows] = True

    def views(self, i: int) -> dict[str, torch.Tensor] | None:
        if not self.present[i]:
            return None
        return {name: self.matrices[dtype][i, start:end].view(shape)
                for name, (dtype, start, end, shape) in self.layout.items()}


class StateBank:
    """The ``BANKED_FIELDS`` (affine parameters, statistics, per-class moments) of ``n``
    :class:`~tdmr_ray.cema.EdgeDeviceState` as rows.

    A parked state has those fields set to None; :meth:`unpark` gives it views into its rows again
    (writes through them land in the bank; replacing the dicts, as a batch does, is caught by the next
    :meth:`park`). Layouts are taken from the first state parked with the field set."""

    def __init__(self, n_devices: int):
        self.n = n_devices
        self.fields: dict[str, _FieldRows] = {}
        self.parked = np.zeros(n_devices, dtype=bool)

    def park(self, i: int, state) -> None:
        if self.parked[i] and all(getattr(state, f) is None for f in BANKED_FIELDS):
            return  # (parked twice: its fields are None because the bank holds them)
        for field in BANKED_FIELDS:
            tensors = getattr(state, field)
            if tensors is None:
                if field in self.fields:
                    self.fields[field].present[i] = False
                continue
            if field not in self.fields:
                self.fields[field] = _FieldRows(self.n, tensors)
            self.fields[field].write(i, tensors)
            setattr(state, field, None)
        self.parked[i] = True

    def unpark(self, i: int, state) -> None:
        if not self.parked[i]:
            return
        for field in BANKED_FIELDS:
            rows = self.fields.get(field)
            setattr(state, field, rows.views(i) if rows is not None else None)
        self.parked[i] = False

    def fill(self, field: str, rows: np.ndarray, tensors: dict[str, torch.Tensor], partial: bool = False) -> None:
        """Write the same ``tensors`` as ``field`` of every (parked) device in ``rows``: one update
        applied to a key's devices at once, without building each device's dicts. ``partial``: some of
        the field's entries, into the devices that hold the field (``_FieldRows.fill``)."""
        if not self.parked[rows].all():
            raise ValueError("fill: every device written must be parked")
        if field not in self.fields:
            if partial:
                return  # no device holds the field yet
            self.fields[field] = _FieldRows(self.n, tensors)
        self.fields[field].fill(rows, tensors, partial)

    def columns(self) -> dict[str, torch.Tensor]:
        """Parked rows in :func:`pack_columns`' format (``col.<field>.<name>`` / ``idx.<field>.<name>``)."""
        flat = {}
        for field, rows in self.fields.items():
            idx = np.flatnonzero(rows.present & self.parked)
            if not len(idx):
                continue
            index = torch.from_numpy(idx).to(torch.int64)
            for name, (dtype, start, end, shape) in rows.layout.items():
                flat[f"col.{field}.{name}"] = rows.matrices[dtype][index, start:end].reshape(len(idx), *shape)
                flat[f"idx.{field}.{name}"] = index.clone()  # (safetensors refuses shared storage)
        return flat

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for rows in self.fields.values() for m in rows.matrices.values())


def pack_columns(per_device: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-device tensors as columns: ``col.<key>`` stacks the key's tensor of every device that has
    it (same shape and dtype), ``idx.<key>`` lists those devices."""
    columns: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for i, entry in enumerate(per_device):
        for k, v in entry.items():
            columns[k].append((i, v))
    flat = {}
    for k, items in columns.items():
        if len({(tuple(v.shape), v.dtype) for _, v in items}) == 1:
            flat[f"col.{k}"] = torch.stack([v for _, v in items])
            flat[f"idx.{k}"] = torch.tensor([i for i, _ in items], dtype=torch.int64)
        else:  # (devices disagree on a shape: keep them apart)
            for i, v in items:
                flat[f"dev.{i}.{k}"] = v
    return flat


def unpack_columns(flat: dict[str, torch.Tensor], n_devices: int) -> list[dict[str, torch.Tensor]]:
    per_device: list[dict[str, torch.Tensor]] = [{} for _ in range(n_devices)]
    for name, v in flat.items():
        head, _, key = name.partition(".")
        if head == "col":
            for row, i in enumerate(flat[f"idx.{key}"].tolist()):
                per_device[i][key] = v[row].clone()
        elif head == "dev":
            i, _, key = key.partition(".")
            per_device[int(i)][key] = v
    return per_device
