"""Bad, odd and hostile image files, generated here: each is accepted (and normalized for the model) or
rejected with a reason in the rejects manifest, a sentence; ingest, scoring and export never crash, also when a
file is replaced or deleted between them."""

import functools
import io
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from cli import main as cli
from lsun_hitl import model as model_lib
from lsun_hitl.config import ModelParams
from lsun_hitl.export.encoding import convert_images, folder_file, left_out, lsun_jpeg
from lsun_hitl.ingest import build_pool, pool_reading, read_pool
from lsun_hitl.inputs import InputCache
from lsun_hitl.scoring import read_pool_images, score_candidates
from lsun_hitl.storage import REJECTS, Storage

RNG = np.random.default_rng(0)
PHOTO = Image.fromarray(RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("P", (30, 20), c) for c in (1, 50, 100)]
    return enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return enc(PHOTO, "JPEG", exif=exif.tobytes())


def transparent() -> Image.Image:
    img = PHOTO.convert("RGBA")
    img.putalpha(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))))
    return img


def bomb() -> bytes:
    return enc(Image.new("1", (20000, 20000)), "PNG")  # 400 MP claimed in a tiny file


def corrupt_middle() -> bytes:
    data = bytearray(enc(PHOTO.resize((256, 256)), "JPEG"))
    data[len(data) // 2 : len(data) // 2 + 400] = b"\x00" * 400
    return bytes(data)


# name -> (bytes, accepted?)  -- 28 kinds
CORPUS: dict[str, tuple[bytes, bool]] = {
    "plain.jpg": (enc(PHOTO, "JPEG"), True),
    "truncated.jpg": (enc(PHOTO, "JPEG")[:200], False),
    "truncated.png": (enc(PHOTO, "PNG")[:80], False),
    "zero-bytes.jpg": (b"", False),
    "text-pretending.png": (b"this is a text file, not an image\n" * 3, False),
    "html-pretending.jpg": (b"<html><body>404 Not Found</body></html>", False),
    "cmyk.jpg": (enc(PHOTO.convert("CMYK"), "JPEG"), True),
    "16bit.png": (enc(Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 13).astype(np.uint16)), "PNG"), True),
    "palette.png": (enc(PHOTO.convert("P"), "PNG"), True),
    "transparent.png": (enc(transparent(), "PNG"), True),
    "grey-alpha.png": (enc(PHOTO.convert("LA"), "PNG"), True),
    "palette-transparent.png": (enc(PHOTO.convert("P"), "PNG", transparency=3), True),
    "animated.gif": (animated_gif(), True),
    "exif-rotated.jpg": (exif_rotated(), True),
    "bomb.png": (bomb(), False),
    "one-pixel.png": (enc(PHOTO.resize((1, 1)), "PNG"), True),
    "grey.jpg": (enc(PHOTO.convert("L"), "JPEG"), True),
    "photo.webp": (enc(PHOTO, "WEBP"), True),
    "photo.tiff": (enc(PHOTO, "TIFF"), True),
    "float.tiff": (enc(Image.fromarray(RNG.random((20, 30)).astype(np.float32), "F"), "TIFF"), True),
    "photo.bmp": (enc(PHOTO, "BMP"), True),
    "progressive.jpg": (enc(PHOTO.resize((200, 150)), "JPEG", progressive=True), True),
    "panorama 1x900.png": (enc(PHOTO.resize((900, 1)), "PNG"), True),
    "unicode naïve 写真.png": (enc(PHOTO.rotate(90, expand=True), "PNG"), True),
    # zeros in the entropy-coded data decode to garbled pixels: libjpeg accepts it, and so do we
    "corrupt-middle.jpg": (corrupt_middle(), True),
    "corrupt-header.jpg": (enc(PHOTO, "JPEG")[:2] + b"\x00" * 60 + enc(PHOTO, "JPEG")[62:], False),
    "icon.ico": (enc(PHOTO.resize((32, 32)), "ICO"), True),
    "bilevel.png": (enc(PHOTO.convert("1"), "PNG"), True),
}
DUPLICATE = "same content, other name.jpg"  # plain.jpg again


