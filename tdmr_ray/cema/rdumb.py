"""RDumb on the edge (Press et al., NeurIPS 2023): ETA plus a full reset every ``reset_every``
steps, the continual-safe edge baseline of the CEMA comparison (needs edge backward, as ``tent``).

ETA is EATA without its Fisher regularizer (Niu et al., ICML 2022): per batch, with test-batch
statistics, keep the samples whose entropy is below ``E_max = e_max_frac * ln(C)`` and whose
softmax is not redundant (|cos| to a moving average of kept softmax outputs below the margin: the
same :class:`FilterConfig` rules the CEMA edge applies), weight each by ``1 / exp(H - E_max)``,
and take one SGD step on the normalization affine parameters. Every ``reset_every`` steps the
parameters, momentum and filter state go back to the deployed model (RDumb's 1,000 steps).
Predictions are those of the forward pass the step is computed from, as in Tent and EATA.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .config import CEMAConfig
from .edge import EdgeDeviceState
from .filters import FilterState, redundancy_filter
from .losses import entropy
from .sgd import sgd_momentum_step
from .tent import TentEdgeRunner


class RDumbEdgeRunner(TentEdgeRunner):
    """A :class:`TentEdgeRunner` whose step is ETA's and which resets every ``tent.reset_every`` steps."""

    def __init__(self, model: nn.Module, cfg: CEMAConfig):
        super().__init__(model, cfg)
        self.filter_cfg = dataclasses.replace(cfg.filter, redundancy=True)

    def forward(self, state: EdgeDeviceState, x: torch.Tensor) -> torch.Tensor:
        every = self.cfg.tent.reset_every
        if every and state.batches and state.batches % every == 0:
            state.affine = {k: v.clone() for k, v in self.initial_affine.items()}
            state.momentum = {}
            state.filter = FilterState()
        self._load(state)
        with torch.enable_grad():
            logits = self.model(x)
            ent = entropy(logits)
            e_max = self.filter_cfg.e_max_frac * math.log(logits.shape[-1])
            reliable = torch.nonzero(ent.detach() < e_max).flatten()
            keep = reliable[redundancy_filter(logits.detach()[reliable].softmax(-1), state.filter, self.filter_cfg)]
            if len(keep):
                weights = torch.exp(-(ent[keep].detach() - e_max))
                loss = (ent[keep] * weights).mean()
                names = list(self.params)
                grads = torch.autograd.grad(loss, [self.params[n] for n in names])
                sgd_momentum_step(self.params, dict(zip(names, grads)), state.momentum, self.cfg.tent.lr,
                                  self.cfg.tent.momentum)
        state.affine = {k: p.detach().clone() for k, p in self.params.items()}
        return logits.detach()
