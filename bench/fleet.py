"""Fleet benchmark: 64 / 256 / 1024 simulated devices on this machine, side by side with a
single-process loop (no Ray) doing the same edge forwards and filtering.

Per fleet size, three runs back to back:
1. the full CEMA fleet (device hosts + cloud adapter): fleet inference samples/s, adapter
   updates/s, upload->applied latency (p50/p99), resident memory of the hosts and the adapter;
2. the same fleet with uploads off (hosts only, one per CPU): the edge side alone;
3. the single-process loop over the same devices and batches, with 1 torch thread and with one
   thread per host of run 2; its better figure is the baseline. Ratio = run 2 / run 3 (Ray around
   the same edge work on the same cores, against the best a plain loop does there).
Memory per device is the growth of the hosts' resident memory from the smallest to the largest
fleet per added device, and the size of a device's checkpointed state. Writes bench/results/fleet.{json,md}.

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
import ray  # noqa: E402
import torch  # noqa: E402

from tdmr_ray.cema import make_edge_runner, method_config  # noqa: E402
from tdmr_ray.fleet import FleetConfig, run_fleet  # noqa: E402
from tdmr_ray.fleet.streams import DeviceStream, build_pool, device_id  # noqa: E402
from tdmr_ray.models import create_model  # noqa: E402
from tdmr_ray.runtime import JobRun  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def single_process_loop(devices: int, batches: int, batch_size: int, pool, threads: int, method: str,
                        max_seconds: float = 60.0) -> dict:
    """The same edge forwards and filtering as the fleet's hosts, in one process, no Ray."""
    torch.set_num_threads(threads)
    runner = make_edge_runner(method, create_model("resnet20", pretrained=True), method_config(method))
    images, _ = pool
    ids = [device_id(i) for i in range(devices)]
    states = {d: runner.new_device(d) for d in ids}
    order = {d: DeviceStream(d, len(images), batch_size, 0) for d in ids}
    start, done = time.perf_counter(), 0
    for b in range(batches):
        for d in ids:
            runner.infer(states[d], images[order[d].indices(b)])
            done += 1
            if time.perf_counter() - start > max_seconds:  # the rate is steady: a sample of it will do
                break
        else:
            continue
        break
    seconds = time.perf_counter() - start
    return {"samples_per_s": round(done * batch_size / seconds, 1), "seconds": round(seconds, 2)}


def run_size(devices: int, batches: int, args, tmp: Path, uploads: bool = True, hosts: int = 0) -> dict:
    tag = f"{devices}-{'full' if uploads else 'edge'}"
    cfg = FleetConfig(devices=devices, batches_per_device=batches, pool_size=args.pool_size, method=args.method,
                      corruptions=args.corruptions, output_dir=str(tmp / f"fleet-{tag}"),
                      storage=str(tmp / "store"), run_name=f"bench{tag}", plot=False, uploads=uploads, hosts=hosts,
                      checkpoint_every_s=args.checkpoint_every_s)
    run = JobRun("bench-fleet", cfg)
    metrics, _ = run_fleet(cfg, run)
    rss = metrics["hosts_rss_bytes"] + metrics.get("adapter", {}).get("rss_bytes", 0)
    state_bytes = per_device_state_bytes(Path(metrics["run_store"]), devices)
    return {"devices": devices, "batches_per_device": batches, "samples": metrics["samples"],
            "fleet_samples_per_s": metrics["samples_per_s"], "accuracy": metrics["accuracy"],
            "upload_fraction": metrics["upload_fraction"],
            "adapter_updates_per_s": metrics.get("adapter_updates_per_s"),
            "apply_latency_p50_s": metrics["apply_latency_s"]["p50"],
            "apply_latency_p99_s": metrics["apply_latency_s"]["p99"],
            "dropped_busy": metrics["host"]["busy"], "acked": metrics["host"]["acked"],
            "hosts": len(list((Path(metrics["run_store"]) / "hosts").glob("host-*.safetensors"))),
            "hosts_rss_bytes": metrics["hosts_rss_bytes"], "fleet_rss_gib": round(rss / 2**30, 2),
            "device_state_kib": round(state_bytes / 1024, 1)}


def per_device_state_bytes(run_dir: Path, devices: int) -> float:
    files = list((run_dir / "hosts").glob("host-*.safetensors"))
    return sum(f.stat().st_size for f in files) / max(devices, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--batches-per-device", type=int, default=2)
    p.add_argument("--pool-size", type=int, default=1000)
    p.add_argument("--corruptions", nargs="+", default=["gaussian_noise", "defocus_blur", "fog"])
    p.add_argument("--method", default="cema")
    p.add_argument("--checkpoint-every-s", type=float, default=30.0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    pool = build_pool("cifar10-jpeg", args.corruptions[0], 5, args.pool_size, 0)
    rows = []
    batches = args.batches_per_device
    with tempfile.TemporaryDirectory() as tmp:
        for devices in args.sizes:
            row = run_size(devices, batches, args, Path(tmp))
            edge = run_size(devices, batches, args, Path(tmp), uploads=False, hosts=cpus)
            # The loop gets the same cores: its best of 1 thread and one thread per host.
            singles = {t: single_process_loop(devices, batches, 64, pool, t, args.method)["samples_per_s"]
                       for t in sorted({1, edge["hosts"]})}
            row["edge_only_fleet_samples_per_s"] = edge["fleet_samples_per_s"]
            row["edge_only_hosts"] = edge["hosts"]
            row["single_process_samples_per_s_by_threads"] = singles
            row["single_process_samples_per_s"] = max(singles.values())
            row["ratio_fleet_to_single_process"] = round(edge["fleet_samples_per_s"] / max(singles.values()), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()
    if len(rows) > 1:
        growth = (rows[-1]["hosts_rss_bytes"] - rows[0]["hosts_rss_bytes"]) / (rows[-1]["devices"] - rows[0]["devices"])
        for r in rows:
            r["rss_per_added_device_kib"] = round(growth / 1024, 1)
    result = {"machine": {"cpus": cpus}, "method": args.method, "batches_per_device": batches, "rows": rows,
              "command": "python bench/fleet.py " + " ".join(argv or sys.argv[1:])}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "fleet.json").write_text(json.dumps(result, indent=1))
    cols = ["devices", "samples", "fleet_samples_per_s", "edge_only_fleet_samples_per_s", "edge_only_hosts",
            "single_process_samples_per_s", "ratio_fleet_to_single_process", "adapter_updates_per_s",
            "apply_latency_p50_s", "apply_latency_p99_s", "fleet_rss_gib", "rss_per_added_device_kib",
            "device_state_kib", "upload_fraction", "dropped_busy"]
    lines = [f"Fleet benchmark ({cpus} CPUs; full fleet: hosts + 1-CPU adapter; method {args.method}; "
             f"{batches} batches of 64 per device). Command: `{result['command']}`", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    (args.out_dir / "fleet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
