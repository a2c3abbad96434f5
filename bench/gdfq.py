"""GDFQ against its data-free baselines: top-1 of FP, noise calibration, ZeroQ-style and GDFQ.

For each model (pretrained CIFAR ResNets) and bit width (W8A8, W6A6, W4A4 by default): accuracy on
the clean subset (1,017 exact test images) and the JPEG test set (10,000; ``--jpeg-limit`` samples).
Every figure is the *final* model's: nothing is selected on test data.

* ``fp``: the float model.
* ``noise``: activation ranges calibrated on Gaussian noise, no fine-tuning.
* ``zeroq``: ranges calibrated on BN-statistics-optimised images (distilled once per model and shared
  by all bit widths).
* ``gdfq``: generator + fine-tuning. All bit widths of a model train on one generator stream (the
  generator's loss never involves a quantized model, so this equals separate runs with the same seed).

``--seeds 0,1,2`` repeats everything per seed (the generator, the calibration images, the JPEG
sample's draw stays seed 0's) and the table gives mean ± std. ``onnx``: the first seed's GDFQ models
(noise-calibrated ones if GDFQ is not run) exported as ONNX QDQ graphs (``tdmr_ray.gdfq.onnx_export``)
and run by onnxruntime on the same sets: top-1 against the fake-quant model, file size and latency
against the float model's ONNX export (one thread; batch 1 and batch 64).

Presets: ``paper`` is the reference schedule (400 epochs x 200 iterations x batch 200, for a GPU);
``quick`` is a CPU schedule (about 20 minutes for ResNet-20 at three bit widths on 2 idle cores)
whose departures from the reference are listed in the output (``schedule_departures``).

    TDMR_DATA=../shared/data TDMR_WEIGHTS=../shared/weights/cifar10-resnet \\
        python bench/gdfq.py --preset quick --models resnet20

Writes ``bench/results/gdfq_<preset>.{json,md}`` (``--tag`` appends to the name).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from tdmr_ray.data import load_dataset  # noqa: E402
from tdmr_ray.evaluation import accuracy  # noqa: E402
from tdmr_ray.gdfq.baselines import CalibrationConfig, distill_images, noise_calibrated, zeroq_calibrated  # noqa: E402
from tdmr_ray.gdfq.job import CPU_DEPARTURES, job_config  # noqa: E402
from tdmr_ray.gdfq.train import GDFQConfig, run_gdfq  # noqa: E402
from tdmr_ray.models import create_model  # noqa: E402
from tdmr_ray.utils import write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("fp", "noise", "zeroq", "gdfq")
EVAL_BATCH = 500

PRESETS = {
    "paper": (GDFQConfig(), CalibrationConfig()),
    # The job's medium schedule (about an hour per model on 2 CPU cores: 1/125 of the reference's
    # generated images) with the reference's loss; --cpu-loss takes the job's loss too.
    "medium": (dataclasses.replace(job_config("medium").gdfq, ce_agreed_only=False, kd_only_from_bits=0),
               CalibrationConfig(batches=1, batch_size=128, zeroq_iters=200)),
    "quick": (GDFQConfig(epochs=16, iters_per_epoch=25, batch_size=32, warmup_epochs=8, range_update_epochs=8,
                         lr_milestones=(12,)),
              CalibrationConfig(batches=1, batch_size=128, zeroq_iters=200)),
}


def schedule_departures(cfg: GDFQConfig, calib: CalibrationConfig) -> list[str]:
    """How a preset's schedule differs from the reference's (empty for ``paper``)."""
    ref, ref_calib, notes = GDFQConfig(), CalibrationConfig(), []
    images, ref_images = cfg.epochs * cfg.iters_per_epoch * cfg.batch_size, ref.epochs * ref.iters_per_epoch * ref.batch_size
    if images != ref_images:
        notes.append(f"GDFQ schedule {cfg.epochs} epochs x {cfg.iters_per_epoch} iterations x batch {cfg.batch_size} "
                     f"instead of {ref.epochs} x {ref.iters_per_epoch} x {ref.batch_size} (1/{ref_images / images:.0f} "
                     "of the generated images)")
    if (cfg.warmup_epochs, cfg.range_update_epochs) != (ref.warmup_epochs, ref.range_update_epochs):
        notes.append(f"generator-only warm-up {cfg.warmup_epochs} epochs and activation-range updates for "
                     f"{cfg.range_update_epochs} epochs ({cfg.warmup_epochs * cfg.iters_per_epoch} iterations; "
                     f"reference: {ref.warmup_epochs} epochs = {ref.warmup_epochs * ref.iters_per_epoch} iterations), "
                     "so the generator has trained before the quantized model learns from it")
    if cfg.lr_milestones != ref.lr_milestones:
        notes.append(f"learning rates x{cfg.lr_decay} at epochs {list(cfg.lr_milestones)} "
                     f"(reference: {list(ref.lr_milestones)})")
    if (calib.batches, calib.batch_size, calib.zeroq_iters) != (ref_calib.batches, ref_calib.batch_size,
                                                               ref_calib.zeroq_iters):
        notes.append(f"baselines calibrate on {calib.batches} batch(es) of {calib.batch_size}; ZeroQ-style images "
                     f"take {calib.zeroq_iters} Adam steps (ZeroQ: 500)")
    if cfg.ce_agreed_only:
        notes.append("loss: the CE to the generator's label only where the FP model agrees with it (ce_agreed_only, "
                     "the job's CPU presets; reference: on every generated image)")
    if cfg.kd_only_from_bits:
        notes.append(f"loss: no CE for students of {cfg.kd_only_from_bits} bits or more (kd_only_from_bits)")
    return notes


def shorten(cfg: GDFQConfig, epochs: int) -> GDFQConfig:
    """``cfg`` with ``epochs`` epochs: milestones at the same fractions of the schedule, warm-up and
    activation-range epochs unchanged (they are about the generator's start, not the schedule's length)."""
    if epochs >= cfg.epochs:
        return cfg
    if epochs <= cfg.warmup_epochs:
        raise ValueError(f"--epochs {epochs} leaves no epoch after the {cfg.warmup_epochs} warm-up epochs")
    milestones = sorted({max(cfg.warmup_epochs + 1, round(m * epochs / cfg.epochs)) for m in cfg.lr_milestones})
    return dataclasses.replace(cfg, epochs=epochs, lr_milestones=tuple(m for m in milestones if m < epochs))


def probe_seconds_per_epoch(name: str, cfg: GDFQConfig, bits: list[int], device: str) -> float:
    """Seconds of one quantized-model-updating epoch of ``cfg`` (a throwaway state; one warm-up epoch
    first so that kernels are compiled and caches warm)."""
    from tdmr_ray.gdfq.train import make_state, train_epoch

    probe = dataclasses.replace(cfg, epochs=2, warmup_epochs=1, range_update_epochs=1, lr_milestones=())
    state = make_state(create_model(name, pretrained=True), probe, device, bit_widths=[(b, b) for b in bits])
    train_epoch(state)
    start = time.perf_counter()
    train_epoch(state)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4], help="WkAk for each k")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--jpeg-limit", type=int, default=0, help="JPEG test images (0: all 10,000; else a seeded sample)")
    p.add_argument("--epochs", type=int, default=0,
                   help="shorten the preset's GDFQ schedule to this many epochs (learning-rate milestones scaled "
                        "to the same fractions; warm-up and range-update epochs kept)")
    p.add_argument("--budget-minutes", type=float, default=0.0,
                   help="time one full epoch first, then shorten the schedule (as --epochs) to fit this many minutes "
                        "of GDFQ training per model; the probe's seconds per epoch and the preset's expected "
                        "full length are reported")
    p.add_argument("--cpu-loss", action="store_true",
                   help="the loss of the job's CPU presets (ce_agreed_only, no CE at 8 bits: "
                        "tdmr_ray.gdfq.job.CPU_DEPARTURES) instead of the reference's")
    p.add_argument("--seeds", default="0", help="comma list; the table gives mean ± std over them")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export / onnxruntime part")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--data-root", default=None, help="default: $TDMR_DATA (weights come from $TDMR_WEIGHTS)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="REPORT_JSON",
                   help="train nothing: join the seeds of these reports (same preset, models, bits, methods and "
                        "settings but the seed) into one report named by --preset/--tag")
    return p.parse_args(argv)


def evaluate(model, sets: dict, device) -> dict:
    return {name: round(accuracy(model, data, batch_size=EVAL_BATCH, device=device), 2) for name, data in sets.items()}


def bench_model(name: str, args, gdfq_cfg: GDFQConfig, calib_cfg: CalibrationConfig, sets: dict) -> dict:
    """One seed's results; ``out["models"]`` (not written) holds the quantized models for the ONNX part."""
    device = torch.device(args.device)
    fp = create_model(name, pretrained=True).to(device).eval()
    out = {"top1": {}, "seconds": {}, "gdfq_last_epoch": None, "models": {}}

    def record(method, bits, model, seconds):
        key = f"W{bits}A{bits}" if bits else "FP"
        start = time.perf_counter()
        out["top1"].setdefault(key, {})[method] = evaluate(model, sets, device)
        eval_s = time.perf_counter() - start
        out["seconds"].setdefault(key, {})[method] = {"method": round(seconds, 1), "eval": round(eval_s, 1)}
        print(f"{name:9s} {key:5s} {method:6s} " + "  ".join(f"{s} {a:6.2f}" for s, a in out["top1"][key][method].items())
              + f"  ({seconds:.0f}s + eval {eval_s:.0f}s)", flush=True)

    if "fp" in args.methods:
        record("fp", None, fp, 0.0)
    if "noise" in args.methods:
        for bits in args.bits:
            start = time.perf_counter()
            qmodel, _ = noise_calibrated(fp, bits, bits, calib_cfg)
            record("noise", bits, qmodel, time.perf_counter() - start)
            out["models"][bits] = ("noise", qmodel)
    if "zeroq" in args.methods:
        start = time.perf_counter()
        rng = torch.Generator(device=device).manual_seed(calib_cfg.seed)
        images = torch.cat([distill_images(fp, calib_cfg.batch_size, calib_cfg, rng) for _ in range(calib_cfg.batches)])
        out["seconds"]["zeroq_distill"] = round(time.perf_counter() - start, 1)
        for bits in args.bits:
            start = time.perf_counter()
            qmodel, _ = zeroq_calibrated(fp, bits, bits, calib_cfg, images=images)
            record("zeroq", bits, qmodel, time.perf_counter() - start)
    if "gdfq" in args.methods:
        start = time.perf_counter()

        def progress(state, metrics):
            shown = {k: round(v, 3) for k, v in metrics.items() if isinstance(v, float)}
            print(f"  gdfq {name} epoch {metrics['epoch'] + 1}/{gdfq_cfg.epochs} {shown}", file=sys.stderr, flush=True)

        teacher = create_model(name, pretrained=True)  # make_state freezes its model: keep `fp` untouched
        state = run_gdfq(teacher, gdfq_cfg, device, on_epoch=progress, bit_widths=[(b, b) for b in args.bits])
        seconds = time.perf_counter() - start
        out["seconds"]["gdfq_train_all_bits"] = round(seconds, 1)
        out["gdfq_last_epoch"] = state.history[-1]
        out["quant_report"] = state.students[0].report.to_dict()
        for bits, student in zip(args.bits, state.students):
            record("gdfq", bits, student.qmodel, seconds / len(state.students))
            out["models"][bits] = ("gdfq", student.qmodel)
    return out


