import tarfile

import numpy as np
import pytest
from PIL import Image

from tdmr_ray.data import DatasetNotFound, load_dataset


def test_named_offline_sets_load(clean_subset, jpeg_test):
    assert clean_subset.x.shape == (1017, 32, 32, 3) and clean_subset.x.dtype == np.uint8
    assert jpeg_test.x.shape == (10000, 32, 32, 3)
    assert jpeg_test.classes[:2] == ["airplane", "automobile"] and np.bincount(jpeg_test.y).tolist() == [1000] * 10
    train = load_dataset("cifar10-clean-subset", "train")
    assert len(train) == 5 * 1017


def test_missing_dataset_names_path_and_fix(tmp_path):
    with pytest.raises(DatasetNotFound, match=str(tmp_path / "cifar10")) as err:
        load_dataset("cifar10-jpeg", "test", root=tmp_path)
    assert "TDMR_DATA" in str(err.value)
    with pytest.raises(DatasetNotFound, match="nope.npz"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_torchvision_cifar10_offline_error_is_clear(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "download_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DatasetNotFound, match="cifar-10-batches-py"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_a_corrupt_torchvision_cifar10_folder_is_named(tmp_path):
    """A cifar-10-batches-py folder whose files fail torchvision's checksum (nothing is unpickled)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("test_batch", "batches.meta"):
        (folder / name).write_bytes(b"not the original file")
    with pytest.raises(DatasetNotFound, match=r"cifar-10-batches-py is incomplete or corrupt"):
        load_dataset("cifar10", "test", root=tmp_path)


def _write_folder(root, sizes=(8, 8), mode="RGB", n=3):
    rng = np.random.default_rng(0)
    for cls in ("cat", "ant"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            shape = (*sizes, 3) if mode == "RGB" else sizes
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")


def test_image_folder_dir_and_tarball(tmp_path, monkeypatch):
    monkeypatch.setenv("TDMR_CACHE", str(tmp_path / "cache"))
    _write_folder(tmp_path / "ds" / "train")
    ds = load_dataset(str(tmp_path / "ds"), "train")
    assert ds.classes == ["ant", "cat"] and ds.x.shape == (6, 8, 8, 3) and ds.y.tolist() == [0] * 3 + [1] * 3
    with pytest.raises(KeyError, match="test"):
        load_dataset(str(tmp_path / "ds"), "test")
    tar_path = tmp_path / "ds.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tmp_path / "ds", arcname=".")
    from_tar = load_dataset(str(tar_path), "train")
    assert np.array_equal(from_tar.x, ds.x) and np.array_equal(from_tar.y, ds.y)


def test_image_folder_grayscale_and_mixed_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("TDMR_CACHE", str(tmp_path / "cache"))
    _write_folder(tmp_path / "gray", mode="L")
    assert load_dataset(str(tmp_path / "gray"), None).x.shape == (6, 8, 8, 1)
    _write_folder(tmp_path / "mixed")
    Image.new("RGB", (5, 7)).save(tmp_path / "mixed" / "cat" / "odd.png")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset(str(tmp_path / "mixed"), None)
    assert load_dataset(str(tmp_path / "mixed"), None, image_size=6).x.shape == (7, 6, 6, 3)


def test_corrupt_tarball_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TDMR_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="broken.tar.gz"):
        load_dataset(str(bad), "train")


def test_npz_layouts(tmp_path):
    x = np.zeros((4, 5, 6, 3), np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=[0, 1, 0, 1], x_test=x[:2], y_test=[1, 1])
    assert len(load_dataset(str(tmp_path / "a.npz"), "train")) == 4
    assert load_dataset(str(tmp_path / "a.npz"), "test").y.tolist() == [1, 1]
    np.savez(tmp_path / "gray.npz", x=np.zeros((3, 28, 28), np.uint8), y=[0, 1, 2])
    assert load_dataset(str(tmp_path / "gray.npz"), None).x.shape == (3, 28, 28, 1)
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 4, 4, 3), np.float32), y=[0, 1, 2])
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(str(tmp_path / "bad.npz"), None)
    np.savez(tmp_path / "short.npz", x=x, y=[0, 1])
    with pytest.raises(ValueError, match="4 images but 2 labels"):
        load_dataset(str(tmp_path / "short.npz"), None)
    with pytest.raises(KeyError, match="no 'test' split"):
        load_dataset(str(tmp_path / "short.npz"), "test")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz"):
        load_dataset(str(tmp_path / "junk.npz"), None)


def test_sample_is_seeded_and_spans_classes(jpeg_test):
    a, b = jpeg_test.sample(500, seed=1), jpeg_test.sample(500, seed=1)
    assert np.array_equal(a.y, b.y) and len(set(a.y.tolist())) == 10
    assert len(jpeg_test.sample(0)) == len(jpeg_test)
