"""Fake quantization with GDFQ's rules: weights per output channel, activations after ReLU.

The rules follow GDFQ's reference code (xushoukai/GDFQ, ``quantization_utils``, taken from ZeroQ):

* Asymmetric uniform grid of ``2**bits`` levels with the step of the exact range ``[lo, hi]`` and an
  integral zero point (so the grid ends lie within half a step of ``lo`` and ``hi``):
  ``scale = (hi - lo) / (2**bits - 1)``, ``zero_point = round(-lo / scale)``,
  ``q = clamp(round(x / scale) + zero_point, 0, 2**bits - 1)``, ``x_hat = (q - zero_point) * scale``.
  (The reference writes it as a signed grid shifted by ``2**(bits-1)``; the levels are the same.)
* Weights: ``[lo, hi]`` = min/max of the *current* weights of each output channel, recomputed at
  every forward (so fine-tuning moves the grid with the weights).
* Activations: one range per quantizer, an EMA (momentum 0.9) of the batch min/max, updated while
  calibrating and frozen afterwards.
* Straight-through gradient: the rounding passes the incoming gradient through unchanged,
  everywhere (also for values clamped at the range ends).

Why not ``torch.ao.quantization``'s FakeQuantize/observers: none of them matches these rules exactly.
(1) Their qparams always widen the range to include 0 and require ``zero_point`` inside
``[quant_min, quant_max]`` (``torch.fake_quantize_per_channel_affine`` rejects anything else); the
reference takes the step from the exact min/max, which differs for channels whose weights all have one sign
(common in depthwise convolutions). (2) ``PerChannelMinMaxObserver`` keeps a running min/max over all
calls instead of the current weights' min/max. (3) ``MovingAverageMinMaxObserver`` is a plain EMA
started at the first batch, without the bias correction. (4) FakeQuantize's backward zeroes the
gradient outside the range (clipped STE); the reference passes it through. The test suite checks
that where torch's rule does apply (ranges containing 0) our forward equals
``torch.fake_quantize_per_channel_affine``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_BITS, MAX_BITS = 2, 8
EMA_BIAS_CORRECTIONS = ("adam", "reference")
_MIN_RANGE = 1e-8  # the reference clamps hi - lo to this, so constant tensors do not divide by 0


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and integer offset (as float) of the ``2**bits``-level grid for the range ``[lo, hi]``.

    ``zero_point`` may lie outside ``[0, 2**bits - 1]`` when the range does not contain 0.
    """
    scale = (hi - lo).clamp(min=_MIN_RANGE) / (2 ** bits - 1)
    return scale, torch.round(-lo / scale)


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels in ``[0, 2**bits - 1]`` (held in a float tensor)."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2 ** bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


class _StraightThroughFakeQuant(torch.autograd.Function):
    # A custom Function rather than ``x + (x_hat - x).detach()``: that sum is not bit-equal to x_hat
    # in floating point, and the exported model must reproduce this forward exactly.
    @staticmethod
    def forward(ctx, x, scale, zero_point, bits):
        return dequantize(quantize_to_int(x, scale, zero_point, bits), scale, zero_point)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the given grid; identity gradient to ``x`` (none to the qparams)."""
    return _StraightThroughFakeQuant.apply(x, scale, zero_point, bits)


def fake_quantize_no_grad(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`fake_quantize`'s values for a per-tensor grid, in one new tensor and three in-place passes
    instead of six allocating ones: ``clamp(round(x / scale), -zero_point, 2**bits - 1 - zero_point) * scale``
    (the same numbers, since the zero point is integral; only a zero may come out as -0.0). Devices run
    every batch through this, where the six passes made the quantized edge ~20% slower than the float one.
    """
    if zero_point.device.type == "cpu":  # scalar bounds: faster, and reading them costs no device sync
        lo, hi = -float(zero_point), 2 ** bits - 1 - float(zero_point)
    else:
        lo, hi = -zero_point, 2 ** bits - 1 - zero_point
    return torch.div(x, scale).round_().clamp_(lo, hi).mul_(scale)


