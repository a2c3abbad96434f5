"""Views of uploaded images for the cloud's distillation (``cloud.augment_views``, ``cloud.augment``).

The foundation labels each view itself, so every view is a new input with its own teacher output
(function matching, Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022): with few uploaded images, mixed views give the distillation more distinct
inputs than the uploads alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, generator: torch.Generator, kind: str = "flip_shift", shift: int = 4) -> torch.Tensor:
    """A random view of each image of ``x`` (N, C, H, W), drawn with ``generator``:

    - ``flip_shift``: flipped horizontally with probability 1/2 and shifted by up to ``shift`` pixels
      each way (zero-padded), CIFAR's training augmentation;
    - ``mixup``: ``lam * x[i] + (1 - lam) * x[j]`` with ``j`` a random permutation of the draw and
      ``lam ~ U(0, 1)`` per image;
    - ``cutmix``: ``x[i]`` with a box of ``x[j]`` pasted in, box area ``1 - lam`` of the image,
      ``lam ~ U(0, 1)``, centre uniform (the box clipped at the border).
    """
    n, _, h, w = x.shape
    if n == 0:
        return x
    if kind == "flip_shift":
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
        padded = F.pad(x, (shift, shift, shift, shift))
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator).tolist()
        return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    partner = x[torch.randperm(n, generator=generator).to(x.device)]
    lam = torch.rand(n, generator=generator)
    if kind == "mixup":
        lam = lam.to(x.device, x.dtype)[:, None, None, None]
        return lam * x + (1 - lam) * partner
    if kind == "cutmix":
        side = (1 - lam).sqrt()
        cy, cx = torch.rand(2, n, generator=generator)
        rows = torch.arange(h, dtype=torch.float32)[None, :, None] + 0.5
        cols = torch.arange(w, dtype=torch.float32)[None, None, :] + 0.5
        half_h, half_w = (side * h / 2)[:, None, None], (side * w / 2)[:, None, None]
        box = ((rows - cy[:, None, None] * h).abs() < half_h) & ((cols - cx[:, None, None] * w).abs() < half_w)
        return torch.where(box.to(x.device)[:, None], partner, x)
    raise ValueError(f"unknown augmentation {kind!r}: choose flip_shift, mixup or cutmix")
