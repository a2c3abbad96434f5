"""TDMR library: prompts and mappings over inputs/architectures, schedule, frozen foundation,
training steps lowering the loss, data helpers, configs and compute accounting. Small models, no Ray."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdmr_ray.data import ImageSet
from tdmr_ray.models import create_model
from tdmr_ray.tdmr import (ComputeMeter, DistillConfig, DistillStudent, DownstreamBatches, InputTransform,
                           ScheduleConfig, StepSampler, TDMRConfig, TeacherConfig, alpha_at, augment,
                           build_teacher, distill_step, evaluate, forward_flops, foundation_input_size,
                           labelled_fraction, make_optimizer, method_config, regroup_classes, reprogram_step,
                           run_method, split_holdout, split_labelled, teacher_param_groups)

torch.set_num_threads(1)


def synthetic_set(n=40, size=32, chans=3, classes=4, seed=0) -> ImageSet:
    """Images whose class sets the mean brightness of one channel region: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, size, size, chans)).astype(np.uint8)
    for i, c in enumerate(y):
        h = size * c // classes
        x[i, h:h + size // classes] += 150
    return ImageSet(x, y)


def capture_input(model):
    """Records the shape of the images a NormalizedModel receives (every path goes through normalize)."""
    seen, normalize = {}, model.normalize

    def recording(x):
        seen["shape"] = tuple(x.shape)
        return normalize(x)

    model.normalize = recording
    return seen


# ---------- prompts and mappings over inputs and architectures ----------

FOUNDATIONS = {  # name -> input size the transform must produce
    "resnet20": 32,
    "test_resnet": 160,  # a tiny timm CNN (its pretrained config says 160)
    "test_vit": 160,  # a tiny timm ViT
}


@pytest.mark.parametrize("foundation_name", list(FOUNDATIONS))
@pytest.mark.parametrize("prompt", ["additive", "pad", "none"])
@pytest.mark.parametrize("hwc", [(32, 32, 3), (28, 28, 1), (64, 64, 3)])
def test_teacher_shapes(foundation_name, prompt, hwc):
    h, w, c = hwc
    torch.manual_seed(0)
    foundation = create_model(foundation_name, num_classes=10)
    cfg = TeacherConfig(prompt=prompt, proxy_dim=24, pad_width=4)
    teacher = build_teacher(foundation, in_chans=c, num_classes=7, cfg=cfg)
    size = FOUNDATIONS[foundation_name]
    assert foundation_input_size(foundation) == size
    seen = capture_input(foundation)
    out = teacher(torch.rand(2, c, h, w))
    assert seen["shape"] == (2, 3, size, size)
    assert out.proxy.shape == (2, 24) and out.logits.shape == (2, 7)
    assert torch.isfinite(out.logits).all()


def test_fixed_size_vit_foundation_trains_its_prompt_from_grayscale_inputs():
    torch.manual_seed(0)
    foundation = create_model("vit_tiny_patch16_224", num_classes=1000)  # fixed 224x224 patch grid
    teacher = build_teacher(foundation, in_chans=1, num_classes=3, cfg=TeacherConfig(prompt="pad", pad_width=16))
    seen = capture_input(foundation)
    opt, _ = make_optimizer(teacher_param_groups(teacher, TeacherConfig()), TeacherConfig().optim, 1)
    prompt = teacher.transform.prompt.clone()
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 2])
    reprogram_step(teacher, x, y, opt)
    assert seen["shape"] == (2, 3, 224, 224)
    assert not torch.equal(prompt, teacher.transform.prompt)  # gradients reach the prompt through the ViT
    assert teacher.transform.channel_map.weight.grad is not None
    assert all(p.grad is None for p in foundation.parameters())


def test_pad_prompt_frames_the_resized_image_and_only_the_frame_learns():
    t = InputTransform(in_chans=3, out_chans=3, input_size=16, prompt="pad", pad_width=3,
                       mean=torch.tensor([0.1, 0.2, 0.3]))
    x = torch.rand(2, 3, 10, 10)  # already the inner size: no resize
    out = t(x)
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out[:, :, 3:13, 3:13], x)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    out.sum().backward()
    grad = t.prompt.grad[0, 0]
    assert grad[0, 0] != 0 and grad[8, 8] == 0  # frame vs centre


