"""Why onnxruntime and the fake-quant model can disagree on a few images: the models' top-1 margins.

For each quantized model (a registry reference ``name@vN`` whose version holds an ONNX QDQ copy, or
``resnet20``: the pretrained ResNet-20 noise-calibrated at W8A8), the clean subset's logits from the
torch fake-quant model and from onnxruntime on the ONNX copy: how many top-1 predictions differ, the
largest logit difference, and the fake-quant model's top-1 margins (logit of the first class minus the
second), overall and on the images that differ; and, for scale, how many predictions the same torch
model changes when PyTorch runs it on its other CPU kernels (oneDNN off). Both compute the same integer graph in float
arithmetic of different kernels, so their logits differ by rounding; a prediction flips only where
the margin is smaller than that.

    python bench/onnx_margins.py --models resnet20 pipeline-quantized@v1 --storage runs/p1/store

Writes ``bench/results/onnx_margins[_tag].{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
from results_io import command_line, write_rows  # noqa: E402

from tdmr_ray.data import load_dataset, to_float  # noqa: E402
from tdmr_ray.gdfq.baselines import noise_calibrated  # noqa: E402
from tdmr_ray.gdfq.onnx_export import OnnxRuntimeModel, export_onnx  # noqa: E402
from tdmr_ray.models import create_model  # noqa: E402
from tdmr_ray.registry import ARTIFACT_FILES, Registry, parse_ref  # noqa: E402



@torch.inference_mode()
def logits(model, images, batch: int = 500, dtype=torch.float32) -> torch.Tensor:
    model.eval()
    return torch.cat([model(to_float(images[i:i + batch]).to(dtype)).float() for i in range(0, len(images), batch)])


def models_of(spec: str, storage: str):
    """(fake-quant torch model, onnxruntime model) of ``spec``."""
    if "@" not in spec:
        q, _ = noise_calibrated(create_model(spec, pretrained=True).eval(), 8, 8)
        return q, OnnxRuntimeModel(export_onnx(q))
    registry = Registry.for_storage(storage)
    name, version = parse_ref(spec)
    payload, _ = registry.load_file(name, version, ARTIFACT_FILES["onnx"])
    return registry.load_model(name, version), OnnxRuntimeModel(payload)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20"])
    p.add_argument("--storage", default="")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    data = load_dataset("cifar10-clean-subset", "test")
    rows = []
    for spec in args.models:
        fq, ort = models_of(spec, args.storage or None)
        a, b = logits(fq, data.x), logits(ort, data.x)
        with torch.backends.mkldnn.flags(enabled=False):  # the same torch model on PyTorch's other CPU kernels
            c = logits(fq, data.x)
        d = logits(copy.deepcopy(fq).double(), data.x, dtype=torch.float64)  # the same graph in float64
        differ = (a.argmax(1) != b.argmax(1)).nonzero().flatten()
        top2 = a.topk(2, 1).values
        margin = top2[:, 0] - top2[:, 1]
        rows.append({"model": spec, "images": len(data), "differing": len(differ),
                     "max_abs_logit_diff": round(float((a - b).abs().max()), 4),
                     "differing_torch_kernels": int((a.argmax(1) != c.argmax(1)).sum()),
                     "max_abs_logit_diff_torch_kernels": round(float((a - c).abs().max()), 4),
                     "differing_float64": int((a.argmax(1) != d.argmax(1)).sum()),
                     "max_abs_logit_diff_float64": round(float((a - d).abs().max()), 4),
                     "median_margin": round(float(margin.median()), 3),
                     "share_margin_below_0.05": round(float((margin < 0.05).float().mean()) * 100, 2),
                     "margins_of_differing": [round(float(margin[i]), 4) for i in differ]})
        print(rows[-1], flush=True)
    command = command_line("onnx_margins.py", argv)
    lines = ["# onnxruntime vs the fake-quant model: top-1 margins", "", f"Command: `{command}`", "",
             "torch = the fake-quant model on PyTorch's default CPU kernels (oneDNN); torch, oneDNN off = the same "
             "model on PyTorch's other kernels; float64 = the same model in double precision: how far float rounding "
             "alone moves it.", "",
             "| model | differing top-1, onnxruntime vs torch (of images) | max abs logit diff | differing top-1, torch "
             "oneDNN off vs on | max abs logit diff | differing top-1, torch float64 vs float32 | max abs logit diff "
             "| median top-1 margin | margins < 0.05 (%) | margins of the "
             "differing (onnxruntime) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['differing']} / {r['images']} | {r['max_abs_logit_diff']} | "
              f"{r['differing_torch_kernels']} | {r['max_abs_logit_diff_torch_kernels']} | {r['differing_float64']} | "
              f"{r['max_abs_logit_diff_float64']} | {r['median_margin']} "
              f"| {r['share_margin_below_0.05']} | {r['margins_of_differing']} |" for r in rows]
    write_rows("onnx_margins", args.tag, command, rows, lines)
    return {"rows": rows}


if __name__ == "__main__":
    main()
