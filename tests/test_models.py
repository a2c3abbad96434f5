import pytest
import torch

from tdmr_ray.evaluation import accuracy
from tdmr_ray.models import (create_model, get_norm_affine, list_models, load_legacy_checkpoint, norm_modules,
                             pretrained_path, set_norm_affine)


@pytest.mark.parametrize("name,clean,jpeg", [("resnet20", 91.6, 80.45), ("resnet56", 92.7, None)])
def test_pretrained_accuracy_matches_reference(name, clean, jpeg, clean_subset, jpeg_test):
    """Clean subset for both; for ResNet-20 also every 5th image of the JPEG test set (2,000 of every
    class alike: 80.45, against 81.03 on all 10,000, which take 5x as long)."""
    from tdmr_ray.data.datasets import ImageSet

    model = create_model(name, pretrained=True)
    assert abs(accuracy(model, clean_subset) - clean) <= 0.5
    if jpeg is not None:
        fifth = ImageSet(jpeg_test.x[::5], jpeg_test.y[::5], jpeg_test.classes, jpeg_test.source)
        assert abs(accuracy(model, fifth) - jpeg) <= 0.5


def test_registered_cifar_resnets_have_expected_sizes():
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110"} <= set(list_models())
    params = {n: sum(p.numel() for p in create_model(n).parameters()) for n in ("resnet20", "resnet56")}
    assert 0.26e6 < params["resnet20"] < 0.28e6 and 0.84e6 < params["resnet56"] < 0.86e6


def test_timm_model_carries_normalisation_and_grayscale():
    model = create_model("resnet10t", num_classes=5, in_chans=1).eval()
    x = torch.rand(2, 1, 32, 32)
    assert model(x).shape == (2, 5)
    assert model.features(x).shape == (2, model.num_features)
    assert model.head(model.features(x)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"expects images of shape \(N, 1"):
        model(torch.rand(2, 3, 32, 32))


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'no-such-net'"):
        create_model("no-such-net")


def test_legacy_checkpoint_strips_module_prefix_and_rejects_garbage(tmp_path):
    state = load_legacy_checkpoint(pretrained_path("resnet20"))
    assert not any(k.startswith("module.") for k in state)
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.th"):
        load_legacy_checkpoint(bad)


def test_missing_weights_name_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TDMR_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError, match="TDMR_WEIGHTS"):
        create_model("resnet32", pretrained=True)


@pytest.mark.parametrize("name", ["resnet20", "resnet10t", "vit_tiny_patch16_224", "convnext_atto"])
def test_norm_affine_round_trip(name):
    model = create_model(name)
    params = get_norm_affine(model)
    assert params and len(params) == sum(2 if m.bias is not None else 1 for m in norm_modules(model).values())
    changed = {k: v + 1.0 for k, v in params.items()}
    set_norm_affine(model, changed)
    assert all(torch.equal(get_norm_affine(model)[k], changed[k]) for k in params)


def test_set_norm_affine_is_all_or_nothing():
    model = create_model("resnet20")
    before = get_norm_affine(model)
    bad = {k: v + 1 for k, v in before.items()}
    key = sorted(bad)[-1]
    bad[key] = torch.zeros(3)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        set_norm_affine(model, bad)
    assert all(torch.equal(get_norm_affine(model)[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="missing"):
        set_norm_affine(model, {})
    nan = dict(before, **{key: torch.full_like(before[key], float("nan"))})
    with pytest.raises(ValueError, match="finite"):
        set_norm_affine(model, nan)


def test_robust_foundation_is_a_model_name(clean_subset):
    model = create_model("resnet56_augmix", pretrained=True)
    assert model.arch["name"] == "resnet56_augmix"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in create_model("resnet56").parameters())
    assert abs(accuracy(model, clean_subset) - 92.5) <= 0.7  # ../shared/data/README.md


def test_local_only_weights_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TDMR_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="finetune_augmix"):
        create_model("resnet56_augmix", pretrained=True)
