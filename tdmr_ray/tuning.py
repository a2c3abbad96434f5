"""Ray Tune sweeps over each job's hyperparameters (``jobs/tune.py``).

Search spaces live next to each method as plain data (``tdmr_ray/<method>/search_space.py``).
A trial is a function Tune runs: for CEMA it streams shifted CIFAR-10 through the single-process
edge<->cloud loop (one report per corruption, so ASHA can stop bad trials early); for the Ray
Train jobs (GDFQ, TDMR) it builds and fits the job's TorchTrainer, whose per-epoch reports reach
Tune through ``TuneReportCallback`` (Train V2's way to run Train under Tune).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import apply_overrides
from .runtime import CommonConfig
from .storage import ray_storage_kwargs


@dataclass
class SweepConfig(CommonConfig):
    job: str = "cema"  # cema | gdfq | tdmr
    num_samples: int = 8
    metric: str = ""  # default: the job's (accuracy)
    mode: str = "max"
    grace_period: int = 1  # ASHA: reports before a trial may be stopped
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs allow
    cpus_per_trial: float = 1.0
    job_config: str = ""  # YAML of the job's own settings the sweep starts from
    # CEMA trials: the stream each trial adapts on
    corruptions: list[str] = None  # type: ignore[assignment]
    n_per_corruption: int = 1000
    severity: int = 5
    # GDFQ/TDMR trials: validation images (training data, never test) behind each report's "accuracy"
    val_images: int = 512

    def __post_init__(self):
        if self.corruptions is None:
            self.corruptions = ["gaussian_noise", "motion_blur", "fog"]


SWEEP_PRESETS = {
    "quick": {"num_samples": 4, "n_per_corruption": 1000},
    "full": {"num_samples": 32, "n_per_corruption": 10000,
             "corruptions": ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                             "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                             "elastic_transform", "pixelate", "jpeg_compression"]},
}
JOB_PACKAGES = {"cema": "tdmr_ray.cema", "gdfq": "tdmr_ray.gdfq", "tdmr": "tdmr_ray.tdmr"}


def search_space(job: str) -> dict:
    """The job's space as Ray Tune domains."""
    from ray import tune

    if job not in JOB_PACKAGES:
        raise ValueError(f"unknown job {job!r}; known: {sorted(JOB_PACKAGES)}")
    space = importlib.import_module(JOB_PACKAGES[job] + ".search_space").SEARCH_SPACE
    out = {}
    for key, (kind, *args) in space.items():
        out[key] = getattr(tune, kind)(*args)
    return out


# -- trials -------------------------------------------------------------------------------------
def cema_trial(config: dict) -> None:
    """Adapt on each corruption of the stream from a fresh start; report the running mean accuracy."""
    import torch
    from ray import tune

    from .cema import run_stream
    from .cema.streams import build_runs
    from .data import load_dataset
    from .models import create_model

    sweep = config["_sweep"]
    overrides = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = apply_overrides(job_base_config("cema", sweep["preset"]), {**sweep["job_overrides"], **overrides}, "trial")
    torch.set_num_threads(1)
    runs = build_runs(load_dataset("cifar10-jpeg", "test"), sweep["corruptions"], sweep["severity"], "reset",
                      n_per_corruption=sweep["n_per_corruption"], seed=sweep["seed"])
    edge, foundation = create_model("resnet20", pretrained=True), create_model("resnet56_augmix", pretrained=True)
    accs, seen, uploaded = [], 0, 0
    for run in runs:
        r = run_stream("cema", edge, foundation, run, cfg)
        accs.append(r.accuracy)
        seen += r.accounting.seen
        uploaded += r.accounting.uploaded
        tune.report({"accuracy": float(np.mean(accs)), "upload_fraction": uploaded / max(seen, 1),
                     "corruptions_done": len(accs)})


def _train_job_trial(job: str):
    """A trial that fits the Ray Train job ``job`` (its module must offer ``train(cfg, callbacks)``)."""

    def trial(config: dict) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        module = importlib.import_module(f"tdmr_ray.{job}.job")
        sweep = config["_sweep"]
        overrides = {k: v for k, v in config.items() if not k.startswith("_")}
        cfg = apply_overrides(job_base_config(job, sweep["preset"]), {**sweep["job_overrides"], **overrides}, "trial")
        cfg.storage, cfg.num_workers, cfg.publish = sweep["storage"], 1, False
        cfg.val_images = cfg.val_images or sweep["val_images"]
        module.train(cfg, callbacks=[TuneReportCallback()], run_name=f"tune-{job}-{_trial_id()}",
                     cpus_per_worker=1 - TRAIN_DRIVER_CPUS)

    return trial


def _trial_id() -> str:
    from ray import tune

    return tune.get_context().get_trial_id()


TRIALS = {"cema": cema_trial, "gdfq": _train_job_trial("gdfq"), "tdmr": _train_job_trial("tdmr")}


def job_base_config(job: str, preset: str):
    """The config a trial of ``job`` starts from, before the sweep's overrides: CEMA's algorithm with
    the fleet's settings, or the Train job's preset."""
    if job == "cema":
        from .fleet.config import fleet_cema_config

        return fleet_cema_config()
    return importlib.import_module(f"tdmr_ray.{job}.job").job_config(preset)


