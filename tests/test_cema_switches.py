"""CEMA's cloud rules that decide accuracy in long streams, and the switches beyond the paper:
replay and replay-only steps, the statistics each model moves in each step, no state shared
between runs, replay_capacity=0, one E_max, device statistics, shift detection and resets,
the pull toward the source parameters, and the RDumb edge baseline."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tdmr_ray.cema import CEMAConfig, CloudAdapter, EdgeRunner, UploadMessage, method_config, run_stream
from tdmr_ray.cema.shift import ShiftState, observe
from tdmr_ray.cema.simulate import make_edge_runner
from tdmr_ray.models import create_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("resnet20")  # random weights: mechanics, not accuracy


def cfg_with(method="cema", **sections):
    cfg = method_config(method)
    for section, values in sections.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    return cfg


def images(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 200, (n, 32, 32, 3)).astype(np.float32) + shift
    return np.clip(x, 0, 255).astype(np.uint8)


def upload(n, seed, device="d", **kw):
    return UploadMessage(device, images(n, seed), 0, **kw)


def small(**cloud):
    base = dict(batch_size=4, replay_min=16, replay_ratio=3, replay_only_multiple=4)
    return {**base, **cloud}


def test_replay_and_replay_only_steps_run_in_a_stream(model):
    """A stream long enough for replay: steps draw from the buffer, and batches that complete no
    new cloud batch still distil (replay-only steps), as the reference."""
    cfg = cfg_with("upload_all", cloud=small())
    cloud = CloudAdapter(model, model, cfg)
    sizes = []
    cloud.edge.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    for i in range(6):
        cloud.process(upload(4, i))  # 4 = one batch each: replay starts at 16 buffered
    for i in range(3):
        cloud.process(upload(2, 10 + i))  # half batches: every other call is replay-only
    ks = cloud.keys["d"]
    assert sizes[:4] == [4, 4, 4, 16] and sizes[4:6] == [16, 16]
    assert ks.replay_only_steps == 2 and ks.steps == 9  # 6 + one completed by two halves + 2 replay-only


def test_foundation_statistics_move_in_step_1_and_stay_frozen_in_step_2(model):
    cfg = cfg_with("upload_all", cloud=small())
    cloud = CloudAdapter(model, model, cfg)
    seen = []

    def record(mod, args):  # the foundation's first layer: is it updating statistics?
        seen.append(mod.training)
    next(m for m in cloud.foundation.modules() if hasattr(m, "stats_started")).register_forward_pre_hook(record)
    for i in range(5):
        cloud.process(upload(4, i))
    # per step: step 1 (adaptation, statistics move), then step 2 (teacher, frozen)
    assert seen == [True, False] * 5
    before = {k: v.clone() for k, v in cloud.keys["d"].foundation.stats.items()}
    cloud.predict("d", images(8, 99))
    assert all(torch.equal(before[k], v) for k, v in cloud.keys["d"].foundation.stats.items())


def test_reset_runs_share_no_state(model):
    """Two runs of the same stream from a fresh start give identical results: nothing carries over."""
    stream = [(images(16, i), np.zeros(16, dtype=np.int64), "a") for i in range(8)]
    cfg = cfg_with("cema", cloud=small(), filter={"warmup_samples": 32, "redundancy_margin": 1.01,
                                                  "e_max_frac": 2.0, "e_min_frac": 0.0})
    first = run_stream("cema", model, model, stream, cfg)
    again = run_stream("cema", model, model, stream, cfg)
    assert first.batch_correct == again.batch_correct
    assert first.accounting == again.accounting and first.cloud == again.cloud
    assert first.cloud["steps"] > 0


def test_replay_capacity_zero_means_no_replay(model):
    cloud = CloudAdapter(model, model, cfg_with("upload_all", cloud=small(replay_capacity=0)))
    sizes = []
    cloud.edge.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    for i in range(10):
        cloud.process(upload(4, i))
    assert len(cloud.keys["d"].replay) == 0 and sizes == [4] * 10
    with pytest.raises(ValueError, match="replay_capacity"):
        CloudAdapter(model, model, cfg_with("cema", cloud={"replay_capacity": -1}))


def test_one_e_max_for_filter_and_loss_unless_set_apart(model):
    tied = CloudAdapter(model, model, cfg_with("cema", filter={"e_max_frac": 0.3}))
    assert tied.e_max == pytest.approx(0.3 * math.log(10))
    apart = CloudAdapter(model, model, cfg_with("cema", filter={"e_max_frac": 0.3}, cloud={"e_max_frac": 0.5}))
    assert apart.e_max == pytest.approx(0.5 * math.log(10))


def test_device_statistics_travel_with_uploads_and_the_cloud_distils_under_them(model):
    cfg = cfg_with("cema", edge={"stats_source": "upload"}, cloud=small(), filter={"redundancy": False,
                                                                                   "low_info": False, "unreliable": False})
    edge = EdgeRunner(model, cfg)
    state = edge.new_device("d")
    cloud = CloudAdapter(model, model, cfg)
    for i in range(3):
        out = edge.infer(state, images(8, i))
        assert out.upload.stats is not None and out.upload.nbytes > out.upload.images.nbytes
        update = cloud.process(out.upload)
    # the cloud copy holds exactly the device's statistics (not moved by the distillation step)
    for k, v in state.stats.items():
        assert torch.equal(cloud.keys["d"].edge.stats[k], v), k
    assert update is not None and update.stats is None  # updates carry affine parameters only
    bad = dict(state.stats)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="statistics"):
        cloud.process(dataclasses.replace(out.upload, stats=bad))


def test_source_share_is_applied_alike_on_the_device_and_in_the_cloud_copy(model):
    """edge.source_share: the device and the cloud's copy of its model normalize with the same
    mixture of TBR and source statistics, so the cloud distils under what the device applies."""
    from tdmr_ray.cema.edge import images_to_input
    from tdmr_ray.cema.norm import load_tbr_stats, set_norm_mode, test_time_bn_modules

    off = {"redundancy": False, "low_info": False, "unreliable": False}
    cfg = cfg_with("cema", edge={"stats_source": "upload", "source_share": 0.5}, cloud=small(), filter=off)
    edge = EdgeRunner(model, cfg)
    state = edge.new_device("d")
    cloud = CloudAdapter(model, model, cfg)
    for i in range(2):
        cloud.process(edge.infer(state, images(8, i, shift=40.0)).upload)
    assert {m.source_share for m in test_time_bn_modules(cloud.edge).values()} == {0.5}
    x = images_to_input(images(8, 5))
    ks = cloud.keys["d"]
    load_tbr_stats(cloud.edge, ks.edge.stats)
    for name, p in cloud.edge.named_parameters():
        if name in ks.edge.affine:
            p.data.copy_(ks.edge.affine[name])
    set_norm_mode(cloud.edge, "tbr", source_share=0.5)
    state.affine = {k: v.clone() for k, v in ks.edge.affine.items()}
    edge._load(state)
    edge.model.eval()  # statistics frozen: both sides normalize with the same numbers
    with torch.no_grad():
        on_device, in_cloud = edge.model(x), cloud.edge(x)
        assert torch.allclose(on_device, in_cloud, atol=1e-4)
        set_norm_mode(cloud.edge, "tbr", source_share=0.0)
        assert not torch.allclose(cloud.edge(x), on_device, atol=1e-2)  # the share changes the outputs


def test_split_statistics_early_layers_from_the_device_later_ones_from_the_cloud(model):
    """edge.stats_source="split": the cloud distils with the uploader's statistics in the first
    split_layer layers and its own (moved by its steps) in the later ones; updates carry only the
    later layers', which the device takes over while keeping its own early ones."""
    from tdmr_ray.cema.norm import test_time_bn_modules

    cfg = cfg_with("cema", edge={"stats_source": "split", "split_layer": 7}, cloud=small(),
                   filter={"redundancy": False, "low_info": False, "unreliable": False})
    edge = EdgeRunner(model, cfg)
    state = edge.new_device("d")
    cloud = CloudAdapter(model, model, cfg)
    names = list(test_time_bn_modules(cloud.edge))
    early, late = f"{names[0]}.running_mean", f"{names[-1]}.running_mean"
    for i in range(3):
        out = edge.infer(state, images(8, i))
        assert out.upload.stats is not None
        sent = {k: v.clone() for k, v in out.upload.stats.items()}
        update = cloud.process(out.upload)
        held = cloud.keys["d"].edge.stats
        assert torch.equal(held[early], sent[early])  # the device's, as uploaded
        if i:
            assert not torch.equal(held[late], sent[late])  # the cloud's own, moved by its steps
    assert update is not None and update.stats is not None
    assert {k.rsplit(".", 1)[0] for k in update.stats} == set(names[7:])  # later layers only
    device_early = state.stats[early].clone()
    assert state.offer(update) and state.apply_pending()
    assert torch.equal(state.stats[late], update.stats[late]) and torch.equal(state.stats[early], device_early)
    edge.infer(state, images(8, 9))  # a full set of statistics again: the device runs on
    with pytest.raises(ValueError, match="split_layer"):
        CloudAdapter(model, model, cfg_with("cema", edge={"stats_source": "split", "split_layer": -1}))


