"""Decode any image file into the model's input: RGB, shorter side resized, centre-cropped square.

Photos of any size and format are accepted (JPEG, PNG, GIF, WebP, TIFF, BMP, ...). EXIF rotation is
applied, palette and transparent images are composited on white, 16-bit and CMYK images converted.
Decompression bombs are refused rather than decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

# Refuse images above 64 megapixels: bigger ones are almost always hostile or broken.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """A file that is not a usable image; the message is the reason recorded in the rejects."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str


def open_image(data: bytes) -> Image.Image:
    """Open the image file ``data`` lazily (PIL reads the header; pixels are decoded on first use).

    Raises ImageError for an empty file, one PIL cannot identify, or a decompression bomb (over
    ``MAX_PIXELS`` pixels), so no caller decodes a hostile image.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(
                    f"image of {img.width}x{img.height} pixels exceeds the {MAX_PIXELS:,}-pixel limit "
                    "(decompression bomb?)"
                )
            return img
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from exc
    except Exception as exc:  # PIL raises many types for garbage input
        raise ImageError(f"not a readable image ({type(exc).__name__}: {exc})") from exc


def probe(data: bytes) -> ImageInfo:
    """Decode ``data`` once and return its size, format and mode; raise ImageError if unusable.

    Every byte of the image data goes through the decoder, so truncated or undecodable files are
    refused here rather than when scoring. JPEGs are decoded at 1/8 scale in greyscale
    (``draft``): libjpeg still reads and entropy-decodes the whole stream, which is what detects
    truncation, but skips most of the inverse DCT and the colour conversion.

    Parameters
    ----------
    data
        The file's bytes.

    Returns
    -------
    ImageInfo
        Full-size width and height, PIL's format name and the file's own mode.
    """
    img = open_image(data)
    fmt = img.format or "unknown"
    (width, height), mode = img.size, img.mode  # draft() changes both: record the file's own
    try:
        if isinstance(img, JpegImagePlugin.JpegImageFile):
            img.draft("L", (max(1, width // 8), max(1, height // 8)))
        img.load()
    except Exception as exc:
        raise ImageError(f"corrupt or truncated {fmt} image ({type(exc).__name__}: {exc})") from exc
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    return ImageInfo(width=width, height=height, format=fmt, mode=mode)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_for_model(data: bytes, size: int) -> np.ndarray:
    """Decode ``data`` to a ``(size, size, 3)`` uint8 array: shorter side to ``size``, centre crop.

    Raises ImageError with the reason if the bytes are not a usable image.
    """
    img = open_image(data)
    try:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # let libjpeg decode big photos at a reduced scale
        img = ImageOps.exif_transpose(img)
        img.seek(0) if getattr(img, "is_animated", False) else None
        img = to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)
