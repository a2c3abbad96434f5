"""Turn a float model into GDFQ's fake-quantized model, and say what stayed float.

As in the reference (``ExperimentDesign.quantize_model``): every ``nn.Conv2d``/``nn.Linear`` becomes a
weight-quantized layer, every ``nn.ReLU``/``nn.ReLU6`` module becomes ``nn.Sequential(relu,
ActivationQuantizer)``; normalization layers, the input image and everything else stay float. For a
:class:`~tdmr_ray.models.NormalizedModel` only the backbone is quantized; the wrapper (input
normalisation) is kept, so the quantized model still takes [0, 1] images.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..models import NormalizedModel
from .fake_quant import ActivationQuantizer, QuantConv2d, QuantLinear, check_bits

QUANTIZED_RELUS = (nn.ReLU, nn.ReLU6)
# Activation modules whose output the reference leaves unquantized (only ReLU outputs are).
OTHER_ACTIVATIONS = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                     nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.GLU)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_FUNCTIONAL_ACTIVATIONS = {F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu,
                           F.elu, F.mish, F.hardtanh, F.sigmoid, F.tanh, torch.relu, torch.relu_,
                           torch.sigmoid, torch.tanh}
_METHOD_ACTIVATIONS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


@dataclass
class QuantReport:
    """What ``quantize_model`` did. Names are module paths in the returned model."""

    w_bits: int
    a_bits: int
    weight_layers: list[str] = field(default_factory=list)
    activation_quantizers: list[str] = field(default_factory=list)
    unquantized: dict[str, str] = field(default_factory=dict)  # module path -> why it stays float
    functional_activations: list[str] | None = None  # FX node names; None: model not traceable
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"W{self.w_bits}A{self.a_bits}: {len(self.weight_layers)} weight-quantized layers, "
                 f"{len(self.activation_quantizers)} activation quantizers, {len(self.unquantized)} modules left float"]
        lines += [f"  float: {name} ({why})" for name, why in self.unquantized.items()]
        if self.functional_activations is None:
            lines.append("  functional activations: not checked (the model does not trace with torch.fx)")
        elif self.functional_activations:
            lines.append(f"  functional activations left unquantized: {', '.join(self.functional_activations)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _trace(net: nn.Module) -> tuple[list[str] | None, dict[str, int], str]:
    """Find what module inspection cannot see: activation *calls* (``F.relu(x)``, ``x.relu()``) and
    modules called more than once per forward (torchvision's BasicBlock reuses one ``self.relu``).

    Returns (functional activation node names or None if untraceable, module path -> calls, error).
    """
    try:
        graph = torch.fx.symbolic_trace(net).graph
    except Exception as exc:  # data-dependent control flow etc.
        return None, {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    found = [n.name for n in graph.nodes
             if (n.op == "call_function" and n.target in _FUNCTIONAL_ACTIVATIONS)
             or (n.op == "call_method" and n.target in _METHOD_ACTIVATIONS)]
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return found, calls, ""


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)


def quantize_model(model: nn.Module, w_bits: int, a_bits: int, *, per_channel: bool = True,
                   ema_momentum: float = 0.9, ema_bias_correction: str = "adam",
                   trace_functional: bool = True) -> tuple[nn.Module, QuantReport]:
    """A fake-quantized deep copy of ``model`` (the original is untouched) and a :class:`QuantReport`.

    Activation quantizers start in calibration mode; calibrate them (forward some batches), then
    ``freeze_activation_ranges``. Only exact ``nn.Conv2d``/``nn.Linear`` are replaced: subclasses
    (e.g. timm's ``StdConv2d``, ``Conv2dSame``) have their own forward and are reported as float.
    """
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    qmodel = copy.deepcopy(model)
    net = qmodel.backbone if isinstance(qmodel, NormalizedModel) else qmodel
    prefix = "backbone." if isinstance(qmodel, NormalizedModel) else ""
    report = QuantReport(w_bits, a_bits)
    calls: dict[str, int] = {}
    if trace_functional:
        report.functional_activations, calls, why = _trace(net)
        if why:
            report.notes.append(f"torch.fx could not trace the model ({why}); functional activations not checked")
    else:
        report.notes.append("functional activations not checked (trace_functional=False)")

    ref = next(iter(net.parameters()), None)  # new quantizers go where the model is
    for name, module in list(net.named_modules()):
        if not name:
            continue
        kind = type(module)
        if kind is nn.Conv2d or kind is nn.Linear:
            quant_cls = QuantConv2d if kind is nn.Conv2d else QuantLinear
            _replace(net, name, quant_cls.from_float(module, w_bits, per_channel))
            report.weight_layers.append(prefix + name)
        elif kind in QUANTIZED_RELUS:
            quantizer = ActivationQuantizer(a_bits, ema_momentum, ema_bias_correction)
            if ref is not None:
                quantizer.to(ref.device)
            _replace(net, name, nn.Sequential(module, quantizer))
            report.activation_quantizers.append(f"{prefix}{name}.1")
            if calls.get(name, 1) > 1:
                report.notes.append(f"{prefix}{name} is called {calls[name]} times per forward: its one "
                                    "quantizer keeps a single range for all call sites")
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            report.unquantized[prefix + name] = f"{kind.__name__}: a Conv2d/Linear subclass with its own forward"
        elif isinstance(module, NORM_TYPES):
            continue  # kept float on purpose (the reference does not fold or quantize them)
        elif isinstance(module, OTHER_ACTIVATIONS):
            report.unquantized[prefix + name] = f"{kind.__name__} output not quantized (only ReLU outputs are)"
        elif any(True for _ in module.parameters(recurse=False)):
            report.unquantized[prefix + name] = f"{kind.__name__} has weights but is not a Conv2d/Linear"
    if report.functional_activations:
        report.notes.append(f"{len(report.functional_activations)} functional activation call(s) in forward "
                            "are not modules, so no quantizer follows them")
    report.notes.append("float by design (as in the reference): the input image, normalization layers, "
                        "biases, residual additions, pooling")
    return qmodel, report


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)}


def weight_quantized_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def calibrate_activation_ranges(model: nn.Module) -> None:
    """Let every activation quantizer fold the batches that follow into its range."""
    for q in activation_quantizers(model).values():
        q.calibrate()


def freeze_activation_ranges(model: nn.Module) -> None:
    for q in activation_quantizers(model).values():
        q.freeze()


@torch.no_grad()
def sync_activation_ranges(model: nn.Module) -> None:
    """Average the activation ranges over the ranks of an initialised process group (no-op otherwise).

    Each data-parallel worker calibrates on its own generated batches; averaging their EMA ranges
    gives every rank the same quantizer, using all ranks' data rather than rank 0's alone.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    quantizers = list(activation_quantizers(model).values())
    if not quantizers:
        return
    ranges = torch.stack([torch.stack([q.x_min, q.x_max]) for q in quantizers])
    dist.all_reduce(ranges)  # SUM: gloo has no AVG
    ranges /= dist.get_world_size()
    for q, (lo, hi) in zip(quantizers, ranges):
        q.x_min.copy_(lo)
        q.x_max.copy_(hi)