def test_upload_stats_momentum_averages_the_uploaded_device_statistics(model):
    cfg = cfg_with("cema", edge={"stats_source": "upload"}, cloud=small(upload_stats_momentum=0.25),
                   filter={"redundancy": False, "low_info": False, "unreliable": False})
    edge = EdgeRunner(model, cfg)
    cloud = CloudAdapter(model, model, cfg)
    first = edge.infer(edge.new_device("d"), images(8, 0)).upload
    second = edge.infer(edge.new_device("d"), images(8, 1, shift=40.0)).upload
    cloud.process(first)
    cloud.process(second)
    key = "backbone.bn1.running_mean"
    expected = first.stats[key] + 0.25 * (second.stats[key] - first.stats[key])
    assert torch.allclose(cloud.keys["d"].edge.stats[key], expected)  # the first replaced, the second averaged in
    with pytest.raises(ValueError, match="upload_stats_momentum"):
        CloudAdapter(model, model, cfg_with("cema", cloud={"upload_stats_momentum": 0.0}))


def test_sample_stats_distils_each_sample_under_its_own_uploads_statistics(model):
    """cloud.sample_stats="own": replayed samples are normalized with the statistics of the upload
    they came in with (not the newest upload's), the statistics bank holds only what the buffer still
    refers to, and "newest" normalizes like TBR (same forward values, fixed-statistics gradients)."""
    from tdmr_ray.cema.norm import set_sample_stats, test_time_bn_modules

    filt = {"redundancy": False, "low_info": False, "unreliable": False}
    cfg = cfg_with("cema", edge={"stats_source": "upload"}, cloud=small(sample_stats="own", replay_capacity=24),
                   filter=filt)
    edge = EdgeRunner(model, cfg)
    cloud = CloudAdapter(model, model, cfg)
    seen = []
    layer = next(iter(test_time_bn_modules(cloud.edge).values()))
    layer.register_forward_pre_hook(lambda m, a: seen.append(None if m.sample_stats is None else m.sample_stats[0]))
    uploads = [edge.infer(edge.new_device("d"), images(8, i, shift=30.0 * i)).upload for i in range(6)]
    for up in uploads:
        cloud.process(up)
    ks = cloud.keys["d"]
    assert len(ks.replay) == 24 and set(ks.bank.stats) == set(ks.replay_ids.unique().tolist())  # pruned
    means = seen[-1]  # the last distillation step: new batch + replayed samples, each with its upload's mean
    assert means is not None and len(means) > cloud.cfg.cloud.batch_size
    key = "backbone.bn1.running_mean"
    firsts = {round(float(u.stats[key][0]), 4) for u in uploads[-3:]}
    assert {round(float(v), 4) for v in means[:, 0]} <= firsts and len({round(float(v), 4) for v in means[:, 0]}) > 1
    # "newest": per-sample normalization with the newest statistics gives TBR's forward values
    x = torch.rand(4, 3, 32, 32)
    bn_layers = list(test_time_bn_modules(cloud.edge))
    with torch.no_grad():
        cloud.edge.eval()
        set_sample_stats(cloud.edge, None)
        from tdmr_ray.cema.norm import load_tbr_stats, set_norm_mode
        load_tbr_stats(cloud.edge, ks.edge.stats)
        set_norm_mode(cloud.edge, "tbr")
        reference = cloud.edge(x)
        set_sample_stats(cloud.edge, ks.bank.gather(torch.full((4,), -1), ks.edge.stats, bn_layers))
        per_sample = cloud.edge(x)
        set_sample_stats(cloud.edge, None)
    assert torch.allclose(reference, per_sample, atol=1e-4)
    with pytest.raises(ValueError, match="sample_stats"):
        CloudAdapter(model, model, cfg_with("cema", cloud={"sample_stats": "own"}))  # needs device statistics


