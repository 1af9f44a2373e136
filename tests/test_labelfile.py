"""Label files people bring back (CSV, JSONL, Label Studio export), and the admin commands."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from cli import main
from lsun_hitl import labels
from lsun_hitl.labelfile import label_studio_tasks, read_label_file
from lsun_hitl.labels import LabelError
from lsun_hitl.storage import LABELERS_KEY, Storage

REQUEST = pa.table({"image_id": ["a1", "b2", "c3"], "uri": ["s3://x/a.jpg", "s3://x/b.jpg", "s3://x/c.jpg"]})


def test_csv_and_jsonl(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("image_id, labeler, answer\na1, ann, Yes\nb2, ann, no\n")
    frame = read_label_file(str(csv), REQUEST, "bag")
    assert list(frame["answer"]) == ["Yes", "no"]
    table = labels.validate_votes(frame, REQUEST.column("image_id").to_pylist(), "r1")
    assert table.column("answer").to_pylist() == ["yes", "no"]
    jsonl = tmp_path / "l.jsonl"
    jsonl.write_text('{"image_id": "c3", "labeler": "bob", "answer": "unsure"}\n')
    assert read_label_file(str(jsonl), REQUEST, "bag").iloc[0]["labeler"] == "bob"


def test_label_studio_round_trip(tmp_path):
    tasks = label_studio_tasks(REQUEST, "bag", scores={"a1": 0.9})
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["Yes"] and "predictions" not in tasks[1]
    # what Label Studio exports after people annotated: data by URL, choices, annotator objects
    export = [
        {
            "data": {"image": "s3://x/a.jpg"},
            "annotations": [
                {
                    "completed_by": {"email": "ann@x.org"},
                    "result": [{"type": "choices", "value": {"choices": ["Yes"]}}],
                },
                {"completed_by": 7, "result": [{"type": "choices", "value": {"choices": ["bag"]}}]},
            ],
        },
        {
            "data": {"image_id": "b2"},
            "annotations": [
                {"completed_by": 7, "result": [{"type": "choices", "value": {"choices": ["No"]}}]},
                {"completed_by": 8, "was_cancelled": True, "result": []},
            ],
        },
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    frame = read_label_file(str(path), REQUEST, "bag")
    assert frame.values.tolist() == [
        ["a1", "label-studio-ann@x.org", "yes"],
        ["a1", "label-studio-7", "yes"],
        ["b2", "label-studio-7", "no"],
    ]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("l.csv", "image,who\nx,y\n", "lacks column(s) ['answer', 'image_id', 'labeler']"),
        ("l.csv", 'image_id,labeler,answer\n"a1,ann\n', "cannot parse label file"),
        ("l.jsonl", "{not json\n", "cannot parse label file"),
        ("l.json", '{"tasks": []}', "a JSON list of tasks"),
        ("l.json", '[{"data": {"image": "s3://elsewhere.jpg"}, "annotations": []}]', "not an image of the request"),
        ("l.json", '[{"data": {"image_id": "a1"}, "annotations": []}]', "no choice annotations"),
        ("l.json", "[", "cannot parse label file"),
        # Label Studio exports with the wrong types: one message naming the file, the task and the field
        ("l.json", '[{"data": {"image_id": "a1"}, "annotations": "yes"}]', "task 0, field annotations is str"),
        ("l.json", '[{"data": {"image": ["a.png"]}, "annotations": []}]', "task 0, field data.image is list"),
        ("l.json", '[{"data": {"image_id": 7}, "annotations": []}]', "task 0, field data.image_id is int"),
        ("l.json", '[{"data": {"image_id": "a1"}, "annotations": ["x"]}]', "task 0, annotation 0 is str"),
        (
            "l.json",
            '[{"data": {"image_id": "a1"}, "annotations": [{"result": [{"type": "choices", "value": "yes"}]}]}]',
            "task 0, annotation 0, result 0, field value is str",
        ),
    ],
)
def test_malformed_label_files_are_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LabelError) as err:
        read_label_file(str(path), REQUEST, "bag")
    assert message in str(err.value) and name in str(err.value)


def test_labelers_and_gold_commands(tmp_path, capsys):
    root = str(tmp_path)
    assert main(["labelers", "add", "alice", "--root", root]) == 0
    token = capsys.readouterr().out.splitlines()[1]
    assert len(token) >= 40 and token not in Storage(root).read_bytes(Storage(root).path(LABELERS_KEY)).decode()
    assert main(["labelers", "add", "alice", "--root", root]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["labelers", "add", "bad name", "--root", root]) == 2
    assert main(["labelers", "list", "--root", root]) == 0
    assert capsys.readouterr().out.strip() == "alice\tlabeler"
    gold = tmp_path / "gold.csv"
    gold.write_text("image_id,answer\nnot-in-pool,yes\n")
    assert main(["gold", "--category", "bag", "--labels", str(gold), "--root", root]) == 2
    assert "lsun-hitl ingest" in capsys.readouterr().err  # no pool yet: says how to build it


def test_label_imports_unknown_ids_repeats_and_closed_batches_change_nothing_wrongly(tmp_path):
    """A file naming images outside the request is refused whole; the same file twice is a no-op;
    answers sent again to a batch already submitted are not stored."""
    from lsun_hitl.desk import LabelingDesk
    from lsun_hitl.quality import QCParams

    storage = Storage(str(tmp_path))
    labels.publish_request(storage, "bag", "r1", 1, REQUEST, None)
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,labeler,answer\na1,ann,yes\nzz9,ann,no\n")
    with pytest.raises(LabelError, match=r"1 image id\(s\) were not in request 'r1', e.g. \['zz9'\]"):
        labels.submit_votes(storage, "bag", "r1", read_label_file(str(bad), REQUEST, "bag"), "file-bad")
    assert labels.read_votes(storage, "bag").num_rows == 0, "nothing of a refused file is stored"

    good = tmp_path / "good.csv"
    good.write_text("image_id,labeler,answer\na1,ann,yes\nb2,ann,no\nc3,ann,no\n")
    frame = read_label_file(str(good), REQUEST, "bag")
    assert labels.submit_votes(storage, "bag", "r1", frame, "file-good") is True
    before = labels.read_votes(storage, "bag")
    assert labels.submit_votes(storage, "bag", "r1", frame, "file-good") is False  # same file again
    assert labels.read_votes(storage, "bag").equals(before)

    desk = LabelingDesk(storage, QCParams(batch_size=3, gold_rate=0, labels_per_image=2))
    batch = desk.next_batch("bob")
    first = desk.submit(batch.batch_id, "bob", [(i, "yes") for i in range(len(batch.image_ids))])
    again = desk.submit(batch.batch_id, "bob", [(i, "no") for i in range(len(batch.image_ids))])
    assert first["stored"] is True and again["stored"] is False
    bob = labels.read_votes(storage, "bag").to_pandas().query("labeler == 'bob'")
    assert len(bob) == len(batch.image_ids) and set(bob.answer) == {"yes"}, "the closed batch kept its answers"


def test_a_label_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.csv"
    path.write_text("image_id,labeler,answer\n" + "a1,ann,yes\n" * 200_000)  # 2.2 MB
    monkeypatch.setenv("LSUN_HITL_MAX_LABEL_FILE_MB", "1")
    with pytest.raises(LabelError, match=r"big.csv' is 2,200,024 bytes, over the limit of 1,048,576: split it"):
        read_label_file(str(path), REQUEST, "bag")
    monkeypatch.setenv("LSUN_HITL_MAX_LABEL_FILE_MB", "3")
    assert len(read_label_file(str(path), REQUEST, "bag")) == 200_000
