"""Every CLI error a user can cause is one message naming the input and the fix, exit status 2, no traceback,
and nothing already stored is changed. Each case runs ``lsun-hitl`` in its own process, as a user would."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsun_hitl import labels
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool, read_pool
from lsun_hitl.storage import Storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory, dask_cluster):
    """A root with a pool of 300 images, Fashion-MNIST's truth, and a published request of 20 images."""
    base = tmp_path_factory.mktemp("cli-errors")
    storage = Storage(str(base / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=300, seed=8), client=dask_cluster)
    pool = read_pool(storage, columns=["image_id", "uri"])
    labels.publish_request(storage, "bag", "iteration-1", 1, pool.slice(0, 20), "no-such-run")
    files = base / "files"
    files.mkdir()
    (files / "bad.csv").write_text("picture,verdict\na.png,yes\n")
    (files / "gold-unknown.csv").write_text("image_id,answer\nnot-an-id,yes\n")
    (files / "labels-unknown.csv").write_text("image_id,labeler,answer\nnot-an-id,alice,yes\n")
    (files / "labels-bad-answer.csv").write_text(
        f"image_id,labeler,answer\n{pool.column('image_id')[0].as_py()},alice,perhaps\n"
    )
    (files / "truth-bad.csv").write_text("uri,bag\n/x.png,maybe\n")
    (files / "review.json").write_text("{not json")
    return storage, files


def digest(storage: Storage) -> str:
    """A hash of every stored file's path and bytes: an error must leave it as it was."""
    h = hashlib.blake2b(digest_size=16)
    for folder, _, names in sorted(os.walk(storage.root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            h.update(path.encode())
            h.update(Path(path).read_bytes())
    return h.hexdigest()


CASES = [
    # (arguments after the root, what the message must say)
    (["ingest", "--images", "/no/such/folder"], "image prefix '/no/such/folder' does not exist"),
    (["run", "--category", "bag", "--target-precision", "1.5"], "target_precision"),
    (["run", "--category", "bag", "--weights", "/no/such/weights.pt"], "/no/such/weights.pt"),
    (["run", "--category", "bag"], "too small for these settings to save labels"),
    (["resume", "--category", "bag", "--request", "iteration-9"], "no label request 'iteration-9'"),
    (["resume", "--category", "bag", "--request", "iteration-1"], "not fully labeled yet"),
    (["resume", "--category", "bag", "--request", "iteration-1", "--labels", "{files}/missing.csv"], "missing.csv"),
    (["resume", "--category", "bag", "--request", "iteration-1", "--labels", "{files}/bad.csv"], "bad.csv"),
    (
        ["resume", "--category", "bag", "--request", "iteration-1", "--labels", "{files}/labels-unknown.csv"],
        "not-an-id",
    ),
    (
        ["resume", "--category", "bag", "--request", "iteration-1", "--labels", "{files}/labels-bad-answer.csv"],
        "perhaps",
    ),
    (["gold", "--category", "bag", "--labels", "{files}/gold-unknown.csv"], "not in the pool"),
    (["gold", "--category", "bag", "--labels", "{files}/bad.csv"], "give image_id or uri, and answer"),
    (["gold", "--category", "unicorn", "--from-truth", "10"], "no ground truth for category 'unicorn'"),
    (["seed-positives", "--category", "bag", "{files}/gold-unknown.csv"], "not in the pool, e.g. ['not-an-id']"),
    (["seed-positives", "--category", "bag", "{files}/bad.csv"], "give a column image_id or uri"),
    (["seed-positives", "--category", "bag", "{files}/missing.csv"], "missing.csv' not found"),
    (["truth", "--table", "{files}/truth-bad.csv"], "not yes/no"),
    (["evaluate", "--category", "bag"], "category 'bag' has no finished dataset"),
    (["replay", "--category", "bag"], "no calibrated iteration of 'bag'"),
    (["crowd", "--category", "bag", "--replay-from", "{files}/no-root"], "no answers for 'bag' stored there"),
    (["crowd", "--category", "bag", "--accuracy", "1.5"], "--accuracy 1.5: give a share between 0 and 1"),
    (["export", "--category", "bag", "--format", "parquet", "--out", "{files}/out"], "bag"),
    (["review", "--category", "bag", "--labels", "{files}/review.json"], "has no finished dataset"),
    (["labelers", "add"], "labelers add needs a NAME"),
    (["run", "--category", "bag", "--dask-address", "tcp://127.0.0.1:9"], "tcp://127.0.0.1:9"),
]


@pytest.mark.parametrize("args, says", CASES, ids=[" ".join(c[0][:2]) + f"-{i}" for i, c in enumerate(CASES)])
def test_cli_error_is_one_message(root, args, says):
    storage, files = root
    before = digest(storage)
    argv = [a.replace("{files}", str(files)) for a in args]
    cmd = [sys.executable, "-m", "cli", argv[0], "--root", storage.url, *argv[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL)
    err = done.stderr.strip()
    assert done.returncode == 2, (cmd, done.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"lsun-hitl {argv[0]}: error: ") and says in err, err
    assert digest(storage) == before  # nothing stored was changed
