"""Exports of a finished dataset, each read back by the reader people use: torchvision's LSUN and
ImageFolder, pyarrow/pandas for Parquet (local and S3), Label Studio itself (a real server) for review
tasks and the annotations that come back."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

from cli import main as cli
from lsun_hitl import export
from lsun_hitl.ingest import image_id as content_id
from lsun_hitl.storage import Storage

from .conftest import free_port

CATEGORIES = ["trouser", "dress"]
SMALL_CASCADE = os.path.join(os.path.dirname(__file__), "small_cascade.py")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Storage:
    """Two categories (trouser, dress) run to the end by the real cascade over a 2,500-image pool.

    12 epochs, not 5: at 5 (25 steps on the 300 training images) one seed in three of the first model scored
    trouser at AUC 0.89 and certified nothing, and once neither iteration let the model decide any image."""
    from lsun_hitl.fashion_mnist import import_fashion_mnist
    from lsun_hitl.ingest import build_pool

    tmp = tmp_path_factory.mktemp("finished")
    storage = Storage(str(tmp / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=2500, seed=4))
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp / "prefect-home")}
    run = subprocess.run(
        [
            sys.executable,
            SMALL_CASCADE,
            storage.url,
            *CATEGORIES,
            "--target_precision=0.9",
            "--target_false_omission=0.03",
            "--calibration_sample=600",
            "--first_calibration_sample=600",
            "--epochs=12",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return storage


def dataset(storage: Storage, category: str) -> pd.DataFrame:
    return pa.concat_tables(export.dataset_batches(storage, category)).to_pandas()


def test_the_dataset_reads_with_provenance(finished):
    d = dataset(finished, "trouser")
    assert len(d) == 2500 and set(d["label"]) == {"positive", "negative"}
    assert {"human", "model"} <= set(d["decided_by"]), "the fixture's cascade let the model decide some images"
    model = d[d["decided_by"] == "model"]
    assert model["probability"].notna().all()
    assert np.allclose(model["probability"], 1 / (1 + np.exp(-model["score"].astype(float))), atol=1e-5)
    for k, decided in model.groupby("decided_iteration"):  # each within its iteration's calibrated thresholds
        thresholds = finished.read_json(finished.path(f"calibration/trouser/iteration={k}.json"))
        negatives = decided[decided["label"] == "negative"]["score"]
        positives = decided[decided["label"] == "positive"]["score"]
        assert (negatives <= thresholds["negative"]).all() if len(negatives) else True
        assert (positives >= thresholds["positive"]).all() if len(positives) else True
    assert d["confidence"].between(0, 1).all()


def test_lsun_lmdb_is_read_by_torchvision(finished, tmp_path, monkeypatch):
    """LSUN's release format: torchvision.datasets.LSUN yields every exported positive, as a JPEG whose
    shorter side is 256."""
    import torchvision
    from torchvision.datasets.lsun import LSUNClass

    monkeypatch.chdir(tmp_path)  # torchvision's LSUN writes its key cache into the working directory
    out = tmp_path / "lsun"
    d = dataset(finished, "trouser")
    positives = set(d.loc[d["label"] == "positive", "image_id"])
    # torchvision.datasets.LSUN only takes LSUN's ten scene names: export under one of them
    report = export.export_lsun(finished, "trouser", str(out), name="kitchen", val_fraction=0.2)
    assert report.skipped == [] and report.written["train"] + report.written["val"] == len(positives)
    assert report.written["val"] > 0

    lsun = torchvision.datasets.LSUN(str(out), classes=["kitchen_train", "kitchen_val"])
    assert len(lsun) == len(positives)
    sizes = {min(lsun[i][0].size) for i in range(len(lsun))}
    assert sizes == {256}
    keys = set()
    for db in lsun.dbs:  # the LMDBs torchvision opened
        with db.env.begin() as txn:
            for key, value in txn.cursor():
                keys.add(key.decode())
                img = Image.open(io.BytesIO(value))
                assert img.format == "JPEG" and img.mode == "RGB"
    assert keys == positives, "every positive exported once, keyed by its image id"
    # any category name: torchvision's LSUNClass reads a single LMDB
    plain = export.export_lsun(finished, "dress", str(out))
    assert len(LSUNClass(root=str(out / "dress_train_lmdb"))) == plain.written["train"] > 0


def test_lsun_resize_keeps_aspect_and_any_photo_format():
    """Real photos of any size and format: a 640x427 CMYK JPEG becomes 384x256 RGB (rounded)."""
    buf = io.BytesIO()
    Image.new("CMYK", (640, 427), (10, 200, 30, 0)).save(buf, format="JPEG")
    jpeg = Image.open(io.BytesIO(export.lsun_jpeg(buf.getvalue())))
    assert jpeg.size == (384, 256) and jpeg.mode == "RGB"
    tall = io.BytesIO()
    Image.new("RGBA", (100, 300)).save(tall, format="PNG")
    assert Image.open(io.BytesIO(export.lsun_jpeg(tall.getvalue()))).size == (256, 768)


def test_parquet_export_with_images_reads_in_pyarrow_and_pandas(finished, tmp_path):
    out = tmp_path / "parquet"
    report = export.export_parquet(finished, CATEGORIES, str(out), with_images=True)
    assert report.written == {"trouser": 2500, "dress": 2500}
    table = pads.dataset(str(out), partitioning="hive").to_table()
    frame = table.drop_columns(["image"]).to_pandas()
    for c in CATEGORIES:
        want = dataset(finished, c)
        got = frame[frame["category"] == c].set_index("image_id").loc[want["image_id"]]
        assert (got["label"].to_numpy() == want["label"].to_numpy()).all()
        assert (got["decided_by"].to_numpy() == want["decided_by"].to_numpy()).all()
    images = table.column("image").to_pylist()[:50]
    ids = table.column("image_id").to_pylist()[:50]
    assert all(content_id(b) == i for b, i in zip(images, ids, strict=True))
    assert Image.open(io.BytesIO(images[0])).size == (28, 28)
    # pandas reads the folder as one table too
    assert len(pd.read_parquet(out, columns=["image_id", "label"])) == 5000


def test_parquet_export_to_s3(finished, s3_bucket, capsys):
    import s3fs

    url, options = s3_bucket
    report = export.export_parquet(finished, ["dress"], f"{url}/export", splits=["positive"], out_options=options)
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    table = pads.dataset(f"{url.removeprefix('s3://')}/export", filesystem=fs, partitioning="hive").to_table()
    assert table.num_rows == report.written["dress"] > 0
    assert set(table.column("label").to_pylist()) == {"positive"}
    # the CLI, with the destination's own storage options
    parquet = ["export", "--root", finished.url, "--category", "trouser", "--format", "parquet"]
    assert cli([*parquet, "--out", f"{url}/cli", "--out-options", json.dumps(options)]) == 0
    cli_table = pads.dataset(f"{url.removeprefix('s3://')}/cli", filesystem=fs, partitioning="hive").to_table()
    assert cli_table.num_rows == 2500 and set(cli_table.column("category").to_pylist()) == {"trouser"}
    assert cli([*parquet, "--out", f"{url}/bad", "--out-options", "{endpoint"]) == 2
    assert "--out-options is not valid JSON" in capsys.readouterr().err
    assert not fs.exists(f"{url.removeprefix('s3://')}/bad")


def test_imagefolder_export_is_read_by_torchvision(finished, tmp_path):
    import torchvision

    out = tmp_path / "folder"
    export.export_imagefolder(finished, ["trouser"], str(out))
    folder = torchvision.datasets.ImageFolder(str(out))
    d = dataset(finished, "trouser")
    assert folder.classes == ["negative", "positive"]
    counts = np.bincount(folder.targets)
    assert counts[1] == (d["label"] == "positive").sum() and counts[0] == (d["label"] == "negative").sum()
    image, target = folder[int(np.flatnonzero(np.array(folder.targets) == 1)[0])]
    assert image.size == (28, 28) and target == 1
    # exported again (idempotent): the same files, nothing left over from the run before
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    export.export_imagefolder(finished, ["trouser"], str(out))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no staging folder left behind"


def test_an_interrupted_export_leaves_the_previous_one_whole(finished, tmp_path):
    out = tmp_path / "folder"
    export.export_imagefolder(finished, ["dress"], str(out), splits=["positive"])
    before = sorted(os.listdir(out / "positive"))

    def crash(done: int, total: int) -> None:
        if done >= 1024:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export.export_imagefolder(finished, ["dress"], str(out), batch_size=512, progress=crash)
    assert sorted(os.listdir(out)) == ["positive"] and sorted(os.listdir(out / "positive")) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_multi_category_and_combined_export(finished, tmp_path):
    """Per category, an image is in every category it was decided for; combined, each positive is in
    exactly one class folder chosen by the documented rule, conflicts listed."""
    import torchvision

    t, d = dataset(finished, "trouser"), dataset(finished, "dress")
    both = set(t.loc[t["label"] == "positive", "image_id"]) & set(d.loc[d["label"] == "positive", "image_id"])
    either = set(t.loc[t["label"] == "positive", "image_id"]) | set(d.loc[d["label"] == "positive", "image_id"])

    per = tmp_path / "per"
    export.export_imagefolder(finished, CATEGORIES, str(per), splits=["positive"])
    for c, frame in (("trouser", t), ("dress", d)):
        files = {f.split(".")[0] for f in os.listdir(per / c / "positive")}
        assert files == set(frame.loc[frame["label"] == "positive", "image_id"])

    out = tmp_path / "combined"
    report = export.export_imagefolder(finished, CATEGORIES, str(out), combined=True)
    folder = torchvision.datasets.ImageFolder(str(out))
    assert folder.classes == sorted(CATEGORIES)
    exported = [os.path.basename(p).split(".")[0] for p, _ in folder.samples]
    assert len(exported) == len(set(exported)) == len(either) == sum(report.written.values())
    conflicts = pd.read_csv(out / "conflicts.csv")
    assert set(conflicts["image_id"]) == both
    labels = pd.read_csv(out / "labels.csv").set_index("image_id")
    for image, chosen in zip(conflicts["image_id"], conflicts["class"], strict=True):
        assert labels.loc[image, "class"] == chosen  # the class the rule chose
    # drop: conflicted images go nowhere
    dropped = export.export_imagefolder(finished, CATEGORIES, str(tmp_path / "drop"), combined=True, rule="drop")
    assert sum(dropped.written.values()) == len(either) - len(both)


def test_combined_export_resolves_real_conflicts_by_the_rule(finished, tmp_path):
    """Reviewers say three trouser positives are dresses too: each is claimed by both categories and goes
    to the class the documented rule gives from the two decisions' provenance and confidence."""
    root = tmp_path / "root"
    shutil.copytree(finished.url, root)
    storage = Storage(str(root))
    t = dataset(storage, "trouser")
    picked = list(t.loc[t["label"] == "positive", "image_id"][:3])
    review = tmp_path / "review.json"
    review.write_text(
        json.dumps(
            [
                {
                    "data": {"image_id": i},
                    "annotations": [
                        {"completed_by": 1, "result": [{"type": "choices", "value": {"choices": ["Yes"]}}]}
                    ],
                }
                for i in picked
            ]
        )
    )
    assert export.import_review(storage, "dress", str(review)).changed == {"negative->positive": 3}

    out = tmp_path / "combined"
    export.export_imagefolder(storage, CATEGORIES, str(out), combined=True)
    conflicts = pd.read_csv(out / "conflicts.csv").set_index("image_id")
    assert set(picked) <= set(conflicts.index)
    frames = [dataset(storage, c).set_index("image_id").loc[picked] for c in CATEGORIES]
    winner, claims = export.resolve_classes(
        np.ones((3, 2), bool),
        np.stack([(f["decided_by"] != "model").to_numpy() for f in frames], axis=1),
        np.stack([f["confidence"].to_numpy() for f in frames], axis=1),
    )
    assert claims.tolist() == [2, 2, 2]
    want = [CATEGORIES[w] for w in winner]
    assert conflicts.loc[picked, "class"].tolist() == want
    for i, c in zip(picked, want, strict=True):
        other = next(o for o in CATEGORIES if o != c)
        assert (out / c / f"{i}.png").exists() and not (out / other / f"{i}.png").exists()
    dropped = tmp_path / "drop"
    export.export_imagefolder(storage, CATEGORIES, str(dropped), combined=True, rule="drop")
    assert not any((dropped / c / f"{i}.png").exists() for c in CATEGORIES for i in picked)


