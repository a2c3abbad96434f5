"""Shared fixtures: offline data/weights from ../shared, one local Ray instance per session, moto S3."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TDMR_SHARED", REPO.parent / "shared"))
os.environ.setdefault("TDMR_DATA", str(SHARED / "data"))
os.environ.setdefault("TDMR_WEIGHTS", str(SHARED / "weights" / "cifar10-resnet"))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every 2 s by default, so each of the suite's ~30 tiny Train
# runs waits up to 2 s after its last step (and as long to see a killed worker). Every Ray process
# this session starts (local instance, `ray start` clusters, multinode scenarios) inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One real local Ray instance for the whole test session (2 CPUs, like CI). The S3 endpoint
    starts first so that Ray's worker processes inherit its AWS_* settings."""
    import ray

    # Serve's proxy must answer its readiness check within 5 s by default, three times; on 2 busy
    # cores its start can take longer and the controller kills it (measured: the whole Serve test
    # module errored with the machine under load). Ray's processes inherit this.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("TDMR_DATA", "TDMR_WEIGHTS")}})
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server on 127.0.0.1) with a bucket ``tdmr-test``; sets AWS_* env."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="tdmr-test")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def clean_subset():
    from tdmr_ray.data import load_dataset

    return load_dataset("cifar10-clean-subset", "test")


@pytest.fixture(scope="session")
def jpeg_test():
    from tdmr_ray.data import load_dataset

    return load_dataset("cifar10-jpeg", "test")


@pytest.fixture(scope="module")
def one_torch_thread():
    """The suite runs on 2 shared cores: oversubscribed intra-op threads make CPU-heavy modules many
    times slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
