"""Request decoding (serve/codec.py, no Ray): bytes a client controls end in a 4xx naming the problem."""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serve.codec import BadRequest, decode_request


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with_text_bomb() -> bytes:
    """A valid 32x32 PNG followed by a zTXt chunk that inflates to 2 MiB (Pillow raises ValueError)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    end = png.rindex(b"IEND") - 4
    return png[:end] + _chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * (2 << 20))) + png[end:]


def _decode(body: bytes):
    return decode_request(body, input_size=32, channels=3, max_images=8)


@pytest.mark.parametrize("body, says", [
    (b"[" * 100_000, "RecursionError"),  # nesting deeper than the parser's recursion
    (b'{"array": "", "shape": [' + b"9" * 5000 + b', 32, 32, 3]}', "digits"),  # an int past Python's limit
    (b"\xff\xfe{", "not valid JSON"),
])
def test_unparseable_bodies_are_400_naming_the_cause(body, says):
    with pytest.raises(BadRequest) as exc:
        _decode(body)
    assert exc.value.status == 400 and "not valid JSON" in str(exc.value) and says in str(exc.value)


def test_a_corrupt_png_that_pillow_rejects_with_valueerror_is_400():
    body = json.dumps({"images": [base64.b64encode(_png_with_text_bomb()).decode()]}).encode()
    with pytest.raises(BadRequest) as exc:
        _decode(body)
    assert exc.value.status == 400 and "images[0] cannot be decoded" in str(exc.value)


def test_a_good_png_still_decodes():
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(buf, format="PNG")
    x = _decode(json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode())
    assert x.shape == (1, 32, 32, 3) and x.dtype == np.uint8 and int(x.max()) == 7
