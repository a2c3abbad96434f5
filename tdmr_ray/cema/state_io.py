"""Flat ``name -> tensor`` dicts for checkpointing explicit state (safetensors-friendly, no pickle).

Nested parts are stored under dotted prefixes; strings as uint8 UTF-8 tensors; ints and floats
as 0-d int64 / float64 tensors. Each state class restores its own fields from these.
"""
from __future__ import annotations

import torch


def str_tensor(s: str) -> torch.Tensor:
    return torch.tensor(list(s.encode("utf-8")), dtype=torch.uint8)


def tensor_str(t: torch.Tensor) -> str:
    return bytes(t.to(torch.uint8).tolist()).decode("utf-8")


def int_tensor(v: int) -> torch.Tensor:
    return torch.tensor(int(v), dtype=torch.int64)


def float_tensor(v: float) -> torch.Tensor:
    return torch.tensor(float(v), dtype=torch.float64)


def put(flat: dict[str, torch.Tensor], prefix: str, tensors: dict[str, torch.Tensor] | None) -> None:
    """Store ``tensors`` (CPU copies) under ``prefix``; ``None`` stores nothing (read back as None)."""
    for k, v in (tensors or {}).items():
        flat[prefix + k] = v.detach().cpu().clone().contiguous()


def take(flat: dict[str, torch.Tensor], prefix: str, device=None) -> dict[str, torch.Tensor] | None:
    """The tensors stored under ``prefix`` (prefix stripped), or None when there are none."""
    out = {k[len(prefix):]: v.to(device) if device is not None else v
           for k, v in flat.items() if k.startswith(prefix)}
    return out or None


def require(flat: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in flat:
        raise ValueError(f"state is missing {key!r}")
    return flat[key]
