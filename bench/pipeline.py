"""The whole chain as a user runs it: ``jobs/pipeline.py --preset quick`` in its own process, timed
per stage, with the issue's targets checked on its summary.json.

Targets: the quantized target's clean top-1 within 1 point of the float target at W8A8; the fleet's
lift (treatment - control) on the quantized edge within 1 point of the lift on the float edge; the
whole quick pipeline under 30 minutes on 2 cores. Writes ``bench/results/pipeline[_tag].{json,md}``.

    TDMR_DATA=../shared/data TDMR_WEIGHTS=../shared/weights/cifar10-resnet python bench/pipeline.py
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import machine  # noqa: E402  (bench/machine.py; the script's folder is on sys.path)
from tdmr_ray.utils import write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="quick")
    p.add_argument("--pipeline-args", default="", help="more flags for jobs/pipeline.py (one string)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    p.add_argument("--keep", default="", help="run in this (new) directory and keep it, registry included, "
                                              "instead of a temporary one")
    return p.parse_args(argv)


def targets(stages: dict, total_s: float) -> list[str]:
    lines = []
    g = stages.get("gdfq")
    if g:
        drop = round(g["fp_top1"]["clean"] - g["quantized_top1"]["clean"], 2)
        lines.append(f"{g['bits']} target's clean top-1 within 1 point of the float target: "
                     f"{'met' if drop <= 1 else 'NOT met'} (float {g['fp_top1']['clean']}, quantized "
                     f"{g['quantized_top1']['clean']}, drop {drop})")
    fleet = stages.get("fleet") or {}
    if {"float", "quantized"} <= set(fleet):
        lf, lq = fleet["float"]["lift"].get("lift"), fleet["quantized"]["lift"].get("lift")
        if lf is not None and lq is not None:
            gap = round(100 * (lf - lq), 2)
            lines.append(f"fleet lift on the quantized edge within 1 point of the float edge's: "
                         f"{'met' if gap <= 1 else 'NOT met'} (float {100 * lf:+.2f}, quantized {100 * lq:+.2f})")
    lines.append(f"whole pipeline under 30 minutes: {'met' if total_s <= 1800 else 'NOT met'} ({total_s / 60:.1f} min)")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# Pipeline benchmark ({report['preset']})", "", f"Command: `{report['command']}`  ",
             f"Machine: {report['machine']}; {report['total_s'] / 60:.1f} min in all.  ",
             f"Reference speed before / after the run: {report['speed_before']} / {report['speed_after']} images/s "
             "(bench/machine.py: the 30-minute target depends on it).", "",
             "| stage | seconds |", "|---|---:|"]
    for stage, seconds in report["stage_seconds"].items():
        lines.append(f"| {stage} | {seconds:.0f} |")
    lines += ["", "The pipeline's own report:", "", report["report_md"].strip(), "", "Targets:", ""]
    lines += [f"- {t}" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        if args.keep and Path(args.keep).exists():
            raise SystemExit(f"--keep {args.keep} exists: name a new directory (a stale run would be resumed)")
        tmp = args.keep or tmp
        out = Path(tmp) / "run"
        cmd = [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--preset", args.preset, "--output-dir", str(out),
               "--storage", str(Path(tmp) / "store")] + shlex.split(args.pipeline_args)
        host = machine.describe()
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=os.environ.copy())
        total_s = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"jobs/pipeline.py failed with exit {proc.returncode}")
        speed_after = machine.reference_speed()
        summary = json.loads((out / "summary.json").read_text())
        report_md = (out / "report.md").read_text()
    stages = summary["metrics"]["stages"]
    stage_seconds = {}
    for name, record in stages.items():
        if name == "fleet":
            for kind, f in record.items():
                stage_seconds[f"fleet ({kind} edge)"] = f["seconds"]
        elif isinstance(record, dict) and "seconds" in record:
            stage_seconds[name] = record["seconds"]
    report = {"preset": args.preset, "command": "python bench/pipeline.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{host['cpu']}, {host['cpus']} CPUs, {host['isa']}", "speed_before":
              host["resnet20_forward_images_per_s"], "speed_after": speed_after, "total_s": round(total_s, 1),
              "stage_seconds": stage_seconds, "stages": stages, "report_md": report_md,
              "targets": targets(stages, total_s)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "pipeline" + (f"_{args.tag.lstrip('_')}" if args.tag else "")
    write_atomic(args.out_dir / f"{stem}.json", json.dumps(report, indent=1, default=str).encode())
    write_atomic(args.out_dir / f"{stem}.md", markdown(report).encode())
    print("\n".join(report["targets"]))
    return report


if __name__ == "__main__":
    main()
