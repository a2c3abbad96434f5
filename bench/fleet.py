"""Fleet benchmark: 64 / 256 / 1024 simulated devices on this machine, side by side with a
single-process loop (no Ray) doing the same edge forwards and filtering.

Per fleet size: fleet inference samples/s, adapter updates/s, upload->applied latency (p50/p99),
memory (total RSS of the Ray worker processes; bytes of per-device state) and the ratio of fleet
throughput to the single-process loop on the same number of cores as the device hosts.
Writes bench/results/fleet.{json,md}.

    TDMR_DATA=../shared/data TDMR_WEIGHTS=../shared/weights/cifar10-resnet python bench/fleet.py
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from tdmr_ray.cema import make_edge_runner, method_config  # noqa: E402
from tdmr_ray.fleet import FleetConfig, run_fleet  # noqa: E402
from tdmr_ray.fleet.streams import DeviceStream, build_pool, device_id  # noqa: E402
from tdmr_ray.models import create_model  # noqa: E402
from tdmr_ray.runtime import JobRun  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def ray_rss_bytes() -> int:
    """Resident memory of every Ray worker process (actors, tasks) and of Ray's own daemons."""
    total = 0
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "default_worker.py" in cmd:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    return total


def single_process_loop(devices: int, batches: int, batch_size: int, pool, threads: int, method: str) -> dict:
    """The same edge forwards and filtering as the fleet's hosts, in one process, no Ray."""
    torch.set_num_threads(threads)
    runner = make_edge_runner(method, create_model("resnet20", pretrained=True), method_config(method))
    images, _ = pool
    ids = [device_id(i) for i in range(devices)]
    states = {d: runner.new_device(d) for d in ids}
    order = {d: DeviceStream(d, len(images), batch_size, 0) for d in ids}
    start = time.perf_counter()
    for b in range(batches):
        for d in ids:
            runner.infer(states[d], images[order[d].indices(b)])
    seconds = time.perf_counter() - start
    return {"samples_per_s": round(devices * batches * batch_size / seconds, 1), "seconds": round(seconds, 2)}


def run_size(devices: int, batches: int, args, tmp: Path) -> dict:
    cfg = FleetConfig(devices=devices, batches_per_device=batches, pool_size=args.pool_size, method=args.method,
                      corruptions=args.corruptions, output_dir=str(tmp / f"fleet-{devices}"),
                      storage=str(tmp / "store"), run_name=f"bench{devices}", plot=False,
                      checkpoint_every_s=args.checkpoint_every_s)
    run = JobRun("bench-fleet", cfg)
    sampler = {"peak": 0}
    import threading

    stop = threading.Event()

    def sample():
        while not stop.is_set():
            sampler["peak"] = max(sampler["peak"], ray_rss_bytes())
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    metrics, _ = run_fleet(cfg, run)
    stop.set()
    thread.join()
    state_bytes = per_device_state_bytes(Path(cfg.output_dir), devices)
    return {"devices": devices, "batches_per_device": batches, "samples": metrics["samples"],
            "fleet_samples_per_s": metrics["samples_per_s"], "accuracy": metrics["accuracy"],
            "upload_fraction": metrics["upload_fraction"],
            "adapter_updates_per_s": metrics.get("adapter_updates_per_s"),
            "apply_latency_p50_s": metrics["apply_latency_s"]["p50"],
            "apply_latency_p99_s": metrics["apply_latency_s"]["p99"],
            "dropped_busy": metrics["host"]["busy"], "acked": metrics["host"]["acked"],
            "ray_rss_peak_gib": round(sampler["peak"] / 2**30, 2),
            "rss_per_device_mib": round(sampler["peak"] / devices / 2**20, 2),
            "device_state_kib": round(state_bytes / 1024, 1)}


def per_device_state_bytes(run_dir: Path, devices: int) -> float:
    files = list((run_dir / "hosts").glob("host-*.safetensors"))
    return sum(f.stat().st_size for f in files) / max(devices, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--samples-per-size", type=int, default=32768, help="edge samples per fleet size")
    p.add_argument("--pool-size", type=int, default=1000)
    p.add_argument("--corruptions", nargs="+", default=["gaussian_noise", "defocus_blur", "fog"])
    p.add_argument("--method", default="cema")
    p.add_argument("--checkpoint-every-s", type=float, default=30.0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    host_cpus = max(1, cpus - 1)  # the adapter takes one
    pool = build_pool("cifar10-jpeg", args.corruptions[0], 5, args.pool_size, 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for devices in args.sizes:
            batches = max(1, args.samples_per_size // (devices * 64))
            row = run_size(devices, batches, args, Path(tmp))
            base = single_process_loop(devices, batches, 64, pool, host_cpus, args.method)
            row["single_process_samples_per_s"] = base["samples_per_s"]
            row["ratio_fleet_to_single_process"] = round(row["fleet_samples_per_s"] / base["samples_per_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()
    result = {"machine": {"cpus": cpus, "host_cpus": host_cpus}, "method": args.method, "rows": rows,
              "command": "python bench/fleet.py " + " ".join(argv or sys.argv[1:])}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "fleet.json").write_text(json.dumps(result, indent=1))
    cols = ["devices", "samples", "fleet_samples_per_s", "single_process_samples_per_s",
            "ratio_fleet_to_single_process", "adapter_updates_per_s", "apply_latency_p50_s", "apply_latency_p99_s",
            "ray_rss_peak_gib", "rss_per_device_mib", "device_state_kib", "upload_fraction", "dropped_busy"]
    lines = [f"Fleet benchmark ({cpus} CPUs; hosts use {host_cpus}, the adapter 1; method {args.method}). "
             f"Command: `{result['command']}`", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (args.out_dir / "fleet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
