"""Tent on the edge (Wang et al., ICLR 2021), as the upper reference of the CEMA comparison.

Unlike every other method here it needs a backward pass on the device: per batch, the
normalization affine parameters take one SGD step (momentum) on the batch's mean softmax
entropy, with test-batch statistics (reference ``tent.py`` / ``conf/tent.conf``). The
predictions are those of the forward pass the step is computed from, as in the reference.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import CEMAConfig
from .edge import EdgeDeviceState, EdgeRunner
from .losses import entropy
from .sgd import sgd_momentum_step


class TentEdgeRunner(EdgeRunner):
    """An :class:`EdgeRunner` whose forward also adapts the device's affine parameters."""

    def __init__(self, model: nn.Module, cfg: CEMAConfig):
        super().__init__(model, dataclasses.replace(cfg, edge=dataclasses.replace(cfg.edge, norm="batch")),
                         uploads=False)
        for p in self.params.values():
            p.requires_grad_(True)

    def forward(self, state: EdgeDeviceState, x: torch.Tensor) -> torch.Tensor:
        self._load(state)
        with torch.enable_grad():
            logits = self.model(x)
            names = list(self.params)
            grads = torch.autograd.grad(entropy(logits).mean(), [self.params[n] for n in names])
        sgd_momentum_step(self.params, dict(zip(names, grads)), state.momentum, self.cfg.tent.lr,
                          self.cfg.tent.momentum)
        state.affine = {k: p.detach().clone() for k, p in self.params.items()}
        return logits.detach()
