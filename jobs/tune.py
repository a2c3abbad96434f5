"""Ray Tune sweeps over a job's hyperparameters with ASHA early stopping.

    python jobs/tune.py --job cema --preset quick
    python jobs/tune.py --job gdfq --num-samples 16 --job-config gdfq.yaml
    ray job submit --working-dir . -- python jobs/tune.py --job tdmr --preset full

The search spaces are tdmr_ray/<job>/search_space.py. Writes results.md/.json (one row per trial),
best_trials.png and best_config.yaml (pass it back: python jobs/<job>.py --config best_config.yaml)
to the output directory, and prints the best settings as flags.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import yaml  # noqa: E402

from tdmr_ray.config import flatten  # noqa: E402
from tdmr_ray.runtime import fail, init_ray, start_job  # noqa: E402
from tdmr_ray.tuning import JOB_PACKAGES, SWEEP_PRESETS, SweepConfig, check_job_overrides, run_sweep  # noqa: E402


def check_job(cfg: SweepConfig) -> None:
    if cfg.job not in JOB_PACKAGES:
        raise ValueError(f"unknown job {cfg.job!r}; known: {sorted(JOB_PACKAGES)}")


def main(argv=None) -> dict:
    cfg, run = start_job("tune", SweepConfig, argv, SWEEP_PRESETS, __doc__, validate=check_job)
    try:
        loaded = yaml.safe_load(Path(cfg.job_config).read_text()) if cfg.job_config else {}
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read --job-config {cfg.job_config}: {exc}")
    if not isinstance(loaded or {}, dict):
        fail(f"--job-config {cfg.job_config}: top level must be a mapping of keys to values")
    job_overrides = flatten(loaded or {})
    if cfg.job == "cema":  # the sweep adapts CEMA's algorithm: keys under cema.* in a jobs/cema.py YAML
        others = sorted(k for k in job_overrides if not k.startswith("cema."))
        if others:
            print(f"[tune] --job-config: the CEMA sweep runs the algorithm, not the fleet; ignoring {others}",
                  flush=True)
        job_overrides = {k.removeprefix("cema."): v for k, v in job_overrides.items() if k.startswith("cema.")}
    try:
        check_job_overrides(cfg, job_overrides)
    except ValueError as exc:
        fail(str(exc))
    init_ray()
    with run.phase("sweep"):
        try:
            result = run_sweep(cfg, run.output_dir, job_overrides)
        except ValueError as exc:
            fail(str(exc))
    headline = {f"best {result['metric']}": result["best"][result["metric"]], "trials": result["trials"],
                "best settings": result["best_flags"],
                "best config": str(run.output_dir / "best_config.yaml")}
    return run.finish(result, headline)


if __name__ == "__main__":
    main()
