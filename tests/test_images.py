import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lsun_hitl.images import DEFAULT_MAX_PIXELS, ImageError, load_for_model, probe


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
        (b"hello, I am text with a .png name", "not a readable image: Pillow does not recognise its format"),
        (encode(RGB, "PNG")[:60], "(?i)truncated|not a readable"),
        (encode(RGB, "JPEG")[:300], "(?i)truncated|corrupt"),
    ],
    ids=["zero-bytes", "text", "truncated-png", "truncated-jpeg"],
)
def test_bad_files_raise_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason) as caught:
        probe(data)
    # a sentence, not Python's words: no "<_io.BytesIO object at 0x...>", no "OSError: ..." prefix
    assert " at 0x" not in str(caught.value) and "<_io" not in str(caught.value)
    assert "Error:" not in str(caught.value)


def test_decompression_bomb_is_refused_without_decoding():
    # A PNG header claiming 20000 x 20000 pixels.
    big = Image.new("1", (20000, 20000))
    data = encode(big, "PNG")
    with pytest.raises(ImageError, match="bomb") as caught:
        probe(data)
    assert "400,000,000 pixels" in str(caught.value) and "max_image_pixels" in str(caught.value)


def test_the_pixel_limit_is_each_decodes_own():
    """The limit is an argument of every decode, not only Pillow's process-wide setting: a lower one refuses
    what the default accepts, naming the limit and the setting; a higher one lets a 144-megapixel scan in
    (over Pillow's own default of ~89 megapixels), and the model input is made from it."""
    small = encode(RGB, "PNG")  # 60 x 40 = 2,400 pixels
    with pytest.raises(
        ImageError, match=r"60x40 = 2,400 pixels is over the pixel limit of 1,000 \(setting max_image_pixels"
    ):
        probe(small, max_pixels=1000)
    with pytest.raises(ImageError, match="max_image_pixels"):
        load_for_model(small, 32, max_pixels=1000)
    assert probe(small).width == 60

    scan = Image.new("L", (12000, 12000), 200)
    scan.paste(20, (0, 0, 6000, 12000))  # a dark left half
    data = encode(scan, "JPEG", quality=50)
    del scan
    assert len(data) < 3_000_000  # a small file for 144 megapixels
    with pytest.raises(ImageError, match=r"144,000,000 pixels is over the pixel limit of 64,000,000") as caught:
        probe(data)
    assert "--max-image-pixels" in str(caught.value) and DEFAULT_MAX_PIXELS == 64_000_000
    info = probe(data, max_pixels=150_000_000)
    assert (info.width, info.height) == (12000, 12000)
    arr = load_for_model(data, 32, max_pixels=150_000_000)
    assert arr[:, :12].mean() < 60 and arr[:, -12:].mean() > 150  # the scan itself, dark half on the left


@pytest.mark.parametrize("size", [(100_000, 1), (1, 100_000), (65_000, 3)], ids=["wide", "tall", "wide-jpeg"])
def test_very_wide_or_tall_images_become_model_input_without_a_giant_intermediate(size, tmp_path):
    """Only the source region the centre crop keeps is resized: a 100000x1 strip at 64 px would otherwise be
    resized to 6,400,000x64 first (1.2 GB of RGB). Decoded in a fresh process, whose peak memory is measured."""
    strip = Image.new("RGB", size, (250, 10, 10))
    path = tmp_path / "strip"
    path.write_bytes(encode(strip, "JPEG" if size == (65_000, 3) else "PNG"))
    # VmHWM is the new process's own peak (ru_maxrss would include this process's, inherited across exec)
    code = (
        "import sys; from lsun_hitl.images import load_for_model, probe; from lsun_hitl.steps import peak_rss_mb\n"
        "data = open(sys.argv[1], 'rb').read(); assert probe(data).width == int(sys.argv[2])\n"
        "arr = load_for_model(data, 64); assert arr.shape == (64, 64, 3)\n"
        "assert arr[..., 0].min() > 200 and arr[..., 1].max() < 60, arr.mean((0, 1))\n"
        "print(int(peak_rss_mb()))"
    )
    run = subprocess.run([sys.executable, "-c", code, str(path), str(size[0])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout) < 400, f"peak {run.stdout.strip()} MB decoding a {size[0]}x{size[1]} image"


def test_the_centre_crop_keeps_the_middle_of_a_long_image():
    img = Image.new("RGB", (90, 30), "black")
    img.paste((255, 255, 255), (30, 0, 60, 30))  # only the middle third is white
    arr = load_for_model(encode(img, "PNG"), 30)
    assert arr.min() > 200
