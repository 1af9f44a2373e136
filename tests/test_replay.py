"""Replay (issue 28): the pipeline is a function of the pool, the settings and the stored answers.

A cascade runs with the simulated crowd; a second root gets a copy of the first root's pool and nothing else,
and runs the same flow while ``crowd.StoredAnswers`` answers each request it publishes with the first root's
stored answers to it. Every file the replay writes must be the first run's, byte for byte: samples, models,
scores, calibration, aggregated labels, manifests, the dataset and its summary. The only differences allowed
are the names of committed attempts and the steps' measurements of themselves (``NOT_RESULTS``).
"""

import json
import shutil
from pathlib import Path

import pytest

from flows.runner import run_cascade, simulated_crowd
from lsun_hitl.crowd import StoredAnswers
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool
from lsun_hitl.storage import Storage
from tests import small_cascade

CATEGORY = "trouser"
COMPARED = ("pool", "samples", "models", "scores", "calibration", "manifests", "datasets", "labels/trouser/aggregated")


def make_root(path: Path) -> Storage:
    storage = Storage(str(path))
    build_pool(storage, import_fashion_mnist(storage, limit=2000, seed=1))
    return storage


# what may differ between two runs of the same inputs: attempt names (random by design, so two writers never
# share a folder) and the scoring step's measurements of itself (its seconds, its workers' memory, the URL of
# the root's input cache)
NOT_RESULTS = {"attempt", "previous", "parts", "file", "manifest_attempt", "seconds", "worker_peak_rss_mb", "cache"}


def _without_attempts(value):
    """A JSON record with ``NOT_RESULTS`` taken out, recursively."""
    if isinstance(value, dict):
        return {k: _without_attempts(v) for k, v in value.items() if k not in NOT_RESULTS}
    if isinstance(value, list):
        return [_without_attempts(v) for v in value]
    return value


def stored_files(root: Path) -> dict[str, bytes]:
    """Every file a run wrote under ``COMPARED``, keyed by its path with ``attempt=<id>`` made ``attempt=*``
    (committed attempts only: leftovers are swept at a run's end), JSON parsed without ``NOT_RESULTS``."""
    out: dict[str, bytes] = {}
    for top in COMPARED:
        for path in sorted((root / top).rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            parts = [("attempt=*" if p.startswith("attempt=") else p) for p in rel.split("/")]
            key = "/".join(parts)
            assert key not in out, f"two attempts left at {key}"
            data = path.read_bytes()
            if path.suffix == ".json":
                data = json.dumps(_without_attempts(json.loads(data)), sort_keys=True).encode()
            out[key] = data
    return out


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

    a, b = stored_files(Path(first.url)), stored_files(Path(second.url))
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert differ == [], f"{len(differ)} of {len(a)} files differ, first {differ[:5]}"
    assert any(k.startswith("manifests/") for k in a) and any(k.startswith("datasets/") for k in a)
    assert any(k.startswith("models/") for k in a) and any(k.startswith("calibration/") for k in a)
