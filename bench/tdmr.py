"""TDMR against its baselines on limited-label downstream tasks built from CIFAR-10-JPEG.

Foundation: the pretrained CIFAR ResNet-56 (clean CIFAR-10; JPEG is a shifted domain for it).
Target: a small timm CNN (``resnet10t`` by default). Tasks draw their labelled images (1% or 10%,
stratified, seeded) from the JPEG training set; the rest of the training images are unlabelled
and only the distillation terms read them. ``cifar10-5``/``cifar10-2`` regroup the ten classes into
five/two superclasses, a label space the foundation was not trained on. Test: the JPEG test set
(a seeded stratified 2,000-image subset in ``--preset quick``). Methods, all through the same code,
data and step budgets: ``scratch``, ``ft-kd`` (classic KD from the fully fine-tuned foundation),
``lp-kd`` (classic KD from a linear probe), ``tdmr``. Accuracy is the final model's (no selection on
test data). Compute: wall-clock seconds and images through each model (forward/backward) with a
FLOPs estimate (see ``tdmr_ray.tdmr.compute``). Writes ``bench/results/tdmr-<preset>.{json,md}``.

    TDMR_DATA=../shared/data TDMR_WEIGHTS=../shared/weights/cifar10-resnet \\
        python bench/tdmr.py --preset quick
"""
from __future__ import annotations

import argparse
import json
import statistics
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from tdmr_ray.data import load_dataset  # noqa: E402
from tdmr_ray.tdmr import (METHODS, TDMRConfig, pretrained_foundation, run_method, split_holdout,  # noqa: E402
                           split_labelled, target_factory)
