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
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..model import to_2tuple

# the file suffixes vitlab reads as images, everywhere: dataset folders and archives, predict, embed
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                              ".pbm"})

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


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


def resize_to(image: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    target_h, target_w = image_size
    if image.size == (target_w, target_h):
        return image
    w, h = image.size
    scale = max(target_w / w, target_h / h)
    scaled_w, scaled_h = max(target_w, round(w * scale)), max(target_h, round(h * scale))
    image = image.resize((scaled_w, scaled_h), Image.Resampling.BICUBIC)
    left, top = (scaled_w - target_w) // 2, (scaled_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


def to_uint8_array(image: Image.Image, image_size: tuple[int, int], channels: int) -> np.ndarray:
    """uint8 (C, H, W) numpy array of an opened PIL image after the conversion and resize rule."""
    image = resize_to(convert_mode(image, channels), image_size)
    array = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_opened(image: Image.Image, name: str) -> Image.Image:
    """Decodes an opened image fully (so truncated files fail here, not later); ValueError names the file."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {name}: {error}") from None
    return image


def open_image(data: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's own message names its in-memory buffer, which tells the user nothing
        raise ValueError(f"cannot read image {name}: not an image format PIL recognises") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {name}: {error}") from None
    return decode_opened(image, name)


def load_image(image: str | Path | Image.Image, image_size: int | tuple[int, int], channels: int) -> torch.Tensor:
    """uint8 (C, H, W) tensor of a file or PIL image, converted exactly as dataset images are."""
    if isinstance(image, Image.Image):
        pil = image
    else:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        pil = open_image(path.read_bytes(), str(path))
    return torch.from_numpy(to_uint8_array(pil, to_2tuple(image_size), channels).copy())