def test_shift_detector_fires_on_a_statistics_jump_and_not_within_a_domain():
    cfg = CEMAConfig().shift
    state = ShiftState()
    rng = torch.Generator().manual_seed(0)
    fired = []
    for t in range(40):
        mean = torch.zeros(16) + 0.02 * torch.randn(16, generator=rng) + (2.0 if t >= 25 else 0.0)
        var = torch.ones(16) + 0.02 * torch.rand(16, generator=rng)
        fired.append(observe(state, mean, var, 64, cfg)[0])
    assert [t for t, f in enumerate(fired) if f] == [25] and state.epoch == 1


def test_detected_shift_resets_edge_and_cloud_parts(model):
    cfg = cfg_with("upload_all", cloud=small(), shift={"detect": "oracle", "reset": ["filter", "replay",
                                                                                     "foundation_stats", "edge_affine"]})
    edge = EdgeRunner(model, cfg)
    cloud = CloudAdapter(model, model, cfg)
    state = edge.new_device("d")
    for i in range(8):
        out = edge.infer(state, images(8, i))
        update = cloud.process(out.upload)
        state.offer(update) if update else None
    ks = cloud.keys["d"]
    assert len(ks.replay) == 64 and state.version > 0
    out = edge.infer(state, images(8, 50, shift=40), shift=True)
    assert out.shifted and out.upload.shift_epoch == 1
    assert state.filter.n_seen == 8  # restarted: only this batch
    assert all(torch.equal(state.affine[k], edge.initial_affine[k]) for k in state.affine)
    cloud.process(out.upload)
    assert ks.shift_resets == 1 and len(ks.replay) == 8  # only the new upload
    assert all(torch.equal(ks.edge.affine[k], cloud._e_init[k]) for k in ks.edge.affine) or ks.steps > 8
    # the same epoch again does not reset twice
    cloud.process(dataclasses.replace(out.upload, seq=99))
    assert ks.shift_resets == 1


