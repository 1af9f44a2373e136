"""Bad and odd image files, generated here: each is accepted (and normalized for the model) or rejected
with a reason in the rejects manifest; ingest and scoring never crash."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lsun_hitl import model as model_lib
from lsun_hitl.config import ModelParams
from lsun_hitl.ingest import build_pool, read_pool
from lsun_hitl.scoring import score_candidates
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
    assert "pixel limit" in reasons["bomb.png"] or "bomb" in reasons["bomb.png"]
    assert "empty" in reasons["zero-bytes.jpg"]
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
