"""Quantized models in the registry: the integer export (``export.py``) stored as one registry
version (format ``tdmr-gdfq-quantized/1``), loadable by anything that reads the registry (Serve,
the fleet) without the GDFQ training code."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..registry import MODEL_LOADERS, Registry, Version
from .export import FORMAT, load_quantized, save_quantized


def publish_quantized(registry: Registry, name: str, model, *, parent: str | None = None,
                      metrics: dict | None = None) -> Version:
    with tempfile.TemporaryDirectory() as tmp:
        tensors_path, json_path = save_quantized(model, Path(tmp) / "model")
        tensors, meta = load_file(str(tensors_path)), json.loads(json_path.read_text())
    return registry.publish(name, tensors, kind="model", format=FORMAT, architecture=meta["arch"], parent=parent,
                            metrics=metrics, extra={"quantization": {k: v for k, v in meta.items() if k != "arch"}})


def _load(tensors: dict, meta: dict):
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "model.json").write_text(json.dumps({**meta["quantization"], "arch": meta["architecture"]}))
        return load_quantized(Path(tmp) / "model")


MODEL_LOADERS[FORMAT] = _load