def test_cema_plus_shift_restarts_statistics_replay_and_filter_but_keeps_the_adapted_parameters(model):
    """cema_plus's reset list: the old domain's statistics, replay and filter state go; the adapted
    affine parameters carry over to the next domain, on the device and in the cloud's copies."""
    reset = method_config("cema_plus").shift.reset
    assert set(reset) == {"filter", "edge_stats", "replay", "foundation_stats"}
    # (a cloud batch of 16: the 8 samples after the shift start no step, so the reset alone is seen)
    cfg = cfg_with("upload_all", cloud=small(batch_size=16, replay_min=64), shift={"detect": "oracle", "reset": reset})
    edge, cloud = EdgeRunner(model, cfg), CloudAdapter(model, model, cfg)
    state = edge.new_device("d")
    for i in range(8):
        update = cloud.process(edge.infer(state, images(8, i)).upload)
        state.offer(update) if update else None
    ks = cloud.keys["d"]
    state.apply_pending()
    assert state.version > 0 and any(not torch.equal(state.affine[k], edge.initial_affine[k]) for k in state.affine)
    edge_before = {k: v.clone() for k, v in state.affine.items()}
    cloud_before = {k: v.clone() for k, v in ks.edge.affine.items()}
    foundation_before = {k: v.clone() for k, v in ks.foundation.affine.items()}
    out = edge.infer(state, images(8, 50, shift=40), shift=True)
    assert out.shifted and state.filter.n_seen == 8  # filter restarted: only this batch
    assert all(torch.equal(state.affine[k], edge_before[k]) for k in state.affine)  # parameters kept
    assert ks.foundation.stats is not None
    steps = ks.steps
    cloud.process(out.upload)
    assert ks.shift_resets == 1 and ks.steps == steps and len(ks.replay) == 8  # only the new upload
    assert ks.foundation.stats is None
    assert all(torch.equal(ks.edge.affine[k], cloud_before[k]) for k in ks.edge.affine)
    assert all(torch.equal(ks.foundation.affine[k], foundation_before[k]) for k in ks.foundation.affine)


