"""Fleet benchmark: the cloud side's throughput, the lift a fleet gets, and fleet sizes, side by side.

Parts (``--parts``, all by default), each a table in bench/results/fleet.{json,md}:

1. ``adapter``: the same work (uploads of 32 samples spread over keys of both shards) through
   CEMA's cloud steps in one process without Ray (the limit), one adapter shard and two shards
   (actors with 1 CPU each). Samples processed per second and CPU-seconds per processed sample
   (the adapters' whole processes): on a 2-core machine two shards cannot double the rate, but the
   CPU cost per sample must not rise with shards.
2. ``lift``: the quickstart's fleet (``--preset quick``: 256 devices, 3 batches of 64, 3 corruption
   groups, robust foundation) keyed by group and by device: treatment - control accuracy with its
   95% interval, overall and per group, refused and unsent shares of the candidate uploads,
   upload->applied latency, adapter throughput; and runs keyed by each of ``--paced-key-by`` whose
   devices run one batch every ``--paced-interval-s`` seconds (a camera's pace) instead of as fast
   as one host core allows, with ``--paced-adapters`` shards, so the candidates they produce fit the
   cloud's capacity. ``--key-by`` with no value runs only the paced runs.
3. ``sizes``: 64 / 256 / 1,024 devices: the full fleet, the same fleet with uploads off (hosts
   only, one per CPU) and a single-process loop over the same edge forwards (no Ray, best of 1
   thread and one thread per host). Ratio = edge-only fleet / single process; resident memory of
   every Ray process of the fleet; memory per added device.
4. ``faults``: the quick fleet while host-0 and adapter-0 are killed ``--kills`` times each at
   random moments (Ray restarts them), and ``jobs/cema.py --preset quick`` whose whole process
   group is killed mid-stream and rerun with ``--resume``: acknowledged samples lost (must be 0),
   the upload log's rows, accuracy and lift against the unfaulted run of part 2.

    TDMR_DATA=../shared/data TDMR_WEIGHTS=../shared/weights/cifar10-resnet python bench/fleet.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from tdmr_ray.config import apply_overrides  # noqa: E402
from tdmr_ray.cema import CloudAdapter, UploadMessage, make_edge_runner, method_config  # noqa: E402
from tdmr_ray.fleet import FLEET_PRESETS, CloudAdapterActor, FleetConfig, run_fleet  # noqa: E402
from tdmr_ray.fleet.adapter import shard_of  # noqa: E402
from tdmr_ray.fleet.streams import DeviceStream, build_pool, device_id  # noqa: E402
from tdmr_ray.models import create_model  # noqa: E402
from tdmr_ray.runtime import JobRun, resolve_model  # noqa: E402

import machine  # noqa: E402  (bench/machine.py: the script's folder is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"


# -- part 1: adapter throughput --------------------------------------------------------------------
def balanced_keys(per_shard: int, shards: int = 2) -> list[str]:
    """Key names with ``per_shard`` keys on each of ``shards`` shards."""
    keys, i = {s: [] for s in range(shards)}, 0
    while any(len(v) < per_shard for v in keys.values()):
        name = f"key-{i}"
        if len(keys[shard_of(name, shards)]) < per_shard:
            keys[shard_of(name, shards)].append(name)
        i += 1
    return [k for s in range(shards) for k in keys[s]]


def adapter_work(pools: dict, uploads: int, keys: list[str]) -> list[tuple[str, UploadMessage]]:
    rng = np.random.default_rng(0)
    groups = list(pools)
    work = []
    for i in range(uploads):
        key = keys[i % len(keys)]
        images, _ = pools[groups[i % len(groups)]]
        idx = rng.choice(len(images), 32, replace=False)
        work.append((key, UploadMessage(f"dev-{i % 64}", images[idx], 0, np.zeros(32, np.float32), seq=i)))
    return work


def adapter_in_process(cfg: FleetConfig, work) -> dict:
    torch.set_num_threads(1)
    core = CloudAdapter(resolve_model(cfg.foundation), resolve_model(cfg.edge), method_config(cfg.method, cfg.cema))
    wall, cpu = time.perf_counter(), time.process_time()
    for key, msg in work:
        core.process(msg, key, replay_only=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = sum(len(m) for _, m in work)
    return {"variant": "in-process CloudAdapter (no Ray)", "samples": n, "seconds": round(wall, 2),
            "samples_per_s": round(n / wall, 1), "cpu_s_per_sample": round(cpu / n, 4)}


def adapter_shards(cfg: FleetConfig, work, shards: int, tmp: Path) -> dict:
    cls = ray.remote(CloudAdapterActor)
    actors = [cls.options(num_cpus=1, max_concurrency=4).remote(cfg, str(tmp / f"shards{shards}"), "x@v1", i, shards)
              for i in range(shards)]
    ray.get([a.stats.remote() for a in actors])  # models loaded
    start = time.perf_counter()
    replies = ray.get([actors[shard_of(k, shards)].upload.remote(m, k, time.time()) for k, m in work])
    stats = ray.get([a.drain.remote() for a in actors])
    wall = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    n = sum(s["processed_samples"] for s in stats)
    assert all(r["status"] == "ok" for r in replies) and n == sum(len(m) for _, m in work)
    return {"variant": f"{shards} adapter shard(s), 1 CPU each", "samples": n, "seconds": round(wall, 2),
            "samples_per_s": round(n / wall, 1),
            "cpu_s_per_sample": round(sum(s["cpu_s"] for s in stats) / n, 4),
            "per_shard_samples": [s["processed_samples"] for s in stats]}


def part_adapter(args, tmp: Path) -> list[dict]:
    cfg = FleetConfig(storage=str(tmp / "store"), run_name="benchadapter", checkpoint_every_s=1e9,
                      adapter_queue_samples=10**6, adapter_replay_idle_s=-1)  # new samples' steps only
    pools = {c: build_pool("cifar10-jpeg", c, 5, 500, 0) for c in cfg.corruptions}
    work = adapter_work(pools, args.adapter_uploads, balanced_keys(3))
    rows = [adapter_in_process(cfg, work)]
    rows += [adapter_shards(cfg, work, s, tmp) for s in (1, 2)]
    for r in rows:
        r["ratio_to_in_process"] = round(r["samples_per_s"] / rows[0]["samples_per_s"], 3)
    return rows


# -- part 2: the lift of the quickstart's fleet -------------------------------------------------------
def fleet_run(tmp: Path, tag: str, overrides: dict | None = None, **settings) -> dict:
    cfg = FleetConfig(output_dir=str(tmp / f"fleet-{tag}"), storage=str(tmp / "store"), run_name=f"bench{tag}",
                      plot=False, **settings)
    cfg = apply_overrides(cfg, overrides or {}, "--set")
    metrics, _ = run_fleet(cfg, JobRun("bench-fleet", cfg))
    return metrics


def part_lift(args, tmp: Path) -> list[dict]:
    rows = []
    runs = [(key_by, 0.0, 1) for key_by in args.key_by] + \
        [(key_by, args.paced_interval_s, args.paced_adapters) for key_by in args.paced_key_by if args.paced_interval_s]
    for key_by, interval, adapters in runs:
        m = fleet_run(tmp, f"lift{key_by}{int(interval)}a{adapters}", key_by=key_by, seed=args.seed,
                      device_interval_s=interval, adapters=adapters, overrides=args.set, **FLEET_PRESETS["quick"])
        lift = m["lift"]
        rows.append({"key_by": key_by, "device_interval_s": interval, "adapters": adapters,
                     "settings": ", ".join(f"{k}={v}" for k, v in args.set.items()) or "defaults",
                     "accuracy": m["accuracy"],
                     "treatment": lift["treatment_accuracy"],
                     "control": lift["control_accuracy"], "lift": lift["lift"], "lift_ci95": lift["ci95"],
                     "lift_by_group": {g: [v["lift"], v["ci95"]] for g, v in m["lift_by_group"].items()},
                     "candidate_fraction": m["upload_fraction"], "sent_fraction": m["sent_fraction"],
                     "refused_fraction": m["refused_fraction"],
                     "unsent_fraction": round(m["refused_or_unsent_fraction"] - m["refused_fraction"], 4),
                     "apply_latency_p50_s": m["apply_latency_s"]["p50"],
                     "apply_latency_p99_s": m["apply_latency_s"]["p99"],
                     "publish_latency_p50_s": m.get("publish_latency_s", {}).get("p50"),
                     "adapter_samples_per_s": m["adapter_samples_per_s"],
                     "adapter_cpu_s_per_sample": m["adapter_cpu_s_per_sample"],
                     "fleet_samples_per_s": m["samples_per_s"], "stream_seconds": m["stream_seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# -- part 3: fleet sizes ----------------------------------------------------------------------------------
def single_process_loop(devices: int, batches: int, batch_size: int, pool, threads: int, method: str,
                        max_seconds: float = 60.0) -> float:
    """Samples/s of the same edge forwards and filtering as the fleet's hosts, one process, no Ray."""
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
                return done * batch_size / (time.perf_counter() - start)
    return done * batch_size / (time.perf_counter() - start)


