"""CEMA vs its baselines on shifted CIFAR-10: online accuracy and communication, per stream mode.

Edge ResNet-20, foundation ResNet-56 (pretrained, from $TDMR_WEIGHTS), stream = the JPEG CIFAR-10
test set under CIFAR-10-C corruptions at severity 5, edge batch 64. Modes: ``reset`` (fresh model
per corruption, the reference protocol), ``continual`` (corruptions back to back), ``label``
(per corruption, classes arrive in Dirichlet(0.1) bursts). One table per mode: per method, mean
online accuracy over corruptions, upload fraction, MB up (uint8 images) and MB down (parameter
sets: float32 affine parameters plus, with the default edge.stats_source "cloud", TBR statistics).

    python bench/cema_algorithm.py --preset quick     # 3 corruptions x 2,000 images
    python bench/cema_algorithm.py --preset medium    # 15 corruptions x 2,000 images
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
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "quick": {"corruptions": ["gaussian_noise", "motion_blur", "fog"], "n_per_corruption": 2000},
    # All 15 corruptions x 2,000 images (a few CPU hours for the default methods and modes).
    "medium": {"corruptions": None, "n_per_corruption": 2000},
    "full": {"corruptions": None, "n_per_corruption": None},  # all 15, all 10,000 images
}
DEFAULT_METHODS = ["none", "bn_adapt", "tbr_stats", "tent", "rdumb", "upload_all", "eata_filter", "cema"]
MODES = ["reset", "continual", "label"]

_RUNS: dict = {}  # (mode, seed) -> list of runs (filled before the worker pool forks)
_MODELS: dict = {}


def parse_variant(text: str) -> tuple[str, str, dict]:
    """``NAME=METHOD;section.key=value;...`` -> (name, method, {dotted key: value}); values are YAML."""
    import yaml

    name, _, rest = text.partition("=")
    method, *settings = rest.split(";")
    if not name or not method:
        raise SystemExit(f"--variant {text!r}: expected NAME=METHOD[;section.key=value...]")
    overrides = {}
    for item in settings:
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, method, overrides


def _job(mode: str, seed: int, label: str, method: str, overrides: dict, cfg_dict: dict, threads: int,
         foundation: str) -> dict:
    import torch

    from tdmr_ray.cema import CEMAConfig, run_stream
    from tdmr_ray.config import apply_overrides
    from tdmr_ray.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if not _MODELS:
        _MODELS["edge"] = create_model("resnet20", pretrained=True)
        _MODELS["foundation"] = create_model(foundation, pretrained=True)
    cfg = apply_overrides(CEMAConfig(seed=seed), {**{f"{sec}.{k}": v for sec, vals in cfg_dict.items()
                                                     for k, v in vals.items()}, **overrides})
    result = None
    cpu_start = time.process_time()
    for run in _RUNS[mode, seed]:
        # (a variant's settings apply over its method's own, those the method fixes included)
        r = run_stream(method, _MODELS["edge"], _MODELS["foundation"], run, cfg, trace=True, settings=overrides)
        result = r if result is None else result.merge(r)
    by_corruption = result.accuracy_by_tag()
    acc = result.accounting
    n = np.asarray(result.batch_sizes)
    trace = {"edge_acc": (np.asarray(result.batch_correct) / n).round(4).tolist(), "tag": result.batch_tags,
             **{k: v for k, v in result.trace.items()}}
    return {"mode": mode, "seed": seed, "method": label, "base_method": method, "overrides": overrides,
            "mean_accuracy": float(np.mean(list(by_corruption.values()))),
            "foundation_accuracy": result.foundation_accuracy,
            "accuracy_by_corruption": by_corruption, "upload_fraction": acc.upload_fraction,
            "mb_up": acc.bytes_up / 1e6, "mb_down": acc.bytes_down / 1e6, "accounting": acc.as_dict(),
            "cloud": result.cloud, "seconds": result.seconds, "cpu_seconds": time.process_time() - cpu_start,
            "trace": trace}


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (mode, method): means and standard deviations over seeds."""
    rows: dict = {}
    for r in results:
        rows.setdefault((r["mode"], r["method"]), []).append(r)
    out = []
    for (mode, method), rs in rows.items():
        accs = [r["mean_accuracy"] for r in rs]
        fa = [r["foundation_accuracy"] for r in rs if r["foundation_accuracy"] is not None]
        corr = {c: float(np.mean([r["accuracy_by_corruption"][c] for r in rs])) for c in rs[0]["accuracy_by_corruption"]}
        out.append({"mode": mode, "method": method, "seeds": [r["seed"] for r in rs],
                    "mean_accuracy": float(np.mean(accs)), "std_accuracy": float(np.std(accs)),
                    "foundation_accuracy": float(np.mean(fa)) if fa else None,
                    "upload_fraction": float(np.mean([r["upload_fraction"] for r in rs])),
                    "mb_up": float(np.mean([r["mb_up"] for r in rs])), "mb_down": float(np.mean([r["mb_down"] for r in rs])),
                    "updates": float(np.mean([r["accounting"]["updates_applied"] for r in rs])),
                    "accuracy_by_corruption": corr})
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    seeds = meta["seeds"]
    lines = [f"# CEMA on shifted CIFAR-10 ({meta['preset']} preset)", "",
             f"Edge ResNet-20, foundation {meta['foundation']}; JPEG CIFAR-10 test images under {len(meta['corruptions'])} "
             f"corruption(s) at severity {meta['severity']} ({', '.join(meta['corruptions'])}), "
             f"{meta['n_per_corruption']} images each, edge batch {meta['batch_size']}. "
             f"Redundancy margin {meta['config']['filter']['redundancy_margin']}, "
             f"edge TBR statistics from: {meta['config']['edge']['stats_source']}. "
             f"Wall time {meta['seconds'] / 60:.1f} min with {meta['workers']} worker(s) "
             f"({meta['cpu_seconds'] / 60:.1f} CPU-minutes in the runs). Seeds {seeds}: accuracy is the final "
             "online accuracy (every prediction counted once, as made), mean ± std over seeds; "
             "'foundation' is the cloud foundation's own online accuracy on the whole stream (the ceiling "
             "the distillation approaches).", ""]
    if meta.get("command"):
        lines[2:2] = [f"Command: `{meta['command']}`", ""]
    for name, overrides in meta.get("variants", {}).items():
        lines.append(f"- `{name}` = {overrides['method']} with {overrides['settings']}")
    lines.append("")
    for mode in meta["modes"]:
        lines += [f"## Mode: {mode}", "",
                  "| method | online acc. (%) | foundation (%) | upload fraction | MB up | MB down | updates | "
                  + " | ".join(meta["corruptions"]) + " |",
                  "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(meta["corruptions"])]
        for r in [r for r in rows if r["mode"] == mode]:
            per = " | ".join(f"{100 * r['accuracy_by_corruption'][c]:.1f}" for c in meta["corruptions"])
            fa = "" if r["foundation_accuracy"] is None else f"{100 * r['foundation_accuracy']:.1f}"
            sd = f" ± {100 * r['std_accuracy']:.2f}" if len(r["seeds"]) > 1 else ""
            lines.append(f"| {r['method']} | {100 * r['mean_accuracy']:.2f}{sd} | {fa} | {r['upload_fraction']:.3f} | "
                         f"{r['mb_up']:.2f} | {r['mb_down']:.2f} | {r['updates']:.0f} | {per} |")
        lines.append("")
    return "\n".join(lines)


def plot_traces(results: list[dict], path: Path, mode: str = "continual", smooth: int = 4) -> None:
    """Per-batch edge accuracy (solid) and foundation accuracy (dotted) for one seed of ``mode``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r["mode"] == mode and r["seed"] == results[0]["seed"]]
    if not runs:
        return
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 1])
    kernel = np.ones(smooth) / smooth
    for r in runs:
        t = r["trace"]
        line, = ax.plot(np.convolve(t["edge_acc"], kernel, mode="valid"), label=r["method"])
        fc = t["foundation_correct"]
        if fc and fc[0] is not None:
            f = np.asarray(fc, dtype=float) / 64
            ax.plot(np.convolve(f, kernel, mode="valid"), ":", color=line.get_color())
            ax2.plot(t["uploaded"], color=line.get_color())
    tags = runs[0]["trace"]["tag"]
    for i in range(1, len(tags)):
        if tags[i] != tags[i - 1]:
            ax.axvline(i, color="gray", lw=0.8)
            ax2.axvline(i, color="gray", lw=0.8)
    ax.set_ylabel(f"online accuracy ({smooth}-batch mean)")
    ax.set_title(f"{mode} stream: edge (solid), cloud foundation (dotted); gray lines = corruption changes")
    ax.legend(fontsize=7, ncol=3)
    ax2.set_ylabel("uploads / batch")
    ax2.set_xlabel("edge batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--seeds", default="0", help="comma list; the table gives mean ± std over them")
    p.add_argument("--foundation", default="resnet56_augmix",
                   help="cloud foundation (default: the corruption-robust ResNet-56, the offline stand-in "
                        "for a large pretrained foundation)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="CEMAConfig override for every method, e.g. cloud.edge_lr=0.005 (repeatable)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD;KEY=VALUE;...",
                   help="an extra row: METHOD with these settings (repeatable), e.g. "
                        "'no-replay=cema;cloud.replay_capacity=0'")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--output", default=None, help="output path without suffix")
    args = p.parse_args(argv)

    preset = PRESETS[args.preset]
    corruptions = (args.corruptions.split(",") if args.corruptions else preset["corruptions"]) or list(CORRUPTIONS)
    n = args.n_per_corruption or preset["n_per_corruption"]
    modes = args.modes.split(",")
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(x) for x in args.seeds.split(",")]
    variants = [parse_variant(v) for v in args.variant]
    import yaml
    global_overrides = {k.strip(): yaml.safe_load(v) for k, _, v in (x.partition("=") for x in args.set)}
    cfg = CEMAConfig()
    cfg.edge.stats_source = args.stats_source or cfg.edge.stats_source
    cfg.filter.redundancy_margin = (args.redundancy_margin if args.redundancy_margin is not None
                                    else redundancy_margin_for(10))
    from tdmr_ray.config import apply_overrides
    cfg = apply_overrides(cfg, global_overrides, "--set")
    cfg_dict = {s: dict(vars(getattr(cfg, s))) for s in ("filter", "edge", "cloud", "tent", "shift")
                if hasattr(cfg, s)}

    start = time.perf_counter()
    images = load_dataset("cifar10-jpeg", "test")
    for mode in modes:
        for seed in seeds:
            _RUNS[mode, seed] = build_runs(images, corruptions, args.severity, mode, args.batch_size, n,
                                           args.dirichlet_alpha, seed)
    print(f"streams ready in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    rows = [(m, m, {}) for m in methods] + variants
    jobs = [(mode, seed, *row) for mode in modes for seed in seeds for row in rows]
    # Slowest first (the cloud methods, upload_all first) keeps both workers busy to the end.
    from tdmr_ray.cema import METHODS
    jobs.sort(key=lambda j: (not METHODS[j[3]].uploads, j[3] != "upload_all"))
    results = []
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = [pool.submit(_job, *job, cfg_dict, args.threads, args.foundation) for job in jobs]
        for f in futures:
            r = f.result()
            results.append(r)
            fa = r["foundation_accuracy"]
            print(f"{r['mode']:9s} s{r['seed']} {r['method']:24s} acc {100 * r['mean_accuracy']:5.2f}  "
                  f"foundation {'' if fa is None else f'{100 * fa:5.2f}'}  upload {r['upload_fraction']:.3f}  "
                  f"{r['seconds']:.0f}s", file=sys.stderr, flush=True)
    order = {row[0]: i for i, row in enumerate(rows)}
    results.sort(key=lambda r: (modes.index(r["mode"]), order[r["method"]], r["seed"]))
    table = aggregate(results)
    command = "python bench/cema_algorithm.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = {"command": command, "preset": args.preset, "foundation": args.foundation, "seeds": seeds,
            "variants": {name: {"method": m, "settings": o} for name, m, o in variants},
            "corruptions": corruptions, "severity": args.severity,
            "n_per_corruption": n or len(images), "batch_size": args.batch_size, "modes": modes,
            "methods": methods, "dirichlet_alpha": args.dirichlet_alpha, "workers": args.workers,
            "threads": args.threads, "cpu_count": os.cpu_count(), "config": cfg_dict,
            "seconds": time.perf_counter() - start, "cpu_seconds": sum(r["cpu_seconds"] for r in results)}
    suffix = f"_{args.tag}" if args.tag else ""
    out = Path(args.output) if args.output else ROOT / "bench" / "results" / f"cema_algorithm_{args.preset}{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "table": table, "results": results}))
    out.with_suffix(".md").write_text(markdown(table, meta))
    plot_traces(results, out.with_name(out.name + "_continual.png"))
    print(markdown(table, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
