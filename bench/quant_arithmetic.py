"""Would an integer-exact quantized model make two runtimes agree? (GDFQ issue: onnxruntime vs torch)

onnxruntime and PyTorch disagree on a few top-1 predictions of quantized ResNet-56 because float
kernels round differently and a quantizer turns a rounding difference at a level boundary into a whole
level step, which the next layers carry on. One remedy would be to compute each quantized convolution
on its integer levels (ONNX ``ConvInteger``; in torch a float32 convolution of integer-valued tensors,
exact while the sums stay below 2**24) and scale afterwards. This bench measures, in PyTorch alone,
whether that would be enough: each variant of the same noise-calibrated model is run twice with one
arithmetic detail changed, and the two runs are compared.

* ``float``: today's fake-quant model (float convolutions of the dequantized values);
* ``integer``: every convolution whose input comes from an activation quantizer is computed as
  ``conv(levels, integer weights) * (input scale x weight scale)``; the stem convolution (its input is
  the float image) and the classifier stay float;
* changed detail: PyTorch's other CPU kernels (oneDNN off) or batch normalization computed as
  ``x * a + b`` instead of PyTorch's fused kernel (as another runtime's BatchNormalization may).

    python bench/quant_arithmetic.py --models resnet20 resnet56 --bits 8

Writes ``bench/results/quant_arithmetic[_tag].{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
from results_io import command_line, write_rows  # noqa: E402

from tdmr_ray.data import load_dataset, to_float  # noqa: E402
from tdmr_ray.gdfq.baselines import noise_calibrated  # noqa: E402
from tdmr_ray.gdfq.fake_quant import ActivationQuantizer, QuantConv2d, affine_qparams  # noqa: E402
from tdmr_ray.models import create_model  # noqa: E402

# (a, b): the two runs compared; each run = (convolution arithmetic, batch norm, oneDNN on)
PAIRS = {
    "float: oneDNN off vs on": (("float", "fused", True), ("float", "fused", False)),
    "integer: oneDNN off vs on": (("integer", "fused", True), ("integer", "fused", False)),
    "integer: BN as x*a+b vs fused": (("integer", "fused", True), ("integer", "mul_add", True)),
    "float vs integer (same kernels)": (("float", "fused", True), ("integer", "fused", True)),
}


class Arithmetic:
    """Patches QuantConv2d / BatchNorm2d forwards of one model to the chosen arithmetic."""

    def __init__(self, model: torch.nn.Module):
        self.conv, self.bn, self.grid = "float", "fused", {}
        for m in model.modules():
            if isinstance(m, ActivationQuantizer):  # remember which tensors are on which grid
                m.register_forward_hook(self._remember_grid)
            elif isinstance(m, QuantConv2d):
                m.forward = self._conv(m)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.forward = self._bn(m)

    def _remember_grid(self, module, inputs, out):
        self.grid[out.data_ptr()] = affine_qparams(module.x_min, module.x_max, module.a_bits)[0]

    def _conv(self, m: QuantConv2d):
        def forward(x):
            scale = self.grid.get(x.data_ptr()) if self.conv == "integer" else None
            if scale is None:
                return m._conv_forward(x, m.quantized_weight(), m.bias)
            q, w_scale, w_zero_point = m.integer_weight()
            y = m._conv_forward(torch.round(x / scale), q - w_zero_point, None) * (scale * w_scale).view(1, -1, 1, 1)
            return y if m.bias is None else y + m.bias.view(1, -1, 1, 1)
        return forward

    def _bn(self, m: torch.nn.BatchNorm2d):
        fused = m.forward

        def forward(x):
            if self.bn == "fused":
                return fused(x)
            a = m.weight / torch.sqrt(m.running_var + m.eps)
            return x * a.view(1, -1, 1, 1) + (m.bias - m.running_mean * a).view(1, -1, 1, 1)
        return forward


@torch.inference_mode()
def logits(model, arithmetic: Arithmetic, images, run: tuple) -> torch.Tensor:
    arithmetic.conv, arithmetic.bn, onednn = run
    out = []
    with torch.backends.mkldnn.flags(enabled=onednn) if not onednn else contextlib.nullcontext():
        for i in range(0, len(images), 256):
            arithmetic.grid.clear()
            out.append(model(to_float(images[i:i + 256])))
    return torch.cat(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--bits", type=int, default=8, help="weight and activation bits (noise calibration)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("cifar10-clean-subset", "test")
    labels = torch.as_tensor(data.y)
    rows = []
    for arch in args.models:
        model, _ = noise_calibrated(create_model(arch, pretrained=True).eval(), args.bits, args.bits)
        model.eval()
        arithmetic, cache = Arithmetic(model), {}
        for name, (a, b) in PAIRS.items():
            for run in (a, b):
                if run not in cache:
                    cache[run] = logits(model, arithmetic, data.x, run)
            x, y = cache[a], cache[b]
            rows.append({"model": f"{arch} W{args.bits}A{args.bits}", "pair": name, "images": len(data),
                         "differing_top1": int((x.argmax(1) != y.argmax(1)).sum()),
                         "max_abs_logit_diff": round(float((x - y).abs().max()), 4),
                         "bit_identical_images_pct": round(100 * float((x == y).all(1).float().mean()), 1),
                         "top1_a": round(100 * float((x.argmax(1) == labels).float().mean()), 2),
                         "top1_b": round(100 * float((y.argmax(1) == labels).float().mean()), 2)})
            print(rows[-1], flush=True)
    command = command_line("quant_arithmetic.py", argv)
    lines = ["# Would integer-exact convolutions make two runtimes agree?", "", f"Command: `{command}`", "",
             "Noise-calibrated models, clean subset; each row runs one model twice with one arithmetic detail "
             "changed (see the script's docstring).", "",
             "| model | runs compared (a vs b) | differing top-1 | max abs logit diff | bit-identical logits "
             "(% of images) | top-1 a / b (%) |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['pair']} | {r['differing_top1']} / {r['images']} | {r['max_abs_logit_diff']} | "
              f"{r['bit_identical_images_pct']} | {r['top1_a']} / {r['top1_b']} |" for r in rows]
    write_rows("quant_arithmetic", args.tag, command, rows, lines)
    return {"rows": rows}


if __name__ == "__main__":
    main()
