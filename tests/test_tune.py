import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))


def test_cema_sweep_end_to_end_and_best_config_feeds_the_job(ray_session, tmp_path):
    import cema
    import tune

    from tdmr_ray.config import load_config

    summary = tune.main(["--job", "cema", "--num-samples", "2", "--n-per-corruption", "192",
                         "--corruptions", "fog,contrast", "--grace-period", "2", "--output-dir", str(tmp_path / "sweep"),
                         "--storage", str(tmp_path / "store")])
    m = summary["metrics"]
    assert m["trials"] == 2 and not m["errors"]
    assert all(r["training_iteration"] == 2 for r in m["rows"])  # one report per corruption, none stopped
    assert 0 < m["best"]["accuracy"] <= 1
    out = tmp_path / "sweep"
    assert (out / "results.md").read_text().count("\n") == 4 and (out / "best_trials.png").stat().st_size
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    cfg = load_config(cema.FleetConfig, ["--config", str(out / "best_config.yaml")], cema.FLEET_PRESETS)
    assert cfg.cema.filter.e_max_frac == best["cema"]["filter"]["e_max_frac"]
    assert "--cema.cloud.edge-lr" in m["best_flags"]


def test_unknown_job_is_named(tmp_path, capsys):
    import tune

    import pytest

    with pytest.raises(SystemExit):
        tune.main(["--job", "nope", "--output-dir", str(tmp_path / "o"), "--storage", str(tmp_path / "s")])
    assert "unknown job 'nope'" in capsys.readouterr().err


def test_train_job_sweeps_run_two_trials_on_two_cpus(ray_session, tmp_path):
    """GDFQ and TDMR trials drive Ray Train runs: two of them on 2 CPUs must not hold every CPU while
    their Train workers wait for one (they once could)."""
    import ray
    import tune

    from tdmr_ray.tuning import SweepConfig, trial_resources

    assert ray.cluster_resources()["CPU"] == 2
    assert trial_resources(SweepConfig(job="gdfq")) == ({"CPU": 0.01}, 2)
    assert trial_resources(SweepConfig(job="tdmr", max_concurrent=1)) == ({"CPU": 0.01}, 1)
    tiny = {"gdfq": {"model": "resnet20", "gdfq": {"epochs": 2, "iters_per_epoch": 2, "batch_size": 8,
                                                   "warmup_epochs": 1, "range_update_epochs": 1,
                                                   "lr_milestones": [1]}, "eval_limit": 50},
            "tdmr": {"foundation": "resnet20", "target": "resnet8", "report_every": 2, "eval_limit": 50,
                     "data": str(tmp_path / "task.npz"), "labelled_fraction": 0.1,
                     "tdmr": {"teacher": {"steps": 2, "batch_size": 8},
                              "distill": {"steps": 2, "labelled_batch_size": 8, "unlabelled_batch_size": 8}}}}
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "task.npz", x=rng.integers(0, 255, (120, 16, 16, 1), dtype=np.uint8), y=np.arange(120) % 3)
    for job, settings in tiny.items():
        (tmp_path / f"{job}.yaml").write_text(yaml.safe_dump(settings))
        summary = tune.main(["--job", job, "--num-samples", "2", "--val-images", "32", "--job-config",
                             str(tmp_path / f"{job}.yaml"), "--output-dir", str(tmp_path / f"sweep-{job}"),
                             "--storage", str(tmp_path / "store")])
        m = summary["metrics"]
        assert m["trials"] == 2 and not m["errors"], (job, m["errors"])
        assert all(r["training_iteration"] >= 1 for r in m["rows"]) and 0 <= m["best"]["accuracy"] <= 1
