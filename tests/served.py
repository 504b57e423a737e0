"""What the serving tests send and expect, shared by the native (integration) and Docker (e2e) tests."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """An image as the bytes of a file of format `fmt` (Pillow's save options)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour gradients with some structure: compresses like a photo (a few hundred KB as JPEG)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = [128 + 100 * np.sin(x / (width / 18)) * np.cos(y / (height / 20)), 128 + 100 * np.sin(x / (width / 33) + 1),
             128 + 100 * np.cos(y / (height / 18))]
    image = Image.fromarray(np.dstack(bands).astype(np.uint8), "RGB")
    if mode in ("RGBA", "LA"):
        image.putalpha(Image.fromarray((255 * x / width).astype(np.uint8), "L"))
        return image.convert(mode)
    return image.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)


def png(array: np.ndarray) -> bytes:
    return encode(Image.fromarray(array))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def holds_an_invalid_escape(body: bytes) -> bool:
    """A '%' not followed by two hex digits. A stock TorchServe parses an application/x-www-form-urlencoded
    body as a form, and answers 500 when Netty's form decoder reaches such a '%'."""
    return re.search(rb"%(?![0-9A-Fa-f]{2})", body) is not None


ZERO_WIDTH_PNG = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 0, 0, 0, 0))
                  + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))


def assert_matches_eager(body: dict, expected: np.ndarray, class_names: list[str]) -> None:
    assert list(body["probabilities"]) == class_names  # every class, in class order
    served = np.array(list(body["probabilities"].values()))
    assert abs(served.sum() - 1) <= 1e-5
    assert body["index"] == int(expected.argmax()) and body["label"] == class_names[body["index"]]
    assert np.abs(served - expected).max() <= 1e-4


BAD_INPUTS = {
    "empty body": (b"", "application/octet-stream", 400, "empty"),
    "not an image": (b"%PDF-1.4 definitely not a picture", "application/octet-stream", 400, "not an image"),
    "truncated image": (png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))[:300],
                        "image/png", 400, "truncated or corrupt"),
    "zero-sized image": (ZERO_WIDTH_PNG, "image/png", 400, ""),
    "decompression bomb": (png(np.zeros((6000, 6000), dtype=np.uint8)), "image/png", 413, "exceeds the limit"),
    "invalid base64": (b'{"data": "not base64 at all!"}', "application/json", 400, "base64"),
    "JSON of the wrong shape": (b'{"image": [1, 2, 3]}', "application/json", 400, '{"data"'),
    "JSON list": (b"[1, 2, 3]", "application/json", 400, '{"data"'),
    "text body": (b"hello", "text/plain", 400, "text"),
}
