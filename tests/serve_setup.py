"""What the Serve CLI tests deploy: a registry with a pretrained ResNet-20 edge model (``<name>-edge``)
and a ``fog`` parameter set (``edge-<name>-fog``), and README's serve/config.yaml pointed at it on a
free loopback port."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import requests
import yaml

from serve.client import free_port
from serve.codec import encode_array
from tdmr_ray.models import create_model, get_norm_affine
from tdmr_ray.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def registry_and_config(folder: Path, name: str) -> tuple[dict, int]:
    """Publish the model and its ``fog`` set under ``folder/registry``; README's Serve config for
    them (a dict to adjust and write) and its HTTP port."""
    registry = Registry(str(folder / "registry"))
    model = create_model("resnet20", pretrained=True).eval()
    base = registry.publish_model(f"{name}-edge", model)
    registry.publish_edge_params(f"edge-{name}-fog", get_norm_affine(model), base=base.ref)
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["deployments"][0]["user_config"].update(
        registry=str(folder / "registry"), model=f"{name}-edge", params_prefix=f"edge-{name}-")
    return config, port


def predict_fog(port: int) -> requests.Response:
    """Two black images, answered on the ``fog`` parameter set."""
    return requests.post(f"http://127.0.0.1:{port}/predict", json=encode_array(np.zeros((2, 32, 32, 3), np.uint8)),
                         headers={"X-Device-Id": "fog"}, timeout=60)
