"""Serve benchmark: ResNet-20 edge model over HTTP on loopback, side by side with
(a) the in-process batched forward of the same model on the same cores (the compute limit) and
(b) a minimal single-process uvicorn server with the same model and codec (serve/minimal.py).

Serve variants (each in its own Ray instance, one after the other): ``serve`` = the deployment
(parameter sets in a dict per replica, devices named by ``X-Device-Id``) behind Ray Serve's default
HTTP proxy; ``serve-throughput`` = the same with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (Ray 2.55+: gRPC
between proxy and replica, the replica's own HTTP server, user code on the event loop, frozen GC),
requests through the proxy; ``serve-direct`` = that instance's replica HTTP server addressed directly
(direct ingress: what Serve's HAProxy ingress, ``RAY_SERVE_ENABLE_HA_PROXY=1``, forwards to; HAProxy
itself is not installed here). Every request names device ``dev-0`` (its parameter set applies).

Request shapes: 1 image and 64 images per request; 1 / 8 / 32 concurrent clients (a separate
load-generator process, bench/loadgen.py). Reports p50/p99 latency, requests/s, images/s, where a
replica's time goes (decode / forward / encode, from the replica's own timers; the rest of the
latency is Serve's proxy, routing and HTTP), and a hot-swap run: parameter updates during load.
Writes bench/results/serve.{json,md}.

    TDMR_WEIGHTS=../shared/weights/cifar10-resnet TDMR_DATA=../shared/data python bench/serve.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

from serve.client import free_port, wait_healthy  # noqa: E402
from serve.codec import encode_array  # noqa: E402
from tdmr_ray.data import load_dataset  # noqa: E402
from tdmr_ray.models import create_model, get_norm_affine  # noqa: E402
from tdmr_ray.registry import Registry  # noqa: E402

from machine import forward_images_per_s  # noqa: E402  (bench/machine.py; the script's folder is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"
HDR = "X-Device-Id"
VARIANTS = {"serve": {}, "serve-throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}


def load(url: str, body: Path, clients: int, seconds: float, headers: dict | None = None, versions=False) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "loadgen.py"), url + "/predict", str(body), str(clients), str(seconds)]
    cmd += [f"{k}={v}" for k, v in (headers or {}).items()] + (["--versions"] if versions else [])
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def summarize(raw: dict, images_per_request: int) -> dict:
    lat = np.array(raw["latencies"]) * 1000
    rps = raw["requests"] / raw["seconds"]
    return {"requests": raw["requests"], "failures": raw["failures"], "req_per_s": round(rps, 1),
            "images_per_s": round(rps * images_per_request, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--shapes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "REGISTRY", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args, *args.child)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    reg_uri = str(tmp / "registry")
    registry = Registry(reg_uri)
    data = load_dataset("cifar10-clean-subset", "test")
    model = create_model("resnet20", pretrained=True).eval()
    base = registry.publish_model("resnet20-cifar10", model, extra={"classes": data.classes})
    registry.publish_edge_params("edge-dev-0", get_norm_affine(model), base=base.ref)
    compute = {n: round(forward_images_per_s(model, data.tensors(slice(0, n))[0], 3.0), 1) for n in args.shapes}
    rows, hot = [], {}
    minimal_port = free_port()
    minimal = subprocess.Popen([sys.executable, "-m", "serve.minimal", "--registry", reg_uri,
                                "--port", str(minimal_port)], cwd=REPO)
    try:
        url = f"http://127.0.0.1:{minimal_port}"
        wait_healthy(url)
        rows += load_rows("minimal", url, args, data, tmp)
    finally:
        minimal.terminate()
    for variant in args.variants:
        out = tmp / f"{variant}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, reg_uri, str(out),
               "--seconds", str(args.seconds), "--clients", *map(str, args.clients), "--shapes", *map(str, args.shapes)]
        subprocess.run(cmd, check=True, env={**os.environ, **VARIANTS[variant]}, cwd=REPO)
        got = json.loads(out.read_text())
        rows += got["rows"]
        hot[variant] = got["hot_swap"]
    pick = {(r["server"], r["images_per_request"], r["clients"]): r for r in rows}
    most = max(args.clients)
    ratios = {}
    for server in dict.fromkeys(r["server"] for r in rows if r["server"] != "minimal"):
        best64 = max((r["images_per_s"] for r in rows if r["server"] == server and r["images_per_request"] == 64),
                     default=0)
        single, base_single = pick.get((server, 1, most)), pick.get(("minimal", 1, most))
        ratios[server] = {"64_image_images_per_s_to_in_process": round(best64 / compute[64], 3) if 64 in compute else None,
                          f"1_image_req_per_s_to_minimal_at_{most}_clients":
                              round(single["req_per_s"] / base_single["req_per_s"], 3) if single and base_single else None}
    result = {"compute_limit_images_per_s": compute, "rows": rows, "hot_swap": hot, "ratios": ratios,
              "command": "python bench/serve.py " + " ".join(argv or sys.argv[1:])}
    write(result, args.out_dir)


def load_rows(server: str, url: str, args, data, tmp: Path, timing: bool = False) -> list[dict]:
    rows = []
    for n in args.shapes:
        body = tmp / f"body{n}.json"
        body.write_text(json.dumps(encode_array(data.x[:n])))
        for clients in args.clients:
            before = requests.get(url + "/models", timeout=10).json().get("timing") if timing else None
            row = {"server": server, "images_per_request": n, "clients": clients,
                   **summarize(load(url, body, clients, args.seconds, {HDR: "dev-0"}), n)}
            if before is not None:
                after = requests.get(url + "/models", timeout=10).json()["timing"]
                reqs = max(after["requests"] - before["requests"], 1)
                for k in ("decode_s", "forward_s", "encode_s"):
                    row[f"replica_{k[:-2]}_ms_per_req"] = round(1000 * (after[k] - before[k]) / reqs, 3)
                row["mean_batch_images"] = round((after["images"] - before["images"]) /
                                                 max(after["batches"] - before["batches"], 1), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def direct_ingress_url() -> str | None:
    """The replica's own HTTP server under direct ingress (Serve allocates ports from 30000)."""
    from ray.serve._private.constants import (RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
                                              RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT)

    for port in range(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, min(RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
                                                                  RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT + 20)):
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return f"http://127.0.0.1:{port}"
        except requests.RequestException:
            continue
    return None