def write_corpus(folder) -> None:
    folder.mkdir(parents=True)
    for name, (data, _) in CORPUS.items():
        (folder / name).write_bytes(data)
    (folder / DUPLICATE).write_bytes(CORPUS["plain.jpg"][0])


def test_every_odd_file_is_accepted_or_rejected_with_a_reason_and_scoring_never_crashes(tmp_path, dask_cluster):
    assert len(CORPUS) + 1 >= 20
    src = tmp_path / "incoming files"
    write_corpus(src)
    storage = Storage(str(tmp_path / "root"))
    report = build_pool(storage, str(src), client=dask_cluster, chunk_size=5)

    pool = read_pool(storage)
    rejects = pq.read_table(storage.path(REJECTS)).to_pylist()
    by_name = {os.path.basename(u): "pool" for u in pool.column("uri").to_pylist()}
    reasons = {os.path.basename(r["uri"]): r["reason"] for r in rejects}
    by_name |= {n: "rejected" for n in reasons}
    assert set(by_name) == set(CORPUS) | {DUPLICATE}, "every file is in the pool or the rejects, none lost"
    assert not set(reasons) & {os.path.basename(u) for u in pool.column("uri").to_pylist()}
    for name, (_, accepted) in CORPUS.items():
        if accepted:
            assert by_name[name] == "pool", f"{name} should be accepted, was rejected: {reasons.get(name)}"
        else:
            assert by_name[name] == "rejected" and reasons[name].strip(), name
    # the same bytes under two names: one pool row, the other a reject naming the kept file
    dup = [n for n in ("plain.jpg", DUPLICATE) if by_name[n] == "rejected"]
    assert len(dup) == 1 and "duplicate" in reasons[dup[0]]
    assert "pixel limit" in reasons["bomb.png"] and "max_image_pixels" in reasons["bomb.png"]
    assert "empty" in reasons["zero-bytes.jpg"]
    assert_sentences(reasons.values())
    assert report.images == pool.num_rows and report.rejected + report.duplicates == len(rejects)

    # Score the pool, plus one image that vanished from storage after ingest: never a crash.
    candidates = pool.select(["image_id", "uri"])
    gone = src / "deleted after ingest.png"
    gone.write_bytes(enc(PHOTO, "PNG"))
    candidates = pa.concat_tables(
        [candidates, pa.table({"image_id": ["vanished"], "uri": [str(gone)]}, schema=candidates.schema)]
    )
    gone.unlink()
    net = model_lib.build(ModelParams(image_size=32))
    model_path = storage.path("models/odd/iteration=1/model.pt")
    storage.write_bytes(model_path, model_lib.save(net.eval()))
    scores = score_candidates(storage, "odd", 1, candidates, model_path, client=dask_cluster, partition_size=7)
    assert scores.column("image_id").to_pylist() == candidates.column("image_id").to_pylist()
    s = scores.column("score").to_numpy(zero_copy_only=False)
    assert np.isfinite(s[:-1]).all(), "every accepted image is normalized and scored"
    assert np.isnan(s[-1]) and scores.column("error")[-1].as_py()


def test_accepted_odd_images_become_model_input():
    for name, (data, accepted) in CORPUS.items():
        if accepted:
            arr = model_lib.decode_many([data], 32)[0][0]
            assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8, name


def assert_sentences(reasons) -> None:
    """Reasons read as sentences: no Python object repr ("<_io.BytesIO object at 0x...>"), no "OSError: ..."."""
    for reason in reasons:
        assert reason and " at 0x" not in reason and "<_io" not in reason and "Error:" not in reason, reason


def png_with_chunk(kind: bytes, data: bytes, after_pixels: bool = False) -> bytes:
    """A 16x16 PNG with one extra chunk ``kind`` holding ``data``, before or after its pixel data (IDAT)."""
    png = enc(PHOTO.resize((16, 16)), "PNG")
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    at = len(png) - 12 if after_pixels else 33  # before IEND, or after the signature and IHDR
    return png[:at] + chunk + png[at:]