def test_resolve_classes_rule():
    positive = np.array([[1, 1], [1, 1], [1, 1], [0, 1], [0, 0]], bool)
    by_people = np.array([[0, 1], [0, 0], [1, 1], [0, 0], [0, 0]], bool)
    confidence = np.array([[0.99, 0.6], [0.7, 0.9], [0.8, 0.8], [0.1, 0.7], [0.9, 0.9]])
    winner, claims = export.resolve_classes(positive, by_people, confidence)
    # people beat the model; then the more confident; then the category listed first; -1: no class
    assert winner.tolist() == [1, 1, 0, 1, -1] and claims.tolist() == [2, 2, 2, 1, 0]
    dropped, _ = export.resolve_classes(positive, by_people, confidence, rule="drop")
    assert dropped.tolist() == [-1, -1, -1, 1, -1]
    with pytest.raises(export.ExportError, match="human-first, drop"):
        export.resolve_classes(positive, by_people, confidence, rule="vote")


def test_a_changed_or_vanished_image_is_left_out_and_listed(finished, tmp_path):
    d = dataset(finished, "trouser")
    pos = d[d["label"] == "positive"]
    changed, vanished = (p.removeprefix("file://") for p in pos["uri"].iloc[:2])
    saved = {p: open(p, "rb").read() for p in (changed, vanished)}
    try:
        with open(changed, "ab") as f:
            f.write(b"edited")
        os.unlink(vanished)
        out = tmp_path / "folder"
        report = export.export_imagefolder(finished, ["trouser"], str(out), splits=["positive"])
    finally:
        for p, data in saved.items():
            with open(p, "wb") as f:
                f.write(data)
    assert report.written["positive"] == len(pos) - 2
    listed = pd.read_csv(out / "skipped.csv")
    reasons = dict(zip(listed["uri"].str.removeprefix("file://"), listed["reason"], strict=True))
    assert "changed since ingest" in reasons[changed] and "unreadable" in reasons[vanished]


