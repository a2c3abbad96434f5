import colorsys

import numpy as np
import pytest
import torch

from tdmr_ray.data import ImageSet, to_float
from tdmr_ray.data import corruptions as C
from tdmr_ray.data.corruptions import CORRUPTIONS, corrupt, corrupt_dataset

RANDOM_TYPES = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost",
                "fog", "elastic_transform"}
# Types whose damage (mean |corrupted - clean|) rises at every severity step with the CIFAR-10-C
# constants; glass_blur, frost and elastic_transform are not monotone step by step in the reference
# constants, motion_blur's steps 3 -> 4 differ by a hair (radius 6 -> 8 at the same sigma).
MONOTONE_TYPES = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "zoom_blur", "snow", "fog",
                  "brightness", "contrast", "pixelate", "jpeg_compression"]


@pytest.fixture(scope="module")
def images(clean_subset):
    return clean_subset.x[:64]


def _damage(before, after):
    return np.abs(after.astype(np.int16) - before).mean()


def test_names_and_cifar_constants():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
    # CIFAR-10-C values, not ImageNet-C's (0.38, 3, 0.27, (0.85, 0.75)... at severity 5)
    assert C.SEVERITY_CONSTANTS["gaussian_noise"][4] == 0.10
    assert C.SEVERITY_CONSTANTS["shot_noise"][4] == 50
    assert C.SEVERITY_CONSTANTS["frost"][0] == (1, 0.2)
    assert len(C.SEVERITY_CONSTANTS["zoom_blur"][0]) == 7  # np.arange(1, 1.06, 0.01) keeps 1.06


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_type_keeps_shape_and_dtype_changes_image_and_is_deterministic(images, name):
    for severity in (1, 5):
        out = corrupt(images, name, severity, seed=3)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert _damage(images, out) > 1.0, (name, severity)
        np.random.seed(severity)  # the global RNG must play no part
        assert np.array_equal(out, corrupt(images, name, severity, seed=3))
    other_seed = corrupt(images, name, 5, seed=4)
    assert np.array_equal(other_seed, corrupt(images, name, 5, seed=3)) == (name not in RANDOM_TYPES)


def test_damage_grows_with_severity(images):
    for name in CORRUPTIONS:
        damage = [_damage(images, corrupt(images, name, s)) for s in range(1, 6)]
        if name in MONOTONE_TYPES:
            assert all(a < b for a, b in zip(damage, damage[1:])), (name, damage)
        elif name != "elastic_transform":  # its severity 1 has the largest affine jitter of all
            assert damage[4] > damage[0], (name, damage)


def test_noise_levels_match_cifar_constants():
    grey = np.full((64, 32, 32, 3), 128, np.uint8)
    noise = corrupt(grey, "gaussian_noise", 5).astype(float) - 128
    assert abs(noise.std() - 0.10 * 255) < 0.3  # ImageNet-C's severity 5 would be 0.38 * 255
    flipped = np.isin(corrupt(grey, "impulse_noise", 5), (0, 255)).mean()
    assert abs(flipped - 0.07) < 0.005
    shot = corrupt(grey, "shot_noise", 1).astype(float) / 255
    expected_std = np.sqrt(128 / 255 * 500) / 500  # Poisson(x * 500) / 500
    assert abs(shot.std() - expected_std) < 0.002


def test_brightness_matches_hsv_value_shift(images):
    out = corrupt(images[:4], "brightness", 3)
    for (r, g, b), got in zip(images[:4].reshape(-1, 3)[::7] / 255.0, out.reshape(-1, 3)[::7]):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        want = np.floor(np.clip(colorsys.hsv_to_rgb(h, s, min(v + 0.15, 1.0)), 0, 1) * 255)
        assert np.abs(want - got).max() <= 1


def test_contrast_keeps_channel_means_and_shrinks_spread(images):
    out = corrupt(images, "contrast", 5).astype(float)
    assert np.abs(out.mean(axis=(1, 2)) - images.mean(axis=(1, 2))).max() < 1.0  # floor costs < 1
    ratio = out.std(axis=(1, 2)) / images.std(axis=(1, 2))
    assert np.allclose(ratio, 0.15, atol=0.02)


