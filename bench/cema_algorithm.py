"""CEMA vs its baselines on shifted CIFAR-10: online accuracy and communication, per stream mode.

Edge ResNet-20, foundation ResNet-56 (pretrained, from $TDMR_WEIGHTS), stream = the JPEG CIFAR-10
test set under CIFAR-10-C corruptions at severity 5, edge batch 64. Modes: ``reset`` (fresh model
per corruption, the reference protocol), ``continual`` (corruptions back to back), ``label``
(per corruption, classes arrive in Dirichlet(0.1) bursts). One table per mode: per method, mean
online accuracy over corruptions, upload fraction, MB up (uint8 images) and MB down (parameter
sets: float32 affine parameters plus, with the default edge.stats_source "cloud", TBR statistics).

    python bench/cema_algorithm.py --preset quick     # 3 corruptions x 2,000 images
    python bench/cema_algorithm.py --preset full      # 15 corruptions x 10,000 images

Cost: the quick preset spends about 12 CPU-minutes (upload_all nearly half), so about 6-7
minutes with 2 workers on 2 idle cores (26 minutes on our shared, oversubscribed machine; the
JSON records wall and CPU time). The full preset runs 25x the images: about 300 CPU-minutes,
2.5 hours with 2 workers on 2 idle cores. Results: bench/results/cema_algorithm_<preset>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "quick": {"corruptions": ["gaussian_noise", "motion_blur", "fog"], "n_per_corruption": 2000},
    "full": {"corruptions": None, "n_per_corruption": None},  # all 15, all 10,000 images
}
DEFAULT_METHODS = ["none", "bn_adapt", "tbr_stats", "tent", "upload_all", "eata_filter", "cema"]
MODES = ["reset", "continual", "label"]

_RUNS: dict = {}  # mode -> list of runs (filled before the worker pool forks)
_MODELS: dict = {}


def _job(mode: str, method: str, cfg_dict: dict, threads: int) -> dict:
    import torch

    from tdmr_ray.cema import CEMAConfig, run_stream
    from tdmr_ray.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if not _MODELS:
        _MODELS["edge"] = create_model("resnet20", pretrained=True)
        _MODELS["foundation"] = create_model("resnet56", pretrained=True)
    cfg = CEMAConfig()
    for section, values in cfg_dict.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    result = None
    cpu_start = time.process_time()
    for run in _RUNS[mode]:
        r = run_stream(method, _MODELS["edge"], _MODELS["foundation"], run, cfg)
        result = r if result is None else result.merge(r)
    by_corruption = result.accuracy_by_tag()
    acc = result.accounting
    return {"mode": mode, "method": method, "mean_accuracy": float(np.mean(list(by_corruption.values()))),
            "accuracy_by_corruption": by_corruption, "upload_fraction": acc.upload_fraction,
            "mb_up": acc.bytes_up / 1e6, "mb_down": acc.bytes_down / 1e6, "accounting": acc.as_dict(),
            "cloud": result.cloud, "seconds": result.seconds, "cpu_seconds": time.process_time() - cpu_start}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# CEMA on shifted CIFAR-10 ({meta['preset']} preset)", "",
             f"Edge ResNet-20, foundation ResNet-56; JPEG CIFAR-10 test images under {len(meta['corruptions'])} "
             f"corruption(s) at severity {meta['severity']} ({', '.join(meta['corruptions'])}), "
             f"{meta['n_per_corruption']} images each, edge batch {meta['batch_size']}. "
             f"Redundancy margin {meta['config']['filter']['redundancy_margin']}, "
             f"edge TBR statistics from: {meta['config']['edge']['stats_source']}. "
             f"Wall time {meta['seconds'] / 60:.1f} min with {meta['workers']} worker(s) "
             f"({meta['cpu_seconds'] / 60:.1f} CPU-minutes in the runs; the machine was shared).", ""]
    for mode in meta["modes"]:
        lines += [f"## Mode: {mode}", "",
                  "| method | mean online acc. (%) | upload fraction | MB up | MB down | updates | "
                  + " | ".join(meta["corruptions"]) + " |",
                  "|---|---:|---:|---:|---:|---:|" + "---:|" * len(meta["corruptions"])]
        for r in [r for r in results if r["mode"] == mode]:
            per = " | ".join(f"{100 * r['accuracy_by_corruption'][c]:.1f}" for c in meta["corruptions"])
            lines.append(f"| {r['method']} | {100 * r['mean_accuracy']:.2f} | {r['upload_fraction']:.3f} | "
                         f"{r['mb_up']:.2f} | {r['mb_down']:.2f} | {r['accounting']['updates_applied']} | {per} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    from tdmr_ray.cema import CEMAConfig
    from tdmr_ray.cema.config import redundancy_margin_for
    from tdmr_ray.cema.streams import build_runs
    from tdmr_ray.data import load_dataset
    from tdmr_ray.data.corruptions import CORRUPTIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--corruptions", default=None, help="comma list (default: the preset's)")
    p.add_argument("--n-per-corruption", type=int, default=None)
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--redundancy-margin", type=float, default=None,
                   help="default: redundancy_margin_for(10) = 0.4 (0.05 is the 1,000-class reference)")
    p.add_argument("--stats-source", choices=["cloud", "local"], default=None,
                   help="where the edge's TBR statistics come from (default: EdgeConfig's, cloud, "
                        "the reference's behaviour; local: the edge's own EMA)")
    p.add_argument("--dirichlet-alpha", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="output path without suffix")
    args = p.parse_args(argv)

    preset = PRESETS[args.preset]
    corruptions = (args.corruptions.split(",") if args.corruptions else preset["corruptions"]) or list(CORRUPTIONS)
    n = args.n_per_corruption or preset["n_per_corruption"]
    modes = args.modes.split(",")
    methods = args.methods.split(",")
    cfg = CEMAConfig(seed=args.seed)
    cfg.edge.stats_source = args.stats_source or cfg.edge.stats_source
    cfg.filter.redundancy_margin = (args.redundancy_margin if args.redundancy_margin is not None
                                    else redundancy_margin_for(10))
    cfg_dict = {"filter": dict(vars(cfg.filter)), "edge": dict(vars(cfg.edge)), "cloud": dict(vars(cfg.cloud)),
                "tent": dict(vars(cfg.tent))}

    start = time.perf_counter()
    images = load_dataset("cifar10-jpeg", "test")
    for mode in modes:
        _RUNS[mode] = build_runs(images, corruptions, args.severity, mode, args.batch_size, n,
                                 args.dirichlet_alpha, args.seed)
    print(f"streams ready in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    jobs = [(mode, method) for mode in modes for method in methods]
    # Slowest first (upload_all, then the other cloud methods) keeps both workers busy to the end.
    jobs.sort(key=lambda j: ["upload_all", "eata_filter", "cema"].index(j[1])
              if j[1] in ("upload_all", "eata_filter", "cema") else 9)
    results = []
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = [pool.submit(_job, mode, method, cfg_dict, args.threads) for mode, method in jobs]
        for f in futures:
            r = f.result()
            results.append(r)
            print(f"{r['mode']:9s} {r['method']:12s} acc {100 * r['mean_accuracy']:5.2f}  "
                  f"upload {r['upload_fraction']:.3f}  {r['seconds']:.0f}s", file=sys.stderr)
    order = {m: i for i, m in enumerate(methods)}
    results.sort(key=lambda r: (modes.index(r["mode"]), order[r["method"]]))
    meta = {"preset": args.preset, "corruptions": corruptions, "severity": args.severity,
            "n_per_corruption": n or len(images), "batch_size": args.batch_size, "modes": modes,
            "methods": methods, "dirichlet_alpha": args.dirichlet_alpha, "workers": args.workers,
            "threads": args.threads, "cpu_count": os.cpu_count(), "config": cfg_dict,
            "seconds": time.perf_counter() - start, "cpu_seconds": sum(r["cpu_seconds"] for r in results)}
    out = Path(args.output) if args.output else ROOT / "bench" / "results" / f"cema_algorithm_{args.preset}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
