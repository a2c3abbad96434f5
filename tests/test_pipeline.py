"""The whole chain on a tiny budget: TDMR -> GDFQ -> fleets (quantized and float edge) -> Serve, then
a rerun that resumes (nothing redone) and one from a named stage (only it and those after it rerun)."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

# The float-edge fleet is the same call with the TDMR target as --edge; the suite skips it for time.
TINY = ["--foundation", "resnet20", "--devices", "8", "--labelled-fraction", "0.002", "--no-float-fleet",
        "--tdmr-args", "--tdmr.teacher.steps 2 --tdmr.teacher.batch-size 8 --tdmr.distill.steps 2 "
                       "--tdmr.distill.labelled-batch-size 8 --tdmr.distill.unlabelled-batch-size 8 "
                       "--report-every 2 --num-workers 1 --eval-limit 64",
        "--gdfq-args", "--gdfq.epochs 1 --gdfq.iters-per-epoch 1 --gdfq.batch-size 8 --gdfq.warmup-epochs 0 "
                       "--gdfq.range-update-epochs 1 --gdfq.lr-milestones 1 --num-workers 1 --eval-limit 64",
        "--fleet-args", "--batches-per-device 2 --pool-size 64 --batch-size 16 --hosts 1 "
                        "--cema.cloud.batch-size 8"]


def test_pipeline_runs_every_stage_and_resumes(ray_session, tmp_path):
    import pipeline

    from tdmr_ray.registry import Registry

    out, store = tmp_path / "run", str(tmp_path / "store")
    summary = pipeline.main([*TINY, "--output-dir", str(out), "--storage", store])
    stages = summary["metrics"]["stages"]
    assert list(stages) == ["tdmr", "gdfq", "fleet", "serve"]
    registry = Registry.for_storage(store)
    assert stages["tdmr"]["ref"] == "pipeline-target@v1" and stages["gdfq"]["ref"] == "pipeline-quantized@v1"
    assert registry.meta("pipeline-quantized", 1)["parent"] == "pipeline-target@v1"
    assert stages["fleet"]["quantized"]["edge"] == "pipeline-quantized@v1"
    assert set(stages["fleet"]) == {"quantized"}
    assert stages["serve"]["model"] == "pipeline-quantized@v1" and 0 <= stages["serve"]["prediction"] < 10
    report = (out / "report.md").read_text()
    assert "pipeline-quantized@v1" in report and "lift vs control" in report and (out / "pipeline.png").exists()

    again = pipeline.main([*TINY, "--output-dir", str(out), "--storage", store])  # all done: nothing reruns
    assert again["metrics"]["stages"] == json.loads((out / "stages.json").read_text())
    assert registry.versions("pipeline-target") == [1] and registry.versions("pipeline-quantized") == [1]


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
