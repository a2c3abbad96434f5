"""Jobs on S3 storage (moto's server on 127.0.0.1): the fleet's run store and registry. (The GDFQ job's
Ray Train checkpoints and registry copies on S3: tests/test_gdfq_job.py, its two-worker run.)"""
import sys
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))


def _keys(endpoint, prefix):
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="tdmr-test", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


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