def test_source_pull_keeps_parameters_near_the_source(model):
    far, near = [], []
    for pull, out in ((0.0, far), (0.5, near)):
        cloud = CloudAdapter(model, model, cfg_with("upload_all", cloud=small(source_pull=pull, edge_lr=0.05)))
        for i in range(10):
            cloud.process(upload(4, i))
        ks = cloud.keys["d"]
        out.append(sum(float((ks.edge.affine[k] - cloud._e_init[k]).norm()) for k in ks.edge.affine))
    assert near[0] < 0.5 * far[0]


def test_rdumb_adapts_on_the_edge_and_resets_on_schedule(model):
    cfg = cfg_with("rdumb", tent={"reset_every": 3, "lr": 0.01}, filter={"e_max_frac": 1.0, "redundancy_margin": 1.01})
    runner = make_edge_runner("rdumb", model, cfg)
    state = runner.new_device("d")
    moved = []
    for i in range(4):
        runner.infer(state, images(16, i))
        moved.append(any(not torch.equal(state.affine[k], runner.initial_affine[k]) for k in state.affine))
    assert moved[:3] == [True, True, True]
    # batch 4 starts from the deployed parameters again (one step since the reset)
    drift3 = sum(float((state.affine[k] - runner.initial_affine[k]).norm()) for k in state.affine)
    assert moved[3] and drift3 > 0
    assert state.momentum  # the step after the reset rebuilt the momentum


def test_unknown_switch_values_are_refused(model):
    with pytest.raises(ValueError, match="stats_source"):
        EdgeRunner(model, cfg_with("cema", edge={"stats_source": "nowhere"}))
    with pytest.raises(ValueError, match="shift.reset"):
        CloudAdapter(model, model, cfg_with("cema", shift={"reset": ["everything"]}))
    with pytest.raises(ValueError, match="class_balanced_stats"):
        method_config("cema_plus", settings={"edge.class_balanced_stats": True, "edge.tbr_cumulative": True})


def test_settings_apply_over_the_methods_own_switches():
    from tdmr_ray.cema.config import CEMAConfig, method_config

    base = CEMAConfig()
    base.filter.unreliable = False
    assert method_config("cema", base).filter.unreliable  # a method sets its filter switches ...
    cfg = method_config("cema", base, {"filter.unreliable": False, "edge.tbr_cumulative": True})
    assert not cfg.filter.unreliable and cfg.edge.tbr_cumulative  # ... settings come last
    # typed as on the CLI: a bench variant's "shift.reset=filter,replay" is a list of two parts (it was
    # taken as a string and failed on its characters), and an unknown key is named
    reset = method_config("cema_plus", settings={"shift.reset": "filter,replay"}).shift.reset
    assert list(reset) == ["filter", "replay"]
    from tdmr_ray.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key .shift.no.such.key"):
        method_config("cema_plus", settings={"shift.no_such_key": 1})


