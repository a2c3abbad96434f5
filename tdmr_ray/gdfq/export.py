"""Save a quantized model as integers + scales (safetensors) and a JSON; load it back for inference.

Files (``save_quantized(model, "out/resnet20-w4a4")`` writes ``out/resnet20-w4a4.safetensors`` and
``out/resnet20-w4a4.json``):

* ``<layer>.weight.int`` (uint8, levels ``0 .. 2**bits - 1``), ``<layer>.weight.scale`` (float32, one
  per output channel, or one) and ``<layer>.weight.zero_point`` (int32; outside ``[0, 2**bits - 1]``
  when a channel's range does not contain 0) for every weight-quantized layer: ``w = (int - zero_point)
  * scale``.
* ``<quantizer>.x_min`` / ``<quantizer>.x_max`` (float32 scalars): each activation quantizer's frozen range.
* Every other tensor of the state dict (biases, BN parameters and statistics, input normalisation) as is.
* The JSON: format tag, the float architecture record (``NormalizedModel.arch``), bit widths, and which
  layers/activations are quantized with which bits.

:func:`load_quantized` needs only torch, safetensors, :mod:`tdmr_ray.models` (to rebuild the float
architecture) and the quantizer arithmetic of :mod:`tdmr_ray.gdfq.fake_quant`; none of the GDFQ
training code. Conv/Linear layers come back as plain ``nn.Conv2d``/``nn.Linear`` holding the
dequantized weights, so the reloaded model computes exactly what the fake-quantized model computed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models import NormalizedModel, build_from_arch
from .fake_quant import ActivationQuantizer, QuantConv2d, QuantLinear, dequantize

FORMAT = "tdmr-gdfq-quantized/1"


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_quantized(model: NormalizedModel, path: str | Path, extra: dict | None = None) -> tuple[Path, Path]:
    """Write the tensors and the JSON next to each other; returns their paths.

    Every activation quantizer must be calibrated (frozen or not: its current range is saved).
    ``extra`` (JSON-serialisable, e.g. accuracy and config) is stored under ``"extra"``.
    """
    if not isinstance(model, NormalizedModel):
        raise TypeError(f"save_quantized expects a NormalizedModel (with .arch), got {type(model).__name__}")
    tensors_path, json_path = _paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors, layers, activations = {}, {}, {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            q, scale, zero_point = m.integer_weight()
            tensors[f"{name}.weight.int"] = q.to(torch.uint8).cpu().contiguous()
            tensors[f"{name}.weight.scale"] = scale.reshape(-1).float().cpu().contiguous()
            tensors[f"{name}.weight.zero_point"] = zero_point.reshape(-1).to(torch.int32).cpu().contiguous()
            state.pop(f"{name}.weight")
            layers[name] = {"type": "Conv2d" if isinstance(m, QuantConv2d) else "Linear", "bits": m.w_bits,
                            "per_channel": m.per_channel}
        elif isinstance(m, ActivationQuantizer):
            if not m._has_range:
                raise ValueError(f"activation quantizer {name} was never calibrated: nothing to export")
            for key in ("x_min", "x_max"):
                tensors[f"{name}.{key}"] = getattr(m, key).detach().float().cpu().reshape(())
            for key in ("x_min", "x_max", "ema_min", "ema_max", "num_updates"):
                state.pop(f"{name}.{key}")
            parent = name.rpartition(".")[0]
            activations[name] = {"bits": m.a_bits, "after": f"{parent}.0"}
    if not layers:
        raise ValueError("the model has no quantized layer: quantize it first (quantize_model)")
    overlap = set(state) & set(tensors)
    if overlap:
        raise ValueError(f"state dict keys collide with quantized tensors: {sorted(overlap)[:5]}")
    tensors.update(state)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tensors_path))
    meta = {"format": FORMAT, "arch": model.arch, "weight_layers": layers, "activation_quantizers": activations,
            "extra": extra or {}}
    json_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
    return tensors_path, json_path


def _relu_path(quantizer_path: str) -> str:
    return quantizer_path.rpartition(".")[0]


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> NormalizedModel:
    """Rebuild a model saved by :func:`save_quantized` (eval mode, activation ranges frozen)."""
    tensors_path, json_path = _paths(path)
    meta = json.loads(json_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{json_path}: not a {FORMAT} file (format={meta.get('format')!r})")
    return build_quantized(load_file(str(tensors_path)), meta, where=str(tensors_path)).to(device)


def build_quantized(tensors: dict[str, torch.Tensor], meta: dict, where: str = "the tensors") -> NormalizedModel:
    """The inference model from the exported tensors (``<layer>.weight.int/.scale/.zero_point``,
    ``<quantizer>.x_min/.x_max`` and the rest of the state dict) and the JSON record; also used by
    the ONNX loader, which hands over the same names. Eval mode, activation ranges frozen."""
    tensors = dict(tensors)
    model = build_from_arch(meta["arch"])
    state = {}
    for name, info in meta["weight_layers"].items():
        module = model.get_submodule(name)
        expected = nn.Conv2d if info["type"] == "Conv2d" else nn.Linear
        if type(module) is not expected:
            raise ValueError(f"{where}: layer {name} is {type(module).__name__} in {meta['arch']}, "
                             f"the record says {info['type']}")
        q = tensors.pop(f"{name}.weight.int").float()
        shape = (-1,) + (1,) * (q.dim() - 1)
        scale = tensors.pop(f"{name}.weight.scale").view(shape)
        zero_point = tensors.pop(f"{name}.weight.zero_point").float().view(shape)
        if not info["per_channel"]:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        state[f"{name}.weight"] = dequantize(q, scale, zero_point)
    ranges = {}
    for name, info in meta["activation_quantizers"].items():
        relu_path = _relu_path(name)
        relu = model.get_submodule(relu_path)
        if not isinstance(relu, (nn.ReLU, nn.ReLU6)):
            raise ValueError(f"{where}: {relu_path} is {type(relu).__name__}, expected a ReLU to quantize")
        quantizer = ActivationQuantizer(info["bits"])
        parent_path, _, child = relu_path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, nn.Sequential(relu, quantizer))
        ranges[name] = (tensors.pop(f"{name}.x_min"), tensors.pop(f"{name}.x_max"))
    state.update(tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in ranges]  # quantizer buffers: set below
    if missing or unexpected:
        raise ValueError(f"{where} does not fit {meta['arch']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, (lo, hi) in ranges.items():
        quantizer = model.get_submodule(name)
        quantizer.set_range(lo, hi)
        quantizer.freeze()
    return model.eval()
