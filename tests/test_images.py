import io

import numpy as np
import pytest
from PIL import Image

from lsun_hitl.images import ImageError, load_for_model, probe


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "data",
    [
        encode(RGB, "JPEG"),
        encode(RGB.convert("L"), "PNG"),
        encode(RGB.convert("RGBA"), "PNG"),
        encode(RGB.convert("P"), "PNG", transparency=0),
        encode(RGB.convert("CMYK"), "JPEG"),
        encode(Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 20).astype(np.uint16)), "PNG"),
        encode(RGB, "WEBP"),
        encode(RGB, "TIFF"),
        encode(RGB, "GIF"),
        encode(RGB.resize((1, 1)), "PNG"),
    ],
    ids=["jpeg", "grey-png", "rgba-png", "palette-transparent", "cmyk-jpeg", "16bit-png", "webp", "tiff", "gif", "1x1"],
)
def test_any_format_becomes_a_square_rgb_array(data):
    info = probe(data)
    assert info.width >= 1
    arr = load_for_model(data, 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (80, 40), "white")
    img.paste((0, 0, 0), (0, 0, 40, 40))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    arr = load_for_model(encode(img, "JPEG", exif=exif.tobytes()), 40)
    # after rotation the black half is on top
    assert arr[:10].mean() < 60 and arr[-10:].mean() > 200


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, I am text with a .png name", "not a readable image"),
        (encode(RGB, "PNG")[:60], "(?i)truncated|not a readable"),
        (encode(RGB, "JPEG")[:300], "(?i)truncated|corrupt"),
    ],
    ids=["zero-bytes", "text", "truncated-png", "truncated-jpeg"],
)
def test_bad_files_raise_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        probe(data)


def test_decompression_bomb_is_refused_without_decoding():
    # A PNG header claiming 20000 x 20000 pixels.
    big = Image.new("1", (20000, 20000))
    data = encode(big, "PNG")
    with pytest.raises(ImageError, match="exceeds|bomb"):
        probe(data)
