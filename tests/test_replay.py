"""Replay (issue 28): the pipeline is a function of the pool, the settings and the stored answers.

A cascade runs with the simulated crowd; a second root gets a copy of the first root's pool and nothing else,
and runs the same flow while ``crowd.StoredAnswers`` answers each request it publishes with the first root's
stored answers to it. Every file the replay writes must be the first run's, byte for byte: samples, models,
scores, calibration, aggregated labels, manifests, the dataset and its summary. The only differences allowed
are the names of committed attempts and the steps' measurements of themselves (``integrity.NOT_RESULTS``).
"""

import shutil
from pathlib import Path

import pytest

from flows.runner import run_cascade, simulated_crowd
from lsun_hitl.crowd import StoredAnswers
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool
from lsun_hitl.integrity import result_files
from lsun_hitl.storage import Storage
from tests import small_cascade

CATEGORY = "trouser"


def make_root(path: Path) -> Storage:
    storage = Storage(str(path))
    build_pool(storage, import_fashion_mnist(storage, limit=2000, seed=1))
    return storage


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_replayed_over_another_root_s_stored_answers_writes_the_same_bytes(tmp_path):
    first = make_root(tmp_path / "first")
    summary = small_cascade.run(first, CATEGORY)
    assert summary["unresolved"] == 0

    second = Storage(str(tmp_path / "second"))
    shutil.copytree(Path(first.url) / "pool", Path(second.url) / "pool")  # the same pool (its uris: first's images)
    with simulated_crowd(second, CATEGORY, StoredAnswers(first)):
        replayed = run_cascade(CATEGORY, second.url, params=small_cascade.PARAMS)
    assert replayed == summary

    a, b = result_files(first, CATEGORY), result_files(second, CATEGORY)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert differ == [], f"{len(differ)} of {len(a)} files differ, first {differ[:5]}"
    assert any(k.startswith("manifests/") for k in a) and any(k.startswith("datasets/") for k in a)
    assert any(k.startswith("models/") for k in a) and any(k.startswith("calibration/") for k in a)
    assert any(k.startswith("labels/") for k in a) and any(k.startswith("pool/") for k in a)
