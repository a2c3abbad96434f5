"""Jobs on S3 storage (moto's server on 127.0.0.1): registry, Ray Train checkpoints, fleet run store."""
import sys
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))


def _keys(endpoint, prefix):
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="tdmr-test", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_gdfq_job_on_s3_checkpoints_and_publishes_there(ray_session, s3_server, tmp_path):
    import gdfq

    from tdmr_ray.registry import Registry

    storage = "s3://tdmr-test/jobs-gdfq"
    summary = gdfq.main(["--gdfq.epochs", "2", "--gdfq.iters-per-epoch", "2", "--gdfq.batch-size", "8",
                         "--gdfq.warmup-epochs", "1", "--gdfq.range-update-epochs", "1", "--gdfq.lr-milestones", "1",
                         "--eval-limit", "100", "--num-workers", "1", "--w-bits", "8", "--a-bits", "8",
                         "--no-onnx",  # (the ONNX copy is tested in test_gdfq_job; here it is skipped as asked)
                         "--output-dir", str(tmp_path / "out"), "--storage", storage])
    keys = _keys(s3_server, "jobs-gdfq/")
    assert summary["metrics"]["onnx_top1"] is None and not any(k.endswith("model.onnx") for k in keys)
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert any(k.startswith("jobs-gdfq/ray-train/") and k.endswith("train_state.pt") for k in keys)
    assert summary["registry_version"] == "resnet20-w8a8@v1"
    model = Registry.for_storage(storage).load_model("resnet20-w8a8")
    assert model.arch["name"] == "resnet20"


def test_fleet_on_s3_keeps_its_log_and_checkpoints_there(ray_session, s3_server, tmp_path):
    import cema

    from tdmr_ray.fleet import read_uploads

    summary = cema.main(["--devices", "4", "--batches-per-device", "3", "--pool-size", "128", "--batch-size", "32",
                         "--corruptions", "fog", "--run-name", "s3fleet", "--no-plot",
                         "--output-dir", str(tmp_path / "out"), "--storage", "s3://tdmr-test/jobs-fleet"])
    m = summary["metrics"]
    assert m["run_store"].startswith("s3://tdmr-test/jobs-fleet/fleet/")
    keys = _keys(s3_server, "jobs-fleet/")
    assert any("/hosts/host-0.safetensors" in k for k in keys)
    assert any(k.startswith("jobs-fleet/registry/edge-s3fleet-fog/") for k in keys)
    assert read_uploads(m["run_store"]).num_rows == m["adapter"]["acked_samples"] > 0