def ray_system_rss() -> int:
    """Resident bytes of this process and of Ray's processes other than the fleet's actors (which
    report their own at the end of a run and are gone by now): GCS, raylet, dashboard, idle workers."""
    import psutil

    total = psutil.Process().memory_info().rss
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and ("gcs_server" in cmd or "raylet" in cmd or "ray/dashboard" in cmd
                                            or "ray::" in cmd or "default_worker.py" in cmd):
                total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def part_sizes(args, tmp: Path, cpus: int) -> list[dict]:
    pool = build_pool("cifar10-jpeg", "gaussian_noise", 5, 1000, 0)
    rows = []
    for devices in args.sizes:
        common = dict(devices=devices, batches_per_device=args.batches_per_device, pool_size=1000)
        # (the edge-only fleet, for the ratio, is skipped above --edge-only-max-devices: it doubles a long run;
        # the fleet with uploads above --uploads-max-devices, where an earlier run measured it)
        full = fleet_run(tmp, f"{devices}full", **common) if devices <= args.uploads_max_devices else None
        edge = fleet_run(tmp, f"{devices}edge", uploads=False, hosts=cpus, **common) \
            if devices <= args.edge_only_max_devices or full is None else None
        run = full or edge
        hosts = len(list((Path(run["run_store"]) / "hosts").glob("host-*.safetensors")))
        single = max(single_process_loop(devices, args.batches_per_device, 64, pool, t, "cema_plus")
                     for t in sorted({1, hosts}))
        rss = run["hosts_rss_bytes"] + run.get("adapter", {}).get("rss_bytes", 0)
        # + this driver and Ray's own processes (GCS, raylet, dashboard, idle workers), read after the run
        all_rss = rss + ray_system_rss()
        state = sum(f.stat().st_size for f in (Path(run["run_store"]) / "hosts").glob("*.safetensors")) / devices
        rows.append({"devices": devices, "fleet_samples_per_s": full["samples_per_s"] if full else None,
                     "edge_only_samples_per_s": edge["samples_per_s"] if edge else None,
                     "single_process_samples_per_s": round(single, 1),
                     "ratio_edge_only_to_single_process": round(edge["samples_per_s"] / single, 3) if edge else None,
                     "ratio_fleet_to_single_process": round(full["samples_per_s"] / single, 3) if full else None,
                     "batches_per_device": args.batches_per_device, "stream_seconds": run["stream_seconds"],
                     "lift": full["lift"]["lift"] if full else None,
                     "refused_fraction": full["refused_fraction"] if full else None,
                     "apply_latency_p50_s": full["apply_latency_s"]["p50"] if full else None,
                     "memory_of": "fleet with uploads" if full else "edge-only fleet",
                     "fleet_rss_gib": round(rss / 2**30, 2), "all_ray_processes_rss_gib": round(all_rss / 2**30, 2),
                     "hosts_rss_bytes": run["hosts_rss_bytes"],
                     "device_state_kib": round(state / 1024, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        growth = (rows[-1]["hosts_rss_bytes"] - rows[0]["hosts_rss_bytes"]) / (rows[-1]["devices"] - rows[0]["devices"])
        for r in rows:
            r["rss_per_added_device_kib"] = round(growth / 1024, 1)
    return rows


# -- part 4: faults -----------------------------------------------------------------------------------------
def fault_row(kind: str, m: dict, kills: list[str], baseline: dict | None) -> dict:
    from tdmr_ray.fleet import read_uploads

    a = m["adapter"]
    logged = read_uploads(m["run_store"]).num_rows
    return {"faults": kind, "kills": len(kills), "killed": ", ".join(kills), "samples": m["samples"],
            "acked_samples": a["acked_samples"], "processed_samples": a["processed_samples"],
            "acked_lost": a["acked_samples"] - a["processed_samples"], "logged_samples": logged,
            "accuracy": m["accuracy"], "lift": m["lift"]["lift"], "hosts_restored": m["hosts_restored"],
            "adapter_restored_from": a["restored_from"],
            "unfaulted_accuracy": baseline["accuracy"] if baseline else None,
            "unfaulted_lift": baseline["lift"] if baseline else None}


def part_faults_actors(args, tmp: Path, baseline: dict | None) -> dict:
    """One quick fleet run; a thread kills host-0 and adapter-0 (Ray restarts them) at random moments."""
    import threading

    rng = np.random.default_rng(args.seed + 1)
    kills, stop = [], threading.Event()

    def killer():
        roles = ["host-0", "adapter-0"] * args.kills
        rng.shuffle(roles)
        for role in roles:
            if stop.wait(float(rng.uniform(8, 25))):
                return
            match = [n for n in ray.util.list_named_actors() if n.startswith("benchfaults") and n.endswith(role)]
            if match:
                ray.kill(ray.get_actor(match[0]), no_restart=False)
                kills.append(f"{role}@{time.strftime('%H:%M:%S')}")

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    m = fleet_run(tmp, "faults", seed=args.seed, **FLEET_PRESETS["quick"])
    stop.set()
    return fault_row("host + adapter kills", m, kills, baseline)


def part_faults_driver(args, tmp: Path, baseline: dict | None) -> dict:
    """The job as a user runs it, its process group killed mid-stream, then rerun with --resume."""
    import os
    import signal
    import subprocess

    out, store = tmp / "driver-run", tmp / "driver-store"
    cmd = [sys.executable, "jobs/cema.py", "--preset", "quick", "--no-plot", "--run-name", "benchdriver",
           "--storage", str(store), "--seed", str(args.seed)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd + ["--output-dir", str(out)], cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait = float(np.random.default_rng(args.seed + 2).uniform(15, 60))
    for line in proc.stdout:  # kill a random while after the stream started
        if "stream ..." in line:
            time.sleep(wait)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    run_id = f"benchdriver-{out.name}"
    resumed = subprocess.run(cmd + ["--output-dir", str(tmp / "driver-resumed"), "--resume", run_id], cwd=repo,
                             env=env, capture_output=True, text=True)
    if resumed.returncode:
        raise RuntimeError(f"the resumed run failed:\n{resumed.stdout[-2000:]}\n{resumed.stderr[-2000:]}")
    m = json.loads((tmp / "driver-resumed" / "summary.json").read_text())["metrics"]
    return fault_row("driver killed, --resume", m, [f"driver after {wait:.0f} s of stream"], baseline)


def parse_setting(text: str) -> tuple[str, object]:
    """``section.key=value`` -> (dotted key, YAML value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


def table(rows: list[dict], cols: list[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
           ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["adapter", "lift", "sizes", "faults"],
                   choices=["adapter", "lift", "sizes", "faults"])
    p.add_argument("--kills", type=int, default=2, help="kills of each of host-0 and adapter-0 in the faults run")
    p.add_argument("--adapter-uploads", type=int, default=48)
    p.add_argument("--key-by", nargs="*", default=["group", "device"], help="full-speed lift runs (none: only the paced ones)")
    p.add_argument("--paced-interval-s", type=float, default=180.0,
                   help="lift runs (keyed by each of --paced-key-by) whose devices run one batch per this many seconds (0: none)")
    p.add_argument("--paced-key-by", nargs="+", default=["group"])
    p.add_argument("--paced-adapters", type=int, default=1,
                   help="adapter shards of the paced runs (the full-speed runs use one)")
    p.add_argument("--set", action="append", default=[], type=parse_setting, metavar="KEY=VALUE",
                   help="a FleetConfig setting of the lift runs, dotted (cema.cloud.batch_size=16); repeatable")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--batches-per-device", type=int, default=2)
    p.add_argument("--edge-only-max-devices", type=int, default=1024,
                   help="sizes part: run the edge-only fleet (the ratio's numerator) up to this many devices")
    p.add_argument("--uploads-max-devices", type=int, default=10**9,
                   help="sizes part: run the fleet with uploads up to this many devices (above it: the edge-only fleet only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result files (fleet<tag>.json/md)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.set = dict(args.set)
    host_machine = machine.describe()  # (before Ray starts its processes beside the speed probe)
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    result = {"machine": {**host_machine, "ray_cpus": cpus},
              "command": "python bench/fleet.py " + " ".join(argv or sys.argv[1:])}
    lines = [f"Fleet benchmark ({cpus} CPUs). Command: `{result['command']}`", "", machine.headline(result["machine"]), ""]
    with tempfile.TemporaryDirectory() as tmp:
        if "adapter" in args.parts:
            result["adapter"] = part_adapter(args, Path(tmp))
            lines += ["Adapter throughput (same uploads; cloud steps only):", ""]
            lines += table(result["adapter"], ["variant", "samples", "seconds", "samples_per_s", "ratio_to_in_process",
                                               "cpu_s_per_sample", "per_shard_samples"]) + [""]
        if "lift" in args.parts:
            result["lift"] = part_lift(args, Path(tmp))
            lines += ["Lift of the quickstart's fleet (256 devices, 3 batches, treatment - control):", ""]
            lines += table(result["lift"], ["key_by", "device_interval_s", "adapters", "settings", "accuracy", "treatment", "control", "lift", "lift_ci95",
                                            "lift_by_group", "candidate_fraction", "sent_fraction", "refused_fraction",
                                            "unsent_fraction", "apply_latency_p50_s", "apply_latency_p99_s",
                                            "publish_latency_p50_s", "adapter_samples_per_s", "adapter_cpu_s_per_sample"]) + [""]
        if "sizes" in args.parts:
            result["sizes"] = part_sizes(args, Path(tmp), cpus)
            lines += [f"Fleet sizes ({args.batches_per_device} batches of 64 per device):", ""]
            lines += table(result["sizes"], ["devices", "fleet_samples_per_s", "edge_only_samples_per_s",
                                             "single_process_samples_per_s", "ratio_edge_only_to_single_process",
                                             "ratio_fleet_to_single_process", "stream_seconds", "lift",
                                             "refused_fraction", "apply_latency_p50_s", "memory_of", "fleet_rss_gib",
                                             "all_ray_processes_rss_gib",
                                             "rss_per_added_device_kib", "device_state_kib"]) + [""]
        if "faults" in args.parts:
            lift_rows = result.get("lift") or json.loads((args.out_dir / "fleet.json").read_text()).get("lift", [])
            baseline = next((r for r in lift_rows if r["key_by"] == "group" and not r["device_interval_s"]), None)
            rows = [part_faults_actors(args, Path(tmp), baseline)]
            print(json.dumps(rows[-1]), flush=True)
            ray.shutdown()  # the driver run starts its own local Ray, as a user's would
            rows.append(part_faults_driver(args, Path(tmp), baseline))
            print(json.dumps(rows[-1]), flush=True)
            result["faults"] = rows
            lines += ["Faults (quick fleet; acknowledged samples lost must be 0):", ""]
            lines += table(rows, ["faults", "kills", "killed", "samples", "acked_samples", "processed_samples",
                                  "acked_lost", "logged_samples", "accuracy", "lift", "hosts_restored",
                                  "adapter_restored_from", "unfaulted_accuracy", "unfaulted_lift"]) + [""]
    ray.shutdown()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"fleet{args.tag}.json").write_text(json.dumps(result, indent=1))
    (args.out_dir / f"fleet{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
