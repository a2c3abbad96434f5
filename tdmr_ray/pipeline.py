"""The chain a fleet operator runs: foundation -> TDMR target -> GDFQ quantized -> fleet (CEMA) -> Serve.

Each stage is one of the project's jobs, run with its own output directory under the pipeline's
and one shared storage; its output is a registry version that the next stage names:

1. ``tdmr``: the foundation and a small labelled set give the target (``<name>-target@vN``);
2. ``gdfq``: that target, quantized without data (``<name>-quantized@vN``);
3. ``fleet``: CEMA fleets with the quantized target as every device's edge model and the foundation
   in the cloud, and the same fleet with the float target (the lift of each over its control group);
4. ``serve``: Serve deployed on the quantized fleet's result, one sample prediction over HTTP.

``stages.json`` in the output directory records each finished stage; a rerun with the same
``--output-dir`` resumes at the first unfinished stage, ``--from-stage STAGE`` reruns from there.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .runtime import CommonConfig

STAGES = ("tdmr", "gdfq", "fleet", "serve")


@dataclass
class PipelineConfig(CommonConfig):
    name: str = "pipeline"  # registry names <name>-target, <name>-quantized; fleet runs <name>-q / <name>-f
    foundation: str = "resnet56_augmix"  # the cloud's foundation and TDMR's teacher source
    target: str = "resnet20"
    data: str = "cifar10-jpeg"  # TDMR's labelled set (any dataset spec jobs/tdmr.py takes)
    labelled_fraction: float = 0.01
    w_bits: int = 8
    a_bits: int = 8
    devices: int = 64
    float_fleet: bool = True  # also run the fleet on the float target (the comparison)
    from_stage: str = ""  # rerun from this stage; default: the first unfinished one
    # Extra flags per stage, as on that job's command line (e.g. --tdmr-args "--tdmr.distill.steps 50")
    tdmr_args: str = ""
    gdfq_args: str = ""
    fleet_args: str = ""


PRESETS = {
    # Each stage's own quick preset, with two departures: TDMR distils 3x longer than its quick preset
    # (300 steps; its 100 left the target at 41.7%, too weak an edge for the fleet's figures to mean much)
    # and the fleets have the quickstart's 256 devices (64 gave control groups of 6, whose lift intervals
    # spanned 0).
    "quick": {"devices": 256, "tdmr_args": "--tdmr.distill.steps 300"},
    "full": {"devices": 256, "tdmr_args": "--preset full", "gdfq_args": "--preset medium",
             "fleet_args": "--preset full"},
}


def check(cfg: PipelineConfig) -> None:
    if cfg.from_stage and cfg.from_stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.from_stage!r}; stages: {list(STAGES)}")
    if not 0 < cfg.labelled_fraction <= 1:
        raise ValueError("labelled_fraction must be in (0, 1]")


class StageBook:
    """``stages.json``: what each finished stage produced; written after every stage."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.done: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a readable stage record ({exc}); remove it to start over") from exc

    def start_index(self, from_stage: str) -> int:
        if from_stage:
            return STAGES.index(from_stage)
        return next((i for i, s in enumerate(STAGES) if s not in self.done), len(STAGES))

    def record(self, stage: str, result: dict) -> None:
        self.done[stage] = result
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1, default=str))
        tmp.replace(self.path)

    def forget_from(self, index: int) -> None:
        for stage in STAGES[index:]:
            self.done.pop(stage, None)


