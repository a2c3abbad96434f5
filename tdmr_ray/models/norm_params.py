"""Normalization-layer affine parameters as a flat ``name -> tensor`` dict: the "edge update".

CEMA and the fleet ship only these between cloud and edge; everything else stays frozen.
"""
from __future__ import annotations

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Normalization layers (BN, GN, LN and their subclasses) that have affine parameters."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None}


def norm_affine_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The live affine parameters (for an optimizer), keyed like ``state_dict``."""
    out = {}
    for name, m in norm_modules(model).items():
        out[f"{name}.weight"] = m.weight
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias
    return out


def get_norm_affine(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the affine parameters."""
    return {k: v.detach().cpu().clone() for k, v in norm_affine_parameters(model).items()}


def set_norm_affine(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Replace the affine parameters, all or nothing: every check runs before anything is written."""
    live = norm_affine_parameters(model)
    missing, unexpected = sorted(set(live) - set(params)), sorted(set(params) - set(live))
    if missing or unexpected:
        raise ValueError(f"normalization parameter set does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in params.items():
        if not isinstance(v, torch.Tensor) or v.shape != live[k].shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"normalization parameter {k}: expected shape {tuple(live[k].shape)}, got {shape}")
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise ValueError(f"normalization parameter {k} is not a finite float tensor")
    with torch.no_grad():
        for k, v in params.items():
            live[k].copy_(v)
