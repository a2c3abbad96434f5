"""CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) for batches of 32x32 uint8 RGB images.

The severity constants are those of the reference ``make_cifar_c.py`` (hendrycks/robustness,
ImageNet-C/create_c), not the ImageNet-C ones. The reference works image by image with skimage,
OpenCV and Wand; here each corruption runs on a whole batch with numpy (and Pillow for JPEG and
pixelate, as in the reference). Like the reference, float results are floored to uint8
(its ``np.uint8`` cast). Departures, all small:

- motion_blur and snow: the reference calls ImageMagick's MotionBlurImage through Wand. We apply
  the same one-sided line kernel (width 2*ceil(radius)+1, weights exp(-i^2 / 2 sigma^2), tap i at
  offset ceil(i * (cos a, sin a) - 0.5), edge pixels repeated) and round to 8 bits as its PNG round
  trip does; ImageMagick's 16-bit intermediate quantisation is not reproduced.
- impulse_noise: skimage ``random_noise('s&p')`` as current scikit-image defines it: each value
  (per channel) flips with probability ``amount``, to 0 or 1 with equal odds. Old releases set an
  exact count of values instead.
- elastic_transform: cv2.warpAffine's bilinear sampling is reproduced with its 1/32-pixel coordinate
  grid and BORDER_REFLECT_101, not its fixed-point weights.
- glass_blur reproduces the reference's actual behaviour: its "swap" ``x[h, w], x[h', w'] =
  x[h', w'], x[h, w]`` on numpy views only copies x[h', w'] into x[h, w]. With the CIFAR shift range
  {-1, 0} and the reference's bottom-right-to-top-left order, every copy reads a pixel not yet
  written, so each pass is one gather over the whole batch.
- frost uses the reference's texture images, read as files from the ``imagecorruptions`` package
  (its code is never imported: it needs OpenCV) or from ``$TDMR_FROST_DIR``. OpenCV's 0.2x
  INTER_LINEAR resize samples exactly every 5th pixel from offset 2, which is what we do.
- Randomness: one numpy Generator seeded from (seed, name, severity), drawn chunk by chunk
  (``CHUNK`` images; different draw order than the reference's per-image global RNG). A prefix of
  k * CHUNK images therefore gets the same corruption whatever follows it.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import ImageSet

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
IMAGE_SIZE = 32  # the constants below are defined for CIFAR's 32x32 images
CHUNK = 1000  # images corrupted at once (bounds float64 temporaries to ~25 MB each)

# make_cifar_c.py constants, one entry per severity 1..5.
SEVERITY_CONSTANTS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std (of [0, 1] pixels)
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson photon count at full intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of values set to 0 or 1
    # (disk radius, Gaussian antialias sigma)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    # (Gaussian sigma, max pixel shift, passes)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # (radius, sigma)
    # zoom factors averaged; np.arange's float end keeps e.g. 1.06 in the first (as the reference)
    "zoom_blur": tuple(tuple(np.arange(1, end, 0.01).tolist()) for end in (1.06, 1.11, 1.16, 1.21, 1.26)),
    # (flake mean, flake std, flake zoom, threshold, blur radius, blur sigma, image weight)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # (image weight, frost weight)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # (fog strength, plasma decay)
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the distance to the per-channel mean
    # (displacement scale, displacement smoothing sigma, affine corner jitter), in pixels
    "elastic_transform": tuple((IMAGE_SIZE * a, IMAGE_SIZE * s, IMAGE_SIZE * j) for a, s, j in (
        (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # box-downscale factor
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # the reference never
FROST_SCALE_STEP = 5  # draws frost6; OpenCV resize by 0.2 == every 5th pixel from offset 2


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 (N, 32, 32, 3) RGB images with CIFAR-10-C corruption ``name`` at ``severity`` 1..5.

    Deterministic given (images, name, severity, seed); returns a new uint8 array of the same shape.
    """
    _check_arguments(images, name, severity, seed)
    corruption = _CORRUPTION_FUNCTIONS[name]
    constants = SEVERITY_CONSTANTS[name][severity - 1]
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode()), severity])
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        result = corruption(images[start:start + CHUNK], constants, rng)
        if result.dtype != np.uint8:  # [0, 1] floats; the reference's uint8 cast floors
            result = (np.clip(result, 0, 1) * 255).astype(np.uint8)
        out[start:start + CHUNK] = result
    return out


