"""TDMR as a Ray Train job: any labelled image set, two workers, publish, and a worker killed mid-run."""
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
sys.path.insert(0, str(REPO / "tests"))

TINY = ["--tdmr.teacher.steps", "4", "--tdmr.teacher.batch-size", "16", "--tdmr.distill.steps", "4",
        "--tdmr.distill.labelled-batch-size", "16", "--tdmr.distill.unlabelled-batch-size", "16",
        "--report-every", "2", "--foundation", "resnet20"]


def test_grayscale_npz_without_test_split_two_workers(ray_session, tmp_path):
    import tdmr

    from tdmr_ray.registry import Registry

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "task.npz", x=rng.integers(0, 255, (150, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 3, 150))
    summary = tdmr.main([*TINY, "--data", str(tmp_path / "task.npz"), "--labelled-fraction", "0.5",
                         "--num-workers", "2", "--output-dir", str(tmp_path / "out"), "--storage", str(tmp_path / "s")])
    m = summary["metrics"]
    assert m["classes"] == 3 and 28 <= m["test_images"] <= 32  # a seeded, stratified 20% holdout
    assert abs(m["labelled"] - (150 - m["test_images"]) / 2) <= 3
    assert m["world_size"] == 2
    assert [(h["phase"], h["step"]) for h in m["history"]] == [("teacher", 2), ("teacher", 4),
                                                               ("distill", 2), ("distill", 4)]
    model = Registry.for_storage(str(tmp_path / "s")).load_model(summary["registry_version"].split("@")[0])
    assert model.arch == {"name": "resnet20", "num_classes": 3, "in_chans": 1}


@pytest.mark.parametrize("method", ["scratch"])  # tdmr: above; ft-kd, lp-kd: tdmr's job path, in test_tdmr
def test_every_baseline_method_runs_on_a_grayscale_npz(ray_session, tmp_path, method):
    """Each --method trains and publishes; scratch has no teacher phase (it left no checkpoint once)."""
    import tdmr

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "task.npz", x=rng.integers(0, 255, (90, 20, 20, 1), dtype=np.uint8),
             y=np.arange(90) % 4, x_test=rng.integers(0, 255, (20, 20, 20, 1), dtype=np.uint8),
             y_test=np.arange(20) % 4)
    summary = tdmr.main([*TINY, "--data", str(tmp_path / "task.npz"), "--labelled-fraction", "0.05",
                         "--method", method, "--num-workers", "1", "--target", "resnet8",
                         "--output-dir", str(tmp_path / "out"), "--storage", str(tmp_path / "s")])
    m = summary["metrics"]
    assert m["method"] == method and m["classes"] == 4 and m["test_images"] == 20 and m["labelled"] == 4
    assert 0 <= m["target_top1"] <= 100
    phases = [(h["phase"], h["step"]) for h in m["history"]]
    teacher_steps = [] if method == "scratch" else [("teacher", 2), ("teacher", 4)]
    assert phases == [*teacher_steps, ("distill", 2), ("distill", 4)]
    assert (m["teacher_top1"] is None) == (method == "scratch")
    assert summary["registry_version"].startswith(f"resnet8-{method}-task@")


def test_worker_killed_mid_run_resumes_at_its_step(ray_session, tmp_path):
    from test_gdfq_job import _kill_one_worker_after

    from tdmr_ray.config import apply_overrides
    from tdmr_ray.tdmr.job import final_models, job_config, load_task, train

    cfg = apply_overrides(job_config("quick"), {
        "foundation": "resnet20", "tdmr.teacher.steps": 6, "tdmr.teacher.batch_size": 16, "tdmr.distill.steps": 6,
        "tdmr.distill.labelled_batch_size": 16, "tdmr.distill.unlabelled_batch_size": 16, "report_every": 2,
        "labelled_fraction": 0.002, "eval_limit": 100, "num_workers": 2, "max_failures": 3,
        "storage": str(tmp_path / "store"), "run_name": "tdmr-ft"})
    killed = []
    thread = _kill_one_worker_after(tmp_path / "store" / "ray-train" / "tdmr-ft", killed)
    result = train(cfg)
    thread.join(timeout=1)
    assert killed and result.error is None
    labelled, _, _ = load_task(cfg)
    target, teacher, history = final_models(cfg, result, labelled)
    steps = [(h["phase"], h["step"]) for h in history]
    assert steps == [("teacher", 2), ("teacher", 4), ("teacher", 6), ("distill", 2), ("distill", 4), ("distill", 6)]


def test_bad_method_and_missing_data_are_named(tmp_path, capsys):
    import tdmr

    with pytest.raises(SystemExit):
        tdmr.main(["--method", "magic", "--output-dir", str(tmp_path / "o"), "--storage", str(tmp_path / "s")])
    assert "unknown method 'magic'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tdmr.main(["--data", str(tmp_path / "none.npz"), "--output-dir", str(tmp_path / "o2"),
                   "--storage", str(tmp_path / "s")])
    assert "none.npz" in capsys.readouterr().err