def test_motion_blur_kernel_is_one_sided_along_the_angle():
    line = np.zeros((2, 32, 32, 1))
    line[:, :, 16] = 1.0  # a vertical line
    blurred = C._motion_blur(line, radius=6, sigma=2, angles_deg=np.array([0.0, 180.0]))
    right, left = blurred[0, 10, :, 0], blurred[1, 10, :, 0]
    # angle 0 samples pixels to the right, so the line smears to its left (and mirrored for 180)
    width = 2 * 6 + 1  # ImageMagick's kernel width for radius 6
    assert right[17:].max() == 0 and np.all(right[17 - width:17] > 0) and right[:17 - width].max() == 0
    assert np.allclose(left[16:16 + width], right[17 - width:17][::-1]) and left[:16].max() == 0
    assert np.isclose(right.sum(), 1.0) and right[16] == right.max()


def test_prefix_of_a_batch_is_corrupted_the_same_whatever_follows(images, monkeypatch):
    monkeypatch.setattr(C, "CHUNK", 16)
    for name in ("gaussian_noise", "snow", "frost", "elastic_transform"):
        assert np.array_equal(corrupt(images[:32], name, 4), corrupt(images, name, 4)[:32])


def test_corrupt_dataset_keeps_labels(clean_subset):
    part = clean_subset.subset(slice(0, 10))
    out = corrupt_dataset(part, "fog", 2, seed=1)
    assert isinstance(out, ImageSet) and np.array_equal(out.y, part.y) and out.classes == part.classes
    assert np.array_equal(out.x, corrupt(part.x, "fog", 2, seed=1)) and "fog@2" in out.source


def test_errors_are_clear(images):
    with pytest.raises(ValueError, match="unknown corruption 'speckle_noise'"):
        corrupt(images, "speckle_noise", 1)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(images, "fog", severity)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.astype(np.float32), "fog", 1)
    for bad in (images[0], images[:, :28, :28], images[..., :1]):
        with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
            corrupt(bad, "fog", 1)
    with pytest.raises(ValueError, match="seed"):
        corrupt(images, "fog", 1, seed=-1)


def test_missing_frost_textures_say_how_to_get_them(images, tmp_path, monkeypatch):
    monkeypatch.setenv("TDMR_FROST_DIR", str(tmp_path))
    C.frost_textures.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="imagecorruptions"):
            corrupt(images, "frost", 1)
    finally:
        monkeypatch.delenv("TDMR_FROST_DIR")
        C.frost_textures.cache_clear()


def test_pretrained_accuracy_falls_with_severity(clean_subset):
    from tdmr_ray.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", pretrained=True).eval()
    x, y = clean_subset.x[:500], clean_subset.y[:500]

    def accuracy(batch):
        with torch.inference_mode():
            return (model(to_float(batch)).argmax(1).numpy() == y).mean()

    clean = accuracy(x)
    assert clean > 0.85
    kinds = ("gaussian_noise", "defocus_blur", "contrast", "pixelate")
    mild = np.array([accuracy(corrupt(x, name, 1)) for name in kinds])
    severe = np.array([accuracy(corrupt(x, name, 5)) for name in kinds])
    assert np.all(severe < mild), (mild, severe)
    assert mild.mean() <= clean + 0.01 and mild.mean() - severe.mean() > 0.25, (clean, mild, severe)


def test_eval_pretrained_bench_writes_its_table(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "eval_pretrained.py"
    spec = importlib.util.spec_from_file_location("eval_pretrained", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--models", "resnet20", "--limit", "40", "--corruptions", "contrast", "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "eval_pretrained.json").read_text())
    assert [r["set"] for r in result["rows"]] == ["clean subset", "jpeg", "jpeg+contrast@5"]
    assert result["rows"][1]["images"] == 40 and result["rows"][0]["top1"]["resnet20"] > 85
    assert result["rows"][2]["top1"]["resnet20"] < result["rows"][1]["top1"]["resnet20"]
    assert "| jpeg+contrast@5 | 40 |" in (tmp_path / "eval_pretrained.md").read_text()
