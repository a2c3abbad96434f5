"""Labelled image sets as in-memory uint8 arrays, from CIFAR-10, ImageFolders (dir or .tar.gz) and .npz.

A dataset is named by a *spec*: ``cifar10`` (torchvision; downloads when online), ``cifar10-jpeg``
and ``cifar10-clean-subset`` (files under the data root), or a path to a directory, a .tar.gz of
one, or an .npz. The data root is an argument or ``$TDMR_DATA``.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..utils import cache_dir, progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Named datasets: spec -> path below the data root.
NAMED_FILES = {
    "cifar10-jpeg": "cifar10/cifar10-jpeg.tar.gz",
    "cifar10-clean-subset": "cifar10/cifar10-clean-subset.npz",
}


class DatasetNotFound(FileNotFoundError):
    pass


@dataclass
class ImageSet:
    """``x``: uint8 (N, H, W, C); ``y``: int64 (N,); ``classes``: label names (may be generic)."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if self.x.dtype != np.uint8 or self.x.ndim != 4 or self.x.shape[-1] not in (1, 3):
            raise ValueError(f"{self.source}: images must be uint8 (N, H, W, C) with C in 1/3, "
                             f"got {self.x.dtype} {self.x.shape}")
        self.y = np.asarray(self.y).astype(np.int64).reshape(-1)
        if len(self.y) != len(self.x):
            raise ValueError(f"{self.source}: {len(self.x)} images but {len(self.y)} labels")
        if len(self.y) and self.y.min() < 0:
            raise ValueError(f"{self.source}: negative labels")
        if not self.classes:
            n = int(self.y.max()) + 1 if len(self.y) else 0
            self.classes = [str(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index) -> "ImageSet":
        return ImageSet(self.x[index], self.y[index], list(self.classes), self.source)

    def sample(self, n: int, seed: int = 0) -> "ImageSet":
        """A seeded random subset of ``n`` images (all when ``n`` is 0 or too large). Use it instead
        of a prefix: folder-loaded sets come sorted by class, so a prefix holds only a few classes."""
        if not n or n >= len(self):
            return self
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))

    def tensors(self, index=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] (N, C, H, W) and labels."""
        return to_float(self.x[index]), torch.from_numpy(self.y[index])


def to_float(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255)


def data_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("TDMR_DATA") or Path.home() / ".cache" / "tdmr_ray" / "data")


def load_dataset(spec: str, split: str | None = "test", root: str | os.PathLike | None = None,
                 image_size: int | None = None) -> ImageSet:
    """Load a labelled image set. ``split`` is ``train``/``test``, or None for a single-folder set."""
    base = data_root(root)
    if spec == "cifar10":
        return _load_torchvision_cifar10(base, split)
    path = base / NAMED_FILES[spec] if spec in NAMED_FILES else Path(spec).expanduser()
    if not path.exists():
        hint = (f"set TDMR_DATA (or --data-root) to a directory holding {NAMED_FILES[spec]}"
                if spec in NAMED_FILES else "pass an ImageFolder directory, a .tar.gz of one, or an .npz")
        raise DatasetNotFound(f"dataset {spec!r}: {path} does not exist; {hint}")
    if path.suffix == ".npz":
        return load_npz(path, split)
    if path.is_dir():
        return load_image_folder(path, split, image_size)
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return load_image_folder(extract_archive(path), split, image_size)
    raise ValueError(f"dataset {spec!r}: {path} is neither a directory, a .tar(.gz) nor an .npz")


def has_split(spec: str, split: str, root=None) -> bool:
    """Whether ``spec`` carries its own ``split`` (test sets are held out from train otherwise)."""
    try:
        load_dataset(spec, split, root)
        return True
    except KeyError:
        return False


def _load_torchvision_cifar10(base: Path, split: str | None) -> ImageSet:
    from torchvision.datasets import CIFAR10

    train = split == "train"
    for candidate in (base, base / "cifar10"):
        if (candidate / "cifar-10-batches-py").is_dir():
            try:  # torchvision checks every batch file's MD5 before it unpickles it
                ds = CIFAR10(str(candidate), train=train, download=False)
            except RuntimeError as exc:
                raise DatasetNotFound(f"CIFAR-10: {candidate / 'cifar-10-batches-py'} is incomplete or corrupt "
                                      f"(torchvision: {exc}); replace it with the original download") from exc
            break
    else:
        try:
            ds = CIFAR10(str(base / "cifar10"), train=train, download=True)
        except Exception as exc:
            raise DatasetNotFound(
                f"CIFAR-10: no cifar-10-batches-py under {base} or {base / 'cifar10'}, and the download "
                f"failed ({exc}); download it there or set TDMR_DATA") from exc
    return ImageSet(np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets), list(ds.classes),
                    f"cifar10:{split}")


def load_npz(path: Path, split: str | None) -> ImageSet:
    """``x``/``y`` (single set or train), ``x_test``/``y_test`` or ``test_x``/``test_y``, and the
    clean-subset layout's ``train_batchK_x``; optional ``classes``. Loaded without pickle."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise ValueError(f"cannot read {path} as .npz: {exc}") from exc
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else []
    keys = {None: [("x", "y")], "train": [("x_train", "y_train"), ("train_x", "train_y"), ("x", "y")],
            "test": [("x_test", "y_test"), ("test_x", "test_y")]}.get(split, [(f"x_{split}", f"y_{split}")])
    for kx, ky in keys:
        if kx in arrays and ky in arrays:
            return ImageSet(_as_nhwc(arrays[kx], path), arrays[ky], classes, f"{path}:{split}")
    batches = sorted(k for k in arrays if k.startswith(f"{split}_batch") and k.endswith("_x"))
    if batches:
        x = np.concatenate([arrays[k] for k in batches])
        y = np.concatenate([arrays[k[:-2] + "_y"] for k in batches])
        return ImageSet(_as_nhwc(x, path), y, classes, f"{path}:{split}")
    raise KeyError(f"{path} has no {split!r} split: looked for {keys}; it holds {sorted(arrays)}")


