"""The pipeline's stage record without Ray: a rerun resumes (nothing redone), one from a named stage reruns
only it and those after it, a corrupt record is named. The whole chain on a tiny budget runs through
``ray job submit`` in tests/test_job_submit.py."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))


def test_stage_record_resumes_and_reruns_from_a_named_stage(tmp_path):
    from tdmr_ray.pipeline import StageBook, run_pipeline

    calls = []

    def job(stage):
        def main(argv):
            calls.append(stage)
            version = sum(c == stage for c in calls)
            metrics = {"tdmr": {"target_top1": 50.0, "teacher_top1": 60.0},
                       "gdfq": {"fp_top1": {}, "quantized_top1": {}, "bits": "W8A8"},
                       "cema": {"accuracy": 0.5, "lift": {"lift": 0.01}, "upload_fraction": 0.3}}[stage]
            return {"registry_version": f"{stage}@v{version}", "metrics": metrics, "durations_s": {"total": 1.0}}
        return main

    jobs = {s: job(s) for s in ("tdmr", "gdfq", "cema")}
    serve = lambda cfg, done, out: {"model": done["fleet"]["quantized"]["edge"]}  # noqa: E731
    from tdmr_ray.pipeline import PipelineConfig

    cfg = PipelineConfig(storage=str(tmp_path / "s"), float_fleet=False)
    done = run_pipeline(cfg, tmp_path, jobs, serve)
    assert calls == ["tdmr", "gdfq", "cema"] and done["serve"] == {"model": "gdfq@v1"}
    run_pipeline(cfg, tmp_path, jobs, serve)  # everything recorded: nothing reruns
    assert calls == ["tdmr", "gdfq", "cema"]
    cfg.from_stage = "gdfq"
    done = run_pipeline(cfg, tmp_path, jobs, serve)  # gdfq and every stage after it rerun, tdmr does not
    assert calls == ["tdmr", "gdfq", "cema", "gdfq", "cema"] and done["serve"] == {"model": "gdfq@v2"}
    assert StageBook(tmp_path / "stages.json").done["gdfq"]["ref"] == "gdfq@v2"
    (tmp_path / "stages.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a readable stage record"):
        run_pipeline(cfg, tmp_path, jobs, serve)


def test_unknown_stage_is_named(tmp_path, capsys):
    import pipeline

    with pytest.raises(SystemExit):
        pipeline.main(["--from-stage", "deploy", "--output-dir", str(tmp_path / "o"), "--storage", str(tmp_path / "s")])
    assert "unknown stage 'deploy'" in capsys.readouterr().err
