"""Compute accounting: images through each model, forward and backward, and a FLOPs estimate.

Forward FLOPs per image are measured once per model with ``torch.utils.flop_counter`` (2 FLOPs per
multiply-accumulate; convolutions, matmuls and attention, not elementwise ops). A backward pass
is counted as 2x the forward when weight gradients are needed and 1x when only input gradients
flow through a frozen network (the prompt's gradient through the frozen foundation): the usual
approximations, not measurements.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

BACKWARD_FACTOR = {"weights": 2.0, "inputs": 1.0}


@torch.no_grad()
def forward_flops(fn: Callable[[torch.Tensor], object], example: torch.Tensor) -> int:
    """FLOPs of ``fn`` on one image shaped like ``example[0]``.

    A module is counted in eval mode (so BatchNorm running statistics are not touched) and put back.
    """
    modes = [(m, m.training) for m in fn.modules()] if isinstance(fn, torch.nn.Module) else []
    for m, _ in modes:
        m.train(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn(example[:1])
    finally:
        for m, mode in modes:
            m.training = mode
    return counter.get_total_flops()


class ComputeMeter:
    """Counts images per model name; ``summary()`` gives counts and total FLOPs."""

    def __init__(self):
        self.flops_per_image: dict[str, int] = {}
        self.forward_images: dict[str, int] = defaultdict(int)
        self.backward_images: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def register(self, name: str, flops_per_image: int) -> None:
        self.flops_per_image[name] = int(flops_per_image)

    def forward(self, name: str, n: int) -> None:
        self.forward_images[name] += n

    def backward(self, name: str, n: int, grads: str = "weights") -> None:
        if grads not in BACKWARD_FACTOR:
            raise ValueError(f"grads must be one of {sorted(BACKWARD_FACTOR)}")
        self.backward_images[name][grads] += n

    def merge(self, other: "ComputeMeter") -> None:
        self.flops_per_image.update(other.flops_per_image)
        for k, v in other.forward_images.items():
            self.forward_images[k] += v
        for k, d in other.backward_images.items():
            for g, v in d.items():
                self.backward_images[k][g] += v

    def flops(self) -> float:
        total = 0.0
        for name, per in self.flops_per_image.items():
            total += per * self.forward_images.get(name, 0)
            for grads, n in self.backward_images.get(name, {}).items():
                total += per * BACKWARD_FACTOR[grads] * n
        return total

    def summary(self) -> dict:
        return {
            "flops": self.flops(),
            "flops_per_image": dict(self.flops_per_image),
            "forward_images": dict(self.forward_images),
            "backward_images": {k: dict(v) for k, v in self.backward_images.items()},
        }
