"""The fleet driver: pools, adapter shards, free-running device hosts, progress, summary and plot."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray

from ..cema import METHODS
from ..data import load_dataset
from ..registry import Registry
from ..runtime import JobRun, init_ray, resolve_model
from ..storage import RunStore, join, resolve_storage
from .adapter import CloudAdapterActor
from .config import FleetConfig
from .host import DeviceHost
from ..fleet_progress import FleetProgress
from .streams import build_pool


def check_config(cfg: FleetConfig) -> None:
    from ..data.corruptions import CORRUPTIONS

    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {sorted(METHODS)}")
    if cfg.key_by not in ("group", "device"):
        raise ValueError(f"key_by must be 'group' or 'device', got {cfg.key_by!r}")
    bad = [c for c in cfg.corruptions if c not in CORRUPTIONS and c != "clean"]
    if bad or not cfg.corruptions:
        raise ValueError(f"unknown corruptions {bad}; known: clean, {', '.join(CORRUPTIONS)}")
    if not 0 <= cfg.control_fraction < 1:
        raise ValueError(f"control_fraction must be in [0, 1), got {cfg.control_fraction}")
    if cfg.progress_interval_s <= 0:
        raise ValueError(f"progress_interval_s must be positive, got {cfg.progress_interval_s}")
    for name in ("devices", "batches_per_device", "batch_size", "pool_size", "round_batches", "max_in_flight",
                 "adapters", "adapter_coalesce", "min_upload"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    cfg.cema_config()  # the algorithm's settings are checked before any actor starts (cema.*)


def fleet_run_id(cfg: FleetConfig, run: JobRun) -> str:
    """``--resume`` if given, else ``<run_name>-<output dir name>``: unique per run."""
    return cfg.resume or f"{cfg.run_name}-{Path(run.output_dir).name}"


def fleet_run_uri(cfg: FleetConfig, run: JobRun) -> str:
    """Where the run's host checkpoints and upload log live: ``<storage>/fleet/<run id>``."""
    return join(resolve_storage(cfg.storage), "fleet", fleet_run_id(cfg, run))


def actor_name(cfg: FleetConfig, run: JobRun, role: str) -> str:
    """Unique per run (the output directory's name), so operators and tests can find the actors."""
    return f"{fleet_run_id(cfg, run)}-{role}"


