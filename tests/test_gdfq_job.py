"""GDFQ as a Ray Train job: two workers, registry publish, resume, and a worker killed mid-run."""
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

TINY = ["--gdfq.epochs", "3", "--gdfq.iters-per-epoch", "3", "--gdfq.batch-size", "16", "--gdfq.warmup-epochs", "1",
        "--gdfq.range-update-epochs", "1", "--gdfq.lr-milestones", "2", "--eval-limit", "300"]


def test_two_worker_job_on_s3_publishes_a_loadable_quantized_model(ray_session, s3_server, tmp_path):
    """Two workers, storage on S3 (moto's server): Ray Train checkpoints, the registry's tensors and
    its ONNX copy all land there; the published model computes what the job's final model did."""
    import gdfq
    from test_s3_storage import _keys

    from tdmr_ray.registry import Registry

    storage = "s3://tdmr-test/jobs-gdfq"
    summary = gdfq.main([*TINY, "--num-workers", "2", "--output-dir", str(tmp_path / "out"), "--storage", storage])
    keys = _keys(s3_server, "jobs-gdfq/")
    assert any(k.startswith("jobs-gdfq/ray-train/") and k.endswith("train_state.pt") for k in keys)
    assert any(k.endswith("/v000001/model.onnx") for k in keys)
    m = summary["metrics"]
    assert m["epochs"] == 3 and [h["epoch"] for h in m["history"]] == [0, 1, 2]
    assert m["world_size"] == 2 and m["train_images_per_s"] > 0
    assert m["quantization_report"]["w_bits"] == 4 and m["bits"] == "W4A4"
    # the generator's last-epoch agreement with the FP model, as the workers measured it
    assert m["generator_agreement"] == round(m["history"][-1]["fp_acc_generated"], 1)
    assert 0 <= m["generator_agreement"] <= 100
    assert summary["registry_version"] == "resnet20-w4a4@v1"
    model = Registry.for_storage(storage).load_model("resnet20-w4a4")
    from tdmr_ray.data import load_dataset
    from tdmr_ray.evaluation import accuracy

    # The registry copy (integer export) computes what the final model computed.
    assert abs(accuracy(model, load_dataset("cifar10-clean-subset", "test")) - m["quantized_top1"]["clean"]) < 0.01
    assert m["fp_top1"]["clean"] > 90
    # The ONNX QDQ graph onnxruntime ran is the same model (top-1 within 0.1 on both sets), stored
    # next to the tensors; the registry's ONNX copy rebuilds the same torch model.
    for split in ("clean", "jpeg"):
        assert round(abs(m["onnx_top1"][split] - m["quantized_top1"][split]), 2) <= 0.1  # (figures in 0.01s)
    assert (tmp_path / "out" / "model.onnx").stat().st_size == m["onnx_bytes"]
    from_onnx = Registry.for_storage(storage).load_ref("resnet20-w4a4@v1:onnx")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_onnx(x), model(x))


def _kill_one_worker_after(checkpoint_dir: Path, killed: list):
    """Kill one Train worker once the run's controller has registered a checkpoint (its snapshot file
    exists). A kill right after a worker uploads one can come before the controller has taken the
    report; the run then restarts from the beginning (measured: every worker restarted with no
    checkpoint), which is correct but does not test resuming."""
    def kill():
        deadline = time.time() + 180
        while time.time() < deadline:
            if (checkpoint_dir / "checkpoint_manager_snapshot.json").exists():
                for p in psutil.process_iter(["cmdline"]):
                    if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                        p.kill()
                        killed.append(p.pid)
                        return
            time.sleep(0.1)

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


def test_worker_killed_mid_run_resumes_from_checkpoint_and_a_rerun_trains_nothing_more(ray_session, tmp_path):
    from tdmr_ray.gdfq.job import final_model, job_config, train

    cfg = job_config("quick")
    cfg.gdfq.epochs, cfg.gdfq.iters_per_epoch, cfg.gdfq.batch_size = 5, 3, 16
    cfg.gdfq.warmup_epochs, cfg.gdfq.range_update_epochs, cfg.gdfq.lr_milestones = 1, 1, (3,)
    cfg.num_workers, cfg.storage, cfg.run_name, cfg.max_failures = 2, str(tmp_path / "store"), "ft", 3
    killed = []
    thread = _kill_one_worker_after(tmp_path / "store" / "ray-train" / "ft", killed)
    result = train(cfg)
    thread.join(timeout=1)
    assert killed, "no worker was killed"
    assert result.error is None
    qmodel, _, history = final_model(cfg, result)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]  # each epoch once in the final state
    resumed_at = history[-1]["started_at_epoch"]  # the workers after the kill started there, not at 0
    assert 0 < resumed_at <= 4 and all(h["started_at_epoch"] == (0 if h["epoch"] < resumed_at else resumed_at)
                                       for h in history)
    assert qmodel(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # Rerunning the finished run (same --run-name) restores its final checkpoint and trains nothing more.
    start = time.monotonic()
    _, _, again = final_model(cfg, train(cfg))
    assert again == history and time.monotonic() - start < 60


def test_bad_bits_are_named(tmp_path, capsys):
    import gdfq

    with pytest.raises(SystemExit):
        gdfq.main(["--w-bits", "1", "--output-dir", str(tmp_path / "o"), "--storage", str(tmp_path / "s")])
    assert "w_bits" in capsys.readouterr().err
