"""Checks of a storage root after faults: what a run wrote, compared and audited file by file.

Used by the replay test (two runs of the same inputs write the same results) and the chaos driver
(``benchmarks/chaos.py``: after many kills, nothing torn, no answer lost or counted twice, no image asked of
people twice). Pure functions over a ``Storage``; each returns what it found, the caller decides.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .labels import list_requests, read_request
from .storage import Storage, votes_dir

# A run's results: everything it decides and stores (the pool it read included), not people's answers
RESULT_FOLDERS = ("pool", "samples", "models", "scores", "calibration", "manifests", "datasets")
# what may differ between two runs of the same inputs: attempt names (random by design, so two writers never
# share a folder) and the steps' measurements of themselves (seconds, workers' memory, the input cache's URL,
# images decoded or read from the caches: a scoring step killed and run again finds some inputs cached)
NOT_RESULTS = frozenset(
    {
        "attempt", "previous", "parts", "file", "manifest_attempt",
        "seconds", "worker_peak_rss_mb", "cache", "decoded", "from_cache", "from_features",
    }
)  # fmt: skip


# seconds no live write of one small file (an answer batch, a request, a record) takes: a temporary older than
# this was left by a writer that died
LIVE_WRITE_S = 5.0


def run_folders(category: str) -> list[str]:
    """The folders only ``category``'s run writes (its results and reports)."""
    return [f"{f}/{category}" for f in RESULT_FOLDERS if f != "pool"] + [f"reports/{category}"]


def _files(storage: Storage, folder: str) -> list[str]:
    root = storage.path(folder)
    return sorted(storage.fs.find(root)) if storage.exists(root) else []


def _relative(storage: Storage, path: str) -> str:
    return path[len(storage.path("")) :].lstrip("/") if path.startswith(storage.path("")) else path


def _without(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without(v) for k, v in value.items() if k not in NOT_RESULTS}
    if isinstance(value, list):
        return [_without(v) for v in value]
    return value


def result_files(storage: Storage, category: str) -> dict[str, bytes]:
    """Every result file of ``category``'s run (and the pool), keyed by its path with ``attempt=<id>`` made
    ``attempt=*``; JSON parsed and written back without ``NOT_RESULTS``; the category's aggregated labels too.

    Two roots whose runs read the same pool, settings and answers give equal dicts (``tests/test_replay.py``).
    Raises ``ValueError`` if two attempts of one table are left (a run's end sweeps all but the committed).
    """
    folders = ["pool", *run_folders(category)[:-1], f"labels/{category}/aggregated"]
    out: dict[str, bytes] = {}
    for folder in folders:
        for path in _files(storage, folder):
            rel = _relative(storage, path)
            key = "/".join("attempt=*" if p.startswith("attempt=") else p for p in rel.split("/"))
            if key in out:
                raise ValueError(f"two attempts left at {key}")
            data = storage.read_bytes(path)
            if rel.endswith(".json"):
                data = json.dumps(_without(json.loads(data)), sort_keys=True).encode()
            out[key] = data
    return out


def temporary_files(storage: Storage) -> list[str]:
    """Files a write left half-done: ``Storage``'s temporaries (``.tmp-`` names), anywhere under the root."""
    return [_relative(storage, p) for p in _files(storage, "") if p.rsplit("/", 1)[-1].startswith(".tmp-")]


def remove_temporary(storage: Storage, folders: Iterable[str], *, older_than_s: float) -> list[str]:
    """Remove the temporaries of writes that died (a process killed between writing and renaming) under
    ``folders``, those last modified more than ``older_than_s`` seconds ago; the paths removed.

    Readers never see them (a write becomes visible by its rename), but they take disk and would be mistaken
    for torn files. Call it where no other writer of ``folders`` is active, or with an age no live write
    reaches: a run's end for its own folders, the labeling service's start for the answers it writes.
    Object stores write in one PUT and leave none."""
    import time

    protocols = storage.fs.protocol if isinstance(storage.fs.protocol, tuple) else (storage.fs.protocol,)
    if "file" not in protocols:
        return []
    cutoff = time.time() - older_than_s
    removed = []
    for folder in folders:
        for path in _files(storage, folder):
            if path.rsplit("/", 1)[-1].startswith(".tmp-"):
                try:
                    if storage.fs.info(path)["mtime"] <= cutoff:
                        storage.fs.rm(path)
                        removed.append(_relative(storage, path))
                except FileNotFoundError:  # renamed or removed meanwhile by its writer
                    pass
    return removed


