"""GDFQ data-free quantization as a Ray Train job.

    python jobs/gdfq.py --preset quick --model resnet20 --w-bits 4 --a-bits 4
    ray job submit --working-dir . -- python jobs/gdfq.py --preset full --num-workers 4 --use-gpu
    python jobs/gdfq.py --model resnet20-tdmr@v3 ...     # quantize a model from the registry

Reports metrics each epoch through Ray Train and checkpoints; rerunning with the same --run-name
resumes from the newest checkpoint. Evaluates the final model on the clean CIFAR-10 subset and the
JPEG test set and publishes it (integer weights + scales) to the registry.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tdmr_ray.gdfq.job import PRESETS, GDFQJobConfig, evaluate, final_model, gdfq_config, train  # noqa: E402
from tdmr_ray.runtime import run_training, start_job  # noqa: E402


def main(argv=None) -> dict:
    # gdfq_config validates bit widths and the schedule before any worker starts.
    cfg, run = start_job("gdfq", GDFQJobConfig, argv, PRESETS, __doc__, validate=gdfq_config)
    cfg.run_name = cfg.run_name or f"gdfq-{run.output_dir.name}"
    result = run_training(run, train, cfg)
    with run.phase("evaluate"):
        from tdmr_ray.runtime import resolve_model

        qmodel, report, history = final_model(cfg, result)
        fp_acc = evaluate(resolve_model(cfg.model, cfg.storage).eval(), cfg.eval_limit, cfg.seed)
        q_acc = evaluate(qmodel, cfg.eval_limit, cfg.seed)
    onnx_model, onnx_acc = None, None
    if cfg.onnx:
        with run.phase("onnx"):  # the integer model a standard runtime runs, checked against the fake-quant one
            from tdmr_ray.gdfq.onnx_export import OnnxRuntimeModel, export_onnx

            onnx_model = export_onnx(qmodel, run.output_dir / "model.onnx")
            onnx_acc = evaluate(OnnxRuntimeModel(onnx_model), cfg.eval_limit, cfg.seed)
    version = None
    if cfg.publish:
        from tdmr_ray.gdfq.registry_format import publish_quantized
        from tdmr_ray.registry import Registry

        name = cfg.registry_name or f"{cfg.model.split('@')[0]}-w{cfg.w_bits}a{cfg.a_bits}"
        version = publish_quantized(Registry.for_storage(cfg.storage), name, qmodel,
                                    parent=cfg.model if "@" in cfg.model else None,
                                    metrics={"top1": q_acc, "fp_top1": fp_acc, "onnx_top1": onnx_acc},
                                    onnx=onnx_model).ref
    metrics = {"fp_top1": fp_acc, "quantized_top1": q_acc, "bits": f"W{cfg.w_bits}A{cfg.a_bits}",
               "onnx_top1": onnx_acc, "onnx_bytes": len(onnx_model) if onnx_model else None,
               "quantization_report": report.to_dict(), "epochs": len(history),
               "world_size": (result.metrics or {}).get("world_size"),
               "worker_nodes": (result.metrics or {}).get("worker_nodes"),
               "train_images_per_s": round((result.metrics or {}).get("images_per_s", 0.0), 1),
               # how far the generator got: the share of its images the FP model labels as intended
               "generator_agreement": round(history[-1]["fp_acc_generated"], 1),
               "history": history, "ray_train_path": result.path}
    headline = {"FP top-1 clean / JPEG": f"{fp_acc['clean']:.2f}% / {fp_acc['jpeg']:.2f}%",
                f"W{cfg.w_bits}A{cfg.a_bits} top-1 clean / JPEG (final model)": f"{q_acc['clean']:.2f}% / {q_acc['jpeg']:.2f}%",
                "ONNX QDQ (onnxruntime) top-1 clean / JPEG": "not exported (--no-onnx)" if onnx_model is None else
                f"{onnx_acc['clean']:.2f}% / {onnx_acc['jpeg']:.2f}% ({len(onnx_model) / 1024:.0f} KiB, model.onnx)",
                "generated images labelled as intended by the FP model (last epoch)":
                    f"{metrics['generator_agreement']}%",
                "registry version": version}
    return run.finish(metrics, headline, registry_version=version)


if __name__ == "__main__":
    main()
