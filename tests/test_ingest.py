import os

import numpy as np
import pyarrow.parquet as pq

from lsun_hitl.ingest import build_pool, read_pool
from lsun_hitl.storage import REJECTS, Storage

from .conftest import png_bytes


def make_folder(root, fashion, n=60):
    images, _ = fashion
    src = root / "src"
    (src / "sub dir").mkdir(parents=True)
    for i in range(n):
        (src / f"img-{i:03d}.png").write_bytes(png_bytes(images[i]))
    (src / "sub dir" / "copy of 0 é.png").write_bytes(png_bytes(images[0]))  # exact duplicate
    (src / "broken.png").write_bytes(png_bytes(images[1])[:50])
    (src / "notes.png").write_text("not an image")
    return src


def test_build_pool_dedupes_and_rejects_with_reasons(tmp_path, fashion, dask_cluster):
    src = make_folder(tmp_path, fashion)
    storage = Storage(str(tmp_path / "root"))
    report = build_pool(storage, str(src), client=dask_cluster, chunk_size=16)
    assert (report.files, report.images, report.duplicates, report.rejected) == (63, 60, 1, 2)
    pool = read_pool(storage)
    assert pool.num_rows == 60
    ids = pool.column("image_id").to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 60
    assert set(pool.column("format").to_pylist()) == {"PNG"}
    assert set(pool.column("width").to_pylist()) == {28}
    rejects = pq.read_table(storage.path(REJECTS)).to_pylist()
    reasons = {r["uri"].rsplit("/", 1)[-1]: r["reason"] for r in rejects}
    assert "not a readable image" in reasons["notes.png"]
    assert reasons["broken.png"]
    dup = [r for name, r in reasons.items() if "duplicate" in r]
    assert len(dup) == 1 and "img-000.png" in dup[0] or "copy of 0" in dup[0]


def test_build_pool_from_s3_in_process(s3_bucket, fashion):
    url, options = s3_bucket
    storage = Storage(url + "/root", options)
    images, _ = fashion
    fs = storage.fs
    fs.pipe({f"{storage.root}/incoming/{i}.png": png_bytes(images[i]) for i in range(20)})
    report = build_pool(storage, storage.url_of("incoming"), client=None)
    assert report.images == 20 and report.rejected == 0
    assert all(u.startswith("s3://") for u in read_pool(storage).column("uri").to_pylist())


def test_image_ids_are_content_hashes(tmp_path, fashion):
    images, _ = fashion
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(png_bytes(images[5]))
    s1 = Storage(str(tmp_path / "r1"))
    build_pool(s1, str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "renamed.png").write_bytes(png_bytes(images[5]))
    s2 = Storage(str(tmp_path / "r2"))
    build_pool(s2, str(tmp_path / "b"))
    assert read_pool(s1).column("image_id").to_pylist() == read_pool(s2).column("image_id").to_pylist()
    assert np.all(read_pool(s1).column("bytes").to_numpy() > 0)


def test_ingest_keeps_to_its_prefix_and_a_list_to_the_root_s_schemes(tmp_path, fashion, dask_cluster):
    """A symbolic link under the prefix that leads outside it is left out unless --links-outside says so; a URL
    list naming another scheme than the root's (http to an internal host, say) is refused with one message
    naming the URL and the flag, before anything is fetched."""
    import subprocess
    import sys
    from pathlib import Path

    from lsun_hitl.config import IngestParams

    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes(fashion[0][0]))
    src = tmp_path / "images"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(fashion[0][1]))
    os.symlink(secret, src / "b.png")  # a link to a file outside the prefix
    os.symlink(src / "a.png", src / "c.png")  # a link that stays inside it
    storage = Storage(str(tmp_path / "root"))
    report = build_pool(storage, str(src), client=dask_cluster)
    uris = read_pool(storage, columns=["uri"]).column("uri").to_pylist()
    assert report.files == 2 and not any(u.endswith("b.png") for u in uris)
    allowed = Storage(str(tmp_path / "root2"))
    build_pool(allowed, str(src), client=dask_cluster, params=IngestParams(links_outside=True))
    assert any(u.endswith("b.png") for u in read_pool(allowed, columns=["uri"]).column("uri").to_pylist())

    listing = tmp_path / "list.txt"
    listing.write_text(f"{src}/a.png\nhttp://169.254.169.254/latest/meta-data/x.png\n")
    cmd = [sys.executable, "-m", "cli", "ingest", "--root", str(tmp_path / "root3"), "--images", f"@{listing}"]
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "'http://169.254.169.254/latest/meta-data/x.png' is a http:// URL" in done.stderr
    assert "--url-schemes http" in done.stderr and not (tmp_path / "root3" / "pool").exists()
