from pathlib import Path

import yaml

from serve.app import DEFAULTS

CONFIG = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"


def test_serve_config_is_valid_for_this_ray_version():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    deployment = raw["applications"][0]["deployments"][0]
    assert set(deployment["user_config"]) <= set(DEFAULTS)
    assert raw["http_options"]["host"] == "127.0.0.1"
    assert schema.applications[0].import_path == "serve.app:app"