def run_pipeline(cfg: PipelineConfig, out: Path, jobs: dict[str, Callable[[list[str]], dict]],
                 serve_stage: Callable[[PipelineConfig, dict, Path], dict]) -> dict:
    """Run the stages from the first unfinished one; ``jobs`` maps tdmr/gdfq/cema to their ``main``."""
    book = StageBook(out / "stages.json")
    start = book.start_index(cfg.from_stage)
    book.forget_from(start)
    common = ["--storage", cfg.storage, "--seed", str(cfg.seed)] + (["--data-root", cfg.data_root] if cfg.data_root else [])
    for stage in STAGES[start:]:
        print(f"[pipeline] stage {stage} ...", flush=True)
        if stage == "tdmr":
            s = jobs["tdmr"]([*common, "--foundation", cfg.foundation, "--target", cfg.target, "--data", cfg.data,
                              "--labelled-fraction", str(cfg.labelled_fraction), "--registry-name",
                              f"{cfg.name}-target", "--output-dir", str(out / "tdmr"), *shlex.split(cfg.tdmr_args)])
            result = {"ref": s["registry_version"], "target_top1": s["metrics"]["target_top1"],
                      "teacher_top1": s["metrics"]["teacher_top1"], "seconds": s["durations_s"]["total"],
                      "params": s["metrics"].get("target_params"), "mmacs": s["metrics"].get("target_mmacs")}
        elif stage == "gdfq":
            target = book.done["tdmr"]["ref"]
            s = jobs["gdfq"]([*common, "--model", target, "--w-bits", str(cfg.w_bits), "--a-bits", str(cfg.a_bits),
                              "--registry-name", f"{cfg.name}-quantized", "--output-dir", str(out / "gdfq"),
                              *shlex.split(cfg.gdfq_args)])
            m = s["metrics"]
            result = {"ref": s["registry_version"], "fp_top1": m["fp_top1"], "quantized_top1": m["quantized_top1"],
                      "bits": m["bits"], "seconds": s["durations_s"]["total"], "onnx_top1": m.get("onnx_top1"),
                      "onnx_bytes": m.get("onnx_bytes")}
        elif stage == "fleet":
            edges = {"quantized": book.done["gdfq"]["ref"]}
            if cfg.float_fleet:
                edges["float"] = book.done["tdmr"]["ref"]
            result = {}
            for kind, edge in edges.items():
                run_name = f"{cfg.name}-{kind[0]}"
                s = jobs["cema"]([*common, "--edge", edge, "--foundation", cfg.foundation, "--devices",
                                  str(cfg.devices), "--run-name", run_name, "--output-dir", str(out / f"fleet-{kind}"),
                                  *shlex.split(cfg.fleet_args)])
                m = s["metrics"]
                result[kind] = {"edge": edge, "run_name": run_name, "accuracy": m["accuracy"], "lift": m["lift"],
                                "upload_fraction": m["upload_fraction"], "seconds": s["durations_s"]["total"]}
        else:
            result = serve_stage(cfg, book.done, out)
        book.record(stage, result)
        print(f"[pipeline] stage {stage} done: {json.dumps(result, default=str)[:300]}", flush=True)
    return book.done


def report_markdown(cfg: PipelineConfig, done: dict) -> str:
    lines = [f"# Pipeline {cfg.name}: {cfg.foundation} -> {cfg.target} -> W{cfg.w_bits}A{cfg.a_bits} -> fleet -> Serve",
             "", "| stage | output | figures | seconds |", "|---|---|---|---:|"]
    if "tdmr" in done:
        t = done["tdmr"]
        size = f", {t['params'] / 1e6:.2f} M parameters, {t['mmacs']} MMACs per image" if t.get("params") else ""
        lines.append(f"| tdmr | `{t['ref']}` | target top-1 {t['target_top1']}%, teacher {t['teacher_top1']}%{size} | "
                     f"{t['seconds']:.0f} |")
    if "gdfq" in done:
        g = done["gdfq"]
        figures = (f"{g['bits']} top-1 clean / JPEG {g['quantized_top1']['clean']}% / {g['quantized_top1']['jpeg']}% "
                   f"(float {g['fp_top1']['clean']}% / {g['fp_top1']['jpeg']}%)")
        if g.get("onnx_bytes"):
            figures += (f"; ONNX QDQ {g['onnx_bytes'] / 1024:.0f} KiB, onnxruntime top-1 clean / JPEG "
                        f"{g['onnx_top1']['clean']}% / {g['onnx_top1']['jpeg']}%")
        lines.append(f"| gdfq | `{g['ref']}` | {figures} | {g['seconds']:.0f} |")
    for kind, f in (done.get("fleet") or {}).items():
        lift = f["lift"]
        text = "n/a" if lift.get("lift") is None else (
            f"{100 * lift['lift']:+.2f} [{100 * lift['ci95'][0]:+.2f}, {100 * lift['ci95'][1]:+.2f}]")
        lines.append(f"| fleet ({kind} edge) | `{f['run_name']}` | accuracy {100 * f['accuracy']:.2f}%, lift vs "
                     f"control {text} points, uploads {100 * f['upload_fraction']:.1f}% | {f['seconds']:.0f} |")
    if "serve" in done:
        s = done["serve"]
        lines.append(f"| serve | `{s['model']}` | sample: class {s['prediction']} (label {s['label']}), "
                     f"params {s['params_version']} | {s['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
