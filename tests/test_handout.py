"""Labels from outside tools get the service's quality control: gold mixed into the handout and checked on the
way back, a random labeler flagged, disputed images asked again in a follow-up, the run resumed only after."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa

from cli import main as cli
from lsun_hitl import labels
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.handout import follow_up, gold_ids
from lsun_hitl.ingest import build_pool, read_pool
from lsun_hitl.quality import read_gold, write_gold
from lsun_hitl.storage import Storage
from lsun_hitl.truth import gold_from_truth, read_truth

CATEGORY = "bag"


def answer_file(path, rows, truth_of, labelers, per_image, seed, everyone=()):
    """A file crowd: ``per_image`` answers per image from ``labelers`` (name -> accuracy), all of them on
    ``everyone``; each answer right with the labeler's accuracy (0.5: at random)."""
    rng = np.random.default_rng(seed)
    names = list(labelers)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "labeler", "answer"])
        for image_id, uri in rows:
            who = names if image_id in everyone else rng.choice(names, per_image, replace=False)
            for name in who:
                right = rng.random() < labelers[name]
                w.writerow([image_id, name, "yes" if truth_of[uri] == right else "no"])


def test_noisy_file_crowd_gets_quality_control(tmp_path, dask_cluster, capsys):
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=600, seed=9), client=dask_cluster)
    truth = read_truth(storage, CATEGORY)
    write_gold(storage, CATEGORY, gold_from_truth(storage, CATEGORY, 40, seed=1))
    pool = read_pool(storage, columns=["image_id", "uri"])
    gold = set(read_gold(storage, CATEGORY).column("image_id").to_pylist())
    keep = pa.array([i not in gold for i in pool.column("image_id").to_pylist()])
    request = pool.filter(keep).slice(0, 150)
    labels.publish_request(storage, CATEGORY, "iteration-1", 1, request, "run-1")

    out = tmp_path / "handout.csv"
    assert cli(["handout", "--root", storage.url, "--category", CATEGORY, "--request", "iteration-1",
                "--out", str(out), "--gold", "30"]) == 0  # fmt: skip
    with open(out) as f:
        handed = list(csv.DictReader(f))
    mixed = set(gold_ids(storage, CATEGORY, "iteration-1"))
    assert len(handed) == 180 and len(mixed) == 30 and mixed <= gold
    assert {r["image_id"] for r in handed} == set(request.column("image_id").to_pylist()) | mixed
    assert list(handed[0]) == ["image_id", "uri", "labeler", "answer"] and not handed[0]["answer"]

    # four careful labelers and one who answers at random; 3 answers an image, all five on the gold
    crowd = {"ann": 0.97, "bo": 0.96, "cy": 0.97, "di": 0.95, "rand": 0.5}
    first = tmp_path / "answers-1.csv"
    answer_file(first, [(r["image_id"], r["uri"]) for r in handed], truth, crowd, 3, seed=3, everyone=mixed)
    argv = ["resume", "--root", storage.url, "--category", CATEGORY]
    assert cli([*argv, "--request", "iteration-1", "--labels", str(first)]) == 0
    said = capsys.readouterr().out
    assert "labelers flagged (answers not used): rand" in said
    assert "asked again as 'iteration-1-more-1'" in said
    assert not labels.was_taken(storage, CATEGORY, "iteration-1")  # the run was not resumed
    check = follow_up(storage, CATEGORY, "iteration-1")
    assert check.flagged == ("rand",) and check.gold_answers == 150 and check.disputed > 0

    # follow-ups, handed out and answered by the careful labelers, settle every disputed image
    careful = {k: v for k, v in crowd.items() if k != "rand"}
    labels.take(storage, CATEGORY, "iteration-1")  # stands in for the run, which takes stored labels itself
    for k in range(1, 4):
        name = f"iteration-1-more-{k}"
        more = tmp_path / f"more-{k}.csv"
        assert cli(["handout", "--root", storage.url, "--category", CATEGORY, "--request", name,
                    "--out", str(more), "--gold", "0"]) == 0  # fmt: skip
        with open(more) as f:
            again = [(r["image_id"], r["uri"]) for r in csv.DictReader(f)]
        assert 0 < len(again) <= check.disputed
        answer_file(tmp_path / f"answers-more-{k}.csv", again, truth, careful, 4, seed=4 + k)
        assert cli([*argv, "--request", name, "--labels", str(tmp_path / f"answers-more-{k}.csv")]) == 0
        said = capsys.readouterr().out
        if "asked again" not in said:
            break
    assert "already took these labels" in said  # resumed (here: found taken) only once nothing is disputed
    assert follow_up(storage, CATEGORY, "iteration-1").disputed == 0
    agg = labels.collect(storage, CATEGORY, "iteration-1")
    uri = dict(zip(pool.column("image_id").to_pylist(), pool.column("uri").to_pylist(), strict=True))
    pairs = zip(agg["image_id"].to_pylist(), agg["p_positive"].to_pylist(), strict=True)
    assert np.mean([(p >= 0.5) == truth[uri[i]] for i, p in pairs]) >= 0.98  # the random labeler left out


def test_a_handout_of_hostile_file_names_is_one_row_an_image_and_no_formula(tmp_path):
    """An image whose name holds a newline, a comma and ``=1+2`` (and ids that start like formulas) stays one
    row of the handout, read back whole, with no cell a spreadsheet would run as a formula."""
    import csv

    from lsun_hitl.handout import write_handout

    uris = ["file:///p/a\nb,=1+2.png", 'file:///p/"quoted",x.png', "file:///p/plain.png", "=HYPERLINK(1)"]
    ids = ["=1+2", "+cmd", "-2", "@SUM(A1)"]
    path = tmp_path / "handout.csv"
    write_handout(pa.table({"image_id": ids, "uri": uris}), str(path), "bag")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", "uri", "labeler", "answer"] and len(rows) == 1 + len(ids)
    assert [r[0] for r in rows[1:]] == ["'" + i for i in ids]
    assert [r[1] for r in rows[1:]] == [*uris[:3], "'=HYPERLINK(1)"]
    assert all(r[2:] == ["", ""] for r in rows[1:])  # nothing pre-filled
    assert not any(cell[:1] in "=+-@" for r in rows[1:] for cell in r if cell)