def test_augment_views_distil_on_flipped_and_shifted_copies_of_the_new_samples(model):
    """cloud.augment_views adds that many augmented copies of a step's new samples to the distillation
    batch (each a horizontal flip and/or a shift of the original), augment_replay augments replay draws."""
    from tdmr_ray.cema.augment import augment

    x = torch.rand(16, 3, 32, 32)
    views = augment(x, torch.Generator().manual_seed(0))
    assert views.shape == x.shape and not torch.equal(views, x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):  # every view is one of the 2 x 81 flips and shifts of its own image
        assert any(torch.equal(views[i], (padded[i].flip(2) if f else padded[i])[:, dy:dy + 32, dx:dx + 32])
                   for f in (0, 1) for dy in range(9) for dx in range(9)), i
    sizes = {}
    for views_n, replay in ((0, False), (2, False), (2, True)):
        cloud = CloudAdapter(model, model, cfg_with("upload_all", cloud=small(augment_views=views_n,
                                                                               augment_replay=replay)))
        seen = []
        cloud.edge.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        for i in range(5):
            cloud.process(upload(4, i))
        sizes[views_n, replay] = [len(s) for s in seen]
        last = seen[-1]  # the step with replay: 4 new, 8 views of them, 12 replayed
        new = cloud._to_input(torch.tensor(images(4, 4)))
        assert torch.equal(last[:4], new)
        replayed_plain = any(torch.equal(last[-1], cloud._to_input(torch.tensor(images(4, j)))[k])
                             for j in range(5) for k in range(4))
        assert replayed_plain != replay
    assert sizes[0, False] == [4, 4, 4, 16, 16] and sizes[2, False] == sizes[2, True] == [12, 12, 12, 24, 24]
    with pytest.raises(ValueError, match="augment_views"):
        CloudAdapter(model, model, cfg_with("cema", cloud=small(augment_views=-1)))


def test_mixup_and_cutmix_views_blend_or_paste_two_images_of_the_draw(model):
    """cloud.augment="mixup": each view is lam * x[i] + (1 - lam) * x[j] for another image j of the same
    draw; "cutmix": x[i] with one axis-aligned box taken from x[j]; an unknown kind is refused."""
    from tdmr_ray.cema.augment import augment

    x = torch.rand(8, 3, 32, 32)
    mixed = augment(x, torch.Generator().manual_seed(0), "mixup")
    for i in range(8):
        fits = []
        for j in range(8):
            d = (x[i] - x[j]).flatten()
            lam = float(((mixed[i] - x[j]).flatten() @ d) / (d @ d)) if j != i else 1.0
            fits.append(0 <= lam <= 1 and torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5))
        assert any(fits), i
    assert not torch.equal(mixed, x)
    cut = augment(x, torch.Generator().manual_seed(1), "cutmix")
    pasted_any = False
    for i in range(8):
        other = (cut[i] != x[i]).any(0)  # pixels not from the image itself
        if not other.any():
            continue
        pasted_any = True
        j = next(j for j in range(8) if torch.equal(cut[i][:, other], x[j][:, other]))
        rows, cols = other.any(1).nonzero().flatten(), other.any(0).nonzero().flatten()
        box = torch.zeros_like(other)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(other, box) and j != i
    assert pasted_any
    with pytest.raises(ValueError, match="cloud.augment"):
        CloudAdapter(model, model, cfg_with("cema", cloud=small(augment="rotate")))


