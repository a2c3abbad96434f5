"""Jobs submitted as README shows them, to a real ``ray start --head`` cluster with token
authentication on: the ``ray job submit`` CLI and the Python ``JobSubmissionClient``."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
CEMA_SMALL = ["--devices", "6", "--batches-per-device", "2", "--pool-size", "128", "--batch-size", "32",
              "--corruptions", "fog", "--no-plot"]
# The pipeline on a tiny budget (the float-edge fleet is the same call with the TDMR target as --edge,
# and the ONNX copy is the GDFQ job's own: both skipped for time).
PIPELINE_TINY = [
    "--foundation", "resnet20", "--devices", "8", "--labelled-fraction", "0.002", "--no-float-fleet",
    "--tdmr-args", "--tdmr.teacher.steps 2 --tdmr.teacher.batch-size 8 --tdmr.distill.steps 2 "
                   "--tdmr.distill.labelled-batch-size 8 --tdmr.distill.unlabelled-batch-size 8 "
                   "--report-every 2 --num-workers 1 --eval-limit 64",
    "--gdfq-args", "--gdfq.epochs 1 --gdfq.iters-per-epoch 1 --gdfq.batch-size 8 --gdfq.warmup-epochs 0 "
                   "--gdfq.range-update-epochs 1 --gdfq.lr-milestones 1 --num-workers 1 --eval-limit 64 "
                   "--no-onnx",  # (the ONNX copy: test_gdfq_job)
    "--fleet-args", "--batches-per-device 2 --pool-size 64 --batch-size 16 --hosts 1 --cema.cloud.batch-size 8"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_start_cluster(ray_session):
    """``ray start --head --block`` in its own process group (its own temp dir and ports, so the
    test session's local instance is untouched); yields the dashboard/jobs address."""
    tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = _free_ports(7)
    # As a user who activated the venv and exported the data paths before `ray start`
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
         f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"],
        # (started outside the checkout, as on any other node: nothing is importable from the cwd)
        env=env, cwd=tmp, stdout=open(tmp / "ray-start.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    from ray.job_submission import JobSubmissionClient

    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                pytest.fail(f"ray start did not come up:\n{(tmp / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(1)
    yield address, tmp
    os.killpg(proc.pid, signal.SIGTERM)  # --block: ray start stops the head's processes on SIGTERM
    try:  # (a throwaway cluster: what has not stopped after a few seconds is killed below)
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever is left of the throwaway cluster (its processes share the group)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def token_env(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # README: export it for the job and serve CLIs


def test_ray_job_submit_cli_runs_the_fleet_job(ray_start_cluster):
    address, tmp = ray_start_cluster
    out, store = tmp / "cema-out", tmp / "store"
    proc = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
                           "python", "jobs/cema.py", *CEMA_SMALL, "--output-dir", str(out), "--storage", str(store)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "succeeded" in proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["samples"] == 6 * 2 * 32
    assert summary["metrics"]["adapter"]["acked_samples"] == summary["metrics"]["adapter"]["processed_samples"]


def test_job_submission_client_runs_the_evaluation_job(ray_start_cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, tmp = ray_start_cluster
    out = tmp / "eval-out"
    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint=f"python jobs/evaluate.py --models resnet20 --limit 64 --corruptions fog "
                            f"--output-dir {out} --storage {tmp / 'store'}",
                            runtime_env={"working_dir": str(REPO)})
    deadline = time.time() + 600
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "job did not finish"
        time.sleep(2)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"] == "evaluate" and summary["metrics"]


def test_gdfq_and_tdmr_sweeps_submitted_together_both_finish(ray_start_cluster):
    """README's ``ray job submit -- python jobs/tune.py`` for GDFQ and TDMR (tiny job settings in
    ``--job-config``), submitted with the Python client at once: the GDFQ sweep's two trials and the
    TDMR sweep's one drive three Ray Train runs (one worker each) on the cluster's 2 CPUs without
    deadlock (a trial holds a sliver, its Train worker the CPU), and both sweeps finish. (The GDFQ and
    TDMR jobs themselves run on this cluster as the pipeline's stages, below; their two-worker runs in
    test_gdfq_job / test_tdmr_job.)"""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, tmp = ray_start_cluster
    rng = np.random.default_rng(0)
    np.savez(tmp / "task.npz", x=rng.integers(0, 255, (120, 16, 16, 1), dtype=np.uint8), y=np.arange(120) % 3)
    tiny = {"gdfq": {"model": "resnet20", "gdfq": {"epochs": 2, "iters_per_epoch": 2, "batch_size": 8,
                                                   "warmup_epochs": 1, "range_update_epochs": 1,
                                                   "lr_milestones": [1]}, "eval_limit": 50, "onnx": False},
            "tdmr": {"foundation": "resnet20", "target": "resnet8", "report_every": 2, "eval_limit": 50,
                     "data": str(tmp / "task.npz"), "labelled_fraction": 0.1,
                     "tdmr": {"teacher": {"steps": 2, "batch_size": 8},
                              "distill": {"steps": 2, "labelled_batch_size": 8, "unlabelled_batch_size": 8}}}}
    client = JobSubmissionClient(address)
    jobs = {}
    trials = {"gdfq": 2, "tdmr": 1}  # two concurrent trials beside a Train job once is the deadlock check
    for job, settings in tiny.items():
        (tmp / f"{job}.yaml").write_text(yaml.safe_dump(settings))
        jobs[f"sweep-{job}"] = client.submit_job(
            entrypoint=f"python jobs/tune.py --job {job} --num-samples {trials[job]} --val-images 32 "
                       f"--job-config {tmp / job}.yaml "
                       f"--output-dir {tmp / ('sweep-' + job)} --storage {tmp / 'store'}",
            runtime_env={"working_dir": str(REPO)})
    deadline = time.time() + 1200
    for name, job_id in jobs.items():
        while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.time() < deadline, f"{name} did not finish"
            time.sleep(2)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
        summary = json.loads((tmp / name / "summary.json").read_text())
        m = summary["metrics"]
        assert m["trials"] == trials[name.removeprefix("sweep-")] and not m["errors"], (name, m["errors"])
        assert all(r["training_iteration"] >= 1 for r in m["rows"]) and 0 <= m["best"]["accuracy"] <= 1


def test_ray_job_submit_runs_the_pipeline(ray_start_cluster):
    """README's ``ray job submit ... jobs/pipeline.py``: every stage (TDMR -> GDFQ -> fleet -> Serve) runs as
    one job on the cluster and records itself. (A rerun finds every stage recorded and redoes nothing:
    tests/test_pipeline.py, through the same ``run_pipeline`` the job calls.)"""
    from tdmr_ray.registry import Registry

    address, tmp = ray_start_cluster
    out, store = tmp / "pipeline-out", str(tmp / "store")
    serve_cli = str(Path(sys.executable).parent / "serve")
    command = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
               "python", "jobs/pipeline.py", *PIPELINE_TINY, "--output-dir", str(out), "--storage", store]
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0 and "succeeded" in proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-3000:]
        stages = json.loads((out / "summary.json").read_text())["metrics"]["stages"]
        assert list(stages) == ["tdmr", "gdfq", "fleet", "serve"]
        registry = Registry.for_storage(store)
        assert stages["tdmr"]["ref"] == "pipeline-target@v1" and stages["gdfq"]["ref"] == "pipeline-quantized@v1"
        assert registry.meta("pipeline-quantized", 1)["parent"] == "pipeline-target@v1"
        # --no-onnx (in --gdfq-args): no ONNX copy in the registry or the stage's summary
        assert "model.onnx" not in (registry.meta("pipeline-quantized", 1).get("files") or {})
        assert stages["fleet"]["quantized"]["edge"] == "pipeline-quantized@v1" and set(stages["fleet"]) == {"quantized"}
        assert stages["serve"]["model"] == "pipeline-quantized@v1" and 0 <= stages["serve"]["prediction"] < 10
        report = (out / "report.md").read_text()
        assert "pipeline-quantized@v1" in report and "lift vs control" in report and (out / "pipeline.png").exists()
        book = json.loads((out / "stages.json").read_text())  # what a resubmission resumes from
        assert list(book) == ["tdmr", "gdfq", "fleet", "serve"] and book["gdfq"]["ref"] == "pipeline-quantized@v1"
        assert registry.versions("pipeline-target") == [1] and registry.versions("pipeline-quantized") == [1]
    finally:  # on a cluster the pipeline's Serve app outlives the job: leave the cluster as found
        subprocess.run([serve_cli, "shutdown", "-y", "--address", address], capture_output=True, timeout=120)


def test_job_submit_without_the_token_mode_is_refused(ray_start_cluster, monkeypatch):
    """What README warns about: with token auth on, the CLI needs RAY_AUTH_MODE=token."""
    address, _ = ray_start_cluster
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    proc = subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "token" in (proc.stdout + proc.stderr).lower()


def test_serve_deploy_cli_serves_the_app_over_http(ray_start_cluster, tmp_path):
    """``serve deploy serve/config.yaml`` as README shows it (token mode exported), on the cluster:
    the app must import on the cluster's workers (the ``serve`` package is installed with the
    project), load the registry's model and answer with a device's parameter set."""
    from serve.client import wait_healthy
    from serve_setup import predict_fog, registry_and_config

    address, _ = ray_start_cluster
    config, port = registry_and_config(tmp_path, "deploy")
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    serve_cli = str(Path(sys.executable).parent / "serve")
    proc = subprocess.run([serve_cli, "deploy", str(tmp_path / "serve.yaml"), "--address", address],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=240)
        r = predict_fog(port)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "deploy-edge@v1" and r.json()["params"] == "edge-deploy-fog@v1"
    finally:
        subprocess.run([serve_cli, "shutdown", "-y", "--address", address], capture_output=True, timeout=120)