def _latency_ms(run, x: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of ``run(x)`` over ``repeats`` calls, after warm-up calls."""
    for _ in range(3):
        run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(1000 * (time.perf_counter() - start))
    return round(statistics.median(times), 3)


def bench_onnx(name: str, res: dict, sets: dict) -> dict:
    """The quantized models as ONNX QDQ graphs under onnxruntime, against the fake-quant models and
    the float model's ONNX export."""
    from tdmr_ray.gdfq.onnx_export import OnnxRuntimeModel, export_float_onnx, export_onnx

    fp_payload = export_float_onnx(create_model(name, pretrained=True).eval())
    fp_session = OnnxRuntimeModel(fp_payload, threads=1)
    x1, x64 = torch.rand(1, 3, 32, 32), torch.rand(64, 3, 32, 32)
    rows = [{"model": name, "bits": "FP", "method": "fp", "bytes": len(fp_payload),
             "top1": evaluate(fp_session, sets, "cpu"), "fake_quant_top1": None,
             "ms_batch1": _latency_ms(fp_session, x1, 200), "ms_batch64": _latency_ms(fp_session, x64, 20)}]
    for bits, (method, qmodel) in sorted(res["models"].items(), reverse=True):
        payload = export_onnx(qmodel.cpu().eval())
        session = OnnxRuntimeModel(payload, threads=1)
        key = f"W{bits}A{bits}"
        rows.append({"model": name, "bits": key, "method": method, "bytes": len(payload),
                     "top1": evaluate(session, sets, "cpu"), "fake_quant_top1": res["top1"][key][method],
                     "ms_batch1": _latency_ms(session, x1, 200), "ms_batch64": _latency_ms(session, x64, 20)})
        print(f"{name:9s} {key:5s} onnx   " + "  ".join(f"{s} {a:6.2f}" for s, a in rows[-1]["top1"].items())
              + f"  ({len(payload) / 1024:.0f} KiB)", flush=True)
    for row in rows:
        row["size_ratio_to_fp"] = round(row["bytes"] / rows[0]["bytes"], 3)
        row["latency_ratio_to_fp_batch64"] = round(row["ms_batch64"] / rows[0]["ms_batch64"], 3)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return round(statistics.mean(values), 2), (round(statistics.stdev(values), 2) if len(values) > 1 else 0.0)


def aggregate(per_seed: list[dict]) -> dict:
    """model -> bits -> method -> set -> [mean, std] over seeds."""
    out = {}
    for model in per_seed[0]:
        for key, by_method in per_seed[0][model]["top1"].items():
            for method, by_set in by_method.items():
                for split in by_set:
                    values = [r[model]["top1"][key][method][split] for r in per_seed]
                    out.setdefault(model, {}).setdefault(key, {}).setdefault(method, {})[split] = list(_mean_std(values))
    return out


def targets(per_seed: list[dict], onnx_rows: list[dict]) -> list[str]:
    """The issue's targets, checked on the measured figures (every seed; means for the drops)."""
    lines = []
    summary = aggregate(per_seed)
    for model in summary:
        res = {"top1": {k: {m: {s: v[0] for s, v in by_set.items()} for m, by_set in by_m.items()}
                        for k, by_m in summary[model].items()}}
        fp = res["top1"].get("FP", {}).get("fp")
        w8 = res["top1"].get("W8A8", {})
        w4 = res["top1"].get("W4A4", {})
        if fp and w8:
            for method, top1 in w8.items():
                gaps = {s: round(fp[s] - a, 2) for s, a in top1.items()}
                ok = all(g <= 0.5 for g in gaps.values())
                lines.append(f"{model} W8A8 {method} within 0.5 of FP: {'met' if ok else 'NOT met'} (drop {gaps})")
        if fp and "gdfq" in w4:
            drop = round(fp["clean"] - w4["gdfq"]["clean"], 2)
            lines.append(f"{model} W4A4 GDFQ drop on the clean subset <= 3.6 (the paper's): "
                         f"{'met' if drop <= 3.6 else 'NOT met'} (FP {fp['clean']}, GDFQ {w4['gdfq']['clean']}, "
                         f"drop {drop})")
        if {"gdfq", "noise", "zeroq"} <= set(w4):
            for s in w4["gdfq"]:
                seeds_ok = [r[model]["top1"]["W4A4"]["gdfq"][s] > max(r[model]["top1"]["W4A4"]["noise"][s],
                                                                      r[model]["top1"]["W4A4"]["zeroq"][s])
                            for r in per_seed]
                lines.append(f"{model} W4A4 GDFQ above both baselines on {s} in every seed: "
                             f"{'met' if all(seeds_ok) else 'NOT met'} ({sum(seeds_ok)}/{len(seeds_ok)} seeds; means "
                             f"gdfq {w4['gdfq'][s]}, noise {w4['noise'][s]}, zeroq {w4['zeroq'][s]})")
    for row in onnx_rows:
        if row["fake_quant_top1"]:
            gaps = {s: round(abs(row["top1"][s] - row["fake_quant_top1"][s]), 2) for s in row["top1"]}
            ok = all(g <= 0.1 for g in gaps.values())
            seed = f" (seed {row['seed']})" if "seed" in row else ""
            lines.append(f"{row['model']} {row['bits']}{seed} ONNX (onnxruntime) top-1 within 0.1 of the fake-quant model: "
                         f"{'met' if ok else 'NOT met'} (|difference| {gaps})")
    return lines


def markdown(report: dict) -> str:
    sets = report["sets"]
    seeds = report["seeds"]
    spread = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    if len(seeds) < len(report.get("seeds_requested", seeds)):
        spread += f" (partial: {len(seeds)} of the seeds {report['seeds_requested']} asked for are done)"
    lines = [f"# GDFQ benchmark ({report['preset']} preset)", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']}; {report['total_s']:.0f} s total.", "",
             "Top-1 (%) of the final models; clean = clean subset (1,017), jpeg = JPEG test set "
             f"({sets['jpeg']} images); {spread}.", ""]
    methods = [m for m in METHODS if m in report["methods"]]
    header = "| model | bits | " + " | ".join(f"{m} clean | {m} jpeg" for m in methods) + " |"
    lines += [header, "|" + "---|" * (2 + 2 * len(methods))]
    cell = (lambda v: f"{v[0]:.2f} ± {v[1]:.2f}") if len(seeds) > 1 else (lambda v: f"{v[0]:.2f}")
    for model, by_bits in report["summary"].items():
        fp = by_bits.get("FP", {}).get("fp")
        for key, by_method in by_bits.items():
            cells = []
            for m in methods:
                top1 = fp if (m == "fp" and fp) else by_method.get(m)
                cells += [cell(top1["clean"]), cell(top1["jpeg"])] if top1 else ["", ""]
            if key != "FP":
                lines.append(f"| {model} | {key} | " + " | ".join(cells) + " |")
    if report["onnx"]:
        lines += ["", f"ONNX QDQ export run by onnxruntime {report['onnxruntime']} (CPU, 1 thread), the models of "
                  f"seed {seeds[0]} (of each run's first seed where runs were merged); latency = median ms per call:", "",
                  "| model | bits | method | onnx clean | onnx jpeg | fake-quant clean | fake-quant jpeg | KiB | size / FP "
                  "| ms batch 1 | ms batch 64 | latency / FP (batch 64) |", "|" + "---|" * 12]
        for r in report["onnx"]:
            fq = r["fake_quant_top1"] or {"clean": "", "jpeg": ""}
            method = f"{r['method']} (seed {r['seed']})" if "seed" in r else r["method"]
            lines.append(f"| {r['model']} | {r['bits']} | {method} | {r['top1']['clean']:.2f} | {r['top1']['jpeg']:.2f} "
                         f"| {fq['clean']} | {fq['jpeg']} | {r['bytes'] / 1024:.0f} | {r['size_ratio_to_fp']} "
                         f"| {r['ms_batch1']} | {r['ms_batch64']} | {r['latency_ratio_to_fp_batch64']} |")
    lines += ["", "Targets:", ""] + [f"- {t}" for t in report["targets"]]
    if report["departures"]:
        lines += ["", "Schedule departures from the reference in this preset:", ""] + [f"- {d}" for d in report["departures"]]
    if report.get("probe"):
        lines += ["", "Probe (one full epoch timed before the run): " + json.dumps(report["probe"])]
    lines += ["", "Seconds (first seed): " + json.dumps({m: r["seconds"] for m, r in report["per_seed"][0].items()})]
    return "\n".join(lines) + "\n"


def _report(args, argv, seeds, per_seed, onnx_rows, gdfq_cfg, calib_cfg, probe, sets, start) -> dict:
    """The report of the seeds done so far (``seeds_requested`` names all), written to bench/results."""
    import onnxruntime

    done = seeds[:len(per_seed)]
    report = {
        "preset": args.preset, "command": "python bench/gdfq.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"device {args.device}, torch {torch.__version__}",
        "methods": args.methods, "bits": args.bits, "sets": {k: len(v) for k, v in sets.items()},
        "seeds": done, "seeds_requested": seeds, "onnxruntime": onnxruntime.__version__,
        "gdfq_config": gdfq_cfg.to_dict(), "calibration_config": calib_cfg.to_dict(),
        "departures": schedule_departures(gdfq_cfg, calib_cfg), "probe": probe,
        "summary": aggregate(per_seed), "per_seed": per_seed, "onnx": onnx_rows,
        "targets": targets(per_seed, onnx_rows), "total_s": round(time.perf_counter() - start, 1),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gdfq_{args.preset}{'_' + args.tag if args.tag else ''}"
    write_atomic(args.out_dir / f"{stem}.json", json.dumps(report, indent=1).encode())
    write_atomic(args.out_dir / f"{stem}.md", markdown(report).encode())
    return report


def _without_seed(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "seed"}


def merge_reports(paths: list[Path], args) -> dict:
    """One report from runs of the same benchmark on different seeds (each seed's models are trained and
    evaluated side by side within its own run; a seed's result does not depend on the others)."""
    reports = [json.loads(p.read_text()) for p in paths]
    first = reports[0]
    for path, r in zip(paths[1:], reports[1:]):
        for key in ("preset", "methods", "bits", "sets", "departures"):
            if r[key] != first[key]:
                raise SystemExit(f"--merge: {path} differs from {paths[0]} in {key!r}: {r[key]} vs {first[key]}")
        for key in ("gdfq_config", "calibration_config"):
            if _without_seed(r[key]) != _without_seed(first[key]):
                raise SystemExit(f"--merge: {path} differs from {paths[0]} in {key!r} beyond the seed")
        if set(r["per_seed"][0]) != set(first["per_seed"][0]):
            raise SystemExit(f"--merge: {path} has models {sorted(r['per_seed'][0])}, {paths[0]} "
                             f"{sorted(first['per_seed'][0])}")
    seeds = [s for r in reports for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--merge: a seed appears twice: {seeds}")
    per_seed = [res for r in reports for res in r["per_seed"]]
    # each run exports its first seed's models: keep every run's rows, with their seed
    onnx_rows = [dict(row, seed=row.get("seed", r["seeds"][0])) for r in reports for row in r["onnx"]]
    report = dict(first, seeds=seeds, seeds_requested=seeds, per_seed=per_seed, summary=aggregate(per_seed),
                  onnx=onnx_rows, targets=targets(per_seed, onnx_rows), total_s=sum(r["total_s"] for r in reports),
                  command="python bench/gdfq.py " + " ".join(sys.argv[1:]),
                  merged_from=[{"file": p.name, "command": r["command"], "seeds": r["seeds"]}
                               for p, r in zip(paths, reports)])
    stem = f"gdfq_{args.preset}{'_' + args.tag if args.tag else ''}"
    write_atomic(args.out_dir / f"{stem}.json", json.dumps(report, indent=1).encode())
    text = markdown(report) + "\nMerged from: " + "; ".join(
        f"`{m['command']}` (seeds {m['seeds']}, {m['file']})" for m in report["merged_from"]) + "\n"
    write_atomic(args.out_dir / f"{stem}.md", text.encode())
    print("\n".join(report["targets"]))
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge_reports(args.merge, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = {"clean": load_dataset("cifar10-clean-subset", "test", root=args.data_root),
            "jpeg": load_dataset("cifar10-jpeg", "test", root=args.data_root).sample(args.jpeg_limit, 0)}
    start = time.perf_counter()
    preset_cfg, probe = PRESETS[args.preset][0], None
    if args.budget_minutes and "gdfq" in args.methods:
        per_epoch = probe_seconds_per_epoch(args.models[0], preset_cfg, args.bits, args.device)
        fit = int(args.budget_minutes * 60 / per_epoch)
        probe = {"seconds_per_epoch": round(per_epoch, 2), "budget_minutes": args.budget_minutes,
                 "epochs_that_fit": fit,
                 "preset_expected_minutes": round(per_epoch * preset_cfg.epochs / 60, 1)}
        print(f"probe: {per_epoch:.2f} s per epoch of {preset_cfg.iters_per_epoch} x {preset_cfg.batch_size}; "
              f"the {args.preset} preset ({preset_cfg.epochs} epochs) would take {probe['preset_expected_minutes']} "
              f"min per model; {fit} epochs fit in {args.budget_minutes} min", flush=True)
        preset_cfg = shorten(preset_cfg, fit)
    if args.epochs:
        preset_cfg = shorten(preset_cfg, args.epochs)
    if args.cpu_loss:
        preset_cfg = dataclasses.replace(preset_cfg, **CPU_DEPARTURES)
    per_seed, onnx_rows = [], []
    for seed in seeds:
        gdfq_cfg = dataclasses.replace(preset_cfg, seed=seed)
        calib_cfg = dataclasses.replace(PRESETS[args.preset][1], seed=seed)
        results = {name: bench_model(name, args, gdfq_cfg, calib_cfg, sets) for name in args.models}
        if seed == seeds[0] and not args.no_onnx:
            onnx_rows = [row for name in args.models for row in bench_onnx(name, results[name], sets)]
        for res in results.values():
            res.pop("models")
        per_seed.append(results)
        # Written after every seed, so a long run that is stopped keeps the seeds it finished.
        report = _report(args, argv, seeds, per_seed, onnx_rows, gdfq_cfg, calib_cfg, probe, sets, start)
    print("\n".join(report["targets"]))
    return report


if __name__ == "__main__":
    main()
