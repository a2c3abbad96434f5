"""Several Ray nodes on one machine (ray.cluster_utils.Cluster), each scenario in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "multinode_scenarios.py"


def run_scenario(name: str, out: Path, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), name, str(out)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"scenario {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_fleet_survives_losing_a_node_that_holds_device_hosts(tmp_path):
    r = run_scenario("fleet-node-loss", tmp_path)
    assert r["removed"], "no node was removed"
    assert r["host_nodes"] == 2  # the two hosts ran on different nodes
    assert r["hosts_restored"] == 1  # the lost host came back on another node from its checkpoint
    assert r["samples"] == 8 * 8 * 32  # every device finished its stream, no batch lost or repeated
    # No acknowledged sample lost. (The restarted host re-runs its last round; the adapter drops
    # re-sent uploads by (device, batch), so host-side and adapter-side counts may differ there.)
    assert r["acked_samples"] == r["processed"] > 0


def test_train_job_workers_and_a_serve_run_replica_on_other_nodes(tmp_path):
    r = run_scenario("train-and-serve-two-nodes", tmp_path, timeout=900)
    assert r["train"] == {"world_size": 2, "worker_nodes": 2, "epochs": 2}
    serve = r["serve"]
    assert serve["status"] == 200, serve["body"]
    assert serve["body"]["model"] == "mn-edge@v1" and serve["body"]["params"] == "edge-mn-fog@v1"
    # served across nodes: the one replica sits on a worker node; the only proxy is the head's
    assert len(serve["replica_nodes"]) == 1 and serve["replica_nodes"][0] in serve["worker_nodes"]