def unreadable_files(storage: Storage, folders: Iterable[str] = RESULT_FOLDERS + ("labels", "reports")) -> list[str]:
    """Parquet files whose footer cannot be read and JSON files that do not parse: torn writes."""
    bad = []
    for folder in folders:
        for path in _files(storage, folder):
            try:
                if path.endswith(".parquet"):
                    with storage.fs.open(path, "rb") as f:
                        pq.ParquetFile(f).metadata  # noqa: B018 - reading the footer is the check
                elif path.endswith(".json"):
                    json.loads(storage.read_bytes(path))
            except Exception as exc:  # noqa: BLE001 - any failure to read is what this reports
                bad.append(f"{_relative(storage, path)}: {type(exc).__name__}")
    return bad


def asked_twice(storage: Storage, category: str) -> list[str]:
    """Images people were asked about in two of the category's requests where the loop asks each image once:
    its iterations' samples and the remainder. Rechecks (and audit, follow-ups) ask again on purpose and must
    only hold images of the request they recheck. Returns one line per breach."""
    images: dict[str, set[str]] = {}
    for req in list_requests(storage, category):
        _, table = read_request(storage, category, req.request_id)
        images[req.request_id] = set(table.column("image_id").to_pylist())
    once = {
        r: ids for r, ids in images.items() if r == "remainder" or (r.startswith("iteration-") and "-" not in r[10:])
    }
    seen: dict[str, str] = {}
    out = []
    for request, ids in sorted(once.items()):
        for image in ids:
            if image in seen:
                out.append(f"{image} in {seen[image]} and {request}")
            seen[image] = request
    for request, ids in images.items():
        base = request.split("-recheck")[0] if "-recheck" in request else None
        if base in images and not ids <= images[base]:
            out.append(f"{request} holds {len(ids - images[base])} images {base} did not")
    return out


def vote_audit(storage: Storage, category: str, accepted: Iterable[dict]) -> dict[str, int]:
    """Count audit of people's answers against what the labeling service told its callers it accepted.

    ``accepted``: one record per 200 answer to a submission (``labeler``, ``batch_id``, ``answers``,
    ``stored``), as ``lsun-hitl crowd --accepted-log`` writes them. Returns the figures: batches accepted
    (distinct), answers they held, answers stored for them, accepted batches with none stored (lost), stored
    answers counted twice (the same labeler, batch and image twice), stored batches no caller was told of.
    """
    by_batch: dict[str, int] = {}
    for record in accepted:
        by_batch[record["batch_id"]] = int(record["answers"])
    files = storage.glob(storage.path(votes_dir(category, "*"), "*.parquet"))
    raw = [storage.read_table(f) for f in files]  # as stored: read_votes would drop repeats before counting
    cols = ["batch_id", "labeler", "image_id"]
    stored = (
        pa.concat_tables(
            [
                t.select(cols).cast(pa.schema([(c, pa.string()) for c in cols]))
                for t in raw
                if "batch_id" in t.column_names
            ]
        )
        .to_pandas()
        .dropna(subset=["batch_id"])
        if raw
        else pd.DataFrame(columns=cols)
    )
    per_batch = stored.groupby("batch_id").size().to_dict()
    mine = {b: n for b, n in per_batch.items() if b in by_batch}
    return {
        "batches_accepted": len(by_batch),
        "answers_accepted": sum(by_batch.values()),
        "answers_stored": int(sum(mine.values())),
        "lost_batches": sum(1 for b in by_batch if b not in per_batch),
        "short_batches": sum(1 for b, n in by_batch.items() if b in per_batch and per_batch[b] != n),
        "counted_twice": int(stored.duplicated(cols).sum()),
        "stored_unacknowledged": sum(1 for b in per_batch if b not in by_batch),
    }