def _two_class_model():
    """1x1 conv (R -> channel 0, G -> channel 1), BatchNorm, mean pool, identity classifier: class =
    the channel above its normalized mean."""
    conv = torch.nn.Conv2d(3, 2, 1, bias=False)
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = conv.weight[1, 1] = 1.0
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    return torch.nn.Sequential(conv, torch.nn.BatchNorm2d(2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head).eval()


def _two_class_batch(labels, rng):
    x = rng.normal(60, 20, (len(labels), 1, 1, 3)) + rng.normal(0, 5, (len(labels), 8, 8, 3))
    x[np.asarray(labels) == 0, :, :, 0] += 120  # class 0: red, class 1: green
    x[np.asarray(labels) == 1, :, :, 1] += 120
    return np.clip(x, 0, 255).astype(np.uint8)


def _red_means(balanced, batches):
    cfg = cfg_with("tbr_stats", edge={"class_balanced_stats": balanced}, shift={"detect": "oracle", "reset": ["edge_stats"]})
    edge = make_edge_runner("tbr_stats", _two_class_model(), cfg)
    state = edge.new_device("d")
    means = []
    for b in batches:
        edge.infer(state, b)
        means.append(float(state.stats["1.running_mean"][0]))
    return means, edge, state


def test_class_balanced_statistics_follow_the_classes_not_their_bursts():
    """On a shuffled stream the statistics are TBR's EMA of batch statistics; on a bursty one (runs of
    6 batches of one class) they stay at the two classes' mean while the EMA swings toward each burst.
    The per-class moments survive a checkpoint, and a shift reset restarts them."""
    rng = np.random.default_rng(0)
    mid = 0.5 * (180 + 60) / 255  # the red channel's mean over both classes, in [0, 1] units
    shuffled = [_two_class_batch([0, 1] * 16, rng) for _ in range(12)]
    plain, _, _ = _red_means(False, shuffled)
    balanced, _, state = _red_means(True, shuffled)
    assert np.allclose(plain, balanced, atol=1e-5) and float(state.class_stats["burst"]) < 0.05
    bursty = shuffled[:4] + [_two_class_batch([run % 2] * 32, rng) for run in range(6) for _ in range(6)]
    plain, _, _ = _red_means(False, bursty)
    balanced, edge, state = _red_means(True, bursty)
    assert max(abs(m - mid) for m in plain[-12:]) > 0.06  # the EMA follows each burst
    assert max(abs(m - mid) for m in balanced[-12:]) < 0.02  # the mixture does not
    assert (state.class_stats["class_count"] > 0).tolist() == [True, True] and float(state.class_stats["burst"]) > 0.45
    restored = type(state).from_tensors(state.to_tensors())
    assert all(torch.equal(restored.class_stats[k], v) for k, v in state.class_stats.items())
    edge.infer(state, _two_class_batch([1] * 32, rng), shift=True)  # a detected shift: restart
    assert float(state.class_stats["class_count"].sum()) == 32 and float(state.class_stats["burst"]) == 0.0


def test_split_gate_takes_cloud_statistics_only_while_the_classes_come_in_bursts():
    """edge.split_gate="burst": on a shuffled stream uploads ask for no cloud statistics (the cloud
    distils under the device's, updates carry none); once the predicted classes come in bursts they
    do, and the updates carry the cloud copy's later-layer statistics, which the device applies."""
    rng = np.random.default_rng(0)
    cfg = cfg_with("cema", edge={"stats_source": "split", "split_layer": 0, "split_gate": "burst"}, cloud=small(),
                   filter={"redundancy": False, "low_info": False, "unreliable": False})
    edge = EdgeRunner(_two_class_model(), cfg)
    cloud = CloudAdapter(_two_class_model(), _two_class_model(), cfg, image_shape=(8, 8, 3))
    state = edge.new_device("d")
    for _ in range(6):
        out = edge.infer(state, _two_class_batch([0, 1] * 4, rng))
        update = cloud.process(out.upload)
        assert not out.upload.split and update.stats is None
        assert torch.equal(cloud.keys["d"].edge.stats["1.running_mean"], out.upload.stats["1.running_mean"])
    flags = []
    for run in range(4):
        for _ in range(4):
            out = edge.infer(state, _two_class_batch([run % 2] * 8, rng))
            update = cloud.process(out.upload)
            flags.append(out.upload.split)
            state.offer(update)
    assert not flags[0] and all(flags[-8:])  # bursty once the burst level passed the midpoint
    assert update.stats is not None and set(update.stats) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert not torch.equal(update.stats["1.running_mean"], out.upload.stats["1.running_mean"])  # the cloud's own
    state.apply_pending()
    assert torch.equal(state.stats["1.running_mean"], update.stats["1.running_mean"])
    with pytest.raises(ValueError, match="split_gate"):
        method_config("cema_plus", settings={"edge.split_gate": False})  # (YAML's `off`)
