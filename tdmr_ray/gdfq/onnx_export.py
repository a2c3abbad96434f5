"""The quantized model as a standard ONNX QDQ graph that onnxruntime (or any ONNX runtime) runs.

``export_onnx(model)`` returns the bytes of an ONNX model (opset 21) in which

* every weight-quantized Conv/Gemm reads its weight through ``DequantizeLinear`` from an **integer
  initializer** (uint8 levels, per-channel float32 scales and uint8 zero points, ``axis=0``), so the
  file stores the integers, not float copies;
* every activation quantizer is a ``QuantizeLinear -> Clip -> DequantizeLinear`` on the ReLU output
  it follows in the fake-quant model (uint8; the ``Clip`` keeps fewer-than-8-bit values in their
  ``2**bits`` levels, as the fake quantizer's clamp does);
* batch normalization stays a separate ``BatchNormalization`` node with the exported statistics and
  affine parameters (not folded into the convolution), so the graph holds the same tensors as the
  safetensors export and :func:`load_onnx` rebuilds the exact torch model from it (the fleet adapts
  normalization affine parameters; a folded graph would lose them).

Zero points outside what uint8 holds: GDFQ's grid takes the step from the exact min/max, so a channel
whose weights all have one sign has a zero point outside ``[0, 2**bits - 1]``. Such a channel is
stored shifted (levels and zero point + the same offset, which dequantizes to the same values) when
the shifted levels still fit in uint8; a layer where that is impossible (8-bit weights with such a
channel) is stored as int16 with its exact zero points. The record of which layers are which is in
the model's metadata (``tdmr.quantization``).

The graph comes from ``torch.onnx.export`` (the ``torch.export``-based exporter) of the float model
with the dequantized weights and no activation quantizers; the Q/DQ nodes are then inserted by name:
weights by their state-dict initializer names, activations after the ``Relu`` nodes whose
``torch.export`` name scope is the quantized ReLU module. Rounding: ``QuantizeLinear`` rounds half to
even like ``torch.round``, so onnxruntime computes the fake-quant model's levels (tests check top-1).
"""
from __future__ import annotations

import ast
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import NormalizedModel
from .export import FORMAT as SAFETENSORS_FORMAT
from .export import build_quantized, load_quantized, save_quantized
from .fake_quant import ActivationQuantizer, affine_qparams

ONNX_FORMAT = "tdmr-gdfq-onnx-qdq/1"
OPSET = 21  # DequantizeLinear with int16 inputs and per-axis scales
_META_KEY = "tdmr.quantization"


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # an optional runtime dependency for users who never export
        raise ImportError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from exc
    return onnx


def _float_graph(model: NormalizedModel, image_size: tuple[int, int, int]):
    """The float model (dequantized weights, ReLUs without quantizers) as an ONNX IR model."""
    import onnxscript.optimizer
    from onnxscript.ir.passes import common as passes

    plain = _without_activation_quantizers(model)
    example = torch.zeros(2, *image_size)
    program = torch.onnx.export(plain, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes={"x": {0: "batch"}}, optimize=False, opset_version=OPSET,
                                verbose=False)
    graph = program.model
    # Constant folding only: the default optimizer also folds BatchNormalization into the weights.
    onnxscript.optimizer.fold_constants(graph)
    passes.RemoveUnusedNodesPass()(graph)
    passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph)
    return graph


def _without_activation_quantizers(model: nn.Module) -> nn.Module:
    import copy

    plain = copy.deepcopy(model).cpu().eval()
    for name, module in list(plain.named_modules()):
        if isinstance(module, ActivationQuantizer):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, nn.Identity())
    return plain


