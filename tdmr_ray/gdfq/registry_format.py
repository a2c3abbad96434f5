"""Quantized models in the registry: the integer export (``export.py``) stored as one registry
version (format ``tdmr-gdfq-quantized/1``) with the ONNX QDQ graph (``onnx_export.py``) next to it
as ``model.onnx``; anything that reads the registry (Serve, the fleet) loads either (``name@vN`` or
``name@vN:onnx``) without the GDFQ training code."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..registry import ARTIFACT_LOADERS, MODEL_LOADERS, Registry, Version
from .export import FORMAT, load_quantized, save_quantized
from .onnx_export import export_onnx, load_onnx


def publish_quantized(registry: Registry, name: str, model, *, parent: str | None = None,
                      metrics: dict | None = None, onnx: bool | bytes = True) -> Version:
    """Publish the integer export and, with ``onnx``, its ONNX QDQ graph as ``model.onnx`` (pass the
    bytes of :func:`export_onnx` when already exported)."""
    with tempfile.TemporaryDirectory() as tmp:
        tensors_path, json_path = save_quantized(model, Path(tmp) / "model")
        tensors, meta = load_file(str(tensors_path)), json.loads(json_path.read_text())
    if onnx is True:
        onnx = export_onnx(model)
    files = {"model.onnx": bytes(onnx)} if onnx else {}
    return registry.publish(name, tensors, kind="model", format=FORMAT, architecture=meta["arch"], parent=parent,
                            metrics=metrics, extra={"quantization": {k: v for k, v in meta.items() if k != "arch"}},
                            files=files)


def _load(tensors: dict, meta: dict):
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "model.json").write_text(json.dumps({**meta["quantization"], "arch": meta["architecture"]}))
        return load_quantized(Path(tmp) / "model")


MODEL_LOADERS[FORMAT] = _load
ARTIFACT_LOADERS["onnx"] = lambda payload, meta: load_onnx(payload)
