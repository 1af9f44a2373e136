"""Decode any image file into the model's input: RGB, shorter side resized, centre-cropped square.

Photos of any size and format are accepted (JPEG, PNG, GIF, WebP, TIFF, BMP, ...). EXIF rotation is
applied, palette and transparent images are composited on white, 16-bit and CMYK images converted; an
animation or a multi-page file gives its first frame. Decompression bombs are refused rather than decoded:
an image of more than ``max_pixels`` pixels (the pool's ``max_image_pixels`` setting, 64 megapixels by
default) is refused from its header, before any pixel is decoded.

Every refusal is an ImageError whose message is the reason recorded in the rejects (or the scores' and
exports' errors): a sentence naming the problem, never a Python object's repr.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .storage import POOL, Storage

# Refuse images above 64 megapixels unless the pool allows more (``IngestParams.max_image_pixels``): bigger ones
# are mostly hostile or broken, and a genuine large scan can be let in by raising the setting.
DEFAULT_MAX_PIXELS = 64_000_000
SETTING = "max_image_pixels"
FIX = "if it is a genuine image, ingest again with a higher limit (lsun-hitl ingest --max-image-pixels N)"
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>" in PIL's messages
_PILLOW_COUNT = re.compile(r"\((\d+) pixels\)")  # Pillow's DecompressionBomb message: "Image size (N pixels) ..."


class ImageError(ValueError):
    """A file that is not a usable image; the message is the reason recorded in the rejects."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str


def over_limit(pixels: int, max_pixels: int, size: tuple[int, int] | None = None) -> ImageError:
    """The refusal of an image of ``pixels`` pixels (``size`` when known) over ``max_pixels``, naming the
    setting and how to raise it."""
    what = f"{size[0]}x{size[1]} = {pixels:,} pixels" if size else f"{pixels:,} pixels"
    return ImageError(
        f"image of {what} is over the pixel limit of {max_pixels:,} (setting {SETTING}, a guard against "
        f"decompression bombs); {FIX}"
    )


def cause(exc: BaseException) -> str:
    """What a decoder's exception says went wrong, as a phrase: its message without object reprs, or its
    type's name when it has no message."""
    text = " ".join(_OBJECT_REPR.sub("", str(exc)).split()).rstrip(".: ")
    if "MAX_TEXT_CHUNK" in text or "MAX_TEXT_MEMORY" in text:
        return (
            "its text metadata is larger than Pillow reads safely (a PNG text chunk over "
            "PngImagePlugin.MAX_TEXT_CHUNK or MAX_TEXT_MEMORY)"
        )
    if not text:
        return f"the decoder failed ({type(exc).__name__})"
    return text[0].lower() + text[1:]


