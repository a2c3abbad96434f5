"""Downstream tasks that do not match the foundation: another domain, another label space, or both.

TDMR's abstract targets exactly these (task mismatch and domain inconsistency). They are built from
CIFAR-10 images, so they run offline:

- domain shifts of the images (labels kept): ``gray`` (luminance, one channel), ``invert`` (255 - x),
  ``lowres`` (2x2 average pooling to 16x16: the target trains at 16x16, the teacher resizes);
- ``glyphs``: a new label space and domain at once, the ten letters A-J rendered (random size,
  position, rotation and colour) over CIFAR images as clutter; the image's CIFAR class is noise.

``make_task(name, train, test)`` returns the (train, test) :class:`ImageSet` pair of a task name:
``cifar10``, ``cifar10-5``/``cifar10-2`` (superclasses), a domain shift ``<shift>`` or
``<shift>+<regrouping>`` (e.g. ``gray+cifar10-5``), or ``glyphs``.
"""
from __future__ import annotations

import numpy as np

from ..data import ImageSet
from .data import CIFAR10_REGROUPINGS, regroup_classes

GLYPHS = "ABCDEFGHIJ"


def gray(x: np.ndarray) -> np.ndarray:
    y = x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None]


def invert(x: np.ndarray) -> np.ndarray:
    return 255 - x


def lowres(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    y = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).astype(np.float32).mean(axis=(2, 4))
    return np.rint(y).astype(np.uint8)


DOMAIN_SHIFTS = {"gray": gray, "invert": invert, "lowres": lowres}


def render_glyphs(backgrounds: np.ndarray, seed: int) -> ImageSet:
    """One letter of ``GLYPHS`` per background image; labels uniform, seeded."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(GLYPHS), len(backgrounds))
    fonts = {s: ImageFont.load_default(size=s) for s in range(14, 27, 2)}
    out = np.empty_like(backgrounds)
    for i, (bg, label) in enumerate(zip(backgrounds, labels)):
        size = int(rng.choice(list(fonts)))
        glyph = Image.new("L", (44, 44), 0)
        ImageDraw.Draw(glyph).text((22, 22), GLYPHS[label], fill=255, font=fonts[size], anchor="mm")
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
        dx, dy = rng.integers(-5, 6, 2)
        mask = np.asarray(glyph, np.float32)[6 + dy: 38 + dy, 6 + dx: 38 + dx, None] / 255.0
        # dimmed clutter, a colour far from the local background
        base = bg.astype(np.float32) * rng.uniform(0.4, 0.8)
        colour = np.where(base.mean(axis=(0, 1)) > 100, rng.uniform(0, 60, 3), rng.uniform(170, 255, 3))
        out[i] = np.clip(base * (1 - mask) + colour * mask, 0, 255).astype(np.uint8)
    return ImageSet(out, labels, list(GLYPHS), "glyphs")


def make_task(name: str, train: ImageSet, test: ImageSet, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, test) of task ``name`` built from CIFAR-10 ``train`` and ``test`` (see the module doc)."""
    if name == "glyphs":
        return render_glyphs(train.x, seed), render_glyphs(test.x, seed + 1)
    shift, _, groups = name.partition("+") if "+" in name else (
        (name, "", "") if name in DOMAIN_SHIFTS else ("", "", name))
    if groups and groups != "cifar10":
        if groups not in CIFAR10_REGROUPINGS:
            raise ValueError(f"unknown task {name!r}: regroupings are {sorted(CIFAR10_REGROUPINGS)}")
        train, test = regroup_classes(train, groups), regroup_classes(test, groups)
    if shift:
        if shift not in DOMAIN_SHIFTS:
            raise ValueError(f"unknown task {name!r}: domain shifts are {sorted(DOMAIN_SHIFTS)}")
        fn = DOMAIN_SHIFTS[shift]
        train = ImageSet(fn(train.x), train.y, train.classes, f"{train.source}:{shift}")
        test = ImageSet(fn(test.x), test.y, test.classes, f"{test.source}:{shift}")
    return train, test
