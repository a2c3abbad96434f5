"""CEMA unit tests: losses, filters, TBR, SGD, messages, update application, cloud rules, state I/O."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tdmr_ray.cema import (Accounting, CEMAConfig, CloudAdapter, EdgeDeviceState, EdgeRunner, FilterConfig,
                           FilterState, UpdateMessage, UploadMessage, distillation_loss, entropy, entropy_weights,
                           method_config, select_uploads, weighted_entropy_loss)
from tdmr_ray.cema.norm import (TestTimeBatchNorm2d, convert_to_test_time_bn, load_tbr_stats, read_tbr_stats,
                                set_norm_mode)
from tdmr_ray.cema.sgd import sgd_momentum_step
from tdmr_ray.cema.streams import build_runs, dirichlet_order
from tdmr_ray.data import ImageSet
from tdmr_ray.models import create_model

LN10 = math.log(10)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def H(p):
    return -sum(q * math.log(q) for q in p if q > 0)


def logits_for(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


# -- losses -------------------------------------------------------------------------------------
def test_entropy_and_weights_match_hand_values():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    assert entropy(logits).tolist() == pytest.approx([math.log(2), H([0.25, 0.75])], abs=1e-6)
    ent = torch.tensor([0.5, 1.5])
    assert entropy_weights(ent, 1.0).tolist() == pytest.approx([math.exp(0.5), math.exp(-0.5)], rel=1e-6)
    # foundation loss: mean of H / exp(H - E_max)
    expected = (math.log(2) * math.exp(1.0 - math.log(2)) + H([.25, .75]) * math.exp(1.0 - H([.25, .75]))) / 2
    assert weighted_entropy_loss(logits, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_matches_hand_computation():
    s_p, t_p = [[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]], [[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]
    student = logits_for(s_p).requires_grad_(True)
    teacher = logits_for(t_p).requires_grad_(True)
    e_max = 0.9
    ent = [H(p) * math.exp(e_max - H(p)) for p in s_p]
    tw = [math.exp(e_max - H(p)) for p in t_p]  # the TEACHER's entropy weights KL and CE
    kl = [sum(t * math.log(t / s) for t, s in zip(tp, sp)) * w for tp, sp, w in zip(t_p, s_p, tw)]
    ce = [-math.log(sp[int(np.argmax(tp))]) * w for tp, sp, w in zip(t_p, s_p, tw)]
    terms = distillation_loss(student, teacher, e_max, alpha=3, beta=3, gamma=1, temperature=1)
    assert terms.entropy.item() == pytest.approx(sum(ent) / 2, rel=1e-5)
    assert terms.kl.item() == pytest.approx(sum(kl) / 2, rel=1e-5)
    assert terms.ce.item() == pytest.approx(sum(ce) / 2, rel=1e-5)
    assert terms.total.item() == pytest.approx(3 * sum(ent) / 2 + 3 * sum(kl) / 2 + sum(ce) / 2, rel=1e-5)
    terms.total.backward()
    assert teacher.grad is None and student.grad is not None  # the teacher is a constant
    # temperature: KL on softened distributions, times T^2
    t2 = distillation_loss(student.detach(), teacher.detach(), e_max, 0, 1, 0, temperature=2.0)
    soft = lambda p: (torch.tensor(p).log() / 2).softmax(-1).tolist()  # noqa: E731
    kl2 = [sum(t * math.log(t / s) for t, s in zip(soft(tp), soft(sp))) * 4 * w for tp, sp, w in zip(t_p, s_p, tw)]
    assert t2.total.item() == pytest.approx(sum(kl2) / 2, rel=1e-4)


# -- filters ------------------------------------------------------------------------------------
def batch_with_entropies():
    """Four 10-class softmaxes with entropies well apart: ~0.006, ~0.35, ~1.2, ln 10."""
    probs = [[0.9995] + [0.0005 / 9] * 9, [0.95] + [0.05 / 9] * 9, [0.6, 0.3] + [0.1 / 8] * 8, [0.1] * 10]
    return logits_for(probs), [H(p) for p in probs]


def test_unreliable_and_low_info_exclusion_static_thresholds():
    logits, ents = batch_with_entropies()
    cfg = FilterConfig(dynamic_e_max=False, redundancy=False)
    sel = select_uploads(logits, FilterState(), cfg)
    e_max, e_min = 0.4 * LN10, 0.02 * LN10
    assert sel.e_max == pytest.approx(e_max)
    assert sel.keep.tolist() == [i for i, h in enumerate(ents) if e_min < h < e_max] == [1]
    assert sel.excluded == {"unreliable": 2, "low_info": 1, "redundant": 0, "over_budget": 0}
    off = select_uploads(logits, FilterState(), dataclasses.replace(cfg, unreliable=False, low_info=False))
    assert off.keep.tolist() == [0, 1, 2, 3] and math.isinf(off.e_max)


def test_dynamic_e_max_follows_mean_entropy_after_warmup():
    cfg = FilterConfig(warmup_samples=4, e_max_lambda=1.2, low_info=False, redundancy=False)
    state = FilterState()
    base = 0.4 * LN10
    a = logits_for([[0.5, 0.5] + [0.0] * 8] * 2)  # entropy ln 2 each: 2 samples, warm-up not over
    assert select_uploads(a, state, cfg).e_max == pytest.approx(base)
    assert state.warmup_mean is None
    b = logits_for([[0.25] * 4 + [0.0] * 6] * 2)  # entropy ln 4: warm-up ends with this batch
    sel = select_uploads(b, state, cfg)
    warm = (2 * math.log(2) + 2 * math.log(4)) / 4
    assert state.warmup_mean == pytest.approx(warm)
    assert sel.e_max == pytest.approx(base * 1.2)  # mean so far == warm-up mean
    c = logits_for([[0.1] * 10] * 4)  # ln 10 each: the mean entropy rises, so does E_max
    sel = select_uploads(c, state, cfg)
    mean = (2 * math.log(2) + 2 * math.log(4) + 4 * LN10) / 8
    assert sel.e_max == pytest.approx(base * mean / warm * 1.2, rel=1e-6)
    assert sel.keep.tolist() == []  # ln 10 > E_max(t)
    static = select_uploads(c, FilterState(), dataclasses.replace(cfg, dynamic_e_max=False))
    assert static.e_max == pytest.approx(base)


def test_redundancy_filter_cosine_to_moving_average():
    cfg = FilterConfig(unreliable=False, low_info=False, redundancy_margin=0.5, redundancy_momentum=0.9)
    state = FilterState()
    p1 = torch.tensor([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0]])
    sel = select_uploads(p1.clamp_min(1e-12).log(), state, cfg)
    assert sel.keep.tolist() == [0, 1]  # the first batch is kept whole and starts the average
    assert state.history_probs.tolist() == pytest.approx([0.7, 0.3, 0.0], abs=1e-5)
    p2 = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.1, 0.9], [0.1, 0.0, 0.9]])
    h = np.array([0.7, 0.3, 0.0])
    cos = [float(np.dot(h, p) / np.linalg.norm(h) / np.linalg.norm(p)) for p in p2.numpy()]
    assert cos[0] > 0.5 and cos[1] < 0.5 and cos[2] < 0.5
    sel = select_uploads(p2.clamp_min(1e-12).log(), state, cfg)
    assert sel.keep.tolist() == [1, 2] and sel.excluded["redundant"] == 1
    expected = 0.9 * h + 0.1 * p2[1:].numpy().mean(0)
    assert state.history_probs.tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_budget_keeps_a_fixed_share_picked_at_random_or_by_entropy():
    logits, ents = batch_with_entropies()  # 4 samples
    cfg = FilterConfig(unreliable=False, low_info=False, redundancy=False, budget_fraction=0.5)
    by_entropy = sorted(range(4), key=lambda i: ents[i])
    uncertain = select_uploads(logits, FilterState(), dataclasses.replace(cfg, budget_pick="uncertain"))
    assert uncertain.keep.tolist() == sorted(by_entropy[2:]) and uncertain.excluded["over_budget"] == 2
    confident = select_uploads(logits, FilterState(), dataclasses.replace(cfg, budget_pick="confident"))
    assert confident.keep.tolist() == sorted(by_entropy[:2])
    picks = [select_uploads(logits, FilterState(n_seen=n), cfg).keep.tolist() for n in range(20)]
    assert all(len(p) == 2 for p in picks) and len({tuple(p) for p in picks}) > 1  # random, by position
    assert picks == [select_uploads(logits, FilterState(n_seen=n), cfg).keep.tolist() for n in range(20)]
    with pytest.raises(ValueError, match="budget_pick"):
        method_config("cema", settings={"filter.budget_pick": "largest"})


def test_start_upload_all_sends_every_sample_until_the_filter_has_seen_that_many():
    logits, _ = batch_with_entropies()  # 4 samples, one of them above E_max
    cfg = FilterConfig(start_upload_all=6)
    state = FilterState()
    assert select_uploads(logits, FilterState(), FilterConfig()).keep.tolist() != [0, 1, 2, 3]  # the rules drop some
    first, second, third = (select_uploads(logits, state, cfg) for _ in range(3))
    assert first.keep.tolist() == second.keep.tolist() == [0, 1, 2, 3]  # 0 and 4 seen before: < 6
    assert 3 not in third.keep.tolist() and third.excluded["unreliable"] >= 1  # from 8 seen on: the rules again
    assert state.n_seen == 12 and state.history_probs is not None  # the rules' state moved meanwhile
    with pytest.raises(ValueError, match="start_upload_all"):
        method_config("cema", settings={"filter.start_upload_all": -1})


def test_method_presets_set_switches_and_keep_thresholds():
    base = CEMAConfig()
    base.filter.redundancy_margin = 0.4
    cema, released, everything = (method_config(m, base) for m in ("cema", "eata_filter", "upload_all"))
    assert cema.filter.dynamic_e_max and cema.filter.low_info and cema.filter.redundancy
    assert not released.filter.dynamic_e_max and not released.filter.low_info and released.filter.redundancy
    assert not (everything.filter.unreliable or everything.filter.redundancy or everything.filter.low_info)
    assert cema.filter.redundancy_margin == released.filter.redundancy_margin == 0.4
    assert method_config("bn_adapt").edge.norm == "mix"
    with pytest.raises(ValueError, match="unknown CEMA method"):
        method_config("magic")


# -- normalization and optimizer ----------------------------------------------------------------
def reference_tbr(x, running_mean, running_var, weight, bias, eps):
    """The reference's tbr_bn_forward_impl, written out with torch.var_mean (unbiased)."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True)
    std = torch.sqrt(var + eps)
    rm, rv = running_mean.view(1, -1, 1, 1), running_var.view(1, -1, 1, 1)
    r = std.detach() / torch.sqrt(rv + eps)
    d = (mean.detach() - rm) / torch.sqrt(rv + eps)
    return weight.view(1, -1, 1, 1) * (((x - mean) / std) * r + d) + bias.view(1, -1, 1, 1)


