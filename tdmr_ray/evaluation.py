"""Top-1 accuracy of a model on an ImageSet (or on float tensors), in inference mode."""
from __future__ import annotations

import torch
from torch import nn

from .data import ImageSet, to_float


@torch.inference_mode()
def predict(model: nn.Module, images, batch_size: int = 500, device: str | torch.device = "cpu") -> torch.Tensor:
    """Class predictions for uint8 NHWC numpy images or float NCHW tensors in [0, 1]."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        x = chunk if isinstance(chunk, torch.Tensor) else to_float(chunk)
        out.append(model(x.to(device)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 500, device="cpu") -> float:
    """Top-1 accuracy in percent."""
    if len(data) == 0:
        raise ValueError(f"{data.source}: empty dataset")
    pred = predict(model, data.x, batch_size, device)
    return 100.0 * pred.eq(torch.from_numpy(data.y)).float().mean().item()
