"""GDFQ's conditional generator and the BatchNorm-statistics loss on the full-precision model."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
    """The reference's CIFAR generator (``main.py: Generator``), producing images in [0, 1] space.

    ``label embedding (C x latent) * z -> Linear -> 128 x (S/4)^2 -> BN -> up x2 -> conv 128, BN,
    LeakyReLU(0.2) -> up x2 -> conv 64, BN, LeakyReLU(0.2) -> conv to channels -> tanh -> BN(affine=False)``.

    Two things to know:

    * ``bn_eps``: the reference writes ``nn.BatchNorm2d(128, 0.8)``, which sets *eps* = 0.8 (the
      second positional argument), not momentum as the DCGAN code it comes from meant. We keep 0.8 by
      default because the published accuracies were obtained with it (a large eps damps the
      normalisation of the two hidden BN layers); set ``bn_eps=1e-5`` for the textbook layer.
    * Output space: the final affine-free BN makes the reference's images roughly standardised, and the
      reference feeds them straight to models that expect *normalised* input. Our models take [0, 1]
      images and normalise inside, so we map the output back with the model's own ``mean``/``std``
      (``x = g * std + mean``): the network then sees exactly ``g`` again (up to float rounding).
      Nothing is clamped to [0, 1], as in the reference.
    """

    def __init__(self, num_classes: int, img_size: int = 32, channels: int = 3, latent_dim: int = 100,
                 bn_eps: float = 0.8, mean=(0.0,), std=(1.0,)):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"generator image size must be a multiple of 4, got {img_size}")
        self.num_classes, self.latent_dim, self.init_size = num_classes, latent_dim, img_size // 4
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(128, eps=bn_eps)
        self.conv2 = nn.Conv2d(128, 64, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(64, eps=bn_eps)
        self.conv3 = nn.Conv2d(64, channels, 3, 1, 1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).expand(channels).reshape(1, -1, 1, 1).clone())
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).expand(channels).reshape(1, -1, 1, 1).clone())

    @classmethod
    def for_model(cls, model: nn.Module, img_size: int = 32, latent_dim: int = 100, bn_eps: float = 0.8) -> "Generator":
        """A generator for a :class:`~tdmr_ray.models.NormalizedModel`: its classes, channels, normalisation."""
        mean, std = model.mean.flatten().tolist(), model.std.flatten().tolist()
        return cls(model.num_classes, img_size, len(mean), latent_dim, bn_eps, mean, std)

    def standardized(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The reference generator's output (normalised-input space)."""
        x = self.l1(self.label_emb(labels) * z).view(z.shape[0], 128, self.init_size, self.init_size)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return self.bn_out(torch.tanh(self.conv3(x)))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.standardized(z, labels) * self.pixel_std + self.pixel_mean


class BNStatisticsLoss:
    """Forward hooks on every ``BatchNorm2d`` of a (frozen, eval-mode) model.

    While :meth:`recording`, each BN layer's *input* batch mean and biased variance are kept, and
    :meth:`loss` is the reference's ``mean over layers of [MSE(mean, running_mean) + MSE(var,
    running_var)]``. Outside ``recording`` the hooks do nothing, so the model can be evaluated freely.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError("the model has no BatchNorm2d layer: the BN-statistics loss needs one")
        self._stats: list[tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]] = []
        self._active = False
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module, inputs, output):
        if self._active:
            x = inputs[0]
            self._stats.append((x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), module))

    @contextmanager
    def recording(self):
        self._stats.clear()
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def loss(self) -> torch.Tensor:
        if not self._stats:
            raise RuntimeError("no BN statistics recorded: run the model inside `with bns.recording():`")
        per_layer = [F.mse_loss(mean, bn.running_mean) + F.mse_loss(var, bn.running_var)
                     for mean, var, bn in self._stats]
        return torch.stack(per_layer).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
