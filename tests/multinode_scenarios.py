"""Multi-node scenarios on one machine (ray.cluster_utils.Cluster), run as subprocesses by
tests/test_multinode.py: a test session already holds a single-node Ray instance, and a process
can join only one. Each scenario prints one JSON line with what the test checks.

    python tests/multinode_scenarios.py fleet-node-loss OUT_DIR
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "jobs"))


def start_cluster(worker_nodes: int):
    import ray
    from ray.cluster_utils import Cluster

    # The head keeps the driver-side actors (the adapter asks for "head"); workers hold device hosts.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1},
                                                          "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources={"worker": 1}) for _ in range(worker_nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, nodes


def fleet_node_loss(out: Path) -> dict:
    """Hosts spread over worker nodes; the node of host 0 is removed mid-run; the fleet finishes."""
    import ray

    import cema

    cluster, nodes = start_cluster(worker_nodes=3)
    removed = []

    def remove_host_node():
        ckpt = out / "store" / "fleet" / "mn-run" / "hosts" / "host-0.safetensors"
        deadline = time.time() + 180
        while time.time() < deadline and not ckpt.exists():
            time.sleep(0.1)
        host = ray.get_actor("mn-run-host-0")
        # (from the GCS: the host is busy in its one long run_round call and would answer only at the end)
        node_id = ray._private.state.actors(actor_id=host._actor_id.hex())["Address"]["NodeID"]
        for node in nodes:
            if node.node_id == node_id:
                cluster.remove_node(node, allow_graceful=False)
                removed.append(node_id)
                return

    thread = threading.Thread(target=remove_host_node, daemon=True)
    thread.start()
    summary = cema.main(["--devices", "8", "--hosts", "2", "--batches-per-device", "8", "--pool-size", "128",
                         "--batch-size", "32", "--corruptions", "fog,contrast", "--run-name", "mn",
                         "--output-dir", str(out / "run"), "--storage", str(out / "store"),
                         "--adapter-resources", "head", "--no-plot",
                         # hosts run their streams free: pace the devices (a batch per second) so the
                         # node is lost mid-stream, not after the hosts finished
                         "--device-interval-s", "1.0"])
    thread.join(timeout=5)
    m = summary["metrics"]
    ray.shutdown()
    cluster.shutdown()
    return {"removed": removed, "samples": m["samples"], "devices": m["devices"], "host_nodes": m["host_nodes"],
            "hosts_restored": m["hosts_restored"], "acked": m["host"]["acked"],
            "processed": m["adapter"]["processed_samples"], "acked_samples": m["adapter"]["acked_samples"]}


def train_and_serve_two_nodes(out: Path) -> dict:
    """On one cluster with two worker nodes (one cluster start for both checks): a two-worker GDFQ
    Train job whose workers sit on the two nodes (1 CPU each), then the Serve app through the
    ``serve run`` CLI with its replica on a worker node."""
    import ray

    import gdfq

    started = time.time()
    cluster, nodes = start_cluster(worker_nodes=2)
    ids = {"worker_nodes": [n.node_id for n in nodes], "head_node": cluster.head_node.node_id}
    try:
        summary = gdfq.main(["--gdfq.epochs", "2", "--gdfq.iters-per-epoch", "2", "--gdfq.batch-size", "8",
                             "--gdfq.warmup-epochs", "1", "--gdfq.range-update-epochs", "1",
                             "--gdfq.lr-milestones", "1", "--eval-limit", "100", "--num-workers", "2",
                             "--no-publish", "--no-onnx", "--output-dir", str(out / "run"),
                             "--storage", str(out / "store")])
        m = summary["metrics"]
        train = {"world_size": m["world_size"], "worker_nodes": m["worker_nodes"], "epochs": m["epochs"]}
        trained = time.time()
        serve = serve_run_on(cluster, out)
        print(f"[scenario] cluster + train {trained - started:.1f}s, serve {time.time() - trained:.1f}s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"train": train, "serve": {**serve, **ids}}


def serve_run_on(cluster, out: Path) -> dict:
    """``serve run serve/config.yaml`` (the CLI, non-blocking) against ``cluster``, the replica on a
    worker node, HTTP through the head's proxy. Changed from README's config for one machine: the proxy
    on the head only (every node's proxy would bind the same port), the replica asks for the worker
    nodes' resource, the registry is the scenario's own."""
    import subprocess

    import ray
    import yaml

    from serve.client import wait_healthy
    from serve_setup import predict_fog, registry_and_config

    config, port = registry_and_config(out, "mn")
    config["proxy_location"] = "HeadOnly"
    deployment = config["applications"][0]["deployments"][0]
    deployment["ray_actor_options"] = {**deployment["ray_actor_options"], "resources": {"worker": 0.5}}
    (out / "serve.yaml").write_text(yaml.safe_dump(config))
    serve_cli = str(Path(sys.executable).parent / "serve")
    deploy = subprocess.run([serve_cli, "run", "--non-blocking", "--address", cluster.address, str(out / "serve.yaml")],
                            cwd=out, capture_output=True, text=True, timeout=300)
    try:
        if deploy.returncode != 0:
            raise RuntimeError(f"serve run failed: {deploy.stdout[-2000:]} {deploy.stderr[-2000:]}")
        wait_healthy(f"http://127.0.0.1:{port}", timeout=240)
        r = predict_fog(port)
        # (from the GCS: this cluster runs no dashboard, so no state API)
        replicas = [a for a in ray._private.state.actors().values()
                    if "EdgeModelServer" in a["ActorClassName"] and a["State"] == "ALIVE"]
        return {"status": r.status_code, "body": r.json() if r.ok else r.text[:500],
                "replica_nodes": [a["Address"]["NodeID"] for a in replicas]}
    finally:
        from ray import serve

        serve.shutdown()  # (`serve shutdown` talks to the dashboard, which this cluster does not run)


SCENARIOS = {"fleet-node-loss": fleet_node_loss, "train-and-serve-two-nodes": train_and_serve_two_nodes}

if __name__ == "__main__":
    name, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    print("RESULT " + json.dumps(SCENARIOS[name](out)), flush=True)
