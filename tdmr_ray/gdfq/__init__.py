"""GDFQ (Xu et al., ECCV 2020): data-free low-bit quantization with a knowledge-matching generator.

Modules: ``fake_quant`` (quantizer arithmetic and layers), ``quantize`` (``quantize_model`` and its
report), ``generator`` (conditional generator, BN-statistics loss), ``train`` (config and the
one-step functions), ``baselines`` (noise and ZeroQ-style calibration), ``export`` (integer
safetensors + JSON, ``load_quantized``), ``onnx_export`` (ONNX QDQ graph, ``export_onnx``,
``load_onnx``, ``OnnxRuntimeModel``).

Names are imported lazily, so ``from tdmr_ray.gdfq import load_quantized`` does not load the
training code.
"""
from importlib import import_module

_EXPORTS = {
    "ActivationQuantizer": "fake_quant", "QuantConv2d": "fake_quant", "QuantLinear": "fake_quant",
    "fake_quantize": "fake_quant", "affine_qparams": "fake_quant",
    "QuantReport": "quantize", "quantize_model": "quantize", "activation_quantizers": "quantize",
    "weight_quantized_layers": "quantize", "calibrate_activation_ranges": "quantize",
    "freeze_activation_ranges": "quantize",
    "Generator": "generator", "BNStatisticsLoss": "generator",
    "GDFQConfig": "train", "GDFQState": "train", "Student": "train", "make_state": "train",
    "sample_latent": "train", "generator_step": "train", "quantized_step": "train", "train_epoch": "train",
    "run_gdfq": "train", "kd_loss": "train",
    "CalibrationConfig": "baselines", "noise_calibrated": "baselines", "zeroq_calibrated": "baselines",
    "distill_images": "baselines", "calibrate": "baselines",
    "save_quantized": "export", "load_quantized": "export",
    "export_onnx": "onnx_export", "load_onnx": "onnx_export", "OnnxRuntimeModel": "onnx_export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
