"""Fetching the images of an export and encoding them as each format stores them.

Image files are checked against their content id before export: one that changed or vanished since
ingest is not converted, and the reason takes its place, so the export leaves it out and lists it. Images
are decoded under the pixel limit the pool was ingested under (``ingest.pool_reading``), and a resize
that would make an image over that limit (a 100000x1 strip at a shorter side of 256) is refused the same way.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
from fsspec.core import url_to_fs
from PIL import Image

from ..images import DEFAULT_MAX_PIXELS, SETTING, ImageError, decode_rgb
from ..ingest import image_id as content_id
from ..ingest import unreadable
from ..storage import Storage

# formats torchvision's ImageFolder opens, by PIL format name; anything else is re-encoded as PNG
JPEG_MAX_SIDE = 65_535  # the JPEG format's largest width or height
FOLDER_EXT = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "PPM": ".ppm"}


def fetch(uris: Sequence[str], image_ids: Sequence[str], storage_options: dict[str, Any]) -> list[bytes | str]:
    """The bytes of each image, or the reason it cannot be exported (unreadable, or changed since ingest:
    its content no longer matches its id). Reads run concurrently on object stores."""
    if not uris:
        return []
    fs, _ = url_to_fs(uris[0], **storage_options)
    paths = [url_to_fs(u, **storage_options)[1] for u in uris]
    got = fs.cat(paths, on_error="return")
    if not isinstance(got, dict):
        got = {paths[0]: got}
    out: list[bytes | str] = []
    for path, want in zip(paths, image_ids, strict=True):
        data = got.get(path)
        if isinstance(data, BaseException) or data is None:
            out.append(unreadable(data))
        elif content_id(data) != want:
            out.append("the file changed since ingest (its content no longer matches its image id)")
        else:
            out.append(data)
    return out


def resize_short_side(img: Image.Image, short_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Scale so the shorter side is ``short_side`` pixels (up or down), keeping the aspect ratio.

    ImageError when the result would be over ``max_pixels`` (an elongated image: 100000x1 at 256 would be
    25,600,000x256), refused before any pixel of it is made."""
    w, h = img.size
    scale = short_side / min(w, h)
    size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
    if size == (w, h):
        return img
    if size[0] * size[1] > max_pixels:
        raise ImageError(
            f"too elongated to export at a shorter side of {short_side} pixels: this {w}x{h} image would become "
            f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, over the pixel limit of {max_pixels:,} (setting "
            f"{SETTING}); export it at its own size (imagefolder without --short-side) or crop it first"
        )
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0 if scale < 1 else None)


def _jpeg_fits(img: Image.Image) -> Image.Image:
    if max(img.size) > JPEG_MAX_SIDE:
        raise ImageError(
            f"a {img.width}x{img.height} image cannot be stored as a JPEG, whose sides are at most "
            f"{JPEG_MAX_SIDE:,} pixels"
        )
    return img


def lsun_jpeg(data: bytes, short_side: int = 256, quality: int = 75, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """An image as LSUN released it: RGB JPEG, quality 75, shorter side 256 pixels; ``max_pixels`` is the pool's
    pixel limit."""
    img = _jpeg_fits(resize_short_side(decode_rgb(data, max_pixels), short_side, max_pixels))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def folder_file(
    data: bytes, fmt: str | None, short_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, str]:
    """Bytes and file extension for an ImageFolder tree: the original file when torchvision opens its
    format and no resizing is asked, else re-encoded (JPEG sources as JPEG quality 90, others PNG);
    ``max_pixels`` is the pool's pixel limit."""
    if short_side is None and fmt in FOLDER_EXT:
        return data, FOLDER_EXT[fmt]
    img = decode_rgb(data, max_pixels)
    if short_side is not None:
        img = resize_short_side(img, short_side, max_pixels)
    buf = io.BytesIO()
    if fmt == "JPEG":
        _jpeg_fits(img).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), ".jpg"
    img.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def convert_images(
    table: pa.Table, storage: Storage, convert: Callable[[bytes, str | None], Any], threads: int
) -> list[Any | str]:
    """``convert(bytes, format)`` over the images of ``table`` (columns uri, image_id, format), in
    ``threads`` threads; a str result is the reason that image is left out."""
    blobs = fetch(table.column("uri").to_pylist(), table.column("image_id").to_pylist(), storage.options)

    def one(item: tuple[bytes | str, str | None]) -> Any:
        data, fmt = item
        if isinstance(data, str):
            return data
        try:
            return convert(data, fmt)
        except ImageError as exc:
            return f"not exportable: {exc}"

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, zip(blobs, table.column("format").to_pylist(), strict=True)))


def left_out(uris: Sequence[str], converted: Sequence[Any]) -> list[tuple[str, str]]:
    """``(uri, reason)`` of each image ``convert_images`` left out, in order."""
    return [(u, c) for u, c in zip(uris, converted, strict=True) if isinstance(c, str)]