def test_tbr_matches_reference_values_gradients_and_statistics():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    m = TestTimeBatchNorm2d.from_batchnorm(bn)
    m.train()  # TBR statistics move by EMA
    x1, x2 = torch.randn(8, 4, 5, 5) * 2 + 1, torch.randn(8, 4, 5, 5) * 3 - 1
    m(x1)  # first batch: statistics start from it
    v1, mu1 = torch.var_mean(x1, dim=(0, 2, 3))
    assert torch.allclose(m.running_mean, mu1, atol=1e-5) and torch.allclose(m.running_var, v1, rtol=1e-4)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    xa = x2.clone().requires_grad_(True)
    xb = x2.clone().requires_grad_(True)
    ours = m(xa)
    ref = reference_tbr(xb, rm, rv, m.weight, m.bias, m.eps)
    assert torch.allclose(ours, ref, atol=1e-4)
    g = torch.randn_like(ours)
    gw_ours, gx_ours = torch.autograd.grad((ours * g).sum(), [m.weight, xa])
    gw_ref, gx_ref = torch.autograd.grad((ref * g).sum(), [m.weight, xb])
    assert torch.allclose(gw_ours, gw_ref, rtol=1e-3, atol=1e-4)
    assert torch.allclose(gx_ours, gx_ref, rtol=1e-2, atol=1e-4)  # biased vs unbiased std: 1/200
    v2, mu2 = torch.var_mean(x2, dim=(0, 2, 3))
    assert torch.allclose(m.running_mean, rm + 0.1 * (mu2 - rm), atol=1e-5)
    assert torch.allclose(m.running_var, rv + 0.1 * (v2 - rv), rtol=1e-4)
    m.eval()
    before = m.running_mean.clone()
    with torch.inference_mode():
        y = m(x1)
    assert torch.equal(m.running_mean, before)  # eval mode: statistics frozen
    expected = (x1 - before.view(1, -1, 1, 1)) / torch.sqrt(m.running_var.view(1, -1, 1, 1) + m.eps)
    assert torch.allclose(y, expected * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1), atol=1e-4)


