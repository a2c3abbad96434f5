"""GDFQ diagnosis: one model, named variants of the GDFQ settings side by side at each bit width.

Each ``--variant 'NAME=key=value;key=value'`` is a GDFQ run with the job preset's schedule
(``tdmr_ray.gdfq.job.PRESETS``, single process, the preset's *global* batch) and the given
``GDFQConfig`` fields changed; ``noise`` (activation ranges on Gaussian noise, no fine-tuning) and
``fp`` are always in the table. All bit widths of a variant train on one generator stream (as in
``bench/gdfq.py``: the generator's loss never involves a quantized model). Every figure is the final
model's top-1 on the clean subset and a seeded sample of the JPEG test set, mean ± std over
``--seeds``; the drop is FP minus the model.

    TDMR_DATA=../shared/data TDMR_WEIGHTS=../shared/weights/cifar10-resnet \\
        python bench/gdfq_variants.py --model resnet20 --bits 8 4 \\
        --variant 'no-finetune=warmup_epochs=8' --variant 'lr/10=lr_q=1e-5'

``--model`` is a pretrained name or a registry reference (``name@vN``, with ``--storage``), so a
pipeline's TDMR target can be diagnosed too. Writes ``bench/results/gdfq_variants<tag>.{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
import yaml  # noqa: E402

from tdmr_ray.data import load_dataset  # noqa: E402
from tdmr_ray.evaluation import accuracy  # noqa: E402
from tdmr_ray.gdfq.baselines import CalibrationConfig, noise_calibrated  # noqa: E402
from tdmr_ray.gdfq.job import job_config  # noqa: E402
from tdmr_ray.gdfq.train import GDFQConfig, run_gdfq  # noqa: E402
from tdmr_ray.runtime import resolve_model  # noqa: E402
from tdmr_ray.utils import write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_variant(text: str) -> tuple[str, dict]:
    """``'NAME=key=value;key=value'`` -> (NAME, {key: value}); values are read as YAML scalars."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant wants NAME=key=value;..., got {text!r}")
    changes = {}
    for item in filter(None, (part.strip() for part in rest.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--variant {name}: {item!r} is not key=value")
        changes[key.strip()] = yaml.safe_load(value)
    defaults = GDFQConfig().to_dict()
    unknown = sorted(set(changes) - set(defaults))
    if unknown:
        raise argparse.ArgumentTypeError(f"--variant {name}: unknown GDFQ setting(s) {unknown}")
    for key, value in changes.items():  # the default's type (YAML 1.1 reads 1e-5 as a string)
        kind = type(defaults[key])
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
            raise argparse.ArgumentTypeError(f"--variant {name}: {key} wants a number, got {value!r}")
        try:
            changes[key] = float(value) if kind is float else int(value) if kind is int else value
        except ValueError:
            raise argparse.ArgumentTypeError(f"--variant {name}: {key} wants a number, got {value!r}") from None
    return name, changes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20", help="pretrained name or registry reference name@vN")
    p.add_argument("--storage", default="", help="registry storage for a name@vN model (default: local runs/)")
    p.add_argument("--bits", type=int, nargs="+", default=[8], help="WkAk for each k")
    p.add_argument("--preset", default="quick", help="tdmr_ray.gdfq.job preset whose schedule is used")
    p.add_argument("--variant", action="append", type=parse_variant, default=[],
                   help="NAME=key=value;... (GDFQConfig fields); 'gdfq' (the preset itself) is always run")
    p.add_argument("--seeds", default="0", help="comma list")
    p.add_argument("--jpeg-limit", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def _fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    job = job_config(args.preset)
    base = dataclasses.replace(job.gdfq, w_bits=args.bits[0], a_bits=args.bits[0])
    sets = {"clean": load_dataset("cifar10-clean-subset", "test"),
            "jpeg": load_dataset("cifar10-jpeg", "test").sample(args.jpeg_limit, 0)}
    variants = [("gdfq", {})] + args.variant
    names = [name for name, _ in variants]
    if len(set(names)) < len(names) or {"fp", "noise"} & set(names):
        raise SystemExit(f"variant names must be unique and not fp, noise or gdfq: {names[1:]}")
    for name, changes in variants:  # an impossible setting fails here, before any run
        try:
            GDFQConfig.from_dict({**base.to_dict(), **changes})
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"--variant {name}: {exc}") from None
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}  # (bits, variant) -> set -> per seed
    seconds: dict[str, float] = {}
    start_all = time.perf_counter()

    def record(bits: str, name: str, model, secs: float) -> None:
        top1 = {s: accuracy(model, data) for s, data in sets.items()}
        for s, a in top1.items():
            rows.setdefault((bits, name), {}).setdefault(s, []).append(round(a, 2))
        seconds[name] = seconds.get(name, 0.0) + secs
        print(f"{bits:5s} {name:24s} " + "  ".join(f"{s} {a:6.2f}" for s, a in top1.items()) + f"  ({secs:.0f}s)",
              flush=True)

    for seed in seeds:
        fp = resolve_model(args.model, args.storage or None).eval()
        if seed == seeds[0]:
            record("FP", "fp", fp, 0.0)
        for bits in args.bits:
            t = time.perf_counter()
            record(f"W{bits}A{bits}", "noise", noise_calibrated(fp, bits, bits, CalibrationConfig(seed=seed))[0],
                   time.perf_counter() - t)
        for name, changes in variants:
            cfg = GDFQConfig.from_dict({**base.to_dict(), **changes, "seed": seed})
            t = time.perf_counter()
            state = run_gdfq(resolve_model(args.model, args.storage or None), cfg,
                             bit_widths=[(b, b) for b in args.bits])
            for student in state.students:
                record(student.name, name, student.qmodel, (time.perf_counter() - t) / len(state.students))
    fp_acc = {s: rows[("FP", "fp")][s][0] for s in sets}
    report = {
        "command": shlex.join(["python", "bench/gdfq_variants.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": args.model, "bits": args.bits, "preset": args.preset, "seeds": seeds,
        "jpeg_limit": args.jpeg_limit, "base_config": base.to_dict(), "variants": dict(variants),
        "top1": {f"{bits} {name}": accs for (bits, name), accs in rows.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_s": round(time.perf_counter() - start_all, 1)}
    lines = [f"# GDFQ variants: {args.model}, preset {args.preset}", "",
             f"Command: `{report['command']}`  ",
             f"Machine: {report['machine']}; {report['total_s']:.0f} s in all. Final models; top-1 (%) on the "
             f"clean subset and {args.jpeg_limit} JPEG test images; mean ± std over seeds {seeds}.", "",
             f"`gdfq` = the job's `{args.preset}` preset, which departs from the reference's settings in: "
             + (", ".join(f"{k}={v}" for k, v in base.to_dict().items()
                          if k not in ("w_bits", "a_bits", "seed") and GDFQConfig().to_dict()[k] != v) or "nothing")
             + ".", "",
             "| bits | variant | settings | clean | jpeg | drop clean | drop jpeg |",
             "|---|---|---|---:|---:|---:|---:|"]
    order = ["FP"] + [f"W{b}A{b}" for b in args.bits]
    for (bits, name), accs in sorted(rows.items(), key=lambda r: order.index(r[0][0])):
        settings = "; ".join(f"{k}={v}" for k, v in dict(variants).get(name, {}).items())
        drops = [f"{fp_acc[s] - statistics.mean(accs[s]):.2f}" for s in sets]
        lines.append(f"| {bits} | {name} | {settings} | {_fmt(accs['clean'])} | {_fmt(accs['jpeg'])} | "
                     f"{' | '.join(drops)} |")
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"gdfq_variants{args.tag}"
    write_atomic(stem.with_suffix(".json"), json.dumps(report, indent=2).encode())
    write_atomic(stem.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