def many_frames_gif(n: int) -> bytes:
    frames = [Image.new("P", (16, 16), i % 200) for i in range(n)]
    for i, frame in enumerate(frames):  # each frame differs, so the encoder keeps them all
        frame.putpixel((i % 16, (i // 16) % 16), 255)
    return enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20)


def many_pages_tiff(n: int) -> bytes:
    pages = [Image.new("L", (16, 16), i % 256) for i in range(n)]
    return enc(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def scan_144mp() -> bytes:
    """A valid 12000x12000 greyscale scan (144 megapixels, mostly uniform: a small JPEG)."""
    scan = Image.new("L", (12000, 12000), 200)
    scan.paste(20, (0, 0, 6000, 12000))
    return enc(scan, "JPEG", quality=50)


ZTXT_BOMB = b"Comment\0\0" + zlib.compress(b"a" * (50 << 20), 9)  # 50 KB that inflate to 50 MB of text


@functools.cache
def hostile() -> dict[str, tuple[bytes, bool, str]]:
    """name -> (bytes, accepted?, words the reject reason holds) -- hostile contents beyond the 28 kinds."""
    return {
        "text chunk of 20 MB.png": (png_with_chunk(b"tEXt", b"Comment\0" + b"a" * (20 << 20)), True, ""),
        "ztxt bomb.png": (png_with_chunk(b"zTXt", ZTXT_BOMB), False, "text metadata is larger than Pillow reads"),
        "ztxt bomb after pixels.png": (png_with_chunk(b"zTXt", ZTXT_BOMB, after_pixels=True), False, "text metadata"),
        "3000 frames.gif": (many_frames_gif(3000), True, ""),
        "300 pages.tiff": (many_pages_tiff(300), True, ""),
        "wide 100000x1.png": (enc(PHOTO.resize((100_000, 1)), "PNG"), True, ""),
        "tall 1x100000.png": (enc(PHOTO.resize((1, 100_000)), "PNG"), True, ""),
        "scan 144 megapixels.jpg": (scan_144mp(), False, "144,000,000 pixels is over the pixel limit of 64,000,000"),
    }


def write_hostile(folder) -> dict[str, str]:
    """The hostile contents and filesystem oddities in ``folder``: name -> words its reject reason holds ("" for
    a file accepted)."""
    folder.mkdir(parents=True)
    expect = {}
    for name, (data, accepted, words) in hostile().items():
        (folder / name).write_bytes(data)
        expect[name] = "" if accepted else words
    os.symlink("loop-b.jpg", folder / "loop-a.jpg")  # a symbolic link loop
    os.symlink("loop-a.jpg", folder / "loop-b.jpg")
    os.symlink(".", folder / "link to its own folder.png")
    os.symlink("nowhere.png", folder / "dangling link.png")
    (folder / "folder named like.jpg").mkdir()  # walked into, never a candidate itself
    (folder / "folder named like.jpg" / "inside.png").write_bytes(enc(PHOTO.rotate(180), "PNG"))
    (folder / "empty folder.png").mkdir()
    expect |= {
        "loop-a.jpg": "symbolic link loop",
        "loop-b.jpg": "symbolic link loop",
        "link to its own folder.png": "it is a folder, not a file",
        "dangling link.png": "the file no longer exists",
        "inside.png": "",
    }
    return expect


def test_hostile_files_are_accepted_safely_or_rejected_with_a_sentence(tmp_path, dask_cluster):
    src = tmp_path / "hostile"
    expect = write_hostile(src)
    storage = Storage(str(tmp_path / "root"))
    report = build_pool(storage, str(src), client=dask_cluster, chunk_size=4)

    pool = read_pool(storage)
    rows = {os.path.basename(r["uri"]): r for r in pool.to_pylist()}
    reasons = {os.path.basename(r["uri"]): r["reason"] for r in pq.read_table(storage.path(REJECTS)).to_pylist()}
    assert set(rows) | set(reasons) == set(expect) and not set(rows) & set(reasons), "each one named, once"
    for name, words in expect.items():
        if words:
            assert words in reasons.get(name, ""), (name, reasons.get(name), rows.get(name))
        else:
            assert name in rows, (name, reasons.get(name))
    assert_sentences(reasons.values())
    assert "--max-image-pixels" in reasons["scan 144 megapixels.jpg"]
    assert rows["inside.png"]["uri"].endswith("/folder named like.jpg/inside.png")
    assert (rows["3000 frames.gif"]["width"], rows["300 pages.tiff"]["format"]) == (16, "TIFF")
    assert (rows["wide 100000x1.png"]["width"], rows["tall 1x100000.png"]["height"]) == (100_000, 100_000)
    assert report.images == len(rows) and report.rejected == len(reasons)

    # every accepted one becomes a model input and a score: the first frame, the first page, the strips
    net = model_lib.build(ModelParams(image_size=32))
    model_path = storage.path("models/hostile/iteration=1/model.pt")
    storage.write_bytes(model_path, model_lib.save(net.eval()))
    scores = score_candidates(storage, "hostile", 1, pool.select(["image_id", "uri"]), model_path, client=dask_cluster)
    assert np.isfinite(scores.column("score").to_numpy(zero_copy_only=False)).all(), scores.column("error")


def test_a_url_list_naming_a_folder_or_a_missing_file_is_rejected_with_a_reason(tmp_path):
    (tmp_path / "x.jpg").mkdir()  # a folder named like an image, named in the list
    (tmp_path / "good.png").write_bytes(enc(PHOTO, "PNG"))
    storage = Storage(str(tmp_path / "root"))
    urls = [str(tmp_path / "x.jpg"), str(tmp_path / "missing.png"), str(tmp_path / "good.png")]
    report = build_pool(storage, urls)
    reasons = {os.path.basename(r["uri"]): r["reason"] for r in pq.read_table(storage.path(REJECTS)).to_pylist()}
    assert report.images == 1 and reasons == {
        "x.jpg": "unreadable: it is a folder, not a file",
        "missing.png": "unreadable: the file no longer exists (deleted or moved after it was listed or ingested)",
    }


def test_files_replaced_or_deleted_after_ingest_are_named_by_scoring_and_export(tmp_path, dask_cluster):
    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(7)
    names = [f"photo-{i}.png" for i in range(10)]
    for name in names:
        (src / name).write_bytes(enc(Image.fromarray(rng.integers(0, 255, (24, 36, 3), dtype=np.uint8)), "PNG"))
    (src / "wide 100000x1.png").write_bytes(hostile()["wide 100000x1.png"][0])
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, str(src), client=dask_cluster, chunk_size=4)
    pool = read_pool(storage)
    assert pool.num_rows == 11 and pool_reading(storage).content_ids

    # between ingest and scoring: replaced with garbage, with another image, deleted, turned into a folder
    (src / "photo-0.png").write_bytes(b"garbage now")
    (src / "photo-1.png").write_bytes(enc(PHOTO, "PNG"))
    (src / "photo-2.png").unlink()
    (src / "photo-3.png").unlink()
    (src / "photo-3.png").mkdir()
    expect = {
        "photo-0.png": "the file changed since ingest",
        "photo-1.png": "the file changed since ingest",
        "photo-2.png": "unreadable: the file no longer exists",
        "photo-3.png": "unreadable: it is a folder, not a file",
    }
    net = model_lib.build(ModelParams(arch="small_convnet", image_size=16))
    model_path = storage.path("models/changed/iteration=1/model.pt")
    storage.write_bytes(model_path, model_lib.save(net.eval()))
    name_of = [os.path.basename(u) for u in pool.column("uri").to_pylist()]
    candidates = pool.select(["image_id", "uri"])
    cache = InputCache.of_pool(storage, pool.column("image_id"), 16)
    with_rows = candidates.add_column(0, "row", pa.array(np.arange(pool.num_rows), pa.int64()))
    for category, todo, kw in (("plain", candidates, {}), ("cached", with_rows, {"pool": pool, "cache": cache})):
        scores = score_candidates(storage, category, 1, todo, model_path, client=dask_cluster, partition_size=3, **kw)
        errors = dict(zip(name_of, scores.column("error").to_pylist(), strict=True))
        finite = dict(zip(name_of, np.isfinite(scores.column("score").to_numpy(zero_copy_only=False)), strict=True))
        for name in name_of:
            if name in expect:
                assert expect[name] in errors[name] and not finite[name], (category, name, errors[name])
            else:
                assert finite[name] and errors[name] is None, (category, name, errors[name])
        assert_sentences(e for e in errors.values() if e)
    _, ok = read_pool_images(storage, np.arange(pool.num_rows), 16)  # training and calibration read them so
    assert [n for n, k in zip(name_of, ok, strict=True) if not k] == sorted(expect, key=name_of.index)

    # between scoring and export: two more changed; the export leaves each out and names it with its reason
    (src / "photo-4.png").write_bytes(enc(PHOTO.rotate(90, expand=True), "PNG"))
    (src / "photo-5.png").unlink()
    expect |= {"photo-4.png": "the file changed since ingest", "photo-5.png": "unreadable: the file no longer exists"}
    limit = pool_reading(storage).max_pixels
    jpegs = convert_images(pool, storage, lambda data, _fmt: lsun_jpeg(data, 256, 75, limit), threads=2)
    skipped = {os.path.basename(u): r for u, r in left_out(pool.column("uri").to_pylist(), jpegs)}
    assert set(skipped) == set(expect) | {"wide 100000x1.png"}
    for name, words in expect.items():
        assert words in skipped[name], (name, skipped[name])
    assert "too elongated to export at a shorter side of 256 pixels" in skipped["wide 100000x1.png"]
    assert_sentences(skipped.values())
    assert sum(isinstance(j, bytes) for j in jpegs) == 11 - len(skipped)
    # an ImageFolder export keeps the strip's original file (no resize asked)
    wide = hostile()["wide 100000x1.png"][0]
    assert folder_file(wide, "PNG", None, limit) == (wide, ".png")


def test_a_144_megapixel_scan_is_refused_by_default_and_let_in_with_the_limit_raised(tmp_path, dask_cluster, capsys):
    src = tmp_path / "scans"
    src.mkdir()
    (src / "scan.jpg").write_bytes(hostile()["scan 144 megapixels.jpg"][0])
    (src / "photo.png").write_bytes(enc(PHOTO, "PNG"))
    address = dask_cluster.scheduler.address
    root = str(tmp_path / "root")
    storage = Storage(root)
    assert cli(["ingest", "--root", root, "--images", str(src), "--dask-address", address]) == 0
    reasons = {os.path.basename(r["uri"]): r["reason"] for r in pq.read_table(storage.path(REJECTS)).to_pylist()}
    assert set(reasons) == {"scan.jpg"}
    for words in (
        "12000x12000 = 144,000,000 pixels",
        "pixel limit of 64,000,000",
        "max_image_pixels",
        "--max-image-pixels",
    ):
        assert words in reasons["scan.jpg"], reasons["scan.jpg"]
    assert pool_reading(storage).max_pixels == 64_000_000

    # a bad value: one line naming the setting and the fix, nothing written
    assert cli(["ingest", "--root", str(tmp_path / "r2"), "--images", str(src), "--max-image-pixels", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_image_pixels = 0 cannot work" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "r2" / "pool")

    flag = ["--max-image-pixels", "150000000"]
    assert cli(["ingest", "--root", root, "--images", str(src), "--dask-address", address, *flag]) == 0
    pool = read_pool(storage)
    scan = pool.filter(pc.ends_with(pool.column("uri"), "scan.jpg")).to_pylist()
    assert [(r["width"], r["height"]) for r in scan] == [(12000, 12000)]
    assert pq.read_table(storage.path(REJECTS)).num_rows == 0
    assert pool_reading(storage).max_pixels == 150_000_000
    # the Dask workers decode it under the pool's limit (their own Pillow limit is ~89 megapixels)
    net = model_lib.build(ModelParams(arch="small_convnet", image_size=32))
    model_path = storage.path("models/scan/iteration=1/model.pt")
    storage.write_bytes(model_path, model_lib.save(net.eval()))
    scores = score_candidates(storage, "scan", 1, pool.select(["image_id", "uri"]), model_path, client=dask_cluster)
    assert np.isfinite(scores.column("score").to_numpy(zero_copy_only=False)).all(), scores.column("error")
    # and an export decodes it under the same limit
    jpeg = convert_images(
        pool.filter(pc.ends_with(pool.column("uri"), "scan.jpg")),
        storage,
        lambda data, _fmt: lsun_jpeg(data, 256, 75, pool_reading(storage).max_pixels),
        threads=1,
    )
    assert Image.open(io.BytesIO(jpeg[0])).size == (256, 256)