def test_additive_prompt_and_grayscale_channel_adaptation():
    t = InputTransform(in_chans=1, out_chans=3, input_size=8, prompt="additive")
    x = torch.rand(2, 1, 8, 8)
    out = t(x)
    for ch in range(3):  # initial channel map replicates the gray channel; prompt starts at zero
        assert torch.allclose(out[:, ch], x[:, 0])
    with torch.no_grad():
        t.prompt[:, 1] += 0.5
    assert torch.allclose(t(x)[:, 1], x[:, 0] + 0.5)


def test_mapping_inputs_choice_sets_proxy_width():
    f = create_model("resnet20")
    for inputs, proxy_dim, width in [("features", 0, 64), ("logits", 0, 10), ("both", 0, 74), ("both", 16, 16)]:
        teacher = build_teacher(f, 3, 5, TeacherConfig(mapping_inputs=inputs, proxy_dim=proxy_dim))
        assert teacher.mapping.proxy_dim == width
        assert teacher(torch.rand(2, 3, 32, 32)).proxy.shape == (2, width)


# ---------- schedule ----------

def test_alpha_schedule_values():
    lin = ScheduleConfig(kind="linear", start=0.0, end=1.0, ramp_end=0.8)
    assert [alpha_at(t, lin) for t in (0.0, 0.4, 0.8, 1.0)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    cos = ScheduleConfig(kind="cosine", start=0.2, end=0.9, ramp_end=1.0)
    assert alpha_at(0.0, cos) == pytest.approx(0.2) and alpha_at(1.0, cos) == pytest.approx(0.9)
    assert alpha_at(0.5, cos) == pytest.approx(0.55)
    assert alpha_at(0.25, cos) == pytest.approx(0.2 + 0.7 * (1 - math.cos(math.pi / 4)) / 2)
    step = ScheduleConfig(kind="step", start=0.1, end=0.7, ramp_end=0.5)
    assert [alpha_at(t, step) for t in (0.0, 0.49, 0.5, 0.9)] == pytest.approx([0.1, 0.1, 0.7, 0.7])
    assert alpha_at(0.0, ScheduleConfig(kind="constant", end=0.3)) == 0.3
    with pytest.raises(ValueError):
        ScheduleConfig(kind="exp")


# ---------- frozen foundation; steps lower the loss ----------

def test_reprogramming_keeps_foundation_frozen_and_learns():
    torch.manual_seed(0)
    data = synthetic_set(n=32, classes=4)
    foundation = create_model("resnet20", pretrained=True)  # random BN statistics give flat features
    before = {k: v.clone() for k, v in foundation.state_dict().items()}  # weights and BN buffers
    teacher = build_teacher(foundation, 3, 4, TeacherConfig(proxy_dim=32))
    params = {n: p.clone() for n, p in teacher.named_parameters() if p.requires_grad}
    assert params and not any(n.startswith("body.") for n in params)
    opt, sched = make_optimizer(teacher_param_groups(teacher, TeacherConfig()), TeacherConfig().optim, 40)
    x, y = data.tensors()
    losses = [reprogram_step(teacher, x, y, opt, sched, grad_clip=5.0)["loss"] for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    for k, v in foundation.state_dict().items():
        assert torch.equal(v, before[k]), f"foundation {k} changed"
    assert not torch.equal(teacher.transform.prompt, params["transform.prompt"])


class Wrapper(torch.nn.Module):
    """Stands in for DDP: holds ``.module`` and forwards to it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


@pytest.mark.parametrize("method", ["tdmr", "lp-kd", "ft-kd"])
def test_wrap_trainable_wraps_exactly_the_learning_parts(method):
    torch.manual_seed(0)
    teacher = build_teacher(create_model("resnet20"), 3, 4, method_config(method).teacher)
    x = torch.rand(3, 3, 32, 32)
    teacher.eval()
    before = teacher(x).logits
    names = set(teacher.wrap_trainable(Wrapper).trainable_modules())
    expected = {"tdmr": {"transform", "mapping"}, "lp-kd": {"mapping"}, "ft-kd": {"mapping", "body"}}[method]
    assert names == expected
    assert all(isinstance(getattr(teacher, n), Wrapper) for n in names)
    assert not isinstance(teacher.body, Wrapper) or method == "ft-kd"
    assert torch.allclose(teacher(x).logits, before)
    assert teacher.proxy_classifier() is teacher.unwrap_trainable().mapping.classifier
    assert not any(isinstance(m, Wrapper) for m in teacher.modules())


def test_finetune_teacher_updates_foundation_at_its_lr():
    foundation = create_model("resnet20")
    cfg = method_config("ft-kd").teacher
    teacher = build_teacher(foundation, 3, 4, cfg)
    groups = teacher_param_groups(teacher, cfg)
    assert any(g.get("lr") == cfg.foundation_lr for g in groups)
    w = foundation.backbone.conv1.weight.clone()
    opt, _ = make_optimizer(groups, cfg.optim, 5)
    x, y = synthetic_set(n=8).tensors()
    reprogram_step(teacher, x, y, opt)
    assert not torch.equal(w, foundation.backbone.conv1.weight)


def test_distill_steps_lower_the_loss_and_skip_unlabelled_ce():
    torch.manual_seed(0)
    data = synthetic_set(n=32, classes=4)
    teacher = build_teacher(create_model("resnet20"), 3, 4, TeacherConfig(proxy_dim=16))
    teacher.requires_grad_(False)
    cfg = DistillConfig(steps=30, projector_hidden=32)
    student = DistillStudent(create_model("test_resnet", num_classes=4), proxy_dim=16, projector_hidden=32)
    opt, sched = make_optimizer(student.parameters(), cfg.optim, 30)
    x, y = data.tensors()
    y = y.clone()
    y[::2] = -1  # half unlabelled
    terms = [distill_step(student, teacher, x, y, opt, 0.5, cfg, sched) for _ in range(30)]
    first, last = np.mean([t["loss"] for t in terms[:5]]), np.mean([t["loss"] for t in terms[-5:]])
    assert last < 0.7 * first
    assert all(t["feature"] > 0 and t["proxy_pred"] >= 0 and t["kd"] >= 0 for t in terms)
    # an all-unlabelled batch contributes no CE but still trains (teacher terms)
    none = torch.full_like(y, -1)
    t = distill_step(student, teacher, x, none, opt, 0.5, cfg)
    assert t["ce"] == 0.0 and t["loss"] > 0
    # the teacher never moves
    assert all(p.grad is None for p in teacher.parameters())


def test_evaluate_reports_accuracy_of_logits():
    data = synthetic_set(n=12, classes=4)

    class Oracle(torch.nn.Module):  # predicts the bright band the generator puts in each class
        def forward(self, x):
            return x.mean(dim=(1, 3)).view(len(x), 4, -1).mean(2)

    assert evaluate(Oracle(), data, batch_size=5)["acc"] == 1.0


# ---------- data helpers ----------

def test_split_holdout_is_stratified_disjoint_and_seeded():
    data = synthetic_set(n=100, classes=4)
    data.y[:] = np.repeat(np.arange(4), 25)
    data.x[:, 0, 0, 0] = np.arange(100)  # identify images
    train, test = split_holdout(data, 0.2, seed=1)
    assert len(test) == 20 and len(train) == 80
    assert np.bincount(test.y).tolist() == [5, 5, 5, 5]
    assert not set(train.x[:, 0, 0, 0]) & set(test.x[:, 0, 0, 0])
    assert np.array_equal(split_holdout(data, 0.2, seed=1)[1].x, test.x)
    assert not np.array_equal(split_holdout(data, 0.2, seed=2)[1].x, test.x)


def test_labelled_fraction_keeps_one_per_class_and_the_rest_is_unlabelled():
    y = np.array([0] * 200 + [1] * 50 + [2] * 3)
    data = ImageSet(np.zeros((len(y), 4, 4, 3), np.uint8), y)
    lab = labelled_fraction(data, 0.01, seed=0)
    assert np.bincount(lab.y).tolist() == [2, 1, 1]
    lab2, unl = split_labelled(data, 0.1, seed=0)
    assert np.bincount(lab2.y).tolist() == [20, 5, 1] and len(unl) == len(y) - 26
    with pytest.raises(ValueError):
        labelled_fraction(data, 0.0)


def test_regroup_classes():
    data = ImageSet(np.zeros((10, 2, 2, 3), np.uint8), np.arange(10))
    two = regroup_classes(data, "cifar10-2")
    assert two.classes == ["vehicle", "animal"] and two.y.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert regroup_classes(data, "cifar10-5").num_classes == 5
    with pytest.raises(ValueError):
        regroup_classes(data, {"a": [0, 1], "b": [1, 2]})


def test_augment_crops_and_flips():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    out = augment(x, crop_padding=0, flip=False)
    assert out.dtype == torch.float32 and torch.allclose(out, x.float() / 255)
    g = torch.Generator().manual_seed(0)
    outs = [augment(x, crop_padding=2, flip=True, generator=g) for _ in range(20)]
    for o in outs:
        assert o.shape == (2, 1, 4, 4)
        # every output pixel is either zero padding or a pixel of the same image
        for i in range(2):
            vals = set((o[i] * 255).round().long().flatten().tolist())
            assert vals <= set(x[i].long().flatten().tolist()) | {0}
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 5  # augmentations vary
    flipped = augment(x.float() / 255, crop_padding=0, flip=True, generator=torch.Generator().manual_seed(3))
    for i in range(2):
        assert torch.equal(flipped[i], x[i].float() / 255) or torch.equal(flipped[i], x[i].flip(2).float() / 255)


def test_step_sampler_is_deterministic_covers_epochs_and_shards():
    s = StepSampler(10, 4, seed=3)
    first_epoch = np.concatenate([s.indices(k) for k in range(5)])[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert np.array_equal(StepSampler(10, 4, seed=3).indices(7), s.indices(7))
    ranks = [StepSampler(10, 4, seed=3, rank=r, world_size=2).indices(2) for r in range(2)]
    assert np.array_equal(np.concatenate(ranks), s.indices(2))
    batches = DownstreamBatches(synthetic_set(n=8), 4, synthetic_set(n=20, seed=1), 6, seed=0)
    x, y = batches.batch(5)
    assert x.shape == (10, 3, 32, 32) and (y[4:] == -1).all() and (y[:4] >= 0).all()
    assert torch.equal(batches.batch(5)[0], x)


# ---------- configs, compute, end to end ----------

def test_method_configs_derive_the_baselines():
    base = TDMRConfig()
    assert method_config("tdmr", base) is base
    ft, lp, sc = (method_config(m, base) for m in ("ft-kd", "lp-kd", "scratch"))
    assert ft.teacher.train_foundation and not lp.teacher.train_foundation
    for c in (ft, lp):
        assert c.teacher.prompt == "none" and c.teacher.proxy_dim == 0
        assert not c.distill.uses_proxy and alpha_at(0.0, c.distill.schedule) == 1.0
        assert c.distill.steps == base.distill.steps and c.teacher.steps == base.teacher.steps
    assert sc.distill.kd_weight == 0 and sc.distill.unlabelled_batch_size == 0
    d = base.to_dict()
    assert TDMRConfig.from_dict(d) == base
    d["distill"]["schedule"]["kindd"] = "linear"
    with pytest.raises(ValueError, match="distill.schedule.kindd"):
        TDMRConfig.from_dict(d)


def test_compute_meter_counts_flops():
    m = ComputeMeter()
    m.register("a", 100)
    m.forward("a", 3)
    m.backward("a", 2, "weights")
    m.backward("a", 1, "inputs")
    assert m.flops() == 100 * 3 + 100 * 2 * 2 + 100 * 1
    lin = torch.nn.Linear(8, 4, bias=False)
    assert forward_flops(lin, torch.rand(5, 8)) == 2 * 8 * 4
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4)).train()
    stats = net[1].running_mean.clone()
    assert forward_flops(net, torch.rand(3, 3, 6, 6)) == 2 * (4 * 4) * 4 * 27  # 4x4 outputs, 4 ch, 3*3*3 MACs
    assert net.training and net[1].training and torch.equal(net[1].running_mean, stats)


def test_run_method_end_to_end_on_grayscale_data():
    train, test = synthetic_set(n=24, size=16, chans=1, classes=3), synthetic_set(n=12, size=16, chans=1, classes=3, seed=1)
    cfg = TDMRConfig()
    cfg.teacher.steps, cfg.teacher.batch_size = 2, 8
    cfg.distill.steps, cfg.distill.labelled_batch_size, cfg.distill.unlabelled_batch_size = 2, 8, 4
    results = {}
    for method in ("scratch", "ft-kd", "lp-kd", "tdmr"):
        r = run_method(method, lambda: create_model("resnet20"),
                       lambda k, c: create_model("test_resnet", num_classes=k, in_chans=c),
                       train, test, unlabelled=train, cfg=cfg)
        results[method] = r
        assert 0.0 <= r["target_acc"] <= 1.0
        assert r["student"].target.num_classes == 3
    assert "teacher_acc" not in results["scratch"] and "foundation" not in results["scratch"]["compute"]["forward_images"]
    tdmr = results["tdmr"]["compute"]
    # 2 teacher steps x 8 (forward + input-gradient backward) + 2 distill steps x (8 + 4) teacher forwards
    assert tdmr["forward_images"]["foundation"] == 16 + 24
    assert tdmr["backward_images"]["foundation"] == {"inputs": 16}
    assert tdmr["backward_images"]["target"] == {"weights": 24}
    assert "inputs" not in results["lp-kd"]["compute"]["backward_images"].get("foundation", {})


def test_bench_config_overrides_and_tasks():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "tdmr.py"
    spec = importlib.util.spec_from_file_location("bench_tdmr", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = bench.build_config(bench.PRESETS["quick"], ["teacher.prompt=pad", "distill.schedule.end=0.5"], seed=3)
    assert cfg.teacher.prompt == "pad" and cfg.distill.schedule.end == 0.5 and cfg.seed == 3
    assert cfg.distill.steps == bench.PRESETS["quick"]["distill"]["steps"]
    with pytest.raises(SystemExit, match="distill.nope"):
        bench.build_config(bench.PRESETS["quick"], ["distill.nope=1"], seed=0)
    y = np.repeat(np.arange(10), 30)
    train = ImageSet(np.zeros((300, 4, 4, 3), np.uint8), y)
    test = ImageSet(np.zeros((100, 4, 4, 3), np.uint8), np.repeat(np.arange(10), 10))
    lab, unl, sub = bench.make_task("cifar10-5@10%", train, test, seed=0, eval_images=50)
    assert lab.num_classes == 5 and np.bincount(lab.y).tolist() == [6] * 5
    assert len(lab) + len(unl) == 300 and len(sub) == 50 and np.bincount(sub.y).tolist() == [10] * 5


def test_mismatched_tasks_change_the_domain_or_the_label_space():
    from tdmr_ray.data import ImageSet
    from tdmr_ray.tdmr.tasks import GLYPHS, make_task

    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.arange(40) % 10)
    test = ImageSet(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.arange(20) % 10)
    g, _ = make_task("gray+cifar10-5", train, test)
    assert g.x.shape == (40, 32, 32, 1) and g.num_classes == 5
    assert abs(int(g.x[0, 0, 0, 0]) - float(train.x[0, 0, 0] @ np.array([0.299, 0.587, 0.114]))) <= 1
    inv, _ = make_task("invert", train, test)
    assert (inv.x == 255 - train.x).all() and (inv.y == train.y).all()
    low, low_test = make_task("lowres", train, test)
    assert low.x.shape == (40, 16, 16, 3) and low_test.x.shape == (20, 16, 16, 3)
    assert abs(float(low.x[0, 0, 0, 0]) - train.x[0, :2, :2, 0].mean()) <= 0.5
    glyphs, glyphs_test = make_task("glyphs", train, test, seed=3)
    assert glyphs.classes == list(GLYPHS) and glyphs.x.shape == train.x.shape
    assert not (glyphs.x == train.x).all() and (make_task("glyphs", train, test, seed=3)[0].x == glyphs.x).all()
    with pytest.raises(ValueError, match="unknown task 'sepia'"):
        make_task("sepia", train, test)