def child(args, variant: str, reg_uri: str, out: str) -> None:
    """One Serve variant in this process's own Ray instance (its environment selects the mode)."""
    import ray
    from ray import serve

    from serve.app import build

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    registry = Registry(reg_uri)
    data = load_dataset("cifar10-clean-subset", "test")
    model = create_model("resnet20", pretrained=True).eval()
    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"registry": reg_uri, "threads": 1, "poll_interval_s": 0.5, "model": "resnet20-cifar10",
                     "params_prefix": "edge-"}), name="edge", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        rows = load_rows(variant, url, args, data, tmp, timing=True)
        direct = direct_ingress_url() if variant == "serve-throughput" else None
        if direct:
            rows += load_rows("serve-direct", direct, args, data, tmp, timing=True)
        hot = hot_swap(url, registry, model, data, tmp, "resnet20-cifar10@v1")
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(out).write_text(json.dumps({"rows": rows, "hot_swap": hot}))


def hot_swap(url, registry, model, data, tmp, base_ref, updates: int = 10) -> dict:
    """Publish ``updates`` new parameter versions for dev-0 while 8 clients send requests."""
    body = tmp / "hot.json"
    body.write_text(json.dumps(encode_array(data.x[:8])))
    params = get_norm_affine(model)

    def publish():
        for i in range(updates):
            time.sleep(0.6)
            registry.publish_edge_params("edge-dev-0", {k: v * (1 + 0.01 * (i + 1)) for k, v in params.items()},
                                         base=base_ref)

    thread = threading.Thread(target=publish)
    thread.start()
    raw = load(url, body, 8, 0.6 * updates + 3, {HDR: "dev-0"}, versions=True)
    thread.join()
    seen = [int(v.rsplit("@v", 1)[1]) for v in raw["versions"]]
    return {"requests": raw["requests"], "failures": raw["failures"], "updates": updates,
            "first_version": seen[0] if seen else None, "last_version": seen[-1] if seen else None,
            "distinct_versions": len(set(seen)),
            "monotonic_per_client_order": all(a <= b for a, b in zip(seen, seen[1:]))}


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve.json").write_text(json.dumps(result, indent=1))
    cols = ["server", "images_per_request", "clients", "req_per_s", "images_per_s", "p50_ms", "p99_ms", "failures",
            "replica_decode_ms_per_req", "replica_forward_ms_per_req", "replica_encode_ms_per_req", "mean_batch_images"]
    lines = [f"Command: `{result['command']}`", "",
             f"In-process compute limit (1 thread, images/s by batch size): {result['compute_limit_images_per_s']}",
             "", "| server | 64-image images/s / in-process (best) | 1-image req/s / minimal uvicorn (most clients) |",
             "|---|---:|---:|"]
    for server, r in result["ratios"].items():
        a, b = r.values()
        lines.append(f"| {server} | {a} | {b} |")
    lines += ["", "Hot swap (10 versions published under 8-client load): " + "; ".join(
        f"{k}: {v}" for k, v in result["hot_swap"].items()), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in result["rows"]]
    (out_dir / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
