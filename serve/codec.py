"""Request decoding and validation for the inference endpoint (no Ray here: unit-testable).

A ``POST /predict`` body is JSON, one of:
  ``{"images": ["<base64 PNG/JPEG>", ...]}``
  ``{"array": "<base64 raw bytes>", "shape": [N, H, W, C], "dtype": "uint8"}``
Every problem raises :class:`BadRequest` with the HTTP status and a message naming it.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math

import numpy as np


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _b64(value, what: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(400, f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(400, f"{what} is not valid base64 ({exc})") from None


def decode_request(body: bytes, input_size: int, channels: int, max_images: int) -> np.ndarray:
    """Body bytes -> uint8 images (N, H, W, C) of the model's input size."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, over-long ints, deep nesting
        raise BadRequest(400, f"body is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, "body must be a JSON object with 'images' or 'array'")
    if "images" in payload:
        items = payload["images"]
        if not isinstance(items, list) or not items:
            raise BadRequest(400, "'images' must be a non-empty list of base64-encoded PNG/JPEG images")
        if len(items) > max_images:
            raise BadRequest(413, f"{len(items)} images in one request; at most {max_images}")
        x = np.stack([_decode_image(_b64(v, f"images[{i}]"), i, channels, input_size)
                      for i, v in enumerate(items)])
    elif "array" in payload:
        x = _decode_array(payload, max_images, (input_size, input_size, channels))
    else:
        raise BadRequest(400, f"body needs 'images' or 'array'; got keys {sorted(payload)[:10]}")
    expected = (input_size, input_size, channels)
    if x.shape[1:] != expected:
        raise BadRequest(422, f"images must be {expected[0]}x{expected[1]} with {channels} channel(s) (H, W, C = "
                              f"{expected}), got {tuple(x.shape[1:])}")
    return x


def _decode_image(data: bytes, index: int, channels: int, input_size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.format not in ("PNG", "JPEG"):
                raise BadRequest(415, f"images[{index}] is {im.format}; send PNG or JPEG")
            # Checked before decoding: a small PNG can hold a huge canvas (a decompression bomb).
            if im.size != (input_size, input_size):
                raise BadRequest(422, f"images[{index}] is {im.size[0]}x{im.size[1]}; images must be "
                                      f"{input_size}x{input_size}")
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except BadRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError,
        # struct.error, zlib.error, DecompressionBombError ... on corrupt files: all of them are the client's bytes
        raise BadRequest(400, f"images[{index}] cannot be decoded as PNG/JPEG ({type(exc).__name__}: {exc})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def _decode_array(payload: dict, max_images: int, image_shape: tuple[int, int, int]) -> np.ndarray:
    shape, dtype = payload.get("shape"), payload.get("dtype", "uint8")
    if dtype != "uint8":
        raise BadRequest(422, f"dtype must be 'uint8' (pixels 0-255), got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise BadRequest(422, f"'shape' must be [N, H, W, C] of positive integers, got {shape!r}")
    if shape[0] > max_images:
        raise BadRequest(413, f"{shape[0]} images in one request; at most {max_images}")
    if tuple(shape[1:]) != tuple(image_shape):
        raise BadRequest(422, f"images must be {image_shape[0]}x{image_shape[1]} with {image_shape[2]} channel(s) "
                              f"(H, W, C = {tuple(image_shape)}), got {tuple(shape[1:])}")
    data = _b64(payload["array"], "'array'")
    needed = math.prod(shape)  # Python ints: no overflow, whatever the client sends
    if len(data) != needed:
        raise BadRequest(422, f"'array' holds {len(data)} bytes but shape {shape} needs {needed}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def encode_array(x: np.ndarray) -> dict:
    """The request body for uint8 NHWC images (what clients and the benchmark send)."""
    return {"array": base64.b64encode(np.ascontiguousarray(x, dtype=np.uint8).tobytes()).decode(),
            "shape": list(x.shape), "dtype": "uint8"}


def encode_predictions(probs, classes: list[str]) -> list[dict]:
    """Softmax rows -> the response's ``predictions`` list (class index, label, probabilities)."""
    rows = probs.tolist()
    out = []
    for row in rows:
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"class": best, "label": classes[best], "probabilities": [round(v, 6) for v in row]})
    return out
