"""Top-1 of the pretrained CIFAR ResNets on clean CIFAR-10, CIFAR-10-JPEG and CIFAR-10-C corruptions.

Rows: the clean subset (1,017 exact test images, always whole), the JPEG test set (10,000), and each
CIFAR-10-C corruption at ``--severity`` (5) applied on top of the JPEG test set. ``--limit N`` uses a
seeded random sample of N JPEG test images (a prefix would hold only the first classes). Records
the time each corruption takes on those images. Writes ``bench/results/eval_pretrained.{json,md}``.

    TDMR_DATA=../shared/data TDMR_WEIGHTS=../shared/weights/cifar10-resnet \\
        python bench/eval_pretrained.py --limit 2000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from tdmr_ray.data import load_dataset  # noqa: E402
from tdmr_ray.data.corruptions import CORRUPTIONS, corrupt_dataset  # noqa: E402
from tdmr_ray.evaluation import accuracy  # noqa: E402
from tdmr_ray.models import create_model  # noqa: E402
from tdmr_ray.utils import write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZE = 500


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--limit", type=int, default=0, help="JPEG test images to use (0: all 10,000)")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    p.add_argument("--seed", type=int, default=0, help="seeds the --limit sample and the corruptions")
    p.add_argument("--data-root", default=None, help="default: $TDMR_DATA (weights come from $TDMR_WEIGHTS)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.corruptions) - set(CORRUPTIONS))
    if unknown:
        p.error(f"unknown corruptions {unknown}; choose from {', '.join(CORRUPTIONS)}")
    return args


def evaluate(models: dict, data) -> tuple[dict, dict]:
    top1, seconds = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        top1[name] = round(accuracy(model, data, batch_size=BATCH_SIZE), 2)
        seconds[name] = round(time.perf_counter() - start, 2)
    return top1, seconds


def run(args: argparse.Namespace, command: str) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {name: create_model(name, pretrained=True).eval() for name in args.models}
    clean = load_dataset("cifar10-clean-subset", "test", root=args.data_root)
    jpeg = load_dataset("cifar10-jpeg", "test", root=args.data_root).sample(args.limit, args.seed)
    rows = []

    def add_row(label, data, corrupt_s=None):
        top1, eval_s = evaluate(models, data)
        rows.append({"set": label, "images": len(data), "top1": top1, "eval_s": eval_s, "corrupt_s": corrupt_s})
        shown = "  ".join(f"{m} {a:5.2f}%" for m, a in top1.items())
        timing = f"  (corrupt {corrupt_s:.1f}s)" if corrupt_s is not None else ""
        print(f"{label:24s} {len(data):6d}  {shown}{timing}", flush=True)

    add_row("clean subset", clean)
    add_row("jpeg", jpeg)
    for name in args.corruptions:
        start = time.perf_counter()
        corrupted = corrupt_dataset(jpeg, name, args.severity, args.seed)
        add_row(f"jpeg+{name}@{args.severity}", corrupted, round(time.perf_counter() - start, 2))
    corrupted_rows = rows[2:]
    mean = {m: round(sum(r["top1"][m] for r in corrupted_rows) / len(corrupted_rows), 2)
            for m in args.models} if corrupted_rows else {}
    return {
        "benchmark": "eval_pretrained",
        "command": command,
        "config": {"models": args.models, "limit": args.limit, "jpeg_images": len(jpeg), "severity": args.severity,
                   "seed": args.seed, "batch_size": BATCH_SIZE, "torch_threads": torch.get_num_threads()},
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
        "mean_corruption_top1": mean,
    }


def markdown(result: dict) -> str:
    cfg, models = result["config"], result["config"]["models"]
    lines = [
        "# Pretrained CIFAR ResNets: clean, JPEG and CIFAR-10-C corruptions",
        "",
        f"`{result['command']}` — JPEG test images used: {cfg['jpeg_images']} "
        f"(limit {cfg['limit'] or 'none'}), severity {cfg['severity']}, seed {cfg['seed']}, "
        f"{cfg['torch_threads']} torch thread(s) on {result['host']['cpus']} CPUs. Corruptions are applied "
        "on top of the JPEG test set; `corrupt s` is the time to corrupt those images.",
        "",
        "| set | images | " + " | ".join(f"{m} top-1 %" for m in models) + " | corrupt s |",
        "|---|---:|" + "---:|" * len(models) + "---:|",
    ]
    for row in result["rows"]:
        timing = "" if row["corrupt_s"] is None else f"{row['corrupt_s']:.2f}"
        lines.append(f"| {row['set']} | {row['images']} | "
                     + " | ".join(f"{row['top1'][m]:.2f}" for m in models) + f" | {timing} |")
    if result["mean_corruption_top1"]:
        lines.append("| **mean over corruptions** | | "
                     + " | ".join(f"**{result['mean_corruption_top1'][m]:.2f}**" for m in models) + " | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    result = run(args, " ".join(["python bench/eval_pretrained.py", *argv]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out_dir / "eval_pretrained.json", (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(args.out_dir / "eval_pretrained.md", markdown(result).encode())
    print(f"wrote {args.out_dir / 'eval_pretrained.json'} and .md")
    return result


if __name__ == "__main__":
    main()