from tdmr_ray.tdmr.tasks import make_task as build_task  # noqa: E402
from tdmr_ray.utils import write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {  # name -> (task of tdmr_ray.tdmr.tasks.make_task, labelled fraction)
    "cifar10@1%": ("cifar10", 0.01),
    "cifar10@10%": ("cifar10", 0.10),
    "cifar10-5@1%": ("cifar10-5", 0.01),
    "cifar10-2@1%": ("cifar10-2", 0.01),
    "cifar10-5@10%": ("cifar10-5", 0.10),
    # mismatched: another domain (grayscale, inverted, 16x16), another label space, or both
    "gray@1%": ("gray", 0.01),
    "invert@1%": ("invert", 0.01),
    "lowres@1%": ("lowres", 0.01),
    "gray+cifar10-5@1%": ("gray+cifar10-5", 0.01),
    "glyphs@2%": ("glyphs", 0.02),
}
PRESETS = {
    # A few minutes per task on 2 free CPU cores; 2,000 test images.
    "quick": {"tasks": ["cifar10@1%", "cifar10@10%", "cifar10-5@1%"], "eval_images": 2000,
              "teacher": {"steps": 100, "batch_size": 64},
              "distill": {"steps": 250, "labelled_batch_size": 32, "unlabelled_batch_size": 96}},
    # Benchmark size (hours on a CPU, minutes on a GPU); the whole test set.
    "full": {"tasks": list(TASKS), "eval_images": None,
             "teacher": {"steps": 1000, "batch_size": 64},
             "distill": {"steps": 4000, "labelled_batch_size": 64, "unlabelled_batch_size": 192}},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), help="default: the preset's")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--foundation", default="resnet56")
    p.add_argument("--target", default=None, help="timm name or CIFAR ResNet (default: the library's)")
    p.add_argument("--seeds", default="0", help="comma list: each seed draws its own labelled set and runs every "
                   "method; the table gives mean ± std over them")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. distill.steps=100 teacher.prompt=pad (YAML/JSON values)")
    p.add_argument("--data-root", default=None, help="default: $TDMR_DATA (weights come from $TDMR_WEIGHTS)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine more threads than free cores slow torch down)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="train nothing: combine these result files (same preset, foundation, target and "
                        "config; e.g. one seed each, run at different times) into one table")
    return p.parse_args(argv)


def build_config(preset: dict, overrides: list[str], seed: int) -> TDMRConfig:
    d = TDMRConfig(seed=seed).to_dict()
    for section in ("teacher", "distill"):
        d[section].update(preset[section])
    for item in overrides:
        key, _, raw = item.partition("=")
        node, *path = key.split(".")
        parent = d
        for part in [node, *path][:-1]:
            if part not in parent:
                raise SystemExit(f"--set: unknown key {key!r}")
            parent = parent[part]
        if [node, *path][-1] not in parent:
            raise SystemExit(f"--set: unknown key {key!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as pad or cosine
        parent[[node, *path][-1]] = value
    return TDMRConfig.from_dict(d)


def make_task(name: str, train, test, seed: int, eval_images: int | None):
    task, fraction = TASKS[name]
    train, test = build_task(task, train, test, seed)
    labelled, unlabelled = split_labelled(train, fraction, seed)
    if eval_images and eval_images < len(test):
        _, test = split_holdout(test, eval_images / len(test), seed)  # stratified subset
    return labelled, unlabelled, test


def merge(paths: list[Path]) -> dict:
    """One result from several runs of the same setting (their rows and seeds together)."""
    results = [json.loads(p.read_text()) for p in paths]
    first = results[0]
    for p, r in zip(paths[1:], results[1:]):
        for field in ("preset", "foundation", "target", "device"):
            if r.get(field) != first.get(field):
                raise SystemExit(f"--merge: {p} has {field} {r.get(field)!r}, {paths[0]} has {first.get(field)!r}")
        a, b = dict(first["config"]), dict(r["config"])
        a.pop("seed", None), b.pop("seed", None)
        if a != b:
            raise SystemExit(f"--merge: {p} was run with another config than {paths[0]}")
    # (rows of older files carry no seed: their file ran one)
    rows = [{"seed": r.get("seeds", [r["config"].get("seed", 0)])[0], **row} for r in results for row in r["rows"]]
    seen = [(row["task"], row["seed"], row["method"]) for row in rows]
    if len(set(seen)) != len(seen):
        raise SystemExit("--merge: the files overlap (the same task, seed and method twice)")
    merged = dict(first, rows=rows, seeds=sorted({row["seed"] for row in rows}), merged_from=[str(p) for p in paths])
    for r in results[1:]:
        merged["target_size"] = {**r.get("target_size", {}), **merged.get("target_size", {})}
    return merged


def write_result(result: dict, args) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"tdmr-{result['preset']}{'-' + args.tag if args.tag else ''}"
    write_atomic(args.out_dir / f"{stem}.json", json.dumps(result, indent=1).encode())
    write_atomic(args.out_dir / f"{stem}.md", markdown(result).encode())
    print(markdown(result))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        result = merge(args.merge)
        write_result(result, args)
        return result
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    preset = PRESETS[args.preset]
    seeds = [int(s) for s in args.seeds.split(",")]
    train = load_dataset("cifar10-jpeg", "train", args.data_root)
    test = load_dataset("cifar10-jpeg", "test", args.data_root)
    make_foundation = pretrained_foundation(args.foundation)
    make_target = target_factory(args.target) if args.target else target_factory()
    target_name = args.target or make_target(10, 3).arch["name"]
    rows, sizes = [], {}
    for task, seed in [(t, s) for t in args.tasks or preset["tasks"] for s in seeds]:
        cfg = build_config(preset, args.set, seed)
        labelled, unlabelled, task_test = make_task(task, train, test, seed, preset["eval_images"])
        sizes[task] = model_size(make_target(labelled.num_classes, labelled.x.shape[-1]), labelled)
        for method in args.methods:
            print(f"[{task} seed {seed}] {method}: {len(labelled)} labelled, {len(unlabelled)} unlabelled, "
                  f"{len(task_test)} test", file=sys.stderr, flush=True)
            r = run_method(method, make_foundation, make_target, labelled, task_test, unlabelled, cfg,
                           log=lambda phase, step, m: print(
                               f"  {phase} {step}: " + " ".join(f"{k}={v:.3f}" for k, v in m.items()),
                               file=sys.stderr, flush=True), device=device)
            c = r["compute"]
            row = {"task": task, "seed": seed, "method": method, "labelled": len(labelled), "test_images": len(task_test),
                   "target_acc": round(100 * r["target_acc"], 2),
                   "teacher_acc": round(100 * r["teacher_acc"], 2) if "teacher_acc" in r else None,
                   "seconds": round(r["train_seconds"], 1), "teacher_seconds": round(r.get("teacher_seconds", 0), 1),
                   "distill_seconds": round(r["distill_seconds"], 1), "tflops": round(c["flops"] / 1e12, 3),
                   "forward_images": c["forward_images"], "backward_images": c["backward_images"],
                   "flops_per_image": c["flops_per_image"]}
            rows.append(row)
            print(f"[{task}] {method}: target {row['target_acc']}%  teacher {row['teacher_acc']}%  "
                  f"{row['seconds']} s  {row['tflops']} TFLOPs", file=sys.stderr, flush=True)
    result = {"preset": args.preset, "foundation": args.foundation, "target": target_name, "seeds": seeds,
              "target_size": sizes, "foundation_size": model_size(make_foundation(), test),
              "config": cfg.to_dict(), "rows": rows, "host": platform.node(), "threads": args.threads, "device": device,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_result(result, args)
    return result


def model_size(model, data) -> dict:
    """Parameters and multiply-accumulates per image of ``model`` at ``data``'s image size."""
    from tdmr_ray.tdmr.compute import forward_flops

    example = torch.zeros(1, data.x.shape[-1], *data.x.shape[1:3])
    return {"params": sum(p.numel() for p in model.parameters()), "macs": forward_flops(model, example) // 2}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def verdicts(groups: dict[tuple, list[dict]]) -> list[str]:
    """Per task with >= 2 seeds: does TDMR beat each baseline by more than the seed spread (the sum
    of the two methods' standard deviations over seeds)?"""
    out = []
    for task in dict.fromkeys(t for t, _ in groups):
        tdmr = [r["target_acc"] for r in groups.get((task, "tdmr"), [])]
        if len(tdmr) < 2:
            continue
        parts = []
        for (t, method), rs in groups.items():
            if t != task or method == "tdmr" or len(rs) < 2:
                continue
            accs = [r["target_acc"] for r in rs]
            margin = statistics.mean(tdmr) - statistics.mean(accs)
            spread = statistics.stdev(tdmr) + statistics.stdev(accs)
            word = "beats" if margin > spread else ("loses to" if -margin > spread else "ties")
            parts.append(f"{word} {method} ({margin:+.2f}, spread {spread:.2f})")
        if parts:
            out.append(f"- {task}: TDMR " + "; ".join(parts))
    return ["", "TDMR against each baseline (mean margin, points; spread = sum of the two std over seeds):", *out] \
        if out else []


def markdown(result: dict) -> str:
    seeds = result.get("seeds", [0])
    fs = result.get("foundation_size")
    lines = [f"# TDMR bench ({result['preset']}): foundation {result['foundation']}, target {result['target']}",
             "", "Target top-1 (%) of the final model on the test split"
             f"{' (a stratified subset)' if result['rows'] and result['rows'][0]['test_images'] < 10000 else ''}, "
             f"mean ± std over seeds {seeds} (each seed draws its own labelled set); teacher = the "
             "foundation-based teacher the target learnt from; compute = training only: seconds are "
             "wall-clock (on a shared machine they vary with its load), TFLOPs an estimate from the images "
             "through each model (forward + backward, see tdmr_ray.tdmr.compute).", ""]
    if fs:
        lines += [f"Foundation: {fs['params'] / 1e6:.2f} M parameters, {fs['macs'] / 1e6:.1f} MMACs per 32x32 "
                  "image. Target (every method deploys the same architecture): " + "; ".join(
                      f"{t}: {s['params'] / 1e6:.2f} M, {s['macs'] / 1e6:.1f} MMACs"
                      for t, s in result.get("target_size", {}).items()), ""]
    lines += ["| task | labelled | method | target acc | teacher acc | seconds | TFLOPs | foundation fwd/bwd imgs | "
              "target fwd/bwd imgs |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    best: dict[str, tuple] = {}
    for (task, method), rs in groups.items():
        r = rs[0]
        fb = {m: (r["forward_images"].get(m, 0), sum(r["backward_images"].get(m, {}).values()))
              for m in ("foundation", "target")}
        accs = [x["target_acc"] for x in rs]
        teacher = "-" if r["teacher_acc"] is None else _mean_std([x["teacher_acc"] for x in rs])
        lines.append(f"| {task} | {r['labelled']} | {method} | {_mean_std(accs)} | {teacher} | "
                     f"{statistics.mean(x['seconds'] for x in rs):.0f} | {r['tflops']:.2f} | "
                     f"{fb['foundation'][0]}/{fb['foundation'][1]} | {fb['target'][0]}/{fb['target'][1]} |")
        if task not in best or statistics.mean(accs) > best[task][1]:
            best[task] = (method, statistics.mean(accs))
    lines += ["", "Best per task (mean): " + ", ".join(f"{t}: {m} ({a:.2f})" for t, (m, a) in best.items())]
    lines += verdicts(groups)
    lines += ["",
              f"Device {result['device']}, {result['threads']} CPU threads, torch {result['torch']}, {result['date']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
