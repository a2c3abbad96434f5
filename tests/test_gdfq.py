"""GDFQ: quantizer arithmetic, model conversion, generator, training loop, baselines, export."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tdmr_ray.gdfq.baselines import CalibrationConfig, distill_images, gaussian_images, noise_calibrated
from tdmr_ray.gdfq.export import load_quantized, save_quantized
from tdmr_ray.gdfq.fake_quant import (ActivationQuantizer, QuantConv2d, affine_qparams, check_bits, fake_quantize,
                                      weight_range)
from tdmr_ray.gdfq.generator import BNStatisticsLoss, Generator
from tdmr_ray.gdfq.quantize import activation_quantizers, quantize_model, weight_quantized_layers
from tdmr_ray.gdfq.train import GDFQConfig, kd_loss, make_state, train_epoch
from tdmr_ray.models import NormalizedModel, create_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clean_images():
    from tdmr_ray.data import load_dataset

    return load_dataset("cifar10-clean-subset", "test").tensors(slice(0, 300))


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return create_model("resnet20", pretrained=True).eval()


def _fq_weight(w, bits, per_channel=True):
    lo, hi = weight_range(w, per_channel)
    scale, zp = affine_qparams(lo, hi, bits)
    return fake_quantize(w, scale, zp, bits), scale


# ---------------------------------------------------------------- quantizer arithmetic

@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_round_trip_error_is_at_most_half_a_step(bits):
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-2, 1, 8).view(-1, 1, 1, 1)
    w_hat, scale = _fq_weight(w, bits)
    assert ((w - w_hat).abs() <= scale / 2 * (1 + 1e-4) + 1e-7).all()
    for c in range(8):  # at most 2**bits levels per channel, and the range ends are kept
        assert len(torch.unique(w_hat[c])) <= 2 ** bits
        assert torch.allclose(w_hat[c].min(), w[c].min(), atol=float(scale[c]) / 2)
    requantized = _fq_weight(w_hat, bits)[0]  # the grid is a fixed point (up to float rounding)
    assert torch.allclose(requantized, w_hat, atol=1e-3 * float(scale.min()) + 1e-6)


def test_per_channel_beats_per_tensor_on_channels_of_different_scale():
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 0, 16).view(-1, 1, 1, 1)
    power = w.pow(2).mean((1, 2, 3))

    def relative_error(per_channel):  # per channel, relative to the channel's power
        return ((w - _fq_weight(w, 4, per_channel)[0]).pow(2).mean((1, 2, 3)) / power).mean()

    assert relative_error(True) < relative_error(False) / 10
    # Small channels are the ones per-tensor quantization wipes out.
    assert (_fq_weight(w, 4, per_channel=False)[0][0] == 0).float().mean() > 0.9
    assert (_fq_weight(w, 4, per_channel=True)[0][0] == 0).float().mean() < 0.2


def test_matches_torch_fake_quant_where_its_rule_applies():
    w = torch.randn(32, 16, 3, 3)  # every channel has both signs: torch's range rule coincides
    for bits in (2, 4, 8):
        lo, hi = weight_range(w)
        scale, zp = affine_qparams(lo, hi, bits)
        ours = fake_quantize(w, scale, zp, bits)
        theirs = torch.fake_quantize_per_channel_affine(w, scale.flatten(), zp.flatten().int(), 0, 0, 2 ** bits - 1)
        close = torch.isclose(ours, theirs, atol=1e-6)
        assert close.float().mean() > 0.999  # a rare x/s vs x*(1/s) tie may round the other way


@pytest.mark.parametrize("lo, hi", [(0.0, 6.0), (-1.5, 2.0), (0.3, 0.9), (-4.0, -1.0)])
def test_inference_path_gives_the_same_levels(lo, hi):
    # Frozen quantizers without autograd take fake_quantize_no_grad (devices, evaluation, Serve); it must
    # give fake_quantize's numbers exactly, for ranges with and without 0 and inputs beyond both ends.
    bits = 4
    q = ActivationQuantizer(bits)
    q.set_range(lo, hi)
    q.freeze()
    x = torch.cat([torch.linspace(lo - 3, hi + 3, 2001), torch.randn(5000) * (hi - lo) + lo])
    scale, zp = affine_qparams(q.x_min, q.x_max, bits)
    with torch.no_grad():
        fast = q(x)
    assert torch.equal(fast, fake_quantize(x, scale, zp, bits))  # -0.0 == 0.0 here, as in any later layer
    assert torch.equal(q(x.clone().requires_grad_(True)).detach(), fast)  # the autograd path: same levels
    assert len(torch.unique(fast)) <= 2 ** bits


def test_one_signed_channel_uses_its_own_range():
    w = torch.rand(2, 50) + 0.5  # all positive: torch's observers would stretch the range to 0
    w_hat, scale = _fq_weight(w, 3)
    assert (scale.flatten() < 0.7 * w.max(1).values / 7).all()  # finer than a range stretched to 0
    assert ((w - w_hat).abs() <= scale / 2 + 1e-6).all()
    for end in (torch.amin, torch.amax):  # integral zero point: the grid ends within half a step
        assert ((end(w_hat, 1) - end(w, 1)).abs() <= scale.flatten() / 2 + 1e-6).all()


def test_bits_outside_2_to_8_are_rejected():
    for bad in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            check_bits(bad)
    with pytest.raises(ValueError, match="w_bits"):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), 9, 4)


def test_straight_through_gradient_passes_everywhere():
    q = ActivationQuantizer(2)
    q(torch.linspace(0, 1, 11))
    q.freeze()
    x = torch.linspace(-1, 3, 41, requires_grad=True)  # beyond the range at both ends
    (q(x) * torch.arange(41.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(41.0))

    conv = QuantConv2d(3, 4, 3, padding=1, w_bits=3)
    x = torch.randn(2, 3, 8, 8)
    conv(x).pow(2).sum().backward()
    w_hat = conv.quantized_weight().detach().requires_grad_(True)
    F.conv2d(x, w_hat, conv.bias, padding=1).pow(2).sum().backward()
    assert torch.allclose(conv.weight.grad, w_hat.grad, atol=1e-5)  # dL/dw = dL/dw_hat


# ---------------------------------------------------------------- activation ranges

@pytest.mark.parametrize("rule", ["adam", "reference"])
def test_activation_range_ema_and_freeze(rule):
    q = ActivationQuantizer(8, momentum=0.9, bias_correction=rule)
    batches = [torch.tensor([0.0, 2.0]), torch.tensor([0.0, 4.0]), torch.tensor([0.0, 1.0])]
    expected, acc = [], 0.0
    for t, b in enumerate(batches, 1):
        if rule == "adam":
            acc = 0.9 * acc + 0.1 * float(b.max())
            expected.append(acc / (1 - 0.9 ** t))
        else:
            prev = expected[-1] if expected else 0.0
            expected.append((0.9 * prev + 0.1 * float(b.max())) / (1 - 0.9 ** t))
    for b, e in zip(batches, expected):
        q(b)
        assert float(q.x_max) == pytest.approx(e, rel=1e-5)
    assert float(q.x_max) != pytest.approx(2.0)  # it did move with the batches
    q.freeze()
    frozen = (q.x_min.clone(), q.x_max.clone())
    y = q(torch.tensor([-5.0, 50.0]))
    assert torch.equal(q.x_min, frozen[0]) and torch.equal(q.x_max, frozen[1])
    assert float(y.max()) <= float(q.x_max) + 1e-6  # clamped to the frozen range
    q.calibrate()
    q(torch.tensor([-5.0, 50.0]))
    assert float(q.x_max) > float(frozen[1])


def test_reference_rule_inflates_short_calibrations_the_adam_rule_does_not():
    ranges = {}
    for rule in ("adam", "reference"):
        q = ActivationQuantizer(8, bias_correction=rule)
        for _ in range(10):
            q(torch.tensor([0.0, 1.0]))
        ranges[rule] = float(q.x_max)
    assert ranges["adam"] == pytest.approx(1.0, rel=1e-5)
    assert ranges["reference"] > 100


def test_uncalibrated_frozen_quantizer_refuses_to_run():
    q = ActivationQuantizer(4)
    q.freeze()
    with pytest.raises(RuntimeError, match="no range"):
        q(torch.ones(3))


# ---------------------------------------------------------------- quantize_model

def test_quantize_model_covers_cifar_resnet_and_keeps_the_wrapper(resnet20):
    qmodel, report = quantize_model(resnet20, 4, 4)
    assert isinstance(qmodel, NormalizedModel) and qmodel.arch == resnet20.arch
    n_conv = sum(isinstance(m, nn.Conv2d) for m in resnet20.modules())
    n_relu = sum(isinstance(m, nn.ReLU) for m in resnet20.modules())
    assert (n_conv, n_relu) == (19, 19)
    assert len(report.weight_layers) == n_conv + 1 == len(weight_quantized_layers(qmodel))
    assert len(report.activation_quantizers) == n_relu == len(activation_quantizers(qmodel))
    assert report.unquantized == {} and report.functional_activations == []
    assert all(name.startswith("backbone.") for name in report.weight_layers)
    assert not weight_quantized_layers(resnet20) and not activation_quantizers(resnet20)  # original untouched
    assert set(activation_quantizers(qmodel)) == set(report.activation_quantizers)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.SiLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.fc(self.act(x.mean((2, 3))))


def test_quantize_model_reports_what_it_left_float():
    _, report = quantize_model(_Mixed(), 8, 8)
    assert report.weight_layers == ["conv", "fc"]
    assert set(report.unquantized) == {"emb", "act"}
    assert "SiLU" in report.unquantized["act"] and "Embedding" in report.unquantized["emb"]
    assert len(report.functional_activations) == 1  # the F.relu call
    assert "functional" in report.summary()

    import torchvision

    tv_q, tv_report = quantize_model(torchvision.models.resnet18(num_classes=10), 6, 6)
    assert len(tv_report.weight_layers) == 21 and len(tv_report.activation_quantizers) == 9
    assert any("layer1.0.relu is called 2 times" in n for n in tv_report.notes)  # shared ReLU flagged
    tv_q.eval()
    assert tv_q(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------- generator and losses

def test_generator_shapes_quirk_and_pixel_space(resnet20):
    gen = Generator.for_model(resnet20)
    z, y = torch.randn(8, 100), torch.arange(8) % 10
    x = gen(z, y)
    assert x.shape == (8, 3, 32, 32)
    assert gen.bn1.eps == 0.8 and gen.bn0.eps == 1e-5 and not gen.bn_out.affine
    standardized = resnet20.normalize(x)  # what the network sees: the reference generator's output
    assert torch.allclose(standardized, gen.standardized(z, y), atol=1e-5)
    assert torch.allclose(standardized.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_bns_loss_decreases_over_generator_steps(resnet20):
    cfg = GDFQConfig(batch_size=16, epochs=1, iters_per_epoch=1, warmup_epochs=0)
    state = make_state(copy.deepcopy(resnet20), cfg)
    from tdmr_ray.gdfq.train import generator_step, sample_latent
    losses = [generator_step(state, *sample_latent(state))[2]["g_bns"] for _ in range(10)]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    state.bns.remove()


def test_bns_hooks_only_record_inside_recording(resnet20):
    bns = BNStatisticsLoss(resnet20)
    resnet20(torch.rand(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match="no BN statistics"):
        bns.loss()
    with bns.recording():
        resnet20(torch.rand(4, 3, 32, 32))
    assert len(bns._stats) == len(bns.layers) == 19 and bns.loss() > 0
    bns.remove()


def test_kd_loss_reductions():
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.arange(6)
    ce = F.cross_entropy(s, y)
    mean = (kd_loss(s, t, y, GDFQConfig(kl_reduction="mean")) - ce).item()
    batchmean = (kd_loss(s, t, y, GDFQConfig(kl_reduction="batchmean")) - ce).item()
    assert batchmean == pytest.approx(10 * mean, rel=1e-4)  # 'mean' also divides by the 10 classes
    assert mean > 0
    with pytest.raises(ValueError, match="kl_reduction"):
        GDFQConfig(kl_reduction="sum")
    # ce_weight scales the CE to the generator's labels; 0 leaves the distillation from the FP model alone
    kl_only = kd_loss(s, t, y, GDFQConfig(ce_weight=0.0)).item()
    assert kl_only == pytest.approx(mean, rel=1e-5)
    assert kd_loss(s, t, y, GDFQConfig(ce_weight=0.5)).item() == pytest.approx(kl_only + 0.5 * ce.item(), rel=1e-5)
    # ce_agreed_only: the CE counts only the images the FP model (teacher) labels as intended
    t_agree = torch.randn(6, 10)
    t_agree[torch.arange(3), y[:3]] = 50.0  # the teacher agrees on the first three, not on the others
    t_agree[torch.arange(3, 6), (y[3:] + 1) % 10] = 50.0
    agreed = kd_loss(s, t_agree, y, GDFQConfig(ce_agreed_only=True)).item()
    kl = kd_loss(s, t_agree, y, GDFQConfig(ce_weight=0.0)).item()
    assert agreed == pytest.approx(kl + F.cross_entropy(s[:3], y[:3]).item(), rel=1e-5)
    t_none = torch.zeros(6, 10)
    t_none[torch.arange(6), (y + 1) % 10] = 50.0
    s_grad = s.clone().requires_grad_(True)  # none agrees: the KL's gradient alone, finite everywhere
    kd_loss(s_grad, t_none, y, GDFQConfig(ce_agreed_only=True)).backward()
    s_kl = s.clone().requires_grad_(True)
    kd_loss(s_kl, t_none, y, GDFQConfig(ce_weight=0.0)).backward()
    assert torch.allclose(s_grad.grad, s_kl.grad)
    with pytest.raises(ValueError, match="ce_weight"):
        GDFQConfig(ce_weight=-1.0)
    # kd_only_from_bits: a student at (or above) that width learns from the KL alone, a narrower one keeps the CE
    kd8 = GDFQConfig(w_bits=8, a_bits=8, kd_only_from_bits=8)
    assert kd_loss(s, t, y, kd8).item() == pytest.approx(kl_only, rel=1e-5)
    assert kd_loss(s, t, y, kd8, bits=(4, 4)).item() == pytest.approx(kl_only + ce.item(), rel=1e-5)
    assert kd_loss(s, t, y, kd8, bits=(8, 4)).item() == pytest.approx(kl_only + ce.item(), rel=1e-5)
    assert kd_loss(s, t, y, GDFQConfig(w_bits=8, a_bits=8)).item() == pytest.approx(kl_only + ce.item(), rel=1e-5)
    with pytest.raises(ValueError, match="kd_only_from_bits"):
        GDFQConfig(kd_only_from_bits=9)


# ---------------------------------------------------------------- training loop

def _tiny_cfg(**kw):
    return GDFQConfig(**{"epochs": 3, "iters_per_epoch": 2, "batch_size": 8, "warmup_epochs": 1,
                         "range_update_epochs": 1, "lr_q": 1e-2, "lr_milestones": (2,), **kw})


def test_loop_warms_up_then_freezes_ranges_and_fine_tunes(resnet20):
    state = make_state(copy.deepcopy(resnet20), _tiny_cfg())
    w0 = state.qmodel.backbone.conv1.weight.detach().clone()
    train_epoch(state)  # warm-up: generator and ranges move, the quantized weights do not
    assert torch.equal(state.qmodel.backbone.conv1.weight, w0)
    ranges = {n: (q.x_min.clone(), q.x_max.clone()) for n, q in activation_quantizers(state.qmodel).items()}
    assert all(float(hi) > 0 for _, hi in ranges.values())
    m1 = train_epoch(state)
    m2 = train_epoch(state)
    assert not torch.equal(state.qmodel.backbone.conv1.weight, w0)
    for n, q in activation_quantizers(state.qmodel).items():  # frozen after the range-update epochs
        assert torch.equal(q.x_max, ranges[n][1]) and not q.calibrating
    assert m1["quantized_updated"] and m2["lr_q"] == pytest.approx(1e-3)  # decayed at epoch 2
    assert [h["epoch"] for h in state.history] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for v in m2.values() if isinstance(v, float))


def test_checkpoint_resume_continues_identically(resnet20):
    cfg = _tiny_cfg(epochs=2)
    straight = make_state(copy.deepcopy(resnet20), cfg)
    train_epoch(straight)
    ckpt = copy.deepcopy(straight.state_dict())
    train_epoch(straight)

    resumed = make_state(copy.deepcopy(resnet20), cfg)
    resumed.load_state_dict(ckpt)
    train_epoch(resumed)
    for a, b in zip(straight.qmodel.state_dict().values(), resumed.qmodel.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="different GDFQ config"):
        make_state(copy.deepcopy(resnet20), _tiny_cfg(epochs=5)).load_state_dict(ckpt)
    # a checkpoint written before a setting existed ran at its default: it resumes under the default only
    older = {**ckpt, "cfg": {k: v for k, v in ckpt["cfg"].items() if k != "ce_weight"}}
    make_state(copy.deepcopy(resnet20), cfg).load_state_dict(older)
    with pytest.raises(ValueError, match="ce_weight"):
        make_state(copy.deepcopy(resnet20), _tiny_cfg(epochs=2, ce_weight=0.0)).load_state_dict(older)
    # kd_only_from_bits written before it existed (0): a W4A4 run is the same under 8 and resumes; a W8A8
    # run would change its loss and is refused
    before_rule = {**ckpt, "cfg": {k: v for k, v in ckpt["cfg"].items() if k != "kd_only_from_bits"}}
    make_state(copy.deepcopy(resnet20), _tiny_cfg(epochs=2, kd_only_from_bits=8)).load_state_dict(before_rule)
    w8 = _tiny_cfg(epochs=2, w_bits=8, a_bits=8)
    w8_ckpt = make_state(copy.deepcopy(resnet20), w8).state_dict()
    w8_ckpt["cfg"].pop("kd_only_from_bits")
    with pytest.raises(ValueError, match="kd_only_from_bits"):
        make_state(copy.deepcopy(resnet20), _tiny_cfg(epochs=2, w_bits=8, a_bits=8, kd_only_from_bits=8)
                   ).load_state_dict(w8_ckpt)


def test_resume_mid_calibration_with_momentum_continues_identically(resnet20):
    """Resumed while activation ranges still move and SGD momentum is non-zero (epoch 2 of 3 range epochs)."""
    cfg = _tiny_cfg(epochs=3, range_update_epochs=3, warmup_epochs=1, momentum=0.9)
    straight = make_state(copy.deepcopy(resnet20), cfg)
    train_epoch(straight)
    train_epoch(straight)
    ckpt = copy.deepcopy(straight.state_dict())
    train_epoch(straight)
    resumed = make_state(copy.deepcopy(resnet20), cfg)
    resumed.load_state_dict(ckpt)
    train_epoch(resumed)
    for (name, a), b in zip(straight.qmodel.state_dict().items(), resumed.qmodel.state_dict().values()):
        assert torch.equal(a, b), name


def test_ranks_draw_distinct_latents_after_a_resume_on_any_device(resnet20):
    from tdmr_ray.gdfq.train import sample_latent, seed_epoch

    cfg = _tiny_cfg(epochs=2)
    ckpt = make_state(copy.deepcopy(resnet20), cfg).state_dict()
    ckpt["epoch"] = 1
    ckpt["rng"] = torch.zeros(3, dtype=torch.uint8)  # e.g. a CUDA generator's state: ignored, never loaded
    draws = []
    for rank in (0, 1):
        state = make_state(copy.deepcopy(resnet20), cfg, rank=rank)
        state.load_state_dict(ckpt)
        seed_epoch(state)
        draws.append(sample_latent(state)[0])
    assert not torch.equal(draws[0], draws[1])  # DDP averages two different batches, not one twice
    again = make_state(copy.deepcopy(resnet20), cfg, rank=1)
    again.epoch = 1
    seed_epoch(again)
    assert torch.equal(sample_latent(again)[0], draws[1])  # what an uninterrupted rank 1 draws at epoch 1


def test_several_students_share_one_generator_stream_exactly(resnet20):
    cfg = _tiny_cfg(epochs=2, w_bits=4, a_bits=4)
    alone = make_state(copy.deepcopy(resnet20), cfg)
    together = make_state(copy.deepcopy(resnet20), cfg, bit_widths=[(4, 4), (8, 8)])
    for _ in range(2):
        m_alone, m_together = train_epoch(alone), train_epoch(together)
    assert m_together["q_loss/W4A4"] == pytest.approx(m_alone["q_loss"], rel=1e-6)
    for a, b in zip(alone.qmodel.state_dict().values(), together.students[0].qmodel.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


# ---------------------------------------------------------------- baselines

def test_zeroq_images_match_bn_statistics_better_than_noise(resnet20):
    cfg = CalibrationConfig(zeroq_iters=15)
    flags = [p.requires_grad for p in resnet20.parameters()]
    noise = gaussian_images(resnet20, 16, 32, torch.Generator().manual_seed(0))
    distilled = distill_images(resnet20, 16, cfg, torch.Generator().manual_seed(0))
    bns = BNStatisticsLoss(resnet20)
    losses = []
    with torch.no_grad():
        for x in (noise, distilled):
            with bns.recording():
                resnet20(x)
            losses.append(bns.loss().item())
    bns.remove()
    assert losses[1] < 0.5 * losses[0]
    assert [p.requires_grad for p in resnet20.parameters()] == flags  # distillation restored them


# ---------------------------------------------------------------- export

@pytest.mark.parametrize("per_channel", [True, False])
def test_export_round_trip_is_exact(resnet20, clean_images, tmp_path, per_channel):
    qmodel, _ = noise_calibrated(resnet20, 4, 4, CalibrationConfig(batches=2, batch_size=32, per_channel=per_channel))
    x, y = clean_images
    with torch.no_grad():
        before = qmodel.eval()(x)
    tensors_path, json_path = save_quantized(qmodel, tmp_path / "r20-w4a4", extra={"note": "test"})
    tensors, meta = load_file(str(tensors_path)), json.loads(json_path.read_text())
    assert tensors["backbone.conv1.weight.int"].dtype == torch.uint8
    assert int(tensors["backbone.layer1.0.conv1.weight.int"].max()) <= 15
    assert tensors["backbone.linear.weight.scale"].shape == ((10,) if per_channel else (1,))
    assert meta["arch"]["name"] == "resnet20" and len(meta["activation_quantizers"]) == 19
    assert not any(k.endswith(".weight") and "conv" in k for k in tensors)  # no float conv weights stored

    loaded = load_quantized(tmp_path / "r20-w4a4")
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before, after)
    assert before.argmax(1).eq(y).float().mean() == after.argmax(1).eq(y).float().mean()
    assert not activation_quantizers(loaded)["backbone.relu.1"].calibrating


def test_loader_needs_no_training_code(resnet20, tmp_path):
    qmodel, _ = noise_calibrated(resnet20, 8, 8, CalibrationConfig(batches=1, batch_size=8))
    save_quantized(qmodel, tmp_path / "m")
    code = (f"import sys, torch; from tdmr_ray.gdfq import load_quantized; m = load_quantized({str(tmp_path / 'm')!r}); "
            "m(torch.rand(1, 3, 32, 32)); "
            "bad = [k for k in sys.modules if k.startswith('tdmr_ray.gdfq.') and k.split('.')[-1] in "
            "('train', 'generator', 'baselines')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str):
    import torch.distributed as dist

    from tdmr_ray.gdfq.quantize import sync_activation_ranges

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), ActivationQuantizer(4)))
    model[1][1](torch.tensor([0.0, 1.0 + rank]))  # rank r sees max 1 + r
    sync_activation_ranges(model)
    torch.save(model[1][1].x_max.clone(), f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_activation_ranges_are_averaged_over_data_parallel_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    maxima = [float(torch.load(tmp_path / f"{r}.pt", weights_only=True)) for r in range(2)]
    assert maxima == [pytest.approx(1.5), pytest.approx(1.5)]


def test_bench_variants_parse_typed_settings_and_name_unknown_ones():
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gdfq_variants.py"
    spec = importlib.util.spec_from_file_location("bench_gdfq_variants", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    name, changes = bench.parse_variant("slow=lr_q=1e-5; ce_agreed_only=true;warmup_epochs=8")
    assert name == "slow" and changes == {"lr_q": 1e-5, "ce_agreed_only": True, "warmup_epochs": 8}
    assert isinstance(changes["lr_q"], float)  # YAML 1.1 alone reads 1e-5 as a string
    GDFQConfig.from_dict({**GDFQConfig().to_dict(), **changes})
    with pytest.raises(argparse.ArgumentTypeError, match="unknown GDFQ setting"):
        bench.parse_variant("x=lr=0.1")
    with pytest.raises(argparse.ArgumentTypeError, match="key=value"):
        bench.parse_variant("x=lr_q")