def check_job_overrides(cfg: SweepConfig, job_overrides: dict) -> None:
    """Apply ``job_overrides`` to the job's base config once, before any trial starts, so that an
    unknown key or a value of the wrong type is one error naming it (ConfigError, a ValueError)
    instead of every trial failing inside Ray."""
    apply_overrides(job_base_config(cfg.job, cfg.preset), job_overrides, "--job-config")


def run_sweep(cfg: SweepConfig, output_dir: Path, job_overrides: dict) -> dict:
    """Run the sweep; write results.csv/.md, best_config.yaml and best_trials.png; return a summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    metric = cfg.metric or "accuracy"
    space = search_space(cfg.job)
    space["_sweep"] = {"corruptions": list(cfg.corruptions), "severity": cfg.severity, "seed": cfg.seed,
                       "n_per_corruption": cfg.n_per_corruption, "job_overrides": job_overrides,
                       "preset": cfg.preset, "storage": cfg.storage, "val_images": cfg.val_images}
    resources, concurrent = trial_resources(cfg)
    trainable = tune.with_resources(TRIALS[cfg.job], resources)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode=cfg.mode, num_samples=cfg.num_samples,
                                    max_concurrent_trials=concurrent,
                                    scheduler=ASHAScheduler(grace_period=cfg.grace_period,
                                                            reduction_factor=cfg.reduction_factor)),
        run_config=tune.RunConfig(name=f"sweep-{cfg.job}-{output_dir.name}",
                                  **ray_storage_kwargs(cfg.storage, "ray-tune")))
    grid = tuner.fit()
    errors = [str(r.error)[:300] for r in grid if r.error]
    rows = []
    for r in grid:
        params = {k: v for k, v in (r.config or {}).items() if not k.startswith("_")}
        rows.append({"trial": r.path.rsplit("/", 1)[-1] if r.path else "", **params,
                     **{k: r.metrics.get(k) for k in (metric, "upload_fraction", "training_iteration")
                        if r.metrics and k in r.metrics}, "error": bool(r.error)})
    best = grid.get_best_result(metric=metric, mode=cfg.mode, scope="last")
    best_params = {k: v for k, v in best.config.items() if not k.startswith("_")}
    write_sweep_outputs(output_dir, cfg, metric, rows, grid, best_params)
    flags = " ".join(f"--{_flag_prefix(cfg.job)}{k.replace('_', '-')} {v:.6g}" if isinstance(v, float)
                     else f"--{_flag_prefix(cfg.job)}{k.replace('_', '-')} {v}" for k, v in best_params.items())
    return {"metric": metric, "best": {"params": best_params, metric: best.metrics.get(metric)},
            "best_flags": flags, "trials": len(rows), "errors": errors, "rows": rows}


def trial_resources(cfg: SweepConfig, cluster_cpus: float | None = None) -> tuple[dict, int | None]:
    """(resources of one trial, concurrent trials) that cannot deadlock.

    A CEMA trial computes itself: ``cpus_per_trial`` each, as many at once as Tune fits. A GDFQ/TDMR
    trial only drives a Ray Train run whose worker (``num_workers`` = 1 in a trial) needs its own CPU
    once the trial runs: were the trial to hold a CPU too, trials could hold every CPU while each
    waits for its worker. So the driver holds a sliver (Tune needs some resource), the worker the
    rest of one CPU, and at most (cluster CPUs // 1) trials run at once, each run's worker accounted.
    ``cluster_cpus``: default the running cluster's.
    """
    if cfg.job == "cema":
        return {"CPU": cfg.cpus_per_trial}, cfg.max_concurrent or None
    if cluster_cpus is None:
        import ray

        cluster_cpus = ray.cluster_resources().get("CPU", 1)
    fits = max(1, int(cluster_cpus + 1e-6))
    return {"CPU": TRAIN_DRIVER_CPUS}, min(cfg.max_concurrent, fits) if cfg.max_concurrent else fits


TRAIN_DRIVER_CPUS = 0.01  # a GDFQ/TDMR trial's own share; its one Train worker takes 0.99


def _flag_prefix(job: str) -> str:
    return "cema." if job == "cema" else ""  # jobs/cema.py nests the algorithm under --cema.*


def write_sweep_outputs(out: Path, cfg: SweepConfig, metric: str, rows: list[dict], grid, best: dict) -> None:
    import yaml

    cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "trial", k))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: -(r.get(metric) or -1e9) if cfg.mode == "max" else (r.get(metric) or 1e9)):
        lines.append("| " + " | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                       for c in cols) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    nested = {"cema": {}} if cfg.job == "cema" else {}
    target = nested["cema"] if cfg.job == "cema" else nested
    for key, value in best.items():
        node = target
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (out / "best_config.yaml").write_text(yaml.safe_dump(nested, sort_keys=True))
    plot_best_trials(out / "best_trials.png", grid, metric, cfg)


def plot_best_trials(path: Path, grid, metric: str, cfg: SweepConfig, top: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in grid if r.metrics and metric in r.metrics and r.metrics_dataframe is not None]
    results.sort(key=lambda r: r.metrics[metric], reverse=cfg.mode == "max")
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results[:top]:
        df = r.metrics_dataframe
        ax.plot(df["training_iteration"], df[metric], marker="o", label=r.path.rsplit("/", 1)[-1][:28])
    ax.set_xlabel("report (corruption / epoch)")
    ax.set_ylabel(metric)
    ax.set_title(f"{cfg.job} sweep: best {min(top, len(results))} of {len(list(grid))} trials")
    ax.grid(alpha=0.3)
    if results:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
