"""CEMA end to end on a few hundred corrupted JPEG CIFAR-10 test images with the pretrained ResNets."""
from __future__ import annotations

import pytest
import torch

from tdmr_ray.cema import CEMAConfig, redundancy_margin_for, run_stream
from tdmr_ray.cema.streams import build_runs
from tdmr_ray.data import DatasetNotFound, load_dataset
from tdmr_ray.models import create_model


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is as fast, and immune to a busy machine
    try:
        images = load_dataset("cifar10-jpeg", "test")
        edge, foundation = create_model("resnet20", pretrained=True), create_model("resnet56", pretrained=True)
    except (DatasetNotFound, FileNotFoundError) as exc:
        pytest.skip(f"offline data or weights missing: {exc}")
    (stream,) = build_runs(images, ["fog"], 5, "reset", batch_size=64, n_per_corruption=384, seed=0)
    yield edge, foundation, stream
    torch.set_num_threads(threads)


def test_cema_uploads_a_subset_and_is_not_worse_than_no_adaptation(setup):
    edge, foundation, stream = setup
    cfg = CEMAConfig()
    cfg.filter.redundancy_margin = redundancy_margin_for(10)
    cfg.filter.warmup_samples = 128
    none = run_stream("none", edge, None, stream, cfg)
    cema = run_stream("cema", edge, foundation, stream, cfg)
    acc = cema.accounting
    assert acc.seen == 384 and none.accounting.uploaded == 0
    assert 0 < acc.uploaded < acc.seen  # the filters keep some samples and drop others
    assert acc.excluded_unreliable > 0 and acc.excluded_low_info > 0 and acc.excluded_redundant > 0
    assert acc.bytes_up == acc.uploaded * 32 * 32 * 3
    assert cema.cloud["steps"] == acc.uploaded // 32 and acc.updates_applied >= 1
    # an update: float32 affine parameters + the cloud copy's TBR statistics (mean, var, int64 count)
    n_params = sum(p.numel() for n, p in edge.named_parameters() if "bn" in n)
    n_layers = sum(1 for m in edge.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert acc.bytes_down == acc.updates_received * (4 * n_params + 4 * n_params + 8 * n_layers)
    # 384 samples: one standard error of the accuracy is about 2.5 points
    assert cema.accuracy >= none.accuracy - 0.05, (cema.accuracy, none.accuracy)
