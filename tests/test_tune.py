import sys
from pathlib import Path

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


def test_a_bad_job_config_is_named_before_any_trial_starts(tmp_path, capsys):
    """An unknown key or a wrong value in --job-config fails the sweep at once, naming it (it used to
    fail every trial inside Ray and surface as "No best trial found")."""
    import pytest
    import tune

    def run(job, text):
        (tmp_path / "job.yaml").write_text(text)
        with pytest.raises(SystemExit):
            tune.main(["--job", job, "--job-config", str(tmp_path / "job.yaml"), "--output-dir", str(tmp_path / "o"),
                       "--storage", str(tmp_path / "s")])
        return capsys.readouterr().err

    assert "unknown key 'gdfq.bits-typo'" in run("gdfq", "gdfq:\n  bits_typo: 4\n")
    assert "'cloud.edge_lr'" in run("cema", "cema:\n  cloud:\n    edge_lr: fast\n")
    assert "top level must be a mapping" in run("tdmr", "- a\n- b\n")
    assert not (tmp_path / "o" / "results.md").exists()


def test_train_job_trials_leave_cpus_for_their_workers():
    """GDFQ and TDMR trials drive Ray Train runs: a trial holds almost nothing, its Train worker the
    CPU, so two trials on 2 CPUs cannot hold every CPU while their workers wait (they once could).
    The sweeps themselves run through ``ray job submit`` in tests/test_job_submit.py."""
    from tdmr_ray.tuning import SweepConfig, trial_resources

    assert trial_resources(SweepConfig(job="gdfq"), cluster_cpus=2) == ({"CPU": 0.01}, 2)
    assert trial_resources(SweepConfig(job="tdmr", max_concurrent=1), cluster_cpus=2) == ({"CPU": 0.01}, 1)
