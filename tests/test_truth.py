"""Any ground truth: tables keyed by URI or image id, class or yes/no columns, and class-folder trees, registered
once and read by the simulated crowd, gold and the evaluation (``lsun_hitl.truth``, ``lsun-hitl truth``)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cli import main as cli
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd
from lsun_hitl.ingest import build_pool, read_pool
from lsun_hitl.quality import read_gold
from lsun_hitl.storage import Storage
from lsun_hitl.truth import TruthError, from_folder, normalize, read_truth, register, registered

from .conftest import png_bytes

CLASSES = ("cat", "dog", "bird")


@pytest.fixture()
def tree(tmp_path, fashion):
    """An ImageFolder tree: 3 classes x 20 images (distinct Fashion-MNIST pixels), plus a stray top-level file."""
    images, _ = fashion
    root = tmp_path / "tree"
    k = 0
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(20):
            (root / name / f"{i:02d}.png").write_bytes(png_bytes(images[k]))
            k += 1
    (root / "README.png").write_bytes(png_bytes(images[k]))
    return root


def test_folder_tree_is_a_truth_table_the_crowd_answers_from(tree, tmp_path, dask_cluster):
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, str(tree / "cat"), client=dask_cluster)  # the pool: the cat folder only
    table = from_folder(str(tree))
    assert table.num_rows == 60  # the stray file has no class
    got = register(storage, "animals", table)
    assert got.categories == tuple(sorted(CLASSES)) and got.covered == 20 and got.pool == 20
    assert registered(storage) == ["animals"]
    cats = read_truth(storage, "cat")
    assert sum(cats.values()) == 20 and len(cats) == 60
    pool = read_pool(storage, columns=["image_id", "uri"])
    assert all(read_truth(storage, "cat")[u] for u in pool.column("uri").to_pylist())
    answers = SimulatedCrowd(cats, CrowdParams(n_labelers=5, labels_per_image=3, seed=1)).answer(pool)
    assert set(answers["image_id"]) == set(pool.column("image_id").to_pylist())


def test_tables_by_uri_path_or_image_id(tree, tmp_path, dask_cluster):
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, str(tree), client=dask_cluster)
    pool = read_pool(storage, columns=["image_id", "uri"])
    uris = pool.column("uri").to_pylist()
    # a class per image, keyed by plain local paths (as a user has them)
    paths = [u.removeprefix("file://") for u in uris]
    classes = [p.rsplit("/", 2)[-2] for p in paths]
    csv = tmp_path / "truth.csv"
    csv.write_text("uri,class\n" + "".join(f"{p},{c}\n" for p, c in zip(paths, classes, strict=True)))
    assert cli(["truth", "--root", storage.url, "--table", str(csv)]) == 0
    assert read_truth(storage, "dog") == {u: c == "dog" for u, c in zip(uris, classes, strict=True)}
    # yes/no for another category, keyed by image id
    ids = pool.column("image_id").to_pylist()
    flags = ["yes" if c == "bird" else "no" for c in classes]
    table = normalize(pa.table({"image_id": ids, "feathered": flags}), pool, "flags")
    register(storage, "flags", table)
    feathered = read_truth(storage, "feathered")
    assert sum(feathered.values()) == 20 and set(feathered) == set(uris)
    # gold drawn from it (half positives), and gold files naming images by URI
    assert cli(["gold", "--root", storage.url, "--category", "feathered", "--from-truth", "10"]) == 0
    gold = read_gold(storage, "feathered")
    assert gold.num_rows == 10 and gold.column("answer").to_pylist().count("yes") == 5
    gold_csv = tmp_path / "gold.csv"
    gold_csv.write_text(
        "uri,answer\n"
        + "".join(f"{p},{'yes' if c == 'dog' else 'no'}\n" for p, c in zip(paths[:6], classes[:6], strict=True))
    )
    assert cli(["gold", "--root", storage.url, "--category", "dog", "--labels", str(gold_csv)]) == 0
    assert read_gold(storage, "dog").num_rows == 6


def test_bad_truth_is_one_clear_message(tree, tmp_path, capsys):
    storage = Storage(str(tmp_path / "root"))
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class\n/a.png,cat\n")
    assert cli(["truth", "--root", storage.url, "--table", str(bad)]) == 2
    assert "no 'uri' or 'image_id' column" in capsys.readouterr().err
    bad.write_text("uri,cat\n/a.png,maybe\n")
    assert cli(["truth", "--root", storage.url, "--table", str(bad)]) == 2
    assert "holds ['maybe'], not yes/no" in capsys.readouterr().err
    bad.write_text("image_id,class\nabc,cat\n")
    assert cli(["truth", "--root", storage.url, "--table", str(bad)]) == 2
    assert "ingest the pool first" in capsys.readouterr().err
    assert cli(["truth", "--root", storage.url, "--folder", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    register(storage, "animals", from_folder(str(tree)))
    with pytest.raises(
        TruthError, match=r"no ground truth for category 'horse'.*categories with truth: bird, cat, dog"
    ):
        read_truth(storage, "horse")
    assert cli(["truth", "--root", storage.url]) == 0
    assert "truth 'animals': 60 images" in capsys.readouterr().out  # the stray file has no class
