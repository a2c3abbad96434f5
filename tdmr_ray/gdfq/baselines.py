"""The two data-free baselines GDFQ is compared with, built from the same quantizer and loss code.

* Gaussian noise: quantize, calibrate the activation ranges on ``N(0, 1)`` noise in the model's
  normalised input space (what a model fed normalised images sees), no fine-tuning.
* ZeroQ-style: optimise a batch of images, started from the same noise, so that the FP model's
  BatchNorm input statistics match the running statistics (the GDFQ BNS loss of
  :class:`~tdmr_ray.gdfq.generator.BNStatisticsLoss`), then calibrate on those images; no generator,
  no fine-tuning. Departures from ZeroQ (amirgholami/ZeroQ ``distill_data.py``) for the sake of one
  shared loss: ZeroQ matches *per-image* channel means/stds (squared L2 summed over images, divided by
  channels) plus an input-statistics term, and lowers its Adam lr on plateaus with an early stop; we
  match batch means/variances with GDFQ's MSE at a constant Adam lr (ZeroQ's 0.1, 500 steps).

Both calibrate with the same EMA range rule as GDFQ (over ``batches`` batches; with one batch that
is exactly min/max calibration).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .generator import BNStatisticsLoss
from .quantize import QuantReport, calibrate_activation_ranges, freeze_activation_ranges, quantize_model


@dataclass
class CalibrationConfig:
    """Ours: the reference has no such baseline run. ``zeroq_*`` follow ZeroQ's distill_data.py."""

    batches: int = 10
    batch_size: int = 200
    img_size: int = 32
    zeroq_iters: int = 500
    zeroq_lr: float = 0.1
    per_channel: bool = True
    act_ema_momentum: float = 0.9
    ema_bias_correction: str = "adam"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def gaussian_images(model: nn.Module, n: int, img_size: int, rng: torch.Generator) -> torch.Tensor:
    """``N(0, 1)`` in the normalised space of a NormalizedModel, returned as the [0, 1]-space input."""
    device = model.mean.device
    z = torch.randn(n, model.mean.shape[1], img_size, img_size, generator=rng, device=device)
    return z * model.std + model.mean


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches) -> nn.Module:
    """Fold each batch into the activation ranges (model in eval mode), then freeze them."""
    qmodel.eval()
    calibrate_activation_ranges(qmodel)
    for x in batches:
        qmodel(x)
    freeze_activation_ranges(qmodel)
    return qmodel


def distill_images(fp_model: nn.Module, n: int, cfg: CalibrationConfig, rng: torch.Generator) -> torch.Tensor:
    """ZeroQ-style synthetic images: noise optimised to match the FP model's BN statistics."""
    fp_model.eval()
    start = gaussian_images(fp_model, n, cfg.img_size, rng)
    z = ((start - fp_model.mean) / fp_model.std).requires_grad_(True)  # optimise in normalised space
    opt = torch.optim.Adam([z], lr=cfg.zeroq_lr)
    bns = BNStatisticsLoss(fp_model)
    grads = [p.requires_grad for p in fp_model.parameters()]
    fp_model.requires_grad_(False)
    try:
        for _ in range(cfg.zeroq_iters):
            with bns.recording():
                fp_model(z * fp_model.std + fp_model.mean)
            loss = bns.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        bns.remove()
        for p, g in zip(fp_model.parameters(), grads):
            p.requires_grad_(g)
    return (z * fp_model.std + fp_model.mean).detach()


def noise_calibrated(fp_model: nn.Module, w_bits: int, a_bits: int,
                     cfg: CalibrationConfig = CalibrationConfig()) -> tuple[nn.Module, QuantReport]:
    """Baseline 1: min/max (EMA) calibration on Gaussian noise, no fine-tuning."""
    rng = torch.Generator(device=fp_model.mean.device).manual_seed(cfg.seed)
    qmodel, report = quantize_model(fp_model, w_bits, a_bits, per_channel=cfg.per_channel,
                                    ema_momentum=cfg.act_ema_momentum, ema_bias_correction=cfg.ema_bias_correction)
    calibrate(qmodel, (gaussian_images(fp_model, cfg.batch_size, cfg.img_size, rng) for _ in range(cfg.batches)))
    return qmodel, report


def zeroq_calibrated(fp_model: nn.Module, w_bits: int, a_bits: int, cfg: CalibrationConfig = CalibrationConfig(),
                     images: torch.Tensor | None = None) -> tuple[nn.Module, QuantReport]:
    """Baseline 2: calibration on BN-statistics-optimised images (``images`` reuses a distilled set)."""
    if images is None:
        rng = torch.Generator(device=fp_model.mean.device).manual_seed(cfg.seed)
        images = torch.cat([distill_images(fp_model, cfg.batch_size, cfg, rng) for _ in range(cfg.batches)])
    qmodel, report = quantize_model(fp_model, w_bits, a_bits, per_channel=cfg.per_channel,
                                    ema_momentum=cfg.act_ema_momentum, ema_bias_correction=cfg.ema_bias_correction)
    calibrate(qmodel, images.split(cfg.batch_size))
    return qmodel, report