def test_tbr_total_variance_counts_the_spread_of_batch_means():
    """Two batches whose means differ (as with label-correlated batches): the reference's EMA of
    batch variances keeps the within-batch variance; total_var gives the mixture's variance."""
    x1 = torch.tensor([-2.0, 0.0]).repeat(8).view(16, 1, 1, 1)  # mean -1, unbiased variance 16/15
    x2 = x1 + 2.0  # mean +1, same variance
    within = float(torch.var(x1))
    for total, expected_var in ((False, within), (True, within + 1.0)):  # mixture 50/50: + (1 - (-1))^2 / 4
        bn = TestTimeBatchNorm2d(1, momentum=0.5)
        bn.mode, bn.total_var = "tbr", total
        bn.train()
        with torch.no_grad():
            bn(x1), bn(x2)
        assert abs(float(bn.running_mean) - 0.0) < 1e-6
        assert abs(float(bn.running_var) - expected_var) < 1e-5, (total, float(bn.running_var))


def test_tbr_source_share_normalizes_between_running_and_source_statistics():
    """edge.source_share = a: a TBR layer normalizes with (1 - a) running + a source statistics, in
    the value path and the gradient path alike; its running statistics still move as TBR's."""
    torch.manual_seed(2)
    m = TestTimeBatchNorm2d(3)
    with torch.no_grad():
        m.source_mean.uniform_(-1, 1), m.source_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
    m.source_share = 0.25
    m.train()
    x1, x2 = torch.randn(8, 3, 4, 4) * 2 + 1, torch.randn(8, 3, 4, 4) - 1
    m(x1)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    mean, var = 0.75 * rm + 0.25 * m.source_mean, 0.75 * rv + 0.25 * m.source_var
    expected = F.batch_norm(x2, mean, var, m.weight, m.bias, False, 0.0, m.eps)
    with torch.no_grad():
        assert torch.allclose(m(x2), expected, atol=1e-4)  # value path (statistics move once more)
    m.eval()
    m.running_mean.copy_(rm), m.running_var.copy_(rv)
    with torch.enable_grad():
        y = m(x2.clone().requires_grad_(True))  # gradient path: same value
    assert torch.allclose(y, expected, atol=1e-4)
    m.source_share = 0.0
    with torch.no_grad():
        assert not torch.allclose(m(x2), expected, atol=1e-2)  # the share matters
    with pytest.raises(ValueError, match="source_share"):
        method_config("cema_plus", settings={"edge.source_share": 1.0})