def _uint8_storage(q: np.ndarray, zero_point: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Levels and zero points shifted per channel into uint8, or None where a channel cannot be."""
    headroom = 255 - (2 ** bits - 1)
    offset = np.clip(-zero_point, 0, headroom)
    shifted_zp = zero_point + offset
    if shifted_zp.min() < 0 or shifted_zp.max() > 255:
        return None
    shape = (-1,) + (1,) * (q.ndim - 1)
    return (q + offset.reshape(shape)).astype(np.uint8), shifted_zp.astype(np.uint8)


def _relu_scope_matches(node, relu_path: str) -> bool:
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if not scopes:
        return False
    try:
        return relu_path in ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return False


def export_onnx(model: NormalizedModel, path: str | Path | None = None, *,
                image_size: tuple[int, int, int] | None = None) -> bytes:
    """ONNX QDQ bytes of a fake-quantized (``quantize_model``, calibrated) or reloaded
    (``load_quantized``) model; written to ``path`` too when given."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    if not isinstance(model, NormalizedModel):
        raise TypeError(f"export_onnx expects a NormalizedModel (with .arch), got {type(model).__name__}")
    with tempfile.TemporaryDirectory() as tmp:  # one route for both kinds of model: through the export
        tensors_path, json_path = save_quantized(model, Path(tmp) / "model")
        from safetensors.torch import load_file

        tensors, meta = load_file(str(tensors_path)), json.loads(json_path.read_text())
        reloaded = load_quantized(Path(tmp) / "model")
    in_chans = meta["arch"].get("in_chans", 3)
    size = image_size or (in_chans, 32, 32)
    proto = _serialize(_float_graph(reloaded, size))
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    new_nodes, weight_record = [], {}

    def consumers(tensor_name):
        return [(n, i) for n in graph.node for i, name in enumerate(n.input) if name == tensor_name]

    for layer, info in meta["weight_layers"].items():
        key = f"{layer}.weight"
        if key not in initializers:
            raise ValueError(f"ONNX graph has no initializer {key!r} for quantized layer {layer}")
        q = tensors[f"{key}.int"].numpy().astype(np.int64)
        zero_point = tensors[f"{key}.zero_point"].numpy().astype(np.int64)
        scale = tensors[f"{key}.scale"].numpy().astype(np.float32)
        stored = _uint8_storage(q, zero_point, info["bits"])
        if stored is None:
            if np.abs(zero_point).max() > 32767 - 255:
                raise ValueError(f"layer {layer}: a zero point ({int(np.abs(zero_point).max())}) does not fit int16")
            stored, dtype = (q.astype(np.int16), zero_point.astype(np.int16)), "int16"
        else:
            dtype = "uint8"
        levels, zps = stored
        graph.initializer.remove(initializers[key])
        per_axis = info["per_channel"]
        names = {part: f"{key}.{part}" for part in ("int", "scale", "zero_point")}
        graph.initializer.extend([
            numpy_helper.from_array(levels, names["int"]),
            numpy_helper.from_array(scale if per_axis else scale.reshape(()), names["scale"]),
            numpy_helper.from_array(zps if per_axis else zps.reshape(()), names["zero_point"])])
        out = f"{key}.dequantized"
        attrs = {"axis": 0} if per_axis else {}
        new_nodes.append((consumers(key), out, [helper.make_node(
            "DequantizeLinear", [names["int"], names["scale"], names["zero_point"]], [out],
            name=f"{layer}/weight_dequantize", **attrs)]))
        weight_record[layer] = {**info, "storage": dtype}

    activation_record = {}
    for quantizer, info in meta["activation_quantizers"].items():
        relu_path = info["after"]
        relus = [n for n in graph.node if n.op_type == "Relu" and _relu_scope_matches(n, relu_path)]
        if not relus:
            raise ValueError(f"no Relu node for {relu_path} in the exported graph (activation quantizer {quantizer})")
        lo, hi = tensors[f"{quantizer}.x_min"].float(), tensors[f"{quantizer}.x_max"].float()
        scale, zero_point = affine_qparams(lo, hi, info["bits"])
        zp, top = int(zero_point), 2 ** info["bits"] - 1
        offset = min(max(0, -zp), 255 - top)
        if not 0 <= zp + offset <= 255:
            raise ValueError(f"activation quantizer {quantizer}: zero point {zp} of range [{float(lo)}, {float(hi)}] "
                             f"does not fit uint8 QDQ")
        base = f"{quantizer}"
        graph.initializer.extend([
            numpy_helper.from_array(np.array(scale.item(), dtype=np.float32), f"{base}.scale"),
            numpy_helper.from_array(np.array(zp + offset, dtype=np.uint8), f"{base}.zero_point"),
            numpy_helper.from_array(np.array(offset, dtype=np.uint8), f"{base}.level_min"),
            numpy_helper.from_array(np.array(offset + top, dtype=np.uint8), f"{base}.level_max")])
        for k, relu in enumerate(relus):
            src = relu.output[0]
            qname, cname, out = f"{src}.q", f"{src}.q_clipped", f"{src}.dq"
            nodes = [helper.make_node("QuantizeLinear", [src, f"{base}.scale", f"{base}.zero_point"], [qname],
                                      name=f"{quantizer}/quantize{k}"),
                     helper.make_node("Clip", [qname, f"{base}.level_min", f"{base}.level_max"], [cname],
                                      name=f"{quantizer}/clip{k}"),
                     helper.make_node("DequantizeLinear", [cname, f"{base}.scale", f"{base}.zero_point"], [out],
                                      name=f"{quantizer}/dequantize{k}")]
            new_nodes.append((consumers(src), out, nodes))
        activation_record[quantizer] = {**info, "x_min": float(lo), "x_max": float(hi)}

    for uses, out, nodes in new_nodes:
        for node, index in uses:
            node.input[index] = out
    for _, _, nodes in new_nodes:
        graph.node.extend(nodes)
    _toposort(graph)
    for node in graph.node:  # the exporter's per-node stack traces: needed for the mapping above only
        del node.metadata_props[:]
    record = {"format": ONNX_FORMAT, "arch": meta["arch"], "weight_layers": weight_record,
              "activation_quantizers": activation_record, "extra": meta.get("extra", {})}
    del proto.metadata_props[:]
    proto.metadata_props.add(key=_META_KEY, value=json.dumps(record, sort_keys=True))
    proto.producer_name = "tdmr-ray"
    onnx.checker.check_model(proto)
    payload = proto.SerializeToString()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(payload)
    return payload


def export_float_onnx(model: nn.Module, image_size: tuple[int, int, int] = (3, 32, 32)) -> bytes:
    """The float model as ONNX (the same exporter, optimized): the baseline for size and latency."""
    program = torch.onnx.export(model.cpu().eval(), (torch.zeros(2, *image_size),), dynamo=True,
                                input_names=["images"], output_names=["logits"],
                                dynamic_shapes={"x": {0: "batch"}}, opset_version=OPSET, verbose=False)
    return program.model_proto.SerializeToString()


def _serialize(ir_model):
    import onnx_ir

    return onnx_ir.serde.serialize_model(ir_model)


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            raise ValueError(f"ONNX graph has a cycle or a missing input near {pending[0].name}")
        for n in ready:
            ordered.append(n)
            produced.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def onnx_record(payload: bytes) -> dict:
    """The quantization record stored in an exported model's metadata."""
    onnx = _onnx()
    proto = onnx.load_model_from_string(payload)
    props = {p.key: p.value for p in proto.metadata_props}
    if _META_KEY not in props:
        raise ValueError(f"not a tdmr-ray ONNX QDQ export (no {_META_KEY} metadata)")
    record = json.loads(props[_META_KEY])
    if record.get("format") != ONNX_FORMAT:
        raise ValueError(f"unknown ONNX export format {record.get('format')!r} (expected {ONNX_FORMAT})")
    return record


def load_onnx(source: str | Path | bytes, device: str | torch.device = "cpu") -> NormalizedModel:
    """The torch inference model rebuilt from an exported ONNX file (the integers, scales, zero points,
    activation ranges and every other tensor it holds): what the fleet and Serve load from it."""
    onnx = _onnx()
    from onnx import numpy_helper

    payload = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    try:
        proto = onnx.load_model_from_string(bytes(payload))
    except Exception as exc:  # protobuf DecodeError and friends
        raise ValueError(f"not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    record = onnx_record(bytes(payload))
    arrays = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    tensors = {}
    for layer in record["weight_layers"]:
        for part in ("int", "scale", "zero_point"):
            key = f"{layer}.weight.{part}"
            if key not in arrays:
                raise ValueError(f"ONNX model lacks {key}")
            array = arrays.pop(key)
            tensors[key] = torch.from_numpy(array.astype(np.float32 if part == "scale" else np.int32))
    for quantizer, info in record["activation_quantizers"].items():
        tensors[f"{quantizer}.x_min"] = torch.tensor(info["x_min"], dtype=torch.float32)
        tensors[f"{quantizer}.x_max"] = torch.tensor(info["x_max"], dtype=torch.float32)
    from ..models import build_from_arch

    state_keys = build_from_arch(record["arch"]).state_dict()
    for key, value in state_keys.items():
        if key in arrays:
            tensors[key] = torch.from_numpy(arrays[key].copy()).to(value.dtype)
        elif key.endswith("num_batches_tracked"):  # not part of an inference graph
            tensors[key] = torch.zeros_like(value)
    meta = {"format": SAFETENSORS_FORMAT, "arch": record["arch"], "weight_layers": record["weight_layers"],
            "activation_quantizers": record["activation_quantizers"]}
    return build_quantized(tensors, meta, where="ONNX model").to(device)


class OnnxRuntimeModel:
    """An onnxruntime CPU session behind a torch-like call: ``logits = model(images)``."""

    def __init__(self, source: str | Path | bytes, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("running the ONNX export needs onnxruntime: pip install onnxruntime") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        payload = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
        self.session = ort.InferenceSession(bytes(payload), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.training = False  # the torch-module calls that evaluation code makes

    def eval(self) -> "OnnxRuntimeModel":
        return self

    def train(self, mode: bool = True) -> "OnnxRuntimeModel":
        if mode:
            raise ValueError("an onnxruntime session runs inference only")
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().numpy().astype(np.float32, copy=False)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


__all__ = ["ONNX_FORMAT", "export_onnx", "export_float_onnx", "load_onnx", "onnx_record", "OnnxRuntimeModel"]