def _as_nhwc(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:  # (N, H, W) grayscale
        x = x[..., None]
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 NHWC, got {x.dtype}")
    return x


def extract_archive(path: Path) -> Path:
    """Extract a tar(.gz) once into the cache (keyed by path, size and mtime); safe to race."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / "extracted" / f"{path.name.split('.')[0]}-{key}"
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")  # refuses absolute paths, links out, devices
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"cannot extract {path}: {exc}") from exc
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _class_folders(root: Path) -> tuple[list[str], dict[str, int]]:
    """torchvision's ``find_classes`` rule (sorted sub-folder names), without importing torchvision: its
    import pulls in torch._dynamo, ~1-2 s in every process that loads a dataset (fleet hosts, Train
    workers, evaluations)."""
    if not root.is_dir():
        raise DatasetNotFound(f"{root}: not a folder")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DatasetNotFound(f"{root}: no class folders")
    return classes, {c: i for i, c in enumerate(classes)}


def load_image_folder(folder: Path, split: str | None, image_size: int | None = None) -> ImageSet:
    """An ImageFolder (``class/image``) at ``folder/split`` (or ``folder`` when split is None).

    Decoded arrays are cached next to extracted archives (or in the cache) as .npy files.
    """
    from PIL import Image

    root = folder / split if split else folder
    if split and not root.is_dir():
        raise KeyError(f"{folder} has no {split!r} split folder")
    classes, class_to_idx = _class_folders(root)
    files = [(p, class_to_idx[c]) for c in classes for p in sorted((root / c).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetNotFound(f"{root}: no images found in class folders")
    newest = max(p.stat().st_mtime_ns for p, _ in files)
    key = hashlib.sha1(f"{root.resolve()}:{len(files)}:{newest}:{image_size}".encode()).hexdigest()[:16]
    cached = cache_dir() / "decoded" / f"{key}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as z:
            return ImageSet(z["x"], z["y"], classes, str(root))
    with Image.open(files[0][0]) as first:
        mode = "L" if first.mode in ("L", "I", "I;16", "1") else "RGB"
    images = []
    for p, _ in progress(files, len(files), f"decoding {root}", every_s=5):
        with Image.open(p) as im:
            im = im.convert(mode)
            if image_size:
                im = im.resize((image_size, image_size), Image.BILINEAR)
            images.append(np.asarray(im, dtype=np.uint8))
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images have different sizes {sorted(shapes)[:3]}...; pass image_size")
    x = np.stack(images)
    x = x[..., None] if x.ndim == 3 else x
    y = np.array([label for _, label in files], dtype=np.int64)
    cached.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, cached)
    return ImageSet(x, y, classes, str(root))
