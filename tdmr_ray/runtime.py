"""What every job shares: common settings, Ray start-up, the output directory and ``summary.json``."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .config import to_dict
from .storage import resolve_storage

# Environment that workers on other nodes need to find data, weights and storage.
FORWARDED_ENV = ("TDMR_DATA", "TDMR_WEIGHTS", "TDMR_CACHE", "TDMR_STORAGE", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


@dataclass
class CommonConfig:
    """Settings every job takes (``--preset``, ``--output-dir``, ``--storage``, ``--data-root``, ``--seed``)."""

    preset: str = "quick"
    output_dir: str = ""  # default: ./runs/<job>-<timestamp>
    storage: str = ""  # local path or s3://bucket/prefix; default $TDMR_STORAGE or ~/tdmr_ray/storage
    data_root: str = ""  # default $TDMR_DATA
    seed: int = 0


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    if not os.environ.get("RAY_ADDRESS"):
        # The local dashboard listens on 127.0.0.1 only; Ray Train's state queries need it.
        kwargs.update(num_cpus=num_cpus, include_dashboard=True)
    ray.init(**kwargs, log_to_driver=True)


class JobRun:
    """Output directory, phase timings and the final ``summary.json`` of one job run."""

    def __init__(self, job: str, cfg):
        self.job, self.cfg = job, cfg
        if cfg.data_root:
            os.environ["TDMR_DATA"] = cfg.data_root
        cfg.storage = resolve_storage(cfg.storage or None)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.output_dir = Path(cfg.output_dir or Path("runs") / f"{job}-{stamp}").resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        cfg.output_dir = str(self.output_dir)
        self.durations: dict[str, float] = {}
        self._start = time.monotonic()
        print(f"[{job}] output: {self.output_dir}  storage: {cfg.storage}", flush=True)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.monotonic()
        print(f"[{self.job}] {name} ...", flush=True)
        try:
            yield
        finally:
            self.durations[name] = round(time.monotonic() - start, 3)
            print(f"[{self.job}] {name} done in {self.durations[name]:.1f}s", flush=True)

    def finish(self, metrics: dict, headline: dict[str, str] | None = None, registry_version: str | None = None,
               extra: dict | None = None) -> dict:
        """Write ``summary.json`` and print one line per headline metric (``label: value``)."""
        self.durations["total"] = round(time.monotonic() - self._start, 3)
        summary = {"job": self.job, "config": to_dict(self.cfg), "metrics": metrics,
                   "durations_s": self.durations, "registry_version": registry_version, **(extra or {})}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        for label, value in (headline or {}).items():
            print(f"{label}: {value}", flush=True)
        print(f"summary: {self.output_dir / 'summary.json'}", flush=True)
        return summary


def fail(message: str, code: int = 2):
    """Exit a job with a one-line error (no traceback) for bad input the user can fix."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def resolve_model(spec: str, storage: str | None = None):
    """A model from a name (pretrained, e.g. ``resnet20``) or a registry reference ``name@vN``.

    Registry references are what TDMR and GDFQ publish, so their models deploy unchanged;
    ``name@vN:onnx`` loads a quantized model from its ONNX QDQ export instead of its tensors.
    """
    from .models import create_model
    from .registry import Registry, parse_ref, split_artifact

    if "@" in spec or spec.endswith(":onnx"):
        name, version = parse_ref(spec)
        return Registry.for_storage(storage).load_model(name, version, split_artifact(spec)[1])
    return create_model(spec, pretrained=True)


def start_job(job: str, cls, argv, presets: dict, description: str, validate=None):
    """Parse a job's settings (bad input exits with a one-line error naming it) and open its run.

    ``validate(cfg)`` may raise ValueError for settings that parse but make no sense. With
    ``--check-config`` the job prints its resolved settings as JSON and exits 0 before it starts
    anything (``scripts/check_readme.py`` checks README's commands that way)."""
    from .config import ConfigError, load_config, to_dict

    argv = list(sys.argv[1:] if argv is None else argv)
    check_only = "--check-config" in argv
    argv = [a for a in argv if a != "--check-config"]
    try:
        cfg = load_config(cls, argv, presets, description)
        if validate is not None:
            validate(cfg)
    except (ConfigError, ValueError, OSError) as exc:
        fail(str(exc))
    if check_only:
        print(json.dumps(to_dict(cfg), indent=1, default=str), flush=True)
        raise SystemExit(0)
    return cfg, JobRun(job, cfg)


def run_training(run: JobRun, train, cfg):
    """Start Ray, fit a Train job (``train(cfg)``) as the run's "train" phase; a failed run exits
    with its error. Returns the Ray Train Result."""
    init_ray()
    with run.phase("train"):
        result = train(cfg)
    if result.error:
        fail(f"training failed: {result.error}")
    return result
