"""TDMR: reprogram a frozen foundation model for a downstream task, then distil a small target
model of another architecture from it, as a Ray Train job.

    python jobs/tdmr.py --preset quick --foundation resnet56 --target resnet20 --data cifar10-jpeg
    python jobs/tdmr.py --data /data/my-task.tar.gz --labelled-fraction 0.1 --target mobilenetv3_small_050
    ray job submit --working-dir . -- python jobs/tdmr.py --preset full --num-workers 4 --use-gpu

--data takes any labelled image set (ImageFolder dir or .tar.gz with train/ and test/ or one
folder; .npz with x, y and optional x_test, y_test); without a test split a seeded 20% is held out.
Rerunning with the same --run-name resumes from the newest checkpoint. The final target is
evaluated on the test split and published to the registry (quantize it next with jobs/gdfq.py
--model <name>@vN).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tdmr_ray.runtime import fail, run_training, start_job  # noqa: E402
from tdmr_ray.tdmr.job import PRESETS, TDMRJobConfig, check, final_models, load_task, train  # noqa: E402


def main(argv=None) -> dict:
    cfg, run = start_job("tdmr", TDMRJobConfig, argv, PRESETS, __doc__, validate=check)
    cfg.run_name = cfg.run_name or f"tdmr-{run.output_dir.name}"
    with run.phase("data"):
        try:
            labelled, unlabelled, test = load_task(cfg)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            fail(str(exc))
    print(f"[tdmr] task: {labelled.num_classes} classes, {len(labelled)} labelled, {len(unlabelled)} unlabelled, "
          f"{len(test)} test images of {labelled.x.shape[1:]}", flush=True)
    result = run_training(run, train, cfg)
    with run.phase("evaluate"):
        from tdmr_ray.evaluation import accuracy

        target, teacher, history = final_models(cfg, result, labelled)
        target_acc = round(accuracy(target, test), 2)
        teacher_acc = None
        if teacher is not None:
            from tdmr_ray.tdmr.steps import evaluate

            teacher_acc = round(100 * evaluate(teacher, test)["acc"], 2)
    version = None
    if cfg.publish:
        from tdmr_ray.registry import Registry

        data_name = Path(cfg.data).name.split(".")[0] + (f"-{cfg.regroup}" if cfg.regroup else "")
        name = cfg.registry_name or f"{cfg.target.replace('/', '-')}-{cfg.method}-{data_name}"
        version = Registry.for_storage(cfg.storage).publish_model(
            name, target, parent=cfg.foundation if "@" in cfg.foundation else None,
            metrics={"top1": target_acc, "teacher_top1": teacher_acc},
            extra={"classes": labelled.classes, "task": cfg.data, "labelled": len(labelled)}).ref
    from tdmr_ray.tdmr.compute import forward_flops

    example = test.tensors(slice(0, 1))[0]
    metrics = {"target_top1": target_acc, "teacher_top1": teacher_acc, "method": cfg.method,
               "target_params": sum(p.numel() for p in target.parameters()),
               "target_mmacs": round(forward_flops(target, example) / 2e6, 2),
               "classes": labelled.num_classes, "labelled": len(labelled), "test_images": len(test),
               "world_size": (result.metrics or {}).get("world_size"),
               "worker_nodes": (result.metrics or {}).get("worker_nodes"), "history": history,
               "ray_train_path": result.path}
    headline = {f"{cfg.method} target ({cfg.target}) top-1, final model": f"{target_acc:.2f}%",
                "reprogrammed foundation (teacher) top-1": f"{teacher_acc}%" if teacher_acc is not None else "n/a",
                "registry version": version}
    return run.finish(metrics, headline, registry_version=version)


if __name__ == "__main__":
    main()
