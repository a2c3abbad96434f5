"""Ray Train scaling: a GDFQ and a TDMR training epoch with 1 and 2 workers, side by side.

Each job runs as it does under ``jobs/gdfq.py`` / ``jobs/tdmr.py`` (the same ``train`` function,
Ray Train, DDP over gloo, one torch thread per worker), shortened; the figure is the training
images per second all workers together process, read from the workers' own reports (the first
report of each phase is dropped: it holds the start-up). Both jobs keep the *global* batch fixed
(each of N workers computes 1/N of it and DDP averages the gradients), so the ratio is strong
scaling: what a user gets by adding a worker to the same run. A single-process loop of the same
steps without Ray (1 and 2 torch threads) gives the limits.

    TDMR_DATA=../shared/data TDMR_WEIGHTS=../shared/weights/cifar10-resnet python bench/train_scaling.py

Writes ``bench/results/train_scaling.{json,md}``. Run on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from tdmr_ray.utils import write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def gdfq_job(workers: int, epochs: int, storage: str):
    from tdmr_ray.gdfq import job

    cfg = job.job_config("quick")
    cfg.gdfq = dataclasses.replace(cfg.gdfq, epochs=epochs, warmup_epochs=0, range_update_epochs=1,
                                   lr_milestones=[])
    cfg.num_workers, cfg.storage, cfg.publish = workers, storage, False
    return cfg, job.train


def tdmr_job(workers: int, steps: int, storage: str):
    from tdmr_ray.tdmr import job

    cfg = job.job_config("quick")
    cfg.tdmr.teacher.steps, cfg.tdmr.distill.steps, cfg.report_every = steps, steps, max(steps // 4, 1)
    cfg.num_workers, cfg.storage, cfg.publish = workers, storage, False
    return cfg, job.train


def ray_rates(kind: str, workers: int, size: int, storage: str) -> dict:
    """Images/s of each reported window of one Ray Train run (the first window of each phase dropped)."""
    cfg, train = (gdfq_job if kind == "gdfq" else tdmr_job)(workers, size, storage)
    start = time.monotonic()
    result = train(cfg, run_name=f"scaling-{kind}-{workers}w-{int(time.time())}")
    wall = time.monotonic() - start
    if result.error:
        raise SystemExit(f"{kind} with {workers} workers failed: {result.error}")
    df = result.metrics_dataframe
    phases = df["phase"] if "phase" in df else ["train"] * len(df)
    rates: dict[str, list[float]] = {}
    for phase, rate in zip(phases, df["images_per_s"]):
        rates.setdefault(str(phase), []).append(float(rate))
    return {"wall_s": round(wall, 1), "rates": {p: r[1:] if len(r) > 1 else r for p, r in rates.items()}}


def in_process_rate(kind: str, threads: int, size: int) -> dict:
    """The same steps in one process without Ray, with ``threads`` torch threads (the limit)."""
    torch.set_num_threads(threads)
    if kind == "gdfq":
        from tdmr_ray.gdfq.job import gdfq_config
        from tdmr_ray.gdfq.train import make_state, train_epoch
        from tdmr_ray.runtime import resolve_model

        cfg, _ = gdfq_job(1, size, "")
        state = make_state(resolve_model(cfg.model), gdfq_config(cfg), "cpu")
        rates = []
        while state.epoch < state.cfg.epochs:
            m = train_epoch(state)
            rates.append(state.cfg.iters_per_epoch * state.cfg.batch_size / m["seconds"])
        return {"rates": {"train": rates[1:]}}
    from tdmr_ray.tdmr.data import DownstreamBatches
    from tdmr_ray.tdmr.distill import alpha_at
    from tdmr_ray.tdmr.job import build, load_task
    from tdmr_ray.tdmr.steps import distill_step, make_optimizer, reprogram_step, teacher_param_groups

    cfg, _ = tdmr_job(1, size, "")
    labelled, unlabelled, _ = load_task(cfg)
    mcfg, teacher, student = build(cfg, labelled, "cpu")
    tc, dc, aug = mcfg.teacher, mcfg.distill, mcfg.augment
    out = {}
    opt, sched = make_optimizer(teacher_param_groups(teacher, tc), tc.optim, tc.steps)
    batches = DownstreamBatches(labelled, tc.batch_size, crop_padding=aug.crop_padding, flip=aug.flip, seed=0)
    out["teacher"] = _timed(lambda s: reprogram_step(teacher, *batches.batch(s), opt, sched, tc.optim.grad_clip),
                            tc.steps, tc.batch_size, cfg.report_every)
    teacher.requires_grad_(False).eval()
    opt, sched = make_optimizer(student.parameters(), dc.optim, dc.steps)
    batches = DownstreamBatches(labelled, dc.labelled_batch_size, unlabelled, dc.unlabelled_batch_size,
                                aug.crop_padding, aug.flip, seed=1000)
    out["distill"] = _timed(lambda s: distill_step(student, teacher, *batches.batch(s), opt,
                                                   alpha_at(s / dc.steps, dc.schedule), dc, sched),
                            dc.steps, dc.labelled_batch_size + dc.unlabelled_batch_size, cfg.report_every)
    return {"rates": out}


def _timed(step, steps: int, images_per_step: int, window: int) -> list[float]:
    rates, t = [], time.monotonic()
    for s in range(steps):
        step(s)
        if (s + 1) % window == 0:
            now = time.monotonic()
            rates.append(images_per_step * window / (now - t))
            t = now
    return rates[1:]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", nargs="+", choices=("gdfq", "tdmr"), default=["gdfq", "tdmr"])
    p.add_argument("--gdfq-epochs", type=int, default=4, help="GDFQ epochs of 20 steps (quick preset)")
    p.add_argument("--tdmr-steps", type=int, default=80, help="steps of each TDMR phase (quick preset)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per Train worker (worker_setup reads it)
    import ray

    from tdmr_ray.runtime import init_ray

    rows = []
    sizes = {"gdfq": args.gdfq_epochs, "tdmr": args.tdmr_steps}
    for kind in args.jobs:
        for threads in (1, 2):
            r = in_process_rate(kind, threads, sizes[kind])
            for phase, rates in r["rates"].items():
                rows.append({"job": kind, "phase": phase, "runner": f"in-process, {threads} thread(s)",
                             "workers": 0, "threads": threads, "images_per_s": round(statistics.median(rates), 1)})
                print(rows[-1], file=sys.stderr, flush=True)
    init_ray(num_cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as storage:
        for kind in args.jobs:
            for workers in [int(w) for w in args.workers.split(",")]:
                r = ray_rates(kind, workers, sizes[kind], storage)
                for phase, rates in r["rates"].items():
                    rows.append({"job": kind, "phase": phase, "runner": f"Ray Train, {workers} worker(s)",
                                 "workers": workers, "threads": 1, "images_per_s": round(statistics.median(rates), 1),
                                 "wall_s": r["wall_s"]})
                    print(rows[-1], file=sys.stderr, flush=True)
    ray.shutdown()
    for row in rows:
        base = next((b["images_per_s"] for b in rows if b["job"] == row["job"] and b["phase"] == row["phase"]
                     and b["workers"] == 1), None)
        row["ratio_to_1_worker"] = round(row["images_per_s"] / base, 3) if base else None
    result = {"rows": rows, "cpus": os.cpu_count(), "host": platform.node(), "torch": torch.__version__,
              "ray": ray.__version__, "gdfq_epochs": args.gdfq_epochs, "tdmr_steps": args.tdmr_steps,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"train_scaling{'_' + args.tag if args.tag else ''}"
    write_atomic(args.out_dir / f"{stem}.json", json.dumps(result, indent=1).encode())
    write_atomic(args.out_dir / f"{stem}.md", markdown(result).encode())
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"# Ray Train scaling ({result['cpus']} CPUs)", "",
             "Training images/s of all workers together (median over report windows, the first dropped); "
             "global batch fixed (strong scaling); one torch thread per worker. "
             f"GDFQ: quick preset, {result['gdfq_epochs']} epochs of 20 steps, no warm-up; TDMR: quick preset, "
             f"{result['tdmr_steps']} steps per phase. Ray Train rows: Ray Train keeps the metrics of the "
             "checkpoints it retains (2), so they are the last report window (GDFQ: the last epoch; TDMR: the "
             "distillation phase's last 20 steps). Command: `python bench/train_scaling.py`", "",
             "| job | phase | runner | images/s | ratio to 1 worker |", "|---|---|---|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['job']} | {r['phase']} | {r['runner']} | {r['images_per_s']} | "
                     f"{'' if r['ratio_to_1_worker'] is None else r['ratio_to_1_worker']} |")
    lines += ["", f"torch {result['torch']}, Ray {result['ray']}, {result['date']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
