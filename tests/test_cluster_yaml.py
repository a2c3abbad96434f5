from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_ray_schema_and_keeps_dashboard_private():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # Ray's own JSON schema for the cluster launcher
    assert config["provider"]["type"] == "aws" and config["head_node_type"] in config["available_node_types"]
    types = config["available_node_types"]
    assert any("g5" in t["node_config"]["InstanceType"] for t in types.values())  # a GPU worker type
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())  # S3 without keys
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert any("pip install" in c and "tdmr-ray" in c for c in config["setup_commands"])
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"]) >= \
        config["max_workers"]


def test_cluster_yaml_turns_token_auth_on_everywhere_without_holding_the_token():
    text = CLUSTER.read_text()
    config = yaml.safe_load(text)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = [c for c in commands if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # copied from the launching machine
    assert "RAY_AUTH_TOKEN=" not in text  # the secret itself is never in the file