@contextmanager
def bomb_guard(max_pixels: int, warn: Literal["error", "ignore"] = "error") -> Iterator[None]:
    """Pillow's own decompression-bomb checks (at open, and on frames, tiles and embedded images while
    decoding) no lower than ``max_pixels``, and their warnings raised as errors (``warn``: a ``warnings``
    action), for the code in the block.

    Pillow's limit is one global per process: it is raised to ``max_pixels`` where it is lower (so Pillow does
    not refuse what the setting allows: a 144-megapixel scan is over Pillow's default of ~89 megapixels) and
    never lowered, as other threads may be decoding under a higher limit; the exact limit is the explicit size
    check each decode makes. Runs in whichever process decodes (a Dask worker included). ``catch_warnings`` is
    process-wide too: threads decoding at once may leave either action in place for this one warning, and
    either way an image over the limit is refused by those explicit checks."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter(warn, Image.DecompressionBombWarning)
        yield


def _bomb(exc: BaseException, max_pixels: int) -> ImageError:
    """Pillow's decompression-bomb refusal (a warning raised as an error, or its error) in this module's words."""
    found = _PILLOW_COUNT.search(str(exc))
    if found:
        return over_limit(int(found.group(1)), max_pixels)
    return ImageError(f"image is over the pixel limit of {max_pixels:,} (setting {SETTING}); {FIX}")


def _check_size(img: Image.Image, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise over_limit(img.width * img.height, max_pixels, img.size)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open the image file ``data`` lazily (PIL reads the header; pixels are decoded on first use).

    Raises ImageError for an empty file, one PIL cannot identify, or a decompression bomb (over
    ``max_pixels`` pixels), so no caller decodes a hostile image. Decode it inside ``bomb_guard(max_pixels)``.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        # Pillow's warning (over its limit, under twice it) is ignored here: the check below refuses the image
        # with its width and height, which Pillow's message lacks
        with bomb_guard(max_pixels, "ignore"):
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            "not a readable image: Pillow does not recognise its format (not an image file, or one it cannot decode)"
        ) from exc
    except Exception as exc:  # PIL raises many types for garbage input
        raise ImageError(f"not a readable image: {cause(exc)}") from exc
    _check_size(img, max_pixels)
    return img


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode ``data`` once and return its size, format and mode; raise ImageError if unusable.

    Every byte of the image data goes through the decoder, so truncated or undecodable files are
    refused here rather than when scoring. JPEGs are decoded at 1/8 scale in greyscale
    (``draft``): libjpeg still reads and entropy-decodes the whole stream, which is what detects
    truncation, but skips most of the inverse DCT and the colour conversion. Only the first frame of an
    animation or multi-page file is decoded (the one the model sees), however many there are.

    Parameters
    ----------
    data
        The file's bytes.
    max_pixels
        The pool's pixel limit (``max_image_pixels``): a larger image is refused, undecoded.

    Returns
    -------
    ImageInfo
        Full-size width and height, PIL's format name and the file's own mode.
    """
    img = open_image(data, max_pixels)
    fmt = img.format or "unknown"
    (width, height), mode = img.size, img.mode  # draft() changes both: record the file's own
    try:
        with bomb_guard(max_pixels):
            if isinstance(img, JpegImagePlugin.JpegImageFile):
                img.draft("L", (max(1, width // 8), max(1, height // 8)))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, max_pixels) from exc
    except Exception as exc:
        raise ImageError(f"corrupt or truncated {fmt} image: {cause(exc)}") from exc
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if not isinstance(img, JpegImagePlugin.JpegImageFile):
        _check_size(img, max_pixels)  # an icon's embedded PNG may be larger than its directory said
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


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None) -> Image.Image:
    """The image in ``data`` as RGB, upright (EXIF rotation applied), the first frame of an animation or a
    multi-page file; ImageError with the reason if it is not a usable image.

    ``draft`` lets libjpeg decode a JPEG at a reduced scale no smaller than that size (what the model needs).
    """
    img = open_image(data, max_pixels)
    try:
        with bomb_guard(max_pixels):
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img = ImageOps.exif_transpose(img)  # an upright copy of the current frame: a fresh image's first
            img = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, max_pixels) from exc
    except Exception as exc:
        raise ImageError(f"corrupt or truncated image: {cause(exc)}") from exc
    _check_size(img, max_pixels)
    return img


def load_for_model(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to a ``(size, size, 3)`` uint8 array: shorter side to ``size``, centre crop.

    Only the source region the crop keeps is resampled (``resize``'s ``box``), with the same scale and filter as
    resizing the whole image and cropping but without the whole resized image in between, which for a 100000x1
    strip would be 6.4 million pixels wide at 64 (1.2 GB). The pixels are those of resizing then cropping for a
    square image; for another, Pillow's reducing step aligns its blocks to the region rather than to the image,
    which can move a value by a few levels. Raises ImageError with the reason if the bytes are not a usable
    image.
    """
    img = decode_rgb(data, max_pixels, draft=(size, size))
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


# -- what ingest records about a pool's files, and how every later step reads them again ------------------------

PIXEL_LIMIT_KEY = b"lsun_hitl.max_image_pixels"
ID_KEY = b"lsun_hitl.image_id"
CONTENT_ID = b"blake2b-128 of the file's bytes"


def image_id(data: bytes) -> str:
    """The content id of an image file: 32 hex digits of BLAKE2b-128 over its bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class PoolReading:
    """How the pool's images are read again after ingest (scoring, training, export), from what ingest recorded
    in the pool manifest's metadata.

    ``max_pixels`` is the pixel limit its images were accepted under (``IngestParams.max_image_pixels``);
    ``content_ids`` says its ids are ``image_id`` of each file's bytes, so a file that no longer hashes to its
    id changed since ingest. A pool written without them (an older root, a pool written by hand) or a root
    without a pool reads at the default limit, its ids unchecked."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    content_ids: bool = False


def pool_reading(storage: Storage) -> PoolReading:
    """What ingest recorded about the pool under ``storage`` (its manifest's footer only)."""
    path = storage.path(POOL)
    if not storage.exists(path):
        return PoolReading()
    with storage.fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    return PoolReading(int(meta.get(PIXEL_LIMIT_KEY, DEFAULT_MAX_PIXELS)), meta.get(ID_KEY) == CONTENT_ID)