def test_norm_modes_and_stats_io():
    torch.manual_seed(1)
    model = convert_to_test_time_bn(create_model("resnet20"))
    bn = model.backbone.bn1
    with torch.no_grad():
        bn.source_mean.uniform_(-1, 1), bn.source_var.uniform_(0.5, 2)
    x = torch.randn(16, 16, 4, 4)
    set_norm_mode(model, "mix", mix_weight=0.5)
    var, mean = torch.var_mean(x, dim=(0, 2, 3))
    expected = F.batch_norm(x, 0.5 * bn.source_mean + 0.5 * mean, 0.5 * bn.source_var + 0.5 * var,
                            bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.allclose(bn(x), expected, atol=1e-5)
    set_norm_mode(model, "source")
    assert torch.allclose(bn(x), F.batch_norm(x, bn.source_mean, bn.source_var, bn.weight, bn.bias, False, 0, bn.eps))
    set_norm_mode(model, "tbr", update_stats=True)
    load_tbr_stats(model, None)
    model(torch.rand(4, 3, 32, 32))
    stats = read_tbr_stats(model)
    assert int(stats["backbone.bn1.num_batches_tracked"]) == 1
    load_tbr_stats(model, None)
    assert not bn.stats_started
    load_tbr_stats(model, stats)
    assert bn.stats_started and torch.equal(bn.running_mean, stats["backbone.bn1.running_mean"])
    with pytest.raises(ValueError, match="do not fit"):
        load_tbr_stats(model, {k: v for k, v in stats.items() if "bn1" not in k})


def test_sgd_momentum_step_matches_torch_sgd():
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(5))
    p_ours = torch.nn.Parameter(p_ref.detach().clone())
    opt = torch.optim.SGD([p_ref], lr=0.1, momentum=0.9)
    bufs: dict = {}
    for _ in range(3):
        g = torch.randn(5)
        p_ref.grad = g.clone()
        opt.step()
        sgd_momentum_step({"p": p_ours}, {"p": g}, bufs, lr=0.1, momentum=0.9)
    assert torch.allclose(p_ref, p_ours, atol=1e-6)


