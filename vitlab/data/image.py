"""One image -> uint8 (C, H, W): the mode conversion and resize rule applied to every dataset image,
and again at prediction time, so a model sees at inference exactly what it saw in training.

Rule (documented in README.md):
- Colour: with 3 channels every mode becomes RGB (grayscale is repeated, palettes are expanded);
  with 1 channel every mode becomes 8-bit luminance (ITU-R 601-2, PIL's "L"). Transparent pixels
  (RGBA, LA, palette with transparency) are composited onto black first, so what was invisible
  does not leak its hidden colour.
- Size: an image of another size is scaled, keeping its aspect ratio, until it covers the target
  (bicubic, antialiased), then centre-cropped to the target. Same aspect ratio -> a plain resize.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..model import to_2tuple
from .limits import describe_bytes, max_image_bytes, read_at_most

# the file suffixes vitlab reads as images, everywhere: dataset folders and archives, predict, embed
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                              ".pbm"})

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}

# The rule above as exported models carry it (vitlab.export writes it into every format's
# metadata), so code without vitlab can feed a model the pixels it was trained on.
PREPROCESSING_RULE = {
    "name": "vitlab-cover-crop-1",
    "colour": "16-bit images shifted right by 8 bits; transparent pixels composited onto black; then "
              "RGB (3 channels) or PIL 'L' luminance (1 channel)",
    "resize": "an image not already height x width is scaled keeping its aspect ratio to cover it "
              "(w, h = max(width, round(w * s)), max(height, round(h * s)) with s = max(width / w, "
              "height / h); PIL bicubic), then centre-cropped at ((w - width) // 2, (h - height) // 2)",
    "normalise": "channels first; pixel / 255, then (x - mean) / std per channel",
}


def _flatten_alpha(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image
    rgba = image.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba)


def convert_mode(image: Image.Image, channels: int) -> Image.Image:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's I -> L conversion clips at 255; 16-bit scans would turn white, so rescale instead.
        array = np.asarray(image, dtype=np.int64)
        image = Image.fromarray((array >> 8 if array.max() > 255 else array).clip(0, 255).astype(np.uint8))
    image = _flatten_alpha(image)
    return image.convert("RGB" if channels == 3 else "L")


def _scaled_size(size: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of an image of `size` scaled to cover the target, keeping its aspect ratio.

    A very elongated image is refused (ValueError): covering a 32x32 target, a 60,000,000 x 1 PNG
    (58 KB on disk) would scale to 1,920,000,000 x 32 pixels."""
    (w, h), (target_h, target_w) = size, image_size
    scale = max(target_w / w, target_h / h)
    scaled_w, scaled_h = max(target_w, round(w * scale)), max(target_h, round(h * scale))
    if scaled_w * scaled_h > max_pixels():
        raise ValueError(f"a {w}x{h} image is too elongated to resize to {target_w}x{target_h}: it would "
                         f"scale to {scaled_w:,}x{scaled_h:,} pixels first")
    return scaled_w, scaled_h


def max_pixels() -> float:
    """The most pixels vitlab decodes or scales one image to: PIL's own decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS, ~89 megapixels unless changed; None turns it off)."""
    return Image.MAX_IMAGE_PIXELS or float("inf")


def resize_to(image: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    target_h, target_w = image_size
    if image.size == (target_w, target_h):
        return image
    scaled_w, scaled_h = _scaled_size(image.size, image_size)
    image = image.resize((scaled_w, scaled_h), Image.Resampling.BICUBIC)
    left, top = (scaled_w - target_w) // 2, (scaled_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


def to_uint8_array(image: Image.Image, image_size: tuple[int, int], channels: int) -> np.ndarray:
    """uint8 (C, H, W) numpy array of an opened PIL image after the conversion and resize rule."""
    if image.size != (image_size[1], image_size[0]):
        _scaled_size(image.size, image_size)  # refuse an impossible resize before converting the image
    image = resize_to(convert_mode(image, channels), image_size)
    array = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def open_header(data: bytes, name: str) -> Image.Image:
    """Opens an image from its bytes, parsing only the header; ValueError names the file.

    Over max_pixels() is unreadable, not a warning: decoding it could take gigabytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by name
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's own message names its in-memory buffer, which tells the user nothing
        raise ValueError(f"cannot read image {name}: not an image format PIL recognises") from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a crafted header can fail in any way inside a plugin
        raise ValueError(f"cannot read image {name}: {error}") from None
    w, h = image.size
    if w < 1 or h < 1:
        image.close()
        raise ValueError(f"cannot read image {name}: its header says {w}x{h} pixels")
    if w * h > max_pixels():
        image.close()
        raise ValueError(f"cannot read image {name}: {w}x{h} is {w * h:,} pixels, more than the "
                         f"{max_pixels():,.0f} vitlab decodes (PIL.Image.MAX_IMAGE_PIXELS)")
    return image


def decode_opened(image: Image.Image, name: str) -> Image.Image:
    """Decodes an opened image fully (so truncated files fail here, not later); ValueError names the file."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - truncated or crafted data fails in many ways
        raise ValueError(f"cannot read image {name}: {error}") from None
    return image


def open_image(data: bytes, name: str) -> Image.Image:
    return decode_opened(open_header(data, name), name)


def load_image(image: str | Path | Image.Image, image_size: int | tuple[int, int], channels: int) -> torch.Tensor:
    """uint8 (C, H, W) tensor of a file or PIL image, converted exactly as dataset images are."""
    if isinstance(image, Image.Image):
        pil = image
    else:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        limit = max_image_bytes()
        with open(path, "rb") as f:
            data = read_at_most(f, limit)
        if data is None:
            raise ValueError(f"cannot read image {path}: larger than {describe_bytes(limit)} "
                             f"(VITLAB_MAX_IMAGE_MB raises the limit)")
        pil = open_image(data, str(path))
    size = to_2tuple(image_size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        array = to_uint8_array(pil, size, channels)
    except ValueError as error:  # too elongated to resize: name the file
        if isinstance(image, Image.Image):
            raise
        raise ValueError(f"cannot read image {image}: {error}") from None
    return torch.from_numpy(array.copy())
