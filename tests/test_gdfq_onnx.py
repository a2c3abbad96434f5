"""The quantized model as an ONNX QDQ graph: integers in the file, onnxruntime computing the
fake-quant model's predictions, the torch model rebuilt from it, and the registry keeping both."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tdmr_ray.gdfq.baselines import CalibrationConfig, noise_calibrated
from tdmr_ray.gdfq.onnx_export import OnnxRuntimeModel, export_onnx, load_onnx, onnx_record
from tdmr_ray.models import create_model
from tdmr_ray.registry import Registry, RegistryError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clean():
    from tdmr_ray.data import load_dataset

    return load_dataset("cifar10-clean-subset", "test").tensors(slice(0, 1017))


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return create_model("resnet20", pretrained=True).eval()


def _quantized(model, bits, per_channel=True, one_sign_channels=False):
    qmodel, _ = noise_calibrated(model, bits, bits, CalibrationConfig(batches=2, batch_size=32, per_channel=per_channel))
    if one_sign_channels:  # GDFQ's grid then puts these channels' zero points outside the levels
        with torch.no_grad():
            conv = qmodel.get_submodule("backbone.layer1.0.conv1")
            conv.weight[0] = conv.weight[0].abs() + 0.05
            conv.weight[1] = -conv.weight[1].abs() - 0.05
    return qmodel.eval()


@pytest.fixture(scope="module")
def w4a4(resnet20):
    qmodel = _quantized(resnet20, 4, one_sign_channels=True)
    return qmodel, export_onnx(qmodel)


def _check_same_predictions(qmodel, payload, x, y):
    with torch.no_grad():
        expected = qmodel(x)
    got = OnnxRuntimeModel(payload)(x)
    top1 = lambda logits: 100 * logits.argmax(1).eq(y).float().mean().item()  # noqa: E731
    assert abs(top1(got) - top1(expected)) <= 0.1
    assert (got.argmax(1) != expected.argmax(1)).sum() <= 1
    with torch.no_grad():  # the torch model rebuilt from the file is the exported one, exactly
        assert torch.equal(load_onnx(payload)(x[:64]), expected[:64])
    return top1(got)


def test_w4a4_graph_holds_integers_and_onnxruntime_matches_the_fake_quant_model(w4a4, clean):
    qmodel, payload = w4a4
    proto = onnx.load_model_from_string(payload)
    ops = [n.op_type for n in proto.graph.node]
    # 19 convolutions + the classifier read integer weights; 19 ReLU outputs are quantized (with the clip).
    assert ops.count("DequantizeLinear") == 20 + 19 and ops.count("QuantizeLinear") == 19 and ops.count("Clip") == 19
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert not any(k.endswith(".weight") and ("conv" in k or "linear" in k) for k in inits)  # no float weights
    levels = inits["backbone.layer1.1.conv1.weight.int"]
    assert levels.dtype == np.uint8 and int(levels.max()) <= 15
    assert inits["backbone.layer1.1.conv1.weight.scale"].shape == (16,)
    # The one-sign channels: the positive one's zero point is below 0, so it is stored shifted in uint8
    # (levels and zero point moved up together); the negative one's lies above the 16 levels.
    assert onnx_record(payload)["weight_layers"]["backbone.layer1.0.conv1"]["storage"] == "uint8"
    assert int(inits["backbone.layer1.0.conv1.weight.int"][0].min()) > 0
    assert int(inits["backbone.layer1.0.conv1.weight.zero_point"][1]) > 15
    top1 = _check_same_predictions(qmodel, payload, *clean)
    assert 40 < top1 < 90  # quantized for real: the float ResNet-20 scores ~92 here, this noise-calibrated one less


def test_w3a3_per_tensor_and_w8a8_int16_fallback(resnet20, clean):
    x, y = clean
    _check_same_predictions(w3 := _quantized(resnet20, 3, per_channel=False), export_onnx(w3), x[:400], y[:400])
    w8 = _quantized(resnet20, 8, one_sign_channels=True)
    payload = export_onnx(w8)  # no spare uint8 levels at 8 bits: the layer is stored as int16, exactly
    assert onnx_record(payload)["weight_layers"]["backbone.layer1.0.conv1"]["storage"] == "int16"
    assert onnx_record(payload)["weight_layers"]["backbone.layer1.1.conv1"]["storage"] == "uint8"
    _check_same_predictions(w8, payload, x[:400], y[:400])


def test_the_registry_keeps_both_formats_and_refuses_a_corrupt_onnx(w4a4, tmp_path):
    from tdmr_ray.gdfq.registry_format import publish_quantized

    qmodel, payload = w4a4
    registry = Registry(str(tmp_path / "registry"))
    version = publish_quantized(registry, "r20-w4a4", qmodel, onnx=payload)
    assert set(version.meta["files"]) == {"model.onnx"}
    assert registry.load_file("r20-w4a4", 1, "model.onnx")[0] == payload
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        from_tensors, from_onnx = registry.load_ref("r20-w4a4@v1")(x), registry.load_ref("r20-w4a4@v1:onnx")(x)
    assert torch.equal(from_tensors, from_onnx)
    path = tmp_path / "registry" / "r20-w4a4" / "v000001" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RegistryError, match="checksum mismatch"):
        registry.load_ref("r20-w4a4@v1:onnx")
    with torch.no_grad():  # the tensors copy still loads
        assert torch.equal(registry.load_ref("r20-w4a4@v1")(x), from_tensors)
    with pytest.raises(RegistryError, match="unknown artifact"):
        registry.load_ref("r20-w4a4@v1:tflite")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        load_onnx(b"not onnx at all")