def test_cli_exports_and_refuses_unfinished_category(finished, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        cli(["export", "--root", finished.url, "--category", *CATEGORIES, "--format", "lsun", "--out", str(out)]) == 0
    )
    assert {"trouser_train_lmdb", "dress_train_lmdb"} <= set(os.listdir(out))
    assert "lsun export" in capsys.readouterr().out
    assert (
        cli(
            [
                "export",
                "--root",
                finished.url,
                "--category",
                "sneaker",
                "--format",
                "parquet",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "'sneaker' has no finished dataset" in err and "lsun-hitl run" in err
    assert not (tmp_path / "p").exists(), "nothing written for a refused export"
    assert (
        cli(["export", "--root", finished.url, "--category", "dress", "--format", "lsun", "--out", "s3://bucket/x"])
        == 2
    )
    assert "local directory" in capsys.readouterr().err


# ---- Label Studio: a real server ---------------------------------------------------------------------
def label_studio_bin() -> str:
    """Label Studio lives in its own virtual environment (.venv-ls, made by scripts/setup.sh): its pinned
    dependencies clash with this project's."""
    path = os.environ.get("LABEL_STUDIO_BIN") or os.path.join(
        os.path.dirname(__file__), "..", ".venv-ls", "bin", "label-studio"
    )
    assert os.path.exists(path), f"Label Studio is not installed at {path}: run bash scripts/setup.sh"
    return path


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """Label Studio started on loopback with a fresh database; yields (URL, API headers)."""
    import requests

    data = tmp_path_factory.mktemp("label-studio")
    port, token = free_port(), "lsun-hitl-test-token"
    env = os.environ | {"LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true", "DJANGO_DB": "sqlite"}
    log = open(data / "server.log", "w")
    proc = subprocess.Popen(
        [
            label_studio_bin(),
            "start",
            "--no-browser",
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--internal-host",
            "127.0.0.1",
            "--username",
            "reviewer@example.com",
            "--password",
            "review-pass-1",
            "--user-token",
            token,
            "--enable-legacy-api-token",
            "--log-level",
            "WARNING",
        ],
        cwd=data,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, (data / "server.log").read_text()[-3000:]
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    else:
        raise AssertionError("Label Studio did not start in 300 s: " + (data / "server.log").read_text()[-3000:])
    yield url, {"Authorization": f"Token {token}"}
    os.killpg(proc.pid, 15)
    proc.wait(30)
    log.close()


def test_label_studio_round_trip(finished, label_studio, tmp_path):
    """Tasks (with the model's scores as predictions) go into Label Studio; a reviewer's answers, exported
    by Label Studio as JSON, come back as labels that override the cascade in every export."""
    import requests

    url, headers = label_studio
    out = tmp_path / "ls"
    report = export.export_label_studio(finished, "trouser", str(out), decided_by=["model"], splits=["negative"])
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == report.written["tasks"] > 0
    assert all(t["predictions"][0]["result"][0]["value"]["choices"] == ["No"] for t in tasks)

    project = requests.post(
        f"{url}/api/projects",
        headers=headers,
        timeout=30,
        json={"title": "trouser review", "label_config": (out / "label_config.xml").read_text()},
    )
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    sent = tasks[:30]
    imported = requests.post(f"{url}/api/projects/{pid}/import", headers=headers, json=sent, timeout=120)
    assert imported.status_code == 201, imported.text
    assert imported.json()["task_count"] == 30 and imported.json()["prediction_count"] == 30

    listed = requests.get(
        f"{url}/api/tasks", params={"project": pid, "page_size": 100}, headers=headers, timeout=30
    ).json()["tasks"]
    flip = {t["data"]["image_id"] for t in sent[:4]}
    for task in listed:  # the reviewer overturns four model negatives, confirms the rest, is unsure of none
        choice = "Yes" if task["data"]["image_id"] in flip else "No"
        done = requests.post(
            f"{url}/api/tasks/{task['id']}/annotations",
            headers=headers,
            timeout=30,
            json={
                "result": [
                    {"from_name": "answer", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}
                ]
            },
        )
        assert done.status_code == 201, done.text
    exported = requests.get(
        f"{url}/api/projects/{pid}/export", params={"exportType": "JSON"}, headers=headers, timeout=60
    )
    assert exported.status_code == 200
    path = tmp_path / "annotations.json"
    path.write_bytes(exported.content)

    review = export.import_review(finished, "trouser", str(path))
    assert review.answers == 30 and review.reviewed == 30 and review.stored
    assert review.changed == {"negative->positive": 4}
    again = export.import_review(finished, "trouser", str(path))
    assert not again.stored, "the same export is stored once"
    d = dataset(finished, "trouser").set_index("image_id")
    assert (d.loc[sorted(flip), "label"] == "positive").all() and (d.loc[sorted(flip), "decided_by"] == "review").all()
    # through the CLI, a file naming images outside the dataset is refused whole
    bad = json.loads(exported.content)
    bad[0]["data"]["image_id"] = "not-an-image"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert cli(["review", "--root", finished.url, "--category", "trouser", "--labels", str(tmp_path / "bad.json")]) == 2
    shutil.rmtree(finished.path("labels", "trouser", "votes", "request=review"))  # other tests see the cascade's labels