# -- messages, device state, accounting --------------------------------------------------------
@pytest.fixture(scope="module")
def edge_model():
    torch.manual_seed(0)
    return create_model("resnet20")  # random weights: these tests check mechanics, not accuracy


def test_updates_apply_atomically_between_batches_and_stale_ones_are_ignored(edge_model):
    cfg = method_config("cema")
    runner = EdgeRunner(edge_model, cfg)
    state = runner.new_device("d0")
    zeros = {k: torch.zeros_like(v) for k, v in state.affine.items()}
    assert state.offer(UpdateMessage("d0", 2, zeros))
    assert not state.offer(UpdateMessage("d0", 1, {k: v + 1 for k, v in zeros.items()}))  # older: stale
    bad = dict(zeros)
    bad[next(iter(bad))] = torch.zeros(3)
    with pytest.raises(ValueError, match="wrong shape"):
        state.offer(UpdateMessage("d0", 5, bad))
    nan = {k: torch.full_like(v, float("nan")) for k, v in zeros.items()}
    with pytest.raises(ValueError, match="not finite"):
        state.offer(UpdateMessage("d0", 6, nan))
    assert state.version == 0 and state.pending.version == 2  # nothing applied mid-batch, bad ones dropped
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    out = runner.infer(state, images)  # v2 applies first: every BN outputs 0, so all logits are equal
    assert state.version == 2 and torch.allclose(out.logits, out.logits[:1].expand_as(out.logits), atol=1e-5)
    assert out.upload.param_version == 2
    assert not state.offer(UpdateMessage("d0", 2, zeros))  # same version again: stale
    acc = state.accounting
    assert (acc.updates_received, acc.updates_applied, acc.updates_stale) == (3, 1, 2)
    acc.check()


