"""The labeling service over HTTP on loopback: access control, payload checks, quality control, and
50 concurrent labelers with a count audit against the stored files."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pyarrow as pa
import pytest

from lsun_hitl import labels
from lsun_hitl.crowd import HttpLabeler
from lsun_hitl.desk import LabelingDesk
from lsun_hitl.labelers import create_labeler, token_hash
from lsun_hitl.quality import QCParams, labeler_stats, read_gold, write_gold
from lsun_hitl.service import ServiceThread, create_app
from lsun_hitl.storage import LABELERS_KEY, Storage

from .conftest import free_port, png_bytes

CATEGORY = "sneaker"


def make_root(tmp_path, fashion, n=300, n_request=200, n_gold=40, seed=0) -> tuple[Storage, dict[str, bool]]:
    """Real Fashion-MNIST PNGs under a local root, one open request, a gold set; returns truth by id."""
    images, classes = fashion
    storage = Storage(str(tmp_path / "root"))
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(images), n, replace=False)
    ids, uris, truth = [], [], {}
    for k, row in enumerate(rows):
        key = f"images/{k}.png"
        storage.write_bytes(storage.path(key), png_bytes(images[row]))
        ids.append(f"img{k:04d}")
        uris.append(storage.url_of(key))
        truth[ids[-1]] = bool(classes[row] == 7)  # 7 = sneaker
    table = pa.table({"image_id": ids[:n_request], "uri": uris[:n_request]})
    labels.publish_request(storage, CATEGORY, "iteration-1", 1, table, None)
    gold = pa.table(
        {
            "image_id": ids[n_request : n_request + n_gold],
            "uri": uris[n_request : n_request + n_gold],
            "answer": ["yes" if truth[i] else "no" for i in ids[n_request : n_request + n_gold]],
        }
    )
    write_gold(storage, CATEGORY, gold)
    return storage, truth


@pytest.fixture()
def service(tmp_path, fashion):
    storage, truth = make_root(tmp_path, fashion)
    completed: list[tuple[str, str]] = []
    tokens = {name: create_labeler(storage, name) for name in ("ann", "bob")}
    tokens["root"] = create_labeler(storage, "root", role="admin")
    app = create_app(storage, QCParams(batch_size=10), on_complete=lambda c, r: completed.append((c, r)))
    with ServiceThread(app) as url:
        yield storage, truth, url, tokens, completed


def client(url: str, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def test_tokens_are_required_hashed_and_scoped(service):
    storage, _, url, tokens, _ = service
    assert client(url).post("/api/batches/next").status_code == 401
    assert client(url, "not-a-token").post("/api/batches/next").status_code == 401
    stored = storage.read_bytes(storage.path(LABELERS_KEY)).decode()
    assert all(token not in stored for token in tokens.values())
    assert token_hash(tokens["ann"]) in stored

    ann, bob = client(url, tokens["ann"]), client(url, tokens["bob"])
    batch = ann.post("/api/batches/next").json()["batch"]
    assert len(batch["items"]) == 10 and batch["question"] == "Is this a sneaker?"
    assert "gold" not in str(batch["items"][0])
    # the same batch again until it is submitted (a page reload continues it)
    assert ann.post("/api/batches/next").json()["batch"]["batch_id"] == batch["batch_id"]
    bid = batch["batch_id"]
    assert bob.get(f"/api/batches/{bid}").status_code == 403
    assert bob.get(f"/api/batches/{bid}/images/0").status_code == 403
    answers = {"answers": [{"index": i, "answer": "no"} for i in range(10)]}
    assert bob.post(f"/api/batches/{bid}/labels", json=answers).status_code == 403
    # admin calls need an admin token
    assert ann.get("/api/admin/labelers").status_code == 403
    assert client(url, tokens["root"]).get("/api/admin/labelers").status_code == 200

    r = ann.get(f"/api/batches/{bid}/images/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    assert ann.get(f"/api/batches/{bid}/images/10").status_code == 404


def test_malformed_payloads_get_422_with_a_clear_message(service):
    storage, _, url, tokens, _ = service
    ann = client(url, tokens["ann"])
    bid = ann.post("/api/batches/next").json()["batch"]["batch_id"]
    path = f"/api/batches/{bid}/labels"
    r = ann.post(path, json={"answers": [{"index": 0, "answer": "maybe"}]})
    assert r.status_code == 422 and "yes" in r.text and "answer" in r.text
    r = ann.post(path, json={"labels": []})
    assert r.status_code == 422 and "answers" in r.text
    r = ann.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = ann.post(path, json={"answers": [{"index": 0, "answer": "yes"}]})
    assert r.status_code == 422 and "exactly once" in r.json()["detail"]
    r = ann.post(path, json={"answers": [{"index": 0, "answer": "yes"}] * 10})
    assert r.status_code == 422
    r = ann.post(path, content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # nothing was stored by any of these
    assert labels.read_votes(storage, CATEGORY).num_rows == 0


def test_a_batch_sent_twice_is_counted_once(service):
    storage, truth, url, tokens, _ = service
    ann = client(url, tokens["ann"])
    batch = ann.post("/api/batches/next").json()["batch"]
    answers = {"answers": [{"index": it["index"], "answer": "yes"} for it in batch["items"]]}
    first = ann.post(f"/api/batches/{batch['batch_id']}/labels", json=answers).json()
    second = ann.post(f"/api/batches/{batch['batch_id']}/labels", json=answers).json()
    assert first["stored"] is True and second["stored"] is False
    votes = labels.read_votes(storage, CATEGORY)
    assert votes.num_rows == 10
    assert set(votes.column("batch_id").to_pylist()) == {batch["batch_id"]}
    # the next batch holds none of the images ann already answered
    nxt = ann.post("/api/batches/next").json()["batch"]
    gold = set(read_gold(storage, CATEGORY).column("image_id").to_pylist())
    answered = {it["image_id"] for it in batch["items"]} - gold
    assert not answered & {it["image_id"] for it in nxt["items"]}


def test_fifty_concurrent_labelers_lose_and_double_count_nothing(tmp_path, fashion):
    storage, truth = make_root(tmp_path, fashion, n=500, n_request=400, n_gold=100, seed=1)
    qc = QCParams(batch_size=10, gold_rate=0.5, min_gold_answers=6)
    completed = threading.Event()
    rng = np.random.default_rng(5)
    spammers = {f"w{k:02d}" for k in range(0, 50, 7)}  # 8 spammers
    stop = threading.Event()
    admin = create_labeler(storage, "admin", role="admin")
    names = [f"w{k:02d}" for k in range(50)]
    tokens = {name: create_labeler(storage, name) for name in names}
    app = create_app(storage, qc, on_complete=lambda c, r: completed.set())
    with ServiceThread(app) as url:
        workers = [
            HttpLabeler(
                url,
                tokens[name],
                0.5 if name in spammers else float(rng.uniform(0.85, 0.95)),
                {CATEGORY: truth},
                stop,
                seed=k,
                poll_s=0.2,
                name=name,
                unsure_rate=0.0,
            )
            for k, name in enumerate(names)
        ]
        for w in workers:
            w.start()
        assert completed.wait(180), "the request never completed"
        stop.set()
        for w in workers:
            w.join(30)
        progress = client(url, admin).get("/api/admin/requests").json()

    # Count audit: every submitted batch is one file holding exactly its answers, no (image, labeler) twice.
    files = storage.glob(storage.path(f"labels/{CATEGORY}/votes/request=iteration-1/*.parquet"))
    batches = storage.glob(storage.path(f"labels/{CATEGORY}/batches/*.json"))
    stored = sum(storage.read_table(f).num_rows for f in files)
    submitted = sum(w.submitted for w in workers)
    assert len(files) == submitted
    votes = labels.read_votes(storage, CATEGORY)
    assert votes.num_rows == stored
    df = votes.to_pandas()
    assert not df.duplicated(["image_id", "labeler"]).any() or df["gold"].any()
    assert not df[~df["gold"]].duplicated(["image_id", "labeler"]).any()
    sizes = {b.rsplit("/", 1)[1][:-5]: len(storage.read_json(b)["image_ids"]) for b in batches}
    assert stored == sum(sizes[f.rsplit("/", 1)[1][:-8]] for f in files)
    assert progress[0]["complete"] and progress[0]["done"] == 400

    # Quality control: spammers are flagged, aggregation beats a single labeler.
    stats = labeler_stats(votes, read_gold(storage, CATEGORY), qc).set_index("labeler")
    flagged = set(stats.index[stats["flagged"]])
    print(stats.loc[sorted(flagged)].to_string())
    # The flag rule (accuracy on gold below 0.8 at 99% confidence) flags a labeler of 85% accuracy with
    # probability ~0.1% per look; over 42 good labelers one false flag can happen (this seed has one).
    assert len(flagged & spammers) >= len(spammers) // 2 and len(flagged - spammers) <= 1, (flagged, spammers)
    assert all(w.flagged for w in workers if w.name.removeprefix("http-") in flagged)
    agg = labels.collect(storage, CATEGORY, "iteration-1").to_pandas()
    aggregated_acc = np.mean([(p >= 0.5) == truth[i] for i, p in zip(agg.image_id, agg.p_positive, strict=True)])
    plain = df[~df["gold"] & (df["answer"] != "unsure")]
    single_acc = np.mean([(a == "yes") == truth[i] for i, a in zip(plain.image_id, plain.answer, strict=True)])
    print(f"single labeler accuracy {single_acc:.3f}, aggregated {aggregated_acc:.3f}, flagged {sorted(flagged)}")
    # Which labeler answers which image depends on the 50 threads' timing, and with it how many answers the
    # flagged spammers had given before their answers stopped counting: 0.9725 in one run of 2026-12-07 (11 of
    # 400 wrong), 0.98 or more in the others. The claim is the margin over one labeler (~0.85 here).
    assert aggregated_acc >= 0.97 and aggregated_acc > single_acc + 0.05


def test_the_desk_rebuilds_from_storage_after_a_restart(service):
    storage, truth, url, tokens, _ = service
    ann = client(url, tokens["ann"])
    done = ann.post("/api/batches/next").json()["batch"]
    ann.post(
        f"/api/batches/{done['batch_id']}/labels",
        json={"answers": [{"index": i, "answer": "no"} for i in range(len(done["items"]))]},
    ).raise_for_status()
    open_batch = ann.post("/api/batches/next").json()["batch"]
    adm = create_labeler(storage, "adm", role="admin")
    # a second service over the same root knows both batches
    with ServiceThread(create_app(storage, QCParams(batch_size=10))) as url2:
        again = client(url2, tokens["ann"])
        assert again.post("/api/batches/next").json()["batch"]["batch_id"] == open_batch["batch_id"]
        r = again.post(
            f"/api/batches/{done['batch_id']}/labels",
            json={"answers": [{"index": i, "answer": "no"} for i in range(len(done["items"]))]},
        )
        assert r.json()["stored"] is False
        progress = client(url2, adm).get("/api/admin/requests").json()
    assert progress[0]["answers"] == len(done["items"]) - _gold_in(storage, done)


def _gold_in(storage: Storage, batch: dict) -> int:
    gold = set(read_gold(storage, CATEGORY).column("image_id").to_pylist())
    return sum(it["image_id"] in gold for it in batch["items"])


def test_page_is_served_without_a_build_step(service):
    _, _, url, _, _ = service
    r = httpx.get(url + "/", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "keydown" in r.text and "/api/batches/next" in r.text and "__PRELOAD__" not in r.text
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


def test_no_path_traversal_and_no_cors_by_default(service):
    """Images are reached only as (batch, index) of one's own batch: no path, id or index reaches a file."""
    _, _, url, tokens, _ = service
    with client(url, tokens["ann"]) as ann:
        batch = ann.post("/api/batches/next").json()["batch"]
        assert ann.get(f"/api/batches/{batch['batch_id']}/images/0").status_code == 200
        for path in (
            "/api/batches/..%2F..%2F..%2Fetc%2Fpasswd/images/0",
            "/api/batches/../../../../etc/passwd/images/0",
            f"/api/batches/{batch['batch_id']}/images/-1",
            f"/api/batches/{batch['batch_id']}/images/{len(batch['items']) + 50}",
            f"/api/batches/{batch['batch_id']}%2F..%2F..%2Flabelers/images/0",
            "/images/..%2F..%2Flabelers%2Flabelers.json",
        ):
            r = ann.get(path)
            assert r.status_code in (404, 422), (path, r.status_code)
            assert b"sha256" not in r.content and b"root:" not in r.content
        r = ann.options(
            "/api/batches/next",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


def test_service_restarted_while_labelers_work_loses_no_accepted_label(tmp_path, fashion):
    """Ten labelers keep working while the service is stopped and started again (twice) on the same
    port; every submission it accepted (HTTP 200) is in storage, and the request completes."""
    storage, truth = make_root(tmp_path, fashion, n=260, n_request=200, n_gold=40, seed=3)
    tokens = {f"r{k}": create_labeler(storage, f"r{k}") for k in range(10)}
    accepted: dict[str, set[str]] = {name: set() for name in tokens}
    stop = threading.Event()
    completed = threading.Event()

    def labeler(name: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            try:
                with client(url, tokens[name]) as c:
                    batch = c.post("/api/batches/next").json()["batch"]
                    if batch is None:
                        stop.wait(0.2)
                        continue
                    answers = [
                        {
                            "index": it["index"],
                            "answer": "yes" if (rng.random() < 0.9) == truth[it["image_id"]] else "no",
                        }
                        for it in batch["items"]
                    ]
                    r = c.post(f"/api/batches/{batch['batch_id']}/labels", json={"answers": answers})
                    if r.status_code == 200:
                        accepted[name].add(batch["batch_id"])
            except httpx.TransportError:
                stop.wait(0.1)  # the service is down: try again, as the page does

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    threads = [threading.Thread(target=labeler, args=(n, k), daemon=True) for k, n in enumerate(tokens)]
    for restart in range(3):
        app = create_app(storage, QCParams(batch_size=10, gold_rate=0.2), on_complete=lambda c, r: completed.set())
        with ServiceThread(app, port=port):
            if restart == 0:
                for t in threads:
                    t.start()
            deadline = time.monotonic() + (1.5 if restart < 2 else 120)
            while time.monotonic() < deadline and not completed.is_set():
                time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(10)
    assert completed.is_set(), "the request completed across the restarts"
    stored = {
        f.rsplit("/", 1)[1][: -len(".parquet")]
        for f in storage.glob(storage.path(f"labels/{CATEGORY}/votes/*/*.parquet"))
    }
    all_accepted = set().union(*accepted.values())
    assert all_accepted and all_accepted <= stored, f"accepted but not stored: {sorted(all_accepted - stored)[:5]}"
    votes = labels.read_votes(storage, CATEGORY).to_pandas()
    assert not votes[~votes["gold"]].duplicated(["image_id", "labeler"]).any()


def test_a_batch_the_desk_cannot_record_is_not_handed_out(tmp_path, fashion):
    """Storage refuses the batch file (a file stands where the batches folder should be): the labeler gets a
    503, not a batch whose answers could never be matched; once storage works, the same images are
    handed out again (the failed reservation was undone)."""
    storage, _ = make_root(tmp_path, fashion, n=60, n_request=20, n_gold=0)
    token = create_labeler(storage, "ann")
    blocker = tmp_path / "root" / "labels" / CATEGORY / "batches"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    app = create_app(storage, QCParams(batch_size=10, gold_rate=0.0))
    with ServiceThread(app) as url:
        ann = client(url, token)
        r = ann.post("/api/batches/next")
        assert r.status_code == 503 and "nothing was recorded" in r.json()["detail"]
        assert app.state.desk.progress()[0]["outstanding_batches"] == 0
        blocker.unlink()
        batch = ann.post("/api/batches/next").json()["batch"]
        assert batch is not None and len(batch["items"]) == 10
        assert storage.exists(storage.path(f"labels/{CATEGORY}/batches/{batch['batch_id']}.json"))
        # the images of a new batch are read ahead: served from memory, the same bytes as in storage
        img = ann.get(f"/api/batches/{batch['batch_id']}/images/0")
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert img.content == storage.read_bytes(
            storage.path("images/" + str(int(batch["items"][0]["image_id"][3:])) + ".png")
        )


def test_image_cache_keeps_the_most_recent_within_its_budget():
    from lsun_hitl.service import ImageCache

    cache = ImageCache(max_bytes=10)
    for k in range(4):
        cache.put(f"u{k}", (b"abc", "image/png"))
    assert cache.get("u0") is None and cache.get("u1") is not None  # 4 x 3 bytes > 10: the oldest went
    cache.put("u4", (b"abcd", "image/png"))  # u2 is now the least recently used
    assert cache.get("u2") is None and cache.get("u1") is not None and cache.get("u4") is not None
    cache.put("huge", (b"x" * 11, "image/png"))  # larger than the whole budget: not kept
    assert cache.get("huge") is None and cache.get("u4") is not None


def test_desk_takes_an_ended_run_as_final_and_close_waits_for_its_background_work(tmp_path, fashion, caplog):
    """A run that read the stored labels itself and finished cannot be resumed: the desk neither retries nor
    re-reads storage for it. ``close`` waits for background work, which must not outlive the process."""
    storage, truth = make_root(tmp_path, fashion, n=40, n_request=20, n_gold=0)
    calls: list[str] = []
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def on_complete(category: str, request_id: str) -> None:
        calls.append(request_id)
        started.set()
        release.wait(30)  # still running when close() is called
        finished.set()
        raise labels.RunEnded(f"flow run r1 waiting for {request_id!r} has ended (Completed)", "Completed")

    desk = LabelingDesk(storage, QCParams(batch_size=10, gold_rate=0.0), on_complete=on_complete, refresh_s=0.0)
    for name in ("ann", "bob", "cy"):
        while (batch := desk.next_batch(name)) is not None:
            desk.submit(batch.batch_id, name, [(i, "yes" if truth[x] else "no") for i, x in enumerate(batch.image_ids)])
    assert started.wait(30) and calls == ["iteration-1"] and not finished.is_set()
    threading.Timer(0.5, release.set).start()
    desk.close(timeout=30)
    assert finished.is_set(), "close() returned while the resume was still running"
    assert not [t for t in threading.enumerate() if t.name.startswith(("resume-", "desk-refresh"))]
    # closed: no new background work; and the ended run is not tried again nor the answers re-read
    desk.refresh_in_background()
    desk.refresh(force=True)
    assert calls == ["iteration-1"]
    assert not [t for t in threading.enumerate() if t.name.startswith("desk-refresh")]
    assert "re-reading the answers" not in caplog.text


def test_a_removed_labeler_or_a_replaced_token_is_refused_by_the_running_service_within_seconds(service):
    """``lsun-hitl labelers add --replace`` and ``labelers remove``, run as a user does beside a running service:
    the old token answered 200 until an unknown token happened to be seen; now it gets 401 within seconds."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    storage, _, url, tokens, _ = service
    repo = Path(__file__).resolve().parents[1]

    def labelers(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "cli", "labelers", *args, "--root", storage.url]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=120, stdin=subprocess.DEVNULL)

    def refused_within(token: str, seconds: float = 5.0) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if client(url, token).post("/api/batches/next").status_code == 401:
                return time.monotonic() - start
            time.sleep(0.1)
        return None

    assert client(url, tokens["ann"]).post("/api/batches/next").status_code == 200
    assert client(url, tokens["bob"]).post("/api/batches/next").status_code == 200
    done = labelers("add", "ann", "--replace")
    assert done.returncode == 0, done.stderr
    new_token = done.stdout.splitlines()[1].strip()
    assert refused_within(tokens["ann"]) is not None  # the old token stops working ...
    assert client(url, new_token).post("/api/batches/next").status_code == 200  # ... the new one works
    done = labelers("remove", "bob")
    assert done.returncode == 0 and "labeler 'bob' removed" in done.stdout, done.stderr
    assert refused_within(tokens["bob"]) is not None
    assert "bob" not in labelers("list").stdout
    done = labelers("remove", "carol")
    assert done.returncode == 2 and "no labeler 'carol'" in done.stderr and "Traceback" not in done.stderr


def test_security_headers_no_schema_and_a_cors_preflight_that_allows_the_token(tmp_path, fashion):
    """Every answer carries a Content-Security-Policy that admits the page's own inline script and style by
    hash only, no framing and no sniffing; the API's schema is not served; with --cors-origin a browser on that
    origin may send the bearer token (its preflight asking for ``authorization`` was refused with 400)."""
    import base64
    import hashlib
    import re

    storage, _ = make_root(tmp_path, fashion)
    token = create_labeler(storage, "ann")
    app = create_app(storage, QCParams(batch_size=10), cors_origins=["https://labels.example"])
    with ServiceThread(app) as url:
        page = client(url).get("/")
        for r in (page, client(url, token).post("/api/batches/next"), client(url).get("/api/batches/next")):
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        policy = page.headers["content-security-policy"]
        script = re.search(r"<script>(.*?)</script>", page.text, flags=re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}';" in policy and "unsafe-inline" not in policy
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert client(url).get(path).status_code == 404
        preflight = client(url).options(
            "/api/batches/next",
            headers={
                "Origin": "https://labels.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://labels.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()


def test_an_image_changed_since_ingest_or_over_the_pixel_limit_is_not_served(tmp_path, fashion, dask_cluster):
    """The service checks image bytes as scoring does: a file whose bytes no longer hash to its pool id (replaced
    after ingest) is refused with 409, the others are served; an image over the pool's pixel limit too."""
    from lsun_hitl.fashion_mnist import import_fashion_mnist
    from lsun_hitl.ingest import build_pool, read_pool
    from lsun_hitl.service import fetch_image

    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=40, seed=3), client=dask_cluster)
    pool = read_pool(storage, columns=["image_id", "uri"])
    labels.publish_request(storage, CATEGORY, "iteration-1", 1, pool.slice(0, 10), None)
    token = create_labeler(storage, "ann")
    uri_of = dict(zip(pool.column("image_id").to_pylist(), pool.column("uri").to_pylist(), strict=True))
    changed = pool.column("image_id")[3].as_py()
    # replaced after ingest by another image, before the service reads it (it reads a batch's images ahead, and
    # serves the bytes it checked then)
    with open(uri_of[changed].removeprefix("file://"), "wb") as f:
        f.write(png_bytes(fashion[0][0]))
    with ServiceThread(create_app(storage, QCParams(batch_size=10))) as url, client(url, token) as ann:
        batch = ann.post("/api/batches/next").json()["batch"]
        got = {i["image_id"]: ann.get(f"/api/batches/{batch['batch_id']}/images/{i['index']}") for i in batch["items"]}
    assert len(got) == 10 and got[changed].status_code == 409 and "changed since the pool" in got[changed].text
    assert all(r.status_code == 200 and r.content[:4] == b"\x89PNG" for i, r in got.items() if i != changed)
    other = uri_of[pool.column("image_id")[0].as_py()]
    with pytest.raises(Exception, match="over the pool's limit of 100 pixels"):
        fetch_image(other, storage, None, max_pixels=100)  # 28 x 28 = 784