def weight_range(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max of the weights, per output channel (dim 0, shaped to broadcast) or over the tensor."""
    w = weight.detach()
    if not per_channel:
        return w.min(), w.max()
    flat = w.reshape(w.shape[0], -1)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return flat.min(1).values.view(shape), flat.max(1).values.view(shape)


class WeightFakeQuantMixin:
    """Shared by :class:`QuantConv2d` and :class:`QuantLinear`: the weight seen by ``forward``."""

    w_bits: int
    per_channel: bool

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = weight_range(self.weight, self.per_channel)
        return affine_qparams(lo, hi, self.w_bits)

    def quantized_weight(self) -> torch.Tensor:
        scale, zero_point = self.weight_qparams()
        return fake_quantize(self.weight, scale, zero_point, self.w_bits)

    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, scale, zero_point)`` with ``dequantize(q, scale, zero_point) == quantized_weight()``."""
        scale, zero_point = self.weight_qparams()
        return quantize_to_int(self.weight.detach(), scale, zero_point, self.w_bits), scale, zero_point

    def extra_repr(self) -> str:
        granularity = "per_channel" if self.per_channel else "per_tensor"
        return f"{super().extra_repr()}, w_bits={self.w_bits}, {granularity}"


class QuantConv2d(WeightFakeQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses the fake-quantized weight (bias stays float, as in the reference)."""

    def __init__(self, *args, w_bits: int = 8, per_channel: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_bits, self.per_channel = check_bits(w_bits, "w_bits"), per_channel

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, per_channel: bool = True) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, w_bits=w_bits, per_channel=per_channel,
                device=conv.weight.device, dtype=conv.weight.dtype)
        q.load_state_dict(conv.state_dict())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(WeightFakeQuantMixin, nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight (per output row)."""

    def __init__(self, *args, w_bits: int = 8, per_channel: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_bits, self.per_channel = check_bits(w_bits, "w_bits"), per_channel

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, per_channel: bool = True) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w_bits=w_bits,
                per_channel=per_channel, device=linear.weight.device, dtype=linear.weight.dtype)
        q.load_state_dict(linear.state_dict())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric activation fake-quant with an EMA range of the batch min/max.

    While ``calibrating`` is on, every forward (in train *or* eval mode, as in the reference) folds
    the batch min/max into the range before quantizing; ``freeze()`` stops that, ``calibrate()``
    resumes it. The rule, with momentum ``beta`` and ``t`` the number of updates so far:

    * ``bias_correction="adam"`` (default): the usual bias-corrected EMA, ``m_t = beta m_{t-1} +
      (1 - beta) b_t`` and range ``m_t / (1 - beta**t)``; the first update gives the batch min/max.
    * ``bias_correction="reference"``: the reference's update ``r_t = (beta r_{t-1} + (1 - beta) b_t)
      / (1 - beta**t)``. It divides the already-corrected value again at every step, which inflates the
      range up to ~4000x around t = 20 and only settles to the EMA after ~150 updates (its schedule
      makes 800 before freezing, so it is harmless there, fatal for short calibrations).
      Departure: we default to ``"adam"``; both give the same range (to < 1e-30 relative) after the
      reference's 800 updates.

    ``torch.ao``'s MovingAverageMinMaxObserver is the same EMA without any bias correction (started at
    the first batch instead), hence this class.
    """

    def __init__(self, a_bits: int = 8, momentum: float = 0.9, bias_correction: str = "adam"):
        super().__init__()
        if bias_correction not in EMA_BIAS_CORRECTIONS:
            raise ValueError(f"bias_correction must be one of {EMA_BIAS_CORRECTIONS}, got {bias_correction!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.a_bits, self.momentum, self.bias_correction = check_bits(a_bits, "a_bits"), momentum, bias_correction
        self.calibrating = True
        self.register_buffer("x_min", torch.zeros(()))
        self.register_buffer("x_max", torch.zeros(()))
        # Biased EMA accumulators ("adam" rule) and the update count t.
        self.register_buffer("ema_min", torch.zeros(()))
        self.register_buffer("ema_max", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # Mirrors num_updates > 0 without reading a (possibly GPU) buffer at every forward.
        self._has_range = False

    def calibrate(self) -> None:
        self.calibrating = True

    def freeze(self) -> None:
        self.calibrating = False

    def set_range(self, x_min: float, x_max: float) -> None:
        """Set a fixed range (e.g. from an export); counts as calibrated."""
        self.x_min.fill_(float(x_min))
        self.x_max.fill_(float(x_max))
        self.num_updates.clamp_(min=1)
        self._has_range = True

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch's min/max into the range."""
        beta = self.momentum
        self.num_updates += 1
        self._has_range = True
        correction = 1.0 - beta ** int(self.num_updates)
        for value, ema, out in ((x.min(), self.ema_min, self.x_min), (x.max(), self.ema_max, self.x_max)):
            if self.bias_correction == "adam":
                ema.mul_(beta).add_((1 - beta) * value)
                out.copy_(ema / correction)
            else:
                out.copy_((beta * out + (1 - beta) * value) / correction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe(x.detach())
        elif not self._has_range:
            raise RuntimeError("activation quantizer has no range yet: run calibration batches "
                               "(calibrate() and forward) before freezing it")
        scale, zero_point = affine_qparams(self.x_min, self.x_max, self.a_bits)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return fake_quantize_no_grad(x, scale, zero_point, self.a_bits)
        return fake_quantize(x, scale, zero_point, self.a_bits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._has_range = bool(self.num_updates > 0)

    def extra_repr(self) -> str:
        state = "calibrating" if self.calibrating else "frozen"
        return (f"a_bits={self.a_bits}, range=[{float(self.x_min):.4g}, {float(self.x_max):.4g}], {state}, "
                f"momentum={self.momentum}, bias_correction={self.bias_correction}")