def corrupt_dataset(images: ImageSet, name: str, severity: int, seed: int = 0) -> ImageSet:
    """A new ImageSet with corrupted images, the same labels and a source naming the corruption."""
    return ImageSet(corrupt(images.x, name, severity, seed), images.y.copy(), list(images.classes),
                    f"{images.source}+{name}@{severity}")


def _check_arguments(images, name, severity, seed) -> None:
    if name not in SEVERITY_CONSTANTS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array, got "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"images must be (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) RGB (the CIFAR-10-C constants "
                         f"are defined for 32x32 images), got shape {images.shape}")


# ----------------------------------------------------------------------------- linear-filter helpers
def _fold(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map out-of-range integer indices into 0..n-1 the way a border mode extends the signal."""
    if mode == "nearest":  # ... 0 0 | 0 1 2 (OpenCV BORDER_REPLICATE)
        return np.clip(index, 0, n - 1)
    if mode == "reflect":  # ... 1 0 | 0 1 2 (scipy/skimage 'reflect', OpenCV BORDER_REFLECT)
        m = np.mod(index, 2 * n)
        return np.where(m >= n, 2 * n - 1 - m, m)
    if mode == "mirror":  # ... 2 1 | 0 1 2 (scipy 'mirror', OpenCV BORDER_REFLECT_101)
        m = np.mod(index, 2 * n - 2)
        return np.where(m >= n, 2 * n - 2 - m, m)
    raise ValueError(mode)


@functools.lru_cache(maxsize=None)
def _gaussian_matrix(n: int, sigma: float, mode: str, truncate: float) -> np.ndarray:
    """(n, n) matrix of a 1-D Gaussian filter with a border mode (scipy.ndimage.gaussian_filter1d)."""
    if sigma <= 1e-15:  # scipy skips such axes
        return np.eye(n)
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * offsets ** 2 / sigma ** 2)
    matrix = np.zeros((n, n))
    rows = np.arange(n)
    for offset, weight in zip(offsets, weights / weights.sum()):
        matrix[rows, _fold(rows + offset, n, mode)] += weight
    return matrix


@functools.lru_cache(maxsize=None)
def _clipped_zoom_matrix(n: int, factor: float) -> np.ndarray:
    """(n, n) matrix of the reference's clipped_zoom along one axis: centre crop of ceil(n / factor)
    pixels, scipy.ndimage.zoom(order=1) by ``factor`` (corner-aligned grid), centre trim back to n."""
    crop = int(np.ceil(n / factor))
    top = (n - crop) // 2
    zoomed = int(round(crop * factor))
    coords = np.arange(zoomed) * ((crop - 1) / (zoomed - 1) if zoomed > 1 else 1.0)
    trim = (zoomed - n) // 2
    coords = coords[trim:trim + n]
    low = np.floor(coords).astype(int)
    frac = coords - low
    matrix = np.zeros((n, n))
    rows = np.arange(n)
    matrix[rows, top + np.clip(low, 0, crop - 1)] += 1 - frac
    matrix[rows, top + np.clip(low + 1, 0, crop - 1)] += frac
    return matrix


def _separable(x: np.ndarray, along_rows: np.ndarray, along_cols: np.ndarray | None = None) -> np.ndarray:
    """Apply (H, H) and (W, W) linear maps to the rows and columns of (N, H, W, C) images."""
    along_cols = along_rows if along_cols is None else along_cols
    planes = np.matmul(along_rows, x.transpose(0, 3, 1, 2)) @ along_cols.T
    return planes.transpose(0, 2, 3, 1)


def _bilinear(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Sample (N, H, W, C) images at float (N, H', W') positions, bilinearly, borders folded by ``mode``."""
    n, height, width = x.shape[:3]
    batch = np.arange(n)[:, None, None]
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    ra, rb = _fold(r0, height, mode), _fold(r0 + 1, height, mode)
    ca, cb = _fold(c0, width, mode), _fold(c0 + 1, width, mode)
    return ((1 - fr) * ((1 - fc) * x[batch, ra, ca] + fc * x[batch, ra, cb])
            + fr * ((1 - fc) * x[batch, rb, ca] + fc * x[batch, rb, cb]))


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage on (N, H, W, C) float images, one angle per image (see module doc)."""
    width = 2 * int(np.ceil(radius)) + 1
    taps = np.arange(width)
    weights = np.exp(-taps ** 2 / (2.0 * sigma ** 2))
    weights /= weights.sum()
    angle = np.deg2rad(np.asarray(angles_deg, dtype=float))[:, None]
    along_x, along_y = width * np.cos(angle), width * np.sin(angle)
    length = np.hypot(along_x, along_y)
    col_shift = np.ceil(taps * along_x / length - 0.5).astype(int)  # (N, width)
    row_shift = np.ceil(taps * along_y / length - 0.5).astype(int)
    n, height, wide = x.shape[:3]
    batch = np.arange(n)[:, None, None]
    rows, cols = np.arange(height)[None, :, None], np.arange(wide)[None, None, :]
    out = np.zeros_like(x, dtype=float)
    for i in range(width):
        r = np.clip(rows + row_shift[:, i, None, None], 0, height - 1)
        c = np.clip(cols + col_shift[:, i, None, None], 0, wide - 1)
        out += weights[i] * x[batch, r, c]
    return out


# ----------------------------------------------------------------------------- the corruptions
# Each takes a uint8 chunk, its severity's constants and the Generator; it returns floats in [0, 1]
# (clipped and floored by corrupt) or a finished uint8 array.
def _gaussian_noise(images, std, rng):
    x = images / 255.0
    return x + rng.normal(0.0, std, x.shape)


def _shot_noise(images, photons, rng):
    return rng.poisson(images / 255.0 * photons) / photons


def _impulse_noise(images, amount, rng):
    flipped = rng.random(images.shape) <= amount
    salt = rng.random(images.shape) <= 0.5
    return np.where(flipped, salt.astype(float), images / 255.0)


def _defocus_blur(images, constants, rng):
    radius, alias_sigma = constants
    span = np.arange(-8, 9)  # the reference's fixed 17x17 support for radii <= 8
    disk = (span[:, None] ** 2 + span[None, :] ** 2 <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    # antialias: OpenCV GaussianBlur, 3x3 kernel, BORDER_REFLECT_101
    offsets = np.array([-1.0, 0.0, 1.0])
    taps = np.exp(-offsets ** 2 / (2 * alias_sigma ** 2))
    blur = np.zeros((17, 17))
    for offset, weight in zip((-1, 0, 1), taps / taps.sum()):
        blur[np.arange(17), _fold(np.arange(17) + offset, 17, "mirror")] += weight
    kernel = (blur @ disk @ blur.T).astype(np.float32)
    # cv2.filter2D (a correlation) with BORDER_REFLECT_101, over the kernel's non-zero taps
    x = images / 255.0
    pad = 8
    index = _fold(np.arange(-pad, IMAGE_SIZE + pad), IMAGE_SIZE, "mirror")
    padded = x[:, index][:, :, index]
    out = np.zeros_like(x)
    for (i, j), weight in np.ndenumerate(kernel):
        if weight:
            out += float(weight) * padded[:, i:i + IMAGE_SIZE, j:j + IMAGE_SIZE]
    return out


def _glass_blur(images, constants, rng):
    sigma, max_shift, passes = constants
    if max_shift != 1:  # the gather below is exact only for the CIFAR shift range {-1, 0}
        raise NotImplementedError("glass_blur is implemented for a maximum shift of 1")
    blur = _gaussian_matrix(IMAGE_SIZE, sigma, "nearest", 4.0)  # skimage.filters.gaussian defaults
    x = (_separable(images / 255.0, blur) * 255).astype(np.uint8)
    inner = np.arange(max_shift + 1, IMAGE_SIZE - max_shift + 1)  # pixels the reference visits
    batch = np.arange(len(x))[:, None, None]
    for _ in range(passes):
        shift = rng.integers(-max_shift, max_shift, size=(len(x), len(inner), len(inner), 2))
        sources = x[batch, inner[None, :, None] + shift[..., 1], inner[None, None, :] + shift[..., 0]]
        x[:, inner[0]:inner[-1] + 1, inner[0]:inner[-1] + 1] = sources
    return _separable(x / 255.0, blur)


def _motion_blur_corruption(images, constants, rng):
    radius, sigma = constants
    angles = rng.uniform(-45, 45, len(images))
    return np.clip(np.rint(_motion_blur(images.astype(float), radius, sigma, angles)), 0, 255).astype(np.uint8)


def _zoom_blur(images, factors, rng):
    x = images / 255.0
    total = x.copy()
    for factor in factors:
        total += _separable(x, _clipped_zoom_matrix(IMAGE_SIZE, factor))
    return total / (len(factors) + 1)


def _snow(images, constants, rng):
    mean, std, zoom, threshold, radius, sigma, image_weight = constants
    x = images / 255.0
    n = len(x)
    zoom_matrix = _clipped_zoom_matrix(IMAGE_SIZE, zoom)
    flakes = zoom_matrix @ rng.normal(mean, std, (n, IMAGE_SIZE, IMAGE_SIZE)) @ zoom_matrix.T
    flakes[flakes < threshold] = 0
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8)  # the reference's 8-bit PNG
    angles = rng.uniform(-135, -45, n)
    flakes = np.rint(_motion_blur(flakes[..., None].astype(float), radius, sigma, angles)) / 255.0
    gray = x @ np.array([0.299, 0.587, 0.114])  # OpenCV RGB2GRAY
    x = image_weight * x + (1 - image_weight) * np.maximum(x, gray[..., None] * 1.5 + 0.5)
    return x + flakes + flakes[:, ::-1, ::-1]


@functools.lru_cache(maxsize=1)
def frost_textures() -> tuple[np.ndarray, ...]:
    """The reference's frost images (RGB, alpha dropped as cv2.imread does), resized by 0.2."""
    folder = os.environ.get("TDMR_FROST_DIR")
    if not folder:
        spec = importlib.util.find_spec("imagecorruptions")  # locates the files without importing it
        folder = spec and spec.submodule_search_locations and Path(spec.submodule_search_locations[0]) / "frost"
    paths = [Path(folder) / f for f in FROST_FILES] if folder else []
    if not paths or not all(p.is_file() for p in paths):
        raise FileNotFoundError(
            "frost needs the CIFAR-10-C frost texture images (frost1.png ... frost5.jpg): install the "
            "'imagecorruptions' package (only its image files are read) or set TDMR_FROST_DIR to a folder "
            f"holding them; looked in {folder or 'nowhere (package not installed)'}")
    textures = []
    for path in paths:
        full = np.asarray(Image.open(path).convert("RGB"))
        rows, cols = (int(np.rint(s / FROST_SCALE_STEP)) for s in full.shape[:2])
        start = FROST_SCALE_STEP // 2
        textures.append(full[start::FROST_SCALE_STEP, start::FROST_SCALE_STEP][:rows, :cols].copy())
    return tuple(textures)


def _frost(images, constants, rng):
    image_weight, frost_weight = constants
    textures = frost_textures()
    n = len(images)
    choice = rng.integers(len(textures), size=n)
    heights = np.array([t.shape[0] for t in textures])[choice]
    widths = np.array([t.shape[1] for t in textures])[choice]
    top = rng.integers(0, heights - IMAGE_SIZE)
    left = rng.integers(0, widths - IMAGE_SIZE)
    frost = np.empty(images.shape, dtype=float)
    span = np.arange(IMAGE_SIZE)
    for k, texture in enumerate(textures):
        idx = np.flatnonzero(choice == k)
        frost[idx] = texture[top[idx, None, None] + span[:, None], left[idx, None, None] + span[None, :]]
    return np.clip(image_weight * images + frost_weight * frost, 0, 255).astype(np.uint8)


def _plasma_fractal(n: int, size: int, decay: float, rng) -> np.ndarray:
    """(n, size, size) diamond-square height maps in [0, 1], as the reference's plasma_fractal."""
    maps = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def wibbled_mean(total):  # the reference scales uniform(-w, w) by w again
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        maps[:, half::step, half::step] = wibbled_mean(square)
        centres = maps[:, half::step, half::step]
        maps[:, ::step, half::step] = wibbled_mean(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2))
        maps[:, half::step, ::step] = wibbled_mean(
            centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1))
        step //= 2
        wibble /= decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def _fog(images, constants, rng):
    strength, decay = constants
    x = images / 255.0
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * _plasma_fractal(len(x), IMAGE_SIZE, decay, rng)[..., None]
    return x * peak / (peak + strength)