def lift(treatment: list[float], control: list[float]) -> dict:
    """Treatment minus control mean per-device accuracy, with a Welch 95% interval (normal
    approximation; None with fewer than two devices in an arm)."""
    out = {"treatment_devices": len(treatment), "control_devices": len(control),
           "treatment_accuracy": round(float(np.mean(treatment)), 4) if treatment else None,
           "control_accuracy": round(float(np.mean(control)), 4) if control else None,
           "lift": None, "ci95": None}
    if len(treatment) >= 2 and len(control) >= 2:
        diff = float(np.mean(treatment) - np.mean(control))
        se = float(np.sqrt(np.var(treatment, ddof=1) / len(treatment) + np.var(control, ddof=1) / len(control)))
        out.update(lift=round(diff, 4), ci95=[round(diff - 1.96 * se, 4), round(diff + 1.96 * se, 4)])
    return out


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def run_fleet(cfg: FleetConfig, run: JobRun) -> tuple[dict, str]:
    """Run the fleet to the end of every device's stream; returns (metrics, edge parameter name prefix)."""
    check_config(cfg)
    init_ray()
    registry = Registry.for_storage(cfg.storage)
    classes = load_dataset(cfg.dataset, "test").classes  # label names, for Serve's answers
    base_ref = cfg.edge if "@" in cfg.edge else registry.publish_model(
        f"{cfg.run_name}-edge", resolve_model(cfg.edge), extra={"source": cfg.edge, "classes": classes}).ref
    cfg.edge = base_ref  # every actor loads the same registered version
    uploads = METHODS[cfg.method].uploads and cfg.uploads
    run_uri = fleet_run_uri(cfg, run)
    cfg.run_id = fleet_run_id(cfg, run)  # (not a setting: travels with cfg to the actors)
    store = RunStore(run_uri)  # a run exists once it logged an upload or checkpointed a host
    if cfg.resume and not (store.list("hosts") or store.list("uploads")):
        raise ValueError(f"--resume {cfg.resume}: no such fleet run in {join(resolve_storage(cfg.storage), 'fleet')}")
    print(f"[cema] run id {cfg.run_id} ({'resumed' if cfg.resume else 'fresh'}; continue it with --resume {cfg.run_id})",
          flush=True)
    with run.phase("pools"):
        build = ray.remote(num_cpus=1)(build_pool)
        pools = dict(zip(cfg.corruptions, ray.get([build.remote(cfg.dataset, c, cfg.severity, cfg.pool_size, cfg.seed)
                                                     for c in cfg.corruptions])))
        pools_ref = ray.put(pools)
    cpus = int(ray.cluster_resources().get("CPU", 2))
    adapters = []
    if uploads:
        # Shards take their CPUs first; on a small cluster they share what one host leaves over.
        adapter_cpus = min(cfg.adapter_cpus, max(0.1, (cpus - 1) / cfg.adapters))
        shard_cls = ray.remote(CloudAdapterActor)
        adapters = [shard_cls.options(
            num_cpus=adapter_cpus, num_gpus=cfg.adapter_gpus, max_restarts=-1, max_task_retries=-1,
            resources={cfg.adapter_resources: 0.01} if cfg.adapter_resources else None, max_concurrency=4,
            name=actor_name(cfg, run, f"adapter-{i}")).remote(cfg, run_uri, base_ref, i, cfg.adapters)
            for i in range(cfg.adapters)]
    n_hosts = cfg.hosts or max(1, int(cpus - (adapter_cpus * cfg.adapters if uploads else 0)))
    n_hosts = min(n_hosts, cfg.devices)
    # (no CPU: it only sums the hosts' posts)
    progress = ray.remote(FleetProgress).options(num_cpus=0, max_restarts=-1, name=actor_name(cfg, run, "progress")
                                                 ).remote(n_hosts)  # (restarted empty: the next posts refill it)
    host_cls = ray.remote(DeviceHost)
    hosts = [host_cls.options(num_cpus=1, max_restarts=-1, max_task_retries=-1, scheduling_strategy="SPREAD",
                              name=actor_name(cfg, run, f"host-{i}"))
             .remote(cfg, i, part.tolist(), pools_ref, adapters, run_uri, n_hosts, progress)
             for i, part in enumerate(np.array_split(np.arange(cfg.devices), n_hosts))]
    ray.get([h.ready.remote() for h in hosts] + [a.stats.remote() for a in adapters])
    print(f"[cema] {cfg.devices} devices on {n_hosts} host actor(s), {len(adapters)} adapter shard(s), method {cfg.method}, "
          f"groups {cfg.corruptions} (severity {cfg.severity}), key_by {cfg.key_by}", flush=True)
    own = dict(METHODS[cfg.method].settings)
    kept = {k: v for k, v in cfg.pinned_cema_values().items() if k in own and own[k] != v}
    if kept:
        print(f"[cema] your settings win over method {cfg.method}'s: "
              + ", ".join(f"{k}={v!r} (method: {own[k]!r})" for k, v in kept.items()), flush=True)
    series, start, last = [], time.monotonic(), {"seen": 0, "correct": 0}
    with run.phase("stream"):
        # Each host runs its whole stream in one call (checkpointing as it goes); the driver only
        # reads the hosts' posted totals every progress_interval_s and reports them.
        running = [h.run_round.remote(cfg.batches_per_device) for h in hosts]
        while running:
            ready, running = ray.wait(running, num_returns=len(running), timeout=cfg.progress_interval_s)
            ray.get(ready)  # a host's error (one Ray does not retry) ends the run here, not silently
            last = report_progress(cfg, progress, adapters, series, start, last)
        stream_s = time.monotonic() - start
        finals = ray.get([h.finish.remote() for h in hosts])
    with run.phase("drain"):
        adapter_stats = ray.get([a.drain.remote() for a in adapters])
    metrics = summarize(cfg, finals, adapter_stats, stream_s, series)
    metrics["run_store"] = run_uri
    metrics["run_id"] = cfg.run_id
    if cfg.plot:
        plot(series, Path(run.output_dir) / "fleet.png", cfg)
    for h in hosts:
        ray.kill(h)
    ray.kill(progress)
    for a in adapters:
        ray.kill(a)
    return metrics, f"edge-{cfg.run_name}-"


def report_progress(cfg: FleetConfig, progress, adapters: list, series: list[dict], start: float,
                    last: dict) -> dict:
    """Append the fleet's posted totals to ``series`` and print a progress line; returns the totals."""
    try:
        now = ray.get(progress.totals.remote(), timeout=10)
    except (ray.exceptions.RayError, TimeoutError):  # the progress actor restarting: report next time
        return last
    if now["seen"] <= last["seen"]:
        return last  # nothing new since the previous line (or a restarted actor still refilling)
    arms = now["arms"]
    t_acc, c_acc = (arms[a][1] / arms[a][0] if arms[a][0] else None for a in ("treatment", "control"))
    elapsed = time.monotonic() - start
    try:
        queue = sum(a["queued_samples"] for a in ray.get([a.stats.remote() for a in adapters], timeout=10))
    except (ray.exceptions.RayError, TimeoutError):  # a shard restarting: report the rest
        queue = "?"
    seen, window = now["seen"], max(now["seen"] - last["seen"], 1)
    series.append({"t": round(elapsed, 3), "seen": seen, "accuracy": now["correct"] / max(seen, 1),
                   "upload_fraction": now["uploaded"] / max(seen, 1),
                   "window_accuracy": (now["correct"] - last["correct"]) / window,
                   "treatment_accuracy": t_acc, "control_accuracy": c_acc})
    lift_text = f"  lift {100 * (t_acc - c_acc):+.1f} pts vs control" if t_acc is not None and c_acc is not None else ""
    print(f"[cema] {elapsed:6.1f}s devices {cfg.devices}  seen {seen}/{cfg.devices * cfg.batches_per_device * cfg.batch_size}"
          f"  {seen / max(elapsed, 1e-9):.0f} samples/s  upload {now['uploaded'] / max(seen, 1):.1%}  "
          f"accuracy {now['correct'] / max(seen, 1):.1%}  adapter queue {queue}{lift_text}", flush=True)
    return now


