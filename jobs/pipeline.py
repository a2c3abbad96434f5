"""The whole chain: foundation -> TDMR target -> GDFQ quantized -> CEMA fleet -> Serve.

    python jobs/pipeline.py --preset quick
    python jobs/pipeline.py --output-dir runs/my-pipeline                 # rerun: resumes at the first unfinished stage
    python jobs/pipeline.py --output-dir runs/my-pipeline --from-stage fleet
    ray job submit --working-dir . -- python jobs/pipeline.py --preset quick --storage s3://bucket/prefix

Each stage is the project's own job (jobs/tdmr.py, jobs/gdfq.py, jobs/cema.py) on one storage; each
hands the next a registry version. Writes stages.json, report.md, summary.json and pipeline.png.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tdmr_ray.pipeline import PRESETS, PipelineConfig, check, report_markdown, run_pipeline  # noqa: E402
from tdmr_ray.runtime import fail, init_ray, start_job  # noqa: E402


def serve_stage(cfg: PipelineConfig, done: dict, out: Path) -> dict:
    """Deploy Serve on the quantized fleet's model and parameter sets; one prediction over HTTP."""
    import os

    import requests
    import yaml
    from ray import serve

    from serve.app import build
    from serve.client import free_port, wait_healthy
    from serve.codec import encode_array
    from tdmr_ray.data import load_dataset
    from tdmr_ray.registry import Registry, parse_ref

    start = time.monotonic()
    fleet = done["fleet"]["quantized"]
    model_name = parse_ref(fleet["edge"])[0]
    user_config = {"registry": Registry.for_storage(cfg.storage).uri, "model": model_name,
                   "params_prefix": f"edge-{fleet['run_name']}-", "poll_interval_s": 1.0}
    (out / "serve_user_config.yaml").write_text(yaml.safe_dump(user_config))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(user_config), name="pipeline-edge", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout=300)
    sample = load_dataset("cifar10-clean-subset", "test")
    keys = [n.removeprefix(user_config["params_prefix"]) for n in Registry(user_config["registry"]).names()
            if n.startswith(user_config["params_prefix"])]
    headers = {"serve_multiplexed_model_id": keys[0]} if keys else {}
    r = requests.post(f"{url}/predict", json=encode_array(sample.x[:1]), headers=headers, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"Serve answered {r.status_code}: {r.text[:300]}")
    body = r.json()
    if not os.environ.get("RAY_ADDRESS"):  # a local Ray instance ends with this driver; a cluster keeps Serve
        serve.shutdown()
    return {"model": body["model"], "params_version": body["params"], "device_key": keys[0] if keys else None,
            "prediction": body["predictions"][0]["class"], "label": int(sample.y[0]), "url": url,
            "user_config": str(out / "serve_user_config.yaml"), "seconds": time.monotonic() - start}


def plot(done: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fleets = done.get("fleet") or {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names, values = [], []
    if "tdmr" in done:
        names.append("TDMR target\n(clean test)")
        values.append(done["tdmr"]["target_top1"])
    if "gdfq" in done:
        names.append("quantized\n(clean)")
        values.append(done["gdfq"]["quantized_top1"]["clean"])
    for kind, f in fleets.items():
        names.append(f"fleet, {kind}\n(shifted)")
        values.append(100 * f["accuracy"])
    ax.bar(names, values, color="#4c72b0")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("pipeline: accuracy per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    import cema
    import gdfq
    import tdmr

    cfg, run = start_job("pipeline", PipelineConfig, argv, PRESETS, __doc__, validate=check)
    init_ray()
    try:
        done = run_pipeline(cfg, run.output_dir, {"tdmr": tdmr.main, "gdfq": gdfq.main, "cema": cema.main},
                            serve_stage)
    except (ValueError, KeyError) as exc:
        fail(str(exc))
    (run.output_dir / "report.md").write_text(report_markdown(cfg, done))
    plot(done, run.output_dir / "pipeline.png")
    headline = {"report": str(run.output_dir / "report.md")}
    for kind, f in (done.get("fleet") or {}).items():
        lift = f["lift"].get("lift")
        headline[f"fleet lift ({kind} edge), points"] = "n/a" if lift is None else f"{100 * lift:+.2f}"
    if "serve" in done:
        headline["served"] = f"{done['serve']['model']} / {done['serve']['params_version']}"
    return run.finish({"stages": done}, headline)


if __name__ == "__main__":
    main()
