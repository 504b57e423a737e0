"""Image bytes -> uint8 pixels at the model's size (decode, orient, convert, resize), and `normalize`.

`open_image` + `to_pixels` take any image Pillow reads, stretched to the model's size or (`fit="crop"`)
resized by the shorter side and centre-cropped as torchvision's Resize + CenterCrop and timm's `crop_pct`
do (`crop_geometry`); `png_pixels_at_size` is the fast path for a plain PNG already at the model's size,
with exactly their pixels where no crop changes them. `normalize` is training's float32
arithmetic; the served path looks its values up in a table `normalize` computes (handlers/pipeline.py).
A refused image raises handlers.errors.ClientError with its HTTP status (400, or 413 when too large).
Plain Pillow and NumPy, no TorchServe: the same functions run inside a .mar, in unit tests and
in training's `folder:` loader, so serving sees exactly the pixels training saw.
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
from PIL import ExifTags, Image

from handlers.errors import ClientError

# Images much larger than the model's input are decoded (JPEG: in the DCT, at 1/2, 1/4 or 1/8 scale)
# or reduced (every other format: box averages, right after decoding) to no less than this many
# times the input's size per side before anything else touches them: a 24-megapixel photo for a
# 28x28 model then needs about 1/64 of the memory. The final bilinear resize does the rest.
KEEP_FACTOR = 4
# Memory a decode may take, at most about 4 bytes per allowed pixel (what Pillow holds for a full
# RGB decode): WebP decodes through several full-size RGBA copies (about 15 bytes per pixel), so
# it gets a quarter of the pixel limit. See README, Reliability.
WEBP_SHARE = 4


def open_image(data: bytes, max_pixels: int, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode any image Pillow reads (first frame of an animation), refusing bombs before decoding.

    With `size` (the model's width, height) a large JPEG is decoded at reduced scale (see KEEP_FACTOR).
    """
    if not data:
        raise ClientError("empty request body: send the image bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own guard, far above any sane max_pixels
        raise ClientError(f"image exceeds the limit of {max_pixels} pixels", status=413) from None
    except Exception as error:  # Pillow raises many types for foreign bytes
        raise ClientError(f"not an image Pillow can read ({type(error).__name__})") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ClientError(f"zero-sized image ({width}x{height})")
    if width * height > max_pixels:
        raise ClientError(
            f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels", status=413
        )
    if image.format == "WEBP" and width * height > max_pixels // WEBP_SHARE:
        raise ClientError(f"WebP image of {width}x{height} pixels exceeds the limit for WebP of "
                       f"{max_pixels // WEBP_SHARE} pixels (it decodes at full size, in several copies)", status=413)
    try:
        if size is not None and image.format == "JPEG":
            image.draft(image.mode, (size[0] * KEEP_FACTOR, size[1] * KEEP_FACTOR))
        image.load()
    except Exception as error:
        raise ClientError(f"truncated or corrupt image data ({error})") from None
    return image


# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose)
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
REDUCIBLE_MODES = ("L", "LA", "I", "F", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def reduce_early(image: Image.Image, height: int, width: int) -> tuple[Image.Image, tuple[float, ...] | None]:
    """A decoded image at least 2 x KEEP_FACTOR times the input's size per side, box-reduced to no less
    than KEEP_FACTOR times it, before any conversion multiplies its memory; and the region of the
    reduced image that the original covers (its last row and column may average fewer pixels), for
    the final resize. Palette and 16-bit images (which Pillow cannot reduce), images with a
    transparent colour (averaging would blur it) and images near the input's size are returned as
    they are, with no region."""
    factor = min(image.width // (width * KEEP_FACTOR), image.height // (height * KEEP_FACTOR))
    if factor < 2 or image.mode not in REDUCIBLE_MODES or "transparency" in image.info:
        return image, None
    region = (0.0, 0.0, image.width / factor, image.height / factor)
    if image.mode not in ("LA", "RGBA"):
        return image.reduce(factor), region
    # Pillow reduces these through a premultiplied copy of the whole image: go strip by strip
    # (at multiples of `factor`, so every box is the one a whole-image reduce would average).
    reduced = Image.new(image.mode, (-(-image.width // factor), -(-image.height // factor)))
    rows = factor * max(1, 4_000_000 // (4 * image.width * factor))  # strips of about 4 MB
    for top in range(0, image.height, rows):
        reduced.paste(image.crop((0, top, image.width, min(image.height, top + rows))).reduce(factor),
                      (0, top // factor))
    return reduced, region


def crop_geometry(image_width: int, image_height: int, height: int, width: int,
                  crop_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """The size an image is resized to, keeping its aspect ratio, and the top-left corner of the centre
    crop of (height, width) in it: ((resized width, resized height), (left, top)).

    As timm's eval transform: the resized image covers floor(height / crop_fraction) x
    floor(width / crop_fraction), the side that limits the scale exactly and the other truncated to
    an int (for a square model that is torchvision's Resize(shorter side)); the crop's offsets are
    torchvision CenterCrop's, int(round((resized - crop) / 2)).
    """
    box_height, box_width = math.floor(height / crop_fraction), math.floor(width / crop_fraction)
    if box_height * image_width >= box_width * image_height:  # the height limits the scale
        resized = (int(box_height * image_width / image_height), box_height)
    else:
        resized = (box_width, int(box_width * image_height / image_width))
    corner = (int(round((resized[0] - width) / 2.0)), int(round((resized[1] - height) / 2.0)))
    return resized, corner


# A crop's full resize is made (exactly torchvision's pixels) unless it would hold more than this many
# times the crop's pixels: an image of extreme aspect ratio (a 1 x 10,000 strip scales to 256 x
# 2,560,000) then has only the crop's window resized, with values within one level of the full resize.
CROP_MAX_STRETCH = 16


def crop_window(image: Image.Image, region: tuple[float, ...] | None, resized: tuple[int, int], left: int,
                top: int, height: int, width: int) -> tuple[float, float, float, float]:
    """The part of `image` (within `region`, where it is a reduced image) that the crop takes."""
    x0, y0, x1, y1 = region if region is not None else (0.0, 0.0, float(image.width), float(image.height))
    sx, sy = (x1 - x0) / resized[0], (y1 - y0) / resized[1]
    return (x0 + left * sx, y0 + top * sy, x0 + (left + width) * sx, y0 + (top + height) * sy)


def to_pixels(image: Image.Image, channels: int, height: int, width: int,
              background: tuple[int, int, int], fit: str = "stretch",
              crop_fraction: float | None = None) -> np.ndarray:
    """A decoded image -> uint8 array (channels, height, width), as the model was trained on.

    EXIF orientation is applied; transparency is composited onto `background` (an RGB triple
    from the spec); the size is changed with bilinear resampling (images far larger than the model's
    input are box-reduced first: `reduce_early`): with `fit="stretch"` to (height, width) without
    keeping the aspect ratio, with `fit="crop"` keeping it, by `crop_geometry`, then cropped to the
    centre (height, width). Each intermediate image is dropped as soon as the next exists.
    """
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in ORIENTATIONS:
        image = image.transpose(ORIENTATIONS[orientation])
    upright_size = image.size  # what a crop's geometry is computed from, before any reduction
    image, region = reduce_early(image, height, width)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale, don't clip
        grey = (np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (*background, 255)), image)
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    resized, left, top = (width, height), 0, 0
    if fit == "crop":
        resized, (left, top) = crop_geometry(*upright_size, height, width, crop_fraction)
        if resized[0] * resized[1] > CROP_MAX_STRETCH * width * height:  # a very long strip: only its centre
            region = crop_window(image, region, resized, left, top, height, width)
            resized, left, top = (width, height), 0, 0
    if image.size != resized or region is not None:
        image = image.resize(resized, Image.Resampling.BILINEAR, box=region)
    if image.size != (width, height):
        image = image.crop((left, top, left + width, top + height))
    pixels = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(height, width, channels)
    return pixels.transpose(2, 0, 1)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that cannot change the pixels the general path produces: Pillow applies no gamma, colour
# profile or resolution. Anything else (tRNS, PLTE, eXIf, text that may carry EXIF or XMP
# orientation, ...) takes the general path.
PNG_INERT_CHUNKS = frozenset({b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME"})
PNG_COLOUR_TYPES = {1: 0, 3: 2}  # model channels -> PNG colour type (grey, RGB)
PNG_MAX_CHUNKS = 16  # a plain small image has 3-8; more goes to the general path


def png_pixels_at_size(data: bytes, channels: int, height: int, width: int) -> np.ndarray | None:
    """The fast path for what clients of a small model mostly send: a plain 8-bit PNG already at the
    model's size and mode (grey or RGB, not interlaced, no transparency, palette or orientation).

    It skips Pillow's Python-level PNG parser (most of the decoding time at 28x28) but decodes the
    image data with Pillow's own decoder, so the pixels are exactly those of `to_pixels(open_image())`.
    Returns uint8 (channels, height, width), or None for anything else, including every damaged
    file, so that the general path answers it (and words its error) as before.
    """
    colour_type = PNG_COLOUR_TYPES.get(channels)
    # IHDR: this size, 8 bits, this colour type, compression 0, filter method 0, not interlaced
    header = struct.pack(">I4sIIBBBBB", 13, b"IHDR", width, height, 8, colour_type or 0, 0, 0, 0)
    if colour_type is None or not data.startswith(PNG_SIGNATURE + header):  # decided in the first 29 bytes
        return None
    chunks = []  # (kind, body) up to IEND, every CRC checked
    position = len(PNG_SIGNATURE)
    while not chunks or chunks[-1][0] != b"IEND":
        if position + 12 > len(data) or len(chunks) == PNG_MAX_CHUNKS:
            return None
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length
        body = data[position + 8:end - 4]
        if end > len(data) or zlib.crc32(body, zlib.crc32(kind)) != struct.unpack_from(">I", data, end - 4)[0]:
            return None
        chunks.append((kind, body))
        position = end
    kinds = [kind for kind, _ in chunks]
    first_data = kinds.index(b"IDAT") if b"IDAT" in kinds else len(kinds)
    # IHDR, inert chunks, one run of IDAT, IEND: the only layout this path takes.
    if (not set(kinds[1:first_data]) <= PNG_INERT_CHUNKS
            or set(kinds[first_data:-1]) != {b"IDAT"}):
        return None
    image_data = b"".join(body for _, body in chunks[first_data:-1])
    mode = "L" if channels == 1 else "RGB"
    try:
        image = Image.frombytes(mode, (width, height), image_data, "zip", mode, 0)
    except (ValueError, OSError):  # damaged image data: the general path says what is wrong
        return None
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(height, width, channels).transpose(2, 0, 1)


def normalize(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 (..., C, H, W) -> float32 ((x / 255) - mean) / std, the exact float32 ops training uses."""
    scaled = pixels.astype(np.float32) / np.float32(255)
    return (scaled - mean[:, None, None]) / std[:, None, None]