def summarize(cfg: FleetConfig, finals: list[dict], shards: list[dict], stream_s: float, series: list[dict]) -> dict:
    devices = {d: v for f in finals for d, v in f["devices"].items()}
    counters = {k: sum(f["counters"].get(k, 0) for f in finals) for k in finals[0]["counters"]}
    seen = sum(v["seen"] for v in devices.values())
    correct = sum(v["correct"] for v in devices.values())
    uploaded = sum(v["accounting"]["uploaded"] for v in devices.values())
    by_group = {}
    for v in devices.values():
        g = by_group.setdefault(v["group"], [0, 0])
        g[0] += v["seen"]
        g[1] += v["correct"]
    latencies = [x for f in finals for x in f["latencies"]]
    acc = {d: v["correct"] / max(v["seen"], 1) for d, v in devices.items()}

    def arm_lift(group=None):
        pick = [d for d, v in devices.items() if group is None or v["group"] == group]
        return lift([acc[d] for d in pick if not devices[d].get("control")],
                    [acc[d] for d in pick if devices[d].get("control")])
    metrics = {
        "devices": len(devices), "samples": seen, "accuracy": round(correct / max(seen, 1), 4),
        "accuracy_by_group": {g: round(c / max(n, 1), 4) for g, (n, c) in by_group.items()},
        "lift": arm_lift(), "lift_by_group": {g: arm_lift(g) for g in by_group},
        "upload_fraction": round(uploaded / max(seen, 1), 4), "uploaded": uploaded,  # candidates (filter)
        "sent_fraction": round(counters.get("sent", 0) / max(seen, 1), 4),
        # of the candidates: refused by a shard, dropped in flight, or kept back by the budget
        "refused_or_unsent_fraction": round((counters.get("busy", 0) + counters.get("dropped_in_flight", 0)
                                             + counters.get("unsent", 0)) / max(uploaded, 1), 4),
        "refused_fraction": round((counters.get("busy", 0) + counters.get("dropped_in_flight", 0))
                                  / max(uploaded, 1), 4),
        "samples_per_s": round(seen / stream_s, 1), "stream_seconds": round(stream_s, 2),
        "host": counters, "hosts_restored": sum(bool(f["restored"]) for f in finals),
        "host_nodes": len({f["node"] for f in finals}),
        "hosts_rss_bytes": sum(f.get("rss_bytes", 0) for f in finals),
        "devices_on_newest_version": sum(v["version"] > 0 for v in devices.values()),
        "apply_latency_s": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "n": len(latencies)},
        "series": series,
    }
    if shards:
        adapter = {k: sum(a[k] for a in shards) for k, v in shards[0].items() if isinstance(v, (int, float))}
        latencies_publish = [x for a in shards for x in a["publish_latency_s"]]
        adapter["acked_not_processed"] = adapter["acked_samples"] - adapter["processed_samples"]
        adapter["shards"] = [{k: v for k, v in a.items() if k != "publish_latency_s"} for a in shards]
        metrics["adapter"] = adapter
        metrics["adapter_updates_per_s"] = round(adapter["published"] / stream_s, 2)
        metrics["adapter_samples_per_s"] = round(adapter["processed_samples"] / stream_s, 1)
        metrics["adapter_cpu_s_per_sample"] = round(adapter["busy_s"] / max(adapter["processed_samples"], 1), 5)
        metrics["publish_latency_s"] = {"p50": percentile(latencies_publish, 50),
                                        "p99": percentile(latencies_publish, 99)}
    return metrics


def plot(series: list[dict], path: Path, cfg: FleetConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in series]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t, [100 * s["window_accuracy"] for s in series], label="accuracy (since the previous point)")
    ax.plot(t, [100 * s["accuracy"] for s in series], label="accuracy (cumulative)")
    ax.plot(t, [100 * s["upload_fraction"] for s in series], label="upload fraction (cumulative)")
    if any(s.get("control_accuracy") is not None for s in series):
        ax.plot(t, [100 * (s["treatment_accuracy"] or 0) for s in series], "--", label="treatment (cumulative)")
        ax.plot(t, [100 * (s["control_accuracy"] or 0) for s in series], ":", label="control: no cloud updates")
    ax.set_xlabel("seconds")
    ax.set_ylabel("%")
    ax.set_title(f"{cfg.method}: {cfg.devices} devices, severity {cfg.severity}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