def _brightness(images, shift, rng):
    # HSV value + shift with hue and saturation kept == scaling RGB by v'/v (grey v' where v == 0)
    x = images / 255.0
    value = x.max(axis=-1, keepdims=True)
    new_value = np.minimum(value + shift, 1.0)
    return np.where(value > 0, x * new_value / np.maximum(value, 1e-12), new_value)


def _contrast(images, factor, rng):
    x = images / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * factor + means


def _elastic_transform(images, constants, rng):
    scale, smoothing, jitter = constants
    x = images / 255.0
    n = len(x)
    centre, half = IMAGE_SIZE // 2, IMAGE_SIZE // 3
    corners = np.array([[centre + half, centre + half], [centre + half, centre - half],
                        [centre - half, centre - half]], dtype=float)  # (x, y) points
    moved = corners + rng.uniform(-jitter, jitter, (n, 3, 2))
    # warpAffine maps corners -> moved, i.e. samples the source at the inverse map of each output pixel
    moved_h = np.concatenate([moved, np.ones((n, 3, 1))], axis=2)
    inverse = corners.T @ np.linalg.inv(moved_h.transpose(0, 2, 1))  # (n, 2, 3)
    ys, xs = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE].astype(float)
    src = inverse[:, :, :2] @ np.stack([xs.ravel(), ys.ravel()]) + inverse[:, :, 2:]
    src = np.floor(src * 32 + 0.5) / 32  # OpenCV's 1/32-pixel interpolation grid
    src = src.reshape(n, 2, IMAGE_SIZE, IMAGE_SIZE)
    warped = _bilinear(x, src[:, 1], src[:, 0], "mirror")
    smooth = _gaussian_matrix(IMAGE_SIZE, smoothing, "reflect", 3.0)
    dx = smooth @ rng.uniform(-1, 1, (n, IMAGE_SIZE, IMAGE_SIZE)) @ smooth.T * scale
    dy = smooth @ rng.uniform(-1, 1, (n, IMAGE_SIZE, IMAGE_SIZE)) @ smooth.T * scale
    return _bilinear(warped, ys + dy, xs + dx, "reflect")  # scipy map_coordinates(order=1, 'reflect')


def _pixelate(images, factor, rng):
    small = int(IMAGE_SIZE * factor)
    out = np.empty_like(images)
    for i, image in enumerate(images):  # Pillow's uint8 box resampling, exactly as the reference
        resized = Image.fromarray(image).resize((small, small), Image.BOX)
        out[i] = np.asarray(resized.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))
    return out


def _jpeg_compression(images, quality, rng):
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


_CORRUPTION_FUNCTIONS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness,
    "contrast": _contrast, "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
assert tuple(_CORRUPTION_FUNCTIONS) == CORRUPTIONS == tuple(SEVERITY_CONSTANTS)