def test_edge_tbr_statistics_come_from_updates_or_move_locally(edge_model):
    rng = np.random.default_rng(3)
    b1, b2 = (rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    cfg = method_config("cema")
    assert cfg.edge.stats_source == "cloud"  # the reference: the edge runs the cloud copy's statistics
    runner = EdgeRunner(edge_model, cfg)
    state = runner.new_device("c")
    runner.infer(state, b1)
    first = {k: v.clone() for k, v in state.stats.items()}
    runner.infer(state, b2)
    assert all(torch.equal(first[k], state.stats[k]) for k in first)  # frozen until an update
    sent = {k: v * 2 if v.is_floating_point() else v + 5 for k, v in first.items()}
    state.offer(UpdateMessage("c", 1, dict(state.affine), sent))
    runner.infer(state, b1)
    assert all(torch.equal(sent[k], state.stats[k]) for k in sent)
    local = EdgeRunner(edge_model, dataclasses.replace(cfg, edge=dataclasses.replace(cfg.edge, stats_source="local")))
    s2 = local.new_device("l")
    local.infer(s2, b1)
    local.infer(s2, b2)
    assert not torch.equal(s2.stats["backbone.bn1.running_mean"], first["backbone.bn1.running_mean"])  # EMA moved
    assert int(s2.stats["backbone.bn1.num_batches_tracked"]) == 2


def test_accounting_adds_up_and_bytes_are_image_bytes(edge_model):
    cfg = method_config("cema", CEMAConfig(filter=FilterConfig(redundancy_margin=0.4, warmup_samples=32)))
    runner = EdgeRunner(edge_model, cfg)
    state = runner.new_device("d1")
    rng = np.random.default_rng(1)
    total = Accounting()
    for _ in range(4):
        images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
        before = dataclasses.replace(state.accounting)
        out = runner.infer(state, images)
        assert len(out.upload) == len(out.selection.keep)
        assert np.array_equal(out.upload.images, images[out.selection.keep.numpy()])
        total = total + Accounting(seen=16)
        assert state.accounting.seen - before.seen == 16
    acc = state.accounting
    acc.check()
    assert acc.seen == total.seen == 64
    assert acc.bytes_up == acc.uploaded * 32 * 32 * 3
    none = EdgeRunner(edge_model, method_config("none"), uploads=False)
    s = none.new_device("d2")
    assert none.infer(s, images).upload is None and s.accounting.not_uploaded == 16


def test_edge_state_round_trips_through_tensors(edge_model):
    cfg = method_config("cema")
    runner = EdgeRunner(edge_model, dataclasses.replace(cfg, filter=dataclasses.replace(cfg.filter, unreliable=False)))
    state = runner.new_device("dev/é")
    runner.infer(state, np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    flat = state.to_tensors()
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    back = EdgeDeviceState.from_tensors(flat)
    assert back.device_id == "dev/é" and back.batches == 1 and back.accounting == state.accounting
    assert all(torch.equal(back.stats[k], state.stats[k]) for k in state.stats)
    assert back.filter.n_seen == 8 and torch.equal(back.filter.history_probs, state.filter.history_probs)


# -- cloud --------------------------------------------------------------------------------------
def small_cloud(model, **cloud):
    cfg = method_config("cema")
    cfg = dataclasses.replace(cfg, cloud=dataclasses.replace(cfg.cloud, **cloud))
    return CloudAdapter(model, model, cfg)


def uploads(n, seed, device="d"):
    x = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return UploadMessage(device, x, 0)


def test_upload_validation_rejects_and_counts(edge_model):
    cloud = small_cloud(edge_model)
    good = uploads(2, 0)
    bad = [dataclasses.replace(good, images=good.images.astype(np.float32)),
           dataclasses.replace(good, images=good.images[:, :28]),
           dataclasses.replace(good, images=good.images[0]),
           dataclasses.replace(good, entropies=np.array([0.1, np.nan], dtype=np.float32)),
           dataclasses.replace(good, param_version=-1),
           dataclasses.replace(good, device_id=""),
           "not a message"]
    for msg in bad:
        with pytest.raises(ValueError):
            cloud.process(msg)
    assert cloud.counters["rejected"] == len(bad) and not cloud.keys
    assert cloud.process(good) is None and cloud.keys["d"].samples_received == 2


def test_replay_sampling_rule_and_capacity(edge_model):
    cloud = small_cloud(edge_model, batch_size=4, replay_min=16, replay_ratio=3, replay_only_multiple=4,
                        replay_capacity=20)
    seen = []
    cloud.edge.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    steps = [(8, [4, 4]),  # buffer 8 < 16: two batches of 4, new samples only
             (8, [16, 16]),  # buffer 16 >= 16: each new batch + 3 x 4 replayed
             (0, []),  # buffer 16, not > 16: no replay-only step
             (2, [16]),  # buffer 18 > 16, no full batch: 4 x 4 replayed
             (6, [16, 16])]  # pending 2 + 6 = two batches, each + 12 replayed
    sent = []
    for i, (n, expected) in enumerate(steps):
        seen.clear()
        msg = uploads(n, i)
        sent.append(msg.images)
        update = cloud.process(msg)
        assert seen == expected, (i, seen)
        assert (update is None) == (not expected)
    ks = cloud.keys["d"]
    assert ks.version == ks.steps == 7 and ks.replay_only_steps == 1 and len(ks.pending) == 0
    assert torch.equal(ks.replay, torch.from_numpy(np.concatenate(sent)[-20:]))  # newest 20 kept
    assert update.version == 7 and set(update.params) == set(ks.edge.affine)
    with pytest.raises(ValueError, match="replay_min"):
        small_cloud(edge_model, batch_size=8, replay_min=16)


def test_cloud_state_round_trip_resumes_identically(edge_model, tmp_path):
    from safetensors.torch import load_file, save_file

    cloud = small_cloud(edge_model, batch_size=2, replay_min=8)
    for i in range(4):
        cloud.process(uploads(4, i, device="a"))
    cloud.process(uploads(3, 9, device="b"))
    save_file(cloud.state_dict(), tmp_path / "cloud.safetensors")
    resumed = small_cloud(edge_model, batch_size=2, replay_min=8)
    resumed.load_state_dict(load_file(tmp_path / "cloud.safetensors"))
    assert set(resumed.keys) == {"a", "b"} and len(resumed.keys["b"].pending) == 1
    nxt = uploads(4, 11, device="a")
    u1, u2 = cloud.process(nxt), resumed.process(nxt)  # two steps, with replay drawn by the restored RNG
    assert u1.version == u2.version == 10
    assert all(torch.allclose(u1.params[k], u2.params[k]) for k in u1.params)
    assert any(not torch.equal(u1.params[k], cloud._e_init[k]) for k in u1.params)  # it did adapt


# -- streams ------------------------------------------------------------------------------------
def test_dirichlet_order_is_a_label_correlated_permutation():
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    order = dirichlet_order(labels, alpha=0.1, n_slots=16, rng=rng)
    assert sorted(order.tolist()) == list(range(1000))
    # share of each 50-sample batch taken by its most frequent class: ~0.17 i.i.d., ~0.5 here
    top_share = lambda y: np.mean([np.bincount(y[i:i + 50]).max() / 50 for i in range(0, 1000, 50)])  # noqa: E731
    assert top_share(labels[rng.permutation(1000)]) < 0.25
    assert top_share(labels[order]) > 0.4


def test_build_runs_modes():
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), np.arange(100) % 10)
    reset = build_runs(images, ["clean", "brightness"], 5, "reset", batch_size=32, n_per_corruption=64)
    assert len(reset) == 2 and [len(r) for r in reset] == [2, 2] and reset[1][0].tag == "brightness"
    continual = build_runs(images, ["clean", "brightness"], 5, "continual", batch_size=32, n_per_corruption=64)
    assert len(continual) == 1 and [b.tag for b in continual[0]] == ["clean"] * 2 + ["brightness"] * 2
    assert np.array_equal(continual[0][0].images, reset[0][0].images)
    label = build_runs(images, ["clean"], 5, "label", batch_size=32, n_per_corruption=64)
    assert sorted(np.concatenate([b.labels for b in label[0]]).tolist()) == sorted(
        np.concatenate([b.labels for b in reset[0]]).tolist())
    with pytest.raises(ValueError, match="unknown corruptions"):
        build_runs(images, ["rain"], 5, "reset")
