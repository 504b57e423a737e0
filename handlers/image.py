"""Image bytes -> the model's input tensor: decode, orient, convert, resize, scale, normalize.

Plain Pillow and NumPy, no TorchServe: the same functions run inside a .mar, in unit tests and
in training's `folder:` loader, so serving sees exactly the pixels training saw.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


class BadImage(ValueError):
    """Input that is not an image this model can take. `status` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode any image Pillow reads (first frame of an animation), refusing bombs before decoding."""
    if not data:
        raise BadImage("empty request body: send the image bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own guard, far above any sane max_pixels
        raise BadImage(f"image exceeds the limit of {max_pixels} pixels", status=413) from None
    except Exception as error:  # Pillow raises many types for foreign bytes
        raise BadImage(f"not an image Pillow can read ({type(error).__name__})") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise BadImage(f"zero-sized image ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(
            f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels", status=413
        )
    try:
        image.load()
    except Exception as error:
        raise BadImage(f"truncated or corrupt image data ({error})") from None
    return image


def to_pixels(image: Image.Image, channels: int, height: int, width: int,
              background: tuple[int, int, int]) -> np.ndarray:
    """A decoded image -> uint8 array (channels, height, width), as the model was trained on.

    EXIF orientation is applied; transparency is composited onto `background` (an RGB triple
    from the spec); the size is changed with bilinear resampling, without keeping the aspect ratio.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale, don't clip
        grey = (np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        image = Image.alpha_composite(flat, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def normalize(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 (..., C, H, W) -> float32 ((x / 255) - mean) / std, the exact float32 ops training uses."""
    scaled = pixels.astype(np.float32) / np.float32(255)
    return (scaled - mean[:, None, None]) / std[:, None, None]
