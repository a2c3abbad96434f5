"""SGD with momentum on explicit tensors, so optimizer state can live in per-device state.

Same update as ``torch.optim.SGD(lr, momentum)`` without dampening, Nesterov or weight decay:
the first step sets ``buf = grad``, later ``buf = momentum * buf + grad``; then ``p -= lr * buf``.
"""
from __future__ import annotations

import torch


def sgd_momentum_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                      buffers: dict[str, torch.Tensor], lr: float, momentum: float) -> None:
    """Update ``params`` in place and ``buffers`` (created on first use) from ``grads``."""
    with torch.no_grad():
        for name, p in params.items():
            g = grads[name]
            if g is None:
                continue
            buf = buffers.get(name)
            if buf is None or momentum == 0:
                buf = g.detach().clone()
            else:
                buf.mul_(momentum).add_(g)
            buffers[name] = buf
            p.sub_(lr * buf)
