"""A category's manifest in partitions: each iteration a committed set of part files, advanced part by part.

Layout (``lsun_hitl.partitions`` for the rules): ``manifests/<category>/iteration=<k>/_committed.json`` names
``attempt=<id>/part-<p>.parquet``, one part per partition of the pool's rows, in pool order, with
``lsun_hitl.manifest``'s columns. Read as one table with ``pyarrow.dataset`` or DuckDB over the files it names.
An older root's layout, one ``manifest.parquet`` per iteration, still opens: ``read_part`` slices it as if it
were partitioned, as it slices parts committed with another partition count (see ``tests/test_partitions.py``).

``advance_part`` is one partition's share of an iteration, run where the part is (a Dask worker): read the
previous iteration's part, record people's labels and the model's decisions for rows in its range, check that
no decision flipped, write the new part. It returns the part's counts, so the flow process (the coordinator)
keeps only the samples, the thresholds and the counts, and commits the iteration once every part is written.
The result is the same for any partition count: each row's new state depends only on its own inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .calibration import Thresholds
from .ingest import read_pool_rows
from .manifest import (
    ROLE_CALIBRATION,
    ROLE_REMAINDER,
    ROLE_TRAIN,
    UNLABELED,
    CascadeState,
    check_transition,
    manifest_counts,
    part_counts,
    rows_held,
    stored_parts,
)
from .partitions import (
    Partitioning,
    bottom_k,
    commit,
    commit_record,
    committed_files,
    merge_bottom_k,
    new_attempt,
    sample_keys,
    score_keys,
    write_part,
)
from .split import apply_human_labels, apply_thresholds
from .storage import Storage, manifest_dir, manifest_key


@dataclass(frozen=True)
class IterationUpdate:
    """What an iteration changes, by global pool row: small, held by the flow process and sent to each part.

    ``scored_rows`` / ``scores``: the candidates the model scored (at 100M these come from the scoring step's
    own parts, read per partition; here they are passed whole).
    """

    iteration: int
    train: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    train_p: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    calibration: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    calibration_p: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    scored_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    thresholds: Thresholds | None = None  # None: the model decides nothing this iteration (scores are recorded)
    scores_dir: str | None = None  # instead of scored_rows / scores: committed parts (row, score), one a partition
    # instead of both: the scoring step's parts (image_id, score) in candidate order and their row counts; each
    # partition reads the slice of them that holds its candidates (``advance_part``'s ``candidate_start``)
    score_files: tuple[str, ...] = ()
    score_sizes: tuple[int, ...] = ()
    # the images still open when the loop stopped, labeled by people (the remainder's iteration)
    remainder: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    remainder_p: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    # (seed, k): also draw each part's share of the next iteration's sample, its ``k`` smallest-keyed rows
    # still unlabeled after this one, while the new part is in memory (``store_next_sample``)
    next_sample: tuple[int, int] | None = None
    # (seed, k): also the parts' share of the next iteration's training draws (``train_draws``), from the scores
    # this iteration's model gave the rows left open
    next_train: tuple[int, int] | None = None


NEXT_SAMPLE_FILE = "next-sample.parquet"
NEXT_TRAIN_FILE = "next-train.parquet"
# the streams of the training draws, apart from the calibration stream (the category's name, which holds no '/')
UNIFORM_TRAIN_STREAM = "/train-uniform"
SCORE_TRAIN_STREAM = "/train-by-score"


# thresholds that decide nothing: what an iteration whose bounds all failed applies
NO_DECISION = Thresholds(
    None, None, None, None, n_calibration=0, n_positive_region=0, n_negative_region=0, confidence=0
)


def part_files(storage: Storage, directory: str, partitioning: Partitioning, what: str) -> list[str] | None:
    """The committed parts at ``directory`` (None if nothing is committed), checked to be one per partition."""
    files = committed_files(storage, directory)
    if files is not None and len(files) != partitioning.n_partitions:
        raise ValueError(f"{what} has {len(files)} parts, not {partitioning.n_partitions}: partitioned differently")
    return files


def _checked(table: pa.Table, rows: int, what: str) -> pa.Table:
    if table.num_rows != rows:
        raise ValueError(
            f"{what} has {table.num_rows:,} rows, not {rows:,}: it belongs to another pool or partitioning"
        )
    return table


def read_part(storage: Storage, category: str, iteration: int, partitioning: Partitioning, p: int) -> CascadeState:
    """Partition ``p`` of ``iteration``'s manifest: a committed part, or rows of today's one-file manifest.

    Today's layout is read whole by each part and sliced: right for the pools that layout holds (it was written
    by one process), to be migrated to parts before pools past a worker's memory.
    """
    return CascadeState.from_table(_state_table(storage, category, iteration, partitioning, p))


def _state_table(
    storage: Storage,
    category: str,
    iteration: int,
    partitioning: Partitioning,
    p: int,
    columns: list[str] | None = None,
) -> pa.Table:
    start, stop = partitioning.rows(p)
    return read_state_rows(storage, category, iteration, partitioning.n_rows, start, stop, columns)


def read_state_rows(
    storage: Storage,
    category: str,
    iteration: int,
    n_rows: int,
    start: int,
    stop: int,
    columns: list[str] | None = None,
) -> pa.Table:
    """Rows ``[start, stop)`` of ``iteration``'s manifest of a pool of ``n_rows`` images, whatever partitioning
    it was committed in: the parts that overlap them (a part wanted whole is read whole and its row count
    checked; the ends of a range read only the row groups they need), or an older root's one file."""
    what = f"the manifest of {category} iteration {iteration}"
    directory = manifest_dir(category, iteration)
    record = commit_record(storage, directory)
    if record is None:  # an older root's layout: one file, written by one process, read whole and sliced
        whole = storage.read_table(storage.path(manifest_key(category, iteration)), columns=columns)
        return _checked(whole, n_rows, what).slice(start, stop - start)
    if int(record["rows"]) != n_rows:
        raise ValueError(
            f"{what} holds {int(record['rows']):,} rows, not {n_rows:,}: it belongs to another pool or partitioning"
        )
    files = [storage.path(directory, name) for name in record["parts"]]
    stored = Partitioning(n_rows, len(files))
    pieces = []
    for q in range(int(stored.of_rows(np.array([start]))[0]) if start < n_rows else stored.n_partitions, len(files)):
        lo, hi = stored.rows(q)
        if lo >= stop:
            break
        a, b = max(start, lo), min(stop, hi)
        if (a, b) == (lo, hi):
            pieces.append(_checked(storage.read_table(files[q], columns=columns), hi - lo, f"part {q} of {what}"))
        else:
            pieces.append(storage.read_rows(files[q], a - lo, b - lo, columns=columns))
    if not pieces:
        return storage.read_rows(files[0], 0, 0, columns=columns)
    return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)


def read_score_slice(
    storage: Storage, files: tuple[str, ...], sizes: tuple[int, ...], start: int, stop: int
) -> pa.Table:
    """Rows ``[start, stop)`` of the scoring step's parts read as one table (image_id, score), opening only the
    parts that hold them."""
    bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
    pieces = [pa.table({"image_id": pa.array([], pa.string()), "score": pa.array([], pa.float32())})]
    if stop <= start:
        return pieces[0]
    if stop > bounds[-1]:
        raise ValueError(f"the scores hold {int(bounds[-1]):,} rows, not the {stop:,} the manifest's candidates need")
    for i in range(max(0, int(np.searchsorted(bounds, start, side="right")) - 1), len(files)):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        if lo >= stop:
            break
        if hi <= start:
            continue
        table = storage.read_table(files[i], columns=["image_id", "score"])
        pieces.append(table.slice(max(start, lo) - lo, min(stop, hi) - max(start, lo)))
    return pa.concat_tables(pieces, promote_options="permissive")


def sample_part(
    storage: Storage, category: str, iteration: int, partitioning: Partitioning, p: int, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The map of ``iteration``'s sample: partition ``p``'s ``k`` unlabeled rows (global) with the smallest
    keys after ``iteration - 1``, and their keys; ``partitions.merge_bottom_k`` of the parts' is the sample."""
    start, _ = partitioning.rows(p)
    column = _state_table(storage, category, iteration - 1, partitioning, p, columns=["state"])  # one column
    rows = np.flatnonzero(column_is(column, "state", "unlabeled")).astype(np.int64) + start
    return bottom_k(rows, sample_keys(rows, seed=seed, iteration=iteration, category=category), k)


def train_draws(
    rows: np.ndarray, scores: np.ndarray, *, seed: int, iteration: int, category: str, k: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The map of an iteration's training draws over one part's open ``rows`` (global) and their latest
    ``scores``: ``(uniform, by_score)``, each ``(rows, keys)`` of its ``k`` smallest keys.

    ``uniform`` is bottom-k of a uniform stream of its own; ``by_score`` a sample without replacement weighted
    by the score (rows with no finite positive score are never drawn). Both merge over parts as the calibration
    draw does (``partitions.merge_bottom_k``), and neither uses the calibration stream (``sampling.compose_sample``
    says why that keeps the bounds valid)."""
    rows = np.asarray(rows, np.int64)
    scores = np.asarray(scores, np.float64)
    uniform_keys = sample_keys(rows, seed=seed, iteration=iteration, category=category + UNIFORM_TRAIN_STREAM)
    uniform = bottom_k(rows, uniform_keys, k)
    ok = np.isfinite(scores) & (scores > 0)
    keys = score_keys(rows[ok], scores[ok], seed=seed, iteration=iteration, stream=category + SCORE_TRAIN_STREAM)
    return uniform, bottom_k(rows[ok], keys, k)


def train_part(
    storage: Storage, category: str, iteration: int, partitioning: Partitioning, p: int, k: int, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The map of ``iteration``'s training draws where the split before it stored none: ``train_draws`` of
    partition ``p``'s rows unlabeled after ``iteration - 1`` (reads the ``state`` and ``score`` columns)."""
    start, _ = partitioning.rows(p)
    table = _state_table(storage, category, iteration - 1, partitioning, p, columns=["state", "score"])
    index = np.flatnonzero(column_is(table, "state", "unlabeled"))
    scores = table.column("score").to_numpy(zero_copy_only=False)[index]
    return train_draws(index.astype(np.int64) + start, scores, seed=seed, iteration=iteration, category=category, k=k)


def _candidates(unlabeled: np.ndarray, train_local: np.ndarray) -> np.ndarray:
    """A part's candidates, ascending: its rows unlabeled before the iteration less those trained on (a mask:
    ``np.setdiff1d`` hashes both sides and took 40% of a part's split)."""
    mask = np.array(unlabeled, bool)
    mask[train_local] = False
    return np.flatnonzero(mask)


def range_candidates(
    storage: Storage, category: str, iteration: int, n_rows: int, start: int, stop: int, train: np.ndarray
) -> tuple[np.ndarray, pa.Array]:
    """The candidates of ``iteration`` among pool rows ``[start, stop)``: global rows, ascending, and their
    image ids. Candidates are the rows unlabeled after ``iteration - 1`` less the iteration's ``train`` rows;
    only the ``image_id`` and ``state`` columns of the rows in range are read."""
    table = read_state_rows(storage, category, iteration - 1, n_rows, start, stop, columns=["image_id", "state"])
    train_local, _ = _local(train, train, start, stop)
    index = _candidates(column_is(table, "state", "unlabeled"), train_local)
    ids = pc.take(table.column("image_id"), pa.array(index, pa.int64())).combine_chunks()
    return index.astype(np.int64) + start, ids


def _candidate_scores(
    storage: Storage,
    what: str,
    part_ids: pa.Array,
    unlabeled: np.ndarray,
    train_local: np.ndarray,
    files: tuple[str, ...],
    sizes: tuple[int, ...],
    candidate_start: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A part's candidates (part-local rows, ascending) and their scores, the slice of the scoring step's
    ``files`` from ``candidate_start``; raises ``ValueError`` naming ``what`` if the scores' ids are not theirs."""
    index = _candidates(unlabeled, train_local)
    table = read_score_slice(storage, files, sizes, candidate_start, candidate_start + len(index))
    if not _aligned(table.column("image_id"), part_ids, index):
        raise ValueError(f"the scores of {what} do not match its candidates; run the score step again")
    return index, table.column("score").to_numpy(zero_copy_only=False).astype(np.float32)


def _aligned(score_ids: pa.ChunkedArray, part_ids: pa.Array, index: np.ndarray, checks: int = 1024) -> bool:
    """Whether the scores' image ids are the part's candidates' (``index``): compared at up to ``checks`` evenly
    spaced positions and both ends (a misaligned slice differs nearly everywhere; taking every id cost 13% of a
    part's split). A misplaced score file shorter than a part's 1/1,024 could slip between the positions; the
    scoring step's files are thousands of rows, and each part checks its own slice."""
    if len(score_ids) != len(index):
        return False
    at = np.unique(np.linspace(0, len(index) - 1, min(checks, len(index))).astype(np.int64)) if len(index) else index
    return _take_sorted(score_ids, at).equals(pc.take(part_ids, pa.array(index[at], pa.int64())))


def _take_sorted(column: pa.ChunkedArray, at: np.ndarray) -> pa.Array:
    """``column``'s values at the ascending positions ``at``, taken chunk by chunk: ``pc.take`` of a chunked
    array first concatenates its chunks, ~50 MB of ids for a part's scores (0.2 s of a 0.7 s split)."""
    bounds = np.cumsum([0, *(len(chunk) for chunk in column.chunks)])
    pieces = [pa.array([], column.type)]
    for chunk, lo, hi in zip(column.chunks, bounds[:-1], bounds[1:], strict=True):
        inside = at[(at >= lo) & (at < hi)] - lo
        if len(inside):
            pieces.append(chunk.take(pa.array(inside, pa.int64())))
    return pa.concat_arrays(pieces)


def _local(rows: np.ndarray, values: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries of ``rows`` in ``[start, stop)`` as part-local indices, with their ``values``."""
    rows = np.asarray(rows, np.int64)
    inside = (rows >= start) & (rows < stop)
    return rows[inside] - start, np.asarray(values)[inside]


def advance_part(
    storage: Storage,
    category: str,
    partitioning: Partitioning,
    p: int,
    update: IterationUpdate,
    attempt: str,
    candidate_start: int = 0,
) -> dict[str, int]:
    """Write partition ``p`` of ``update.iteration``'s manifest from the previous iteration's; its counts.

    The part's candidates are its rows unlabeled before, less the iteration's training sample; with
    ``update.score_files`` their scores are rows ``candidate_start`` onward of those files (``candidate_start``:
    how many candidates the partitions before ``p`` hold), checked by image id. Returns ``manifest.part_counts``
    of the new part and ``unlabeled_before``, ``scored``, ``model_positive``, ``model_negative``.
    """
    start, stop = partitioning.rows(p)
    before = read_part(storage, category, update.iteration - 1, partitioning, p)
    after = before.copy()
    train_local, _ = _local(update.train, update.train, start, stop)
    for rows, values, role in (
        (update.train, update.train_p, ROLE_TRAIN),
        (update.calibration, update.calibration_p, ROLE_CALIBRATION),
        (update.remainder, update.remainder_p, ROLE_REMAINDER),
    ):
        index, p_positive = _local(rows, values, start, stop)
        apply_human_labels(after, index, p_positive, role, update.iteration)
    if update.score_files:
        index, scores = _candidate_scores(
            storage,
            f"{category} iteration {update.iteration}, part {p}",
            before.image_id,
            before.state == UNLABELED,
            train_local,
            update.score_files,
            update.score_sizes,
            candidate_start,
        )
    elif update.scores_dir is None:
        index, scores = _local(update.scored_rows, update.scores, start, stop)
    else:
        files = part_files(storage, update.scores_dir, partitioning, f"the scores at {update.scores_dir}")
        if files is None:
            raise FileNotFoundError(f"no committed scores at {storage.url_of(update.scores_dir)}")
        part = storage.read_table(files[p], columns=["row", "score"])
        if len(part) and not (
            start <= pc.min(part.column("row")).as_py() and pc.max(part.column("row")).as_py() < stop
        ):
            raise ValueError(f"part {p} of the scores at {update.scores_dir} holds rows outside [{start}, {stop})")
        index, scores = _local(part.column("row").to_numpy(), part.column("score").to_numpy(), start, stop)
    model_pos, model_neg = apply_thresholds(after, index, scores, update.thresholds or NO_DECISION, update.iteration)
    check_transition(before, after)
    write_part(storage, manifest_dir(category, update.iteration), attempt, p, after.to_table())
    counts: dict = {
        **part_counts(after, update.iteration),
        "unlabeled_before": int(np.sum(before.state == UNLABELED)),
        "scored": int(np.isfinite(np.asarray(scores, np.float32)).sum()),
        "model_positive": model_pos,
        "model_negative": model_neg,
    }
    if update.next_sample is not None:
        seed, k = update.next_sample
        rows = np.flatnonzero(after.state == UNLABELED).astype(np.int64) + start
        keys = sample_keys(rows, seed=seed, iteration=update.iteration + 1, category=category)
        counts[NEXT_SAMPLE_FILE] = bottom_k(rows, keys, k)
    if update.next_train is not None:
        seed, k = update.next_train
        rows = np.flatnonzero(after.state == UNLABELED)
        counts[NEXT_TRAIN_FILE] = train_draws(
            rows.astype(np.int64) + start,
            after.score[rows],
            seed=seed,
            iteration=update.iteration + 1,
            category=category,
            k=k,
        )
    return counts


def split_off_next_sample(counts: list[dict]) -> tuple[list[dict[str, int]], list[tuple[np.ndarray, np.ndarray]]]:
    """``advance_part``'s results as ``(counts, each part's bottom-k of the next sample)`` (the latter empty
    when the update drew none); the parts' training draws, if any, stay under ``NEXT_TRAIN_FILE``
    (``split_off_next_train``)."""
    mapped = [c.pop(NEXT_SAMPLE_FILE) for c in counts if NEXT_SAMPLE_FILE in c]
    return counts, mapped


def split_off_next_train(counts: list[dict]) -> list:
    """The parts' training draws of the next iteration out of ``advance_part``'s results (empty if none)."""
    return [c.pop(NEXT_TRAIN_FILE) for c in counts if NEXT_TRAIN_FILE in c]


def merge_train_draws(mapped: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reduce of ``train_draws``: the ``k`` first rows of the uniform and of the score-weighted draw."""
    uniform, _ = merge_bottom_k([m[0] for m in mapped], k)
    by_score, _ = merge_bottom_k([m[1] for m in mapped], k)
    return uniform, by_score


def store_next_train(
    storage: Storage, directory: str, attempt: str, mapped: list, *, iteration: int, seed: int, k: int
) -> dict:
    """Write the reduce of the parts' training draws of ``iteration`` into ``attempt``'s folder (committed with
    the manifest, as ``store_next_sample``); return the commit's ``next_train`` entry. The file holds each
    draw's ``k`` first rows in draw order (``draw``: 0 uniform, 1 by score)."""
    uniform, by_score = merge_train_draws(mapped, k)
    name = f"attempt={attempt}/{NEXT_TRAIN_FILE}"
    storage.write_table(
        storage.path(directory.strip("/"), name),
        pa.table(
            {
                "row": pa.array(np.concatenate([uniform, by_score]), pa.int64()),
                "draw": pa.array(np.repeat(np.array([0, 1], np.int8), [len(uniform), len(by_score)]), pa.int8()),
            }
        ),
    )
    return {"file": name, "iteration": iteration, "seed": seed, "k": k}


def stored_next_train(
    storage: Storage, category: str, iteration: int, *, seed: int, k: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """``iteration``'s training draws (uniform, by score), each's first ``k`` rows in draw order, as the split
    before it stored them (``store_next_train``), or None where none was stored for this seed and ``k``."""
    directory = manifest_dir(category, iteration - 1)
    record = commit_record(storage, directory)
    entry = None if record is None else record.get("next_train")
    if not entry or entry["iteration"] != iteration or entry["seed"] != seed or entry["k"] < k:
        return None
    table = storage.read_table(storage.path(directory, entry["file"]))
    rows = table.column("row").to_numpy()
    draw = table.column("draw").to_numpy()
    return rows[draw == 0][:k], rows[draw == 1][:k]


def store_next_sample(
    storage: Storage,
    directory: str,
    attempt: str,
    mapped: list[tuple[np.ndarray, np.ndarray]],
    *,
    iteration: int,
    seed: int,
    k: int,
) -> dict:
    """Write the reduce of the parts' draws of ``iteration``'s sample (made while the manifest before it was
    written: one pass over each part instead of two) into ``attempt``'s folder, committed with it so a reader
    never pairs a manifest with another attempt's draw; return the commit's ``next_sample`` entry.

    The file holds the ``k`` smallest-keyed rows still unlabeled (row, key; key order). Any sample of that
    iteration of at most ``k`` rows is its prefix: the rows the map of ``sample_part`` would draw, for any
    partitioning (``stored_next_sample``; ``tests/test_partitions.py``).
    """
    rows, keys = merge_bottom_k(mapped, k)
    name = f"attempt={attempt}/{NEXT_SAMPLE_FILE}"
    storage.write_table(
        storage.path(directory.strip("/"), name),
        pa.table({"row": pa.array(rows, pa.int64()), "key": pa.array(keys, pa.uint64())}),
    )
    return {"file": name, "iteration": iteration, "seed": seed, "k": k}


def stored_next_sample(storage: Storage, category: str, iteration: int, *, seed: int, k: int) -> np.ndarray | None:
    """The ``k`` rows of ``iteration``'s sample in key order, from the draw stored with the manifest before it
    (``store_next_sample``), or None where none was stored for this seed and at least ``k`` rows."""
    directory = manifest_dir(category, iteration - 1)
    record = commit_record(storage, directory)
    entry = None if record is None else record.get("next_sample")
    if not entry or entry["iteration"] != iteration or entry["seed"] != seed or entry["k"] < k:
        return None
    rows = storage.read_table(storage.path(directory, entry["file"]), columns=["row"]).column("row").to_numpy()
    return rows[:k]  # the stored bottom-min(K, n) begins with the bottom-min(k, n) for every k <= K


def score_lookup_part(
    storage: Storage,
    category: str,
    iteration: int,
    partitioning: Partitioning,
    p: int,
    candidate_start: int,
    train: np.ndarray,
    wanted: np.ndarray,
    score_files: tuple[str, ...],
    score_sizes: tuple[int, ...],
    bins: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partition ``p``'s share of a score lookup for ``iteration``: the rows of ``wanted`` in the part (global),
    their scores, and the histogram over ``bins`` of every finite score of the part's candidates (its rows
    unlabeled before ``iteration`` less ``train``, whose scores start at ``candidate_start``).

    Raises ``ValueError`` if a wanted row of the part is not a candidate (it was decided, or trained on)."""
    start, stop = partitioning.rows(p)
    column = _state_table(storage, category, iteration - 1, partitioning, p, columns=["image_id", "state"])
    train_local, _ = _local(train, train, start, stop)
    index, scores = _candidate_scores(
        storage,
        f"{category} iteration {iteration}, part {p}",
        column.column("image_id").combine_chunks(),
        column_is(column, "state", "unlabeled"),
        train_local,
        score_files,
        score_sizes,
        candidate_start,
    )
    want, _ = _local(wanted, wanted, start, stop)
    at = np.minimum(np.searchsorted(index, want), max(0, len(index) - 1))
    if len(want) and (len(index) == 0 or not np.array_equal(index[at], want)):
        raise ValueError(f"{category} iteration {iteration}: a row asked for in part {p} is not a candidate")
    histogram = np.histogram(scores[np.isfinite(scores)], bins)[0]
    return want + start, scores[at] if len(want) else np.zeros(0, np.float32), histogram


def open_rows(
    storage: Storage, category: str, iteration: int, partitioning: Partitioning, p: int
) -> tuple[np.ndarray, pa.Array]:
    """The rows of partition ``p`` unlabeled after ``iteration``: global rows, ascending, and their image ids."""
    start, _ = partitioning.rows(p)
    table = _state_table(storage, category, iteration, partitioning, p, columns=["image_id", "state"])
    index = np.flatnonzero(column_is(table, "state", "unlabeled"))
    return index.astype(np.int64) + start, pc.take(
        table.column("image_id"), pa.array(index, pa.int64())
    ).combine_chunks()


def open_part(storage: Storage, category: str, iteration: int, partitioning: Partitioning, p: int) -> int:
    """How many rows of partition ``p`` are unlabeled after ``iteration`` (reads its ``state`` column only)."""
    return int(
        column_is(
            _state_table(storage, category, iteration, partitioning, p, columns=["state"]), "state", "unlabeled"
        ).sum()
    )


def column_is(table: pa.Table, column: str, value: str) -> np.ndarray:
    """Where a (dictionary) string column of a manifest or dataset part equals ``value`` (null: no)."""
    return pc.fill_null(pc.equal(table.column(column).cast(pa.string()), value), False).to_numpy(zero_copy_only=False)


def human_labels(
    storage: Storage, category: str, iteration: int, *, without_calibration: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Every image people decided by ``iteration`` (all but the calibration images ``without_calibration``):
    their global rows, ascending, and people's posteriors. Reads three columns, one stored part at a time, so
    this process holds a part's columns and the labels, not the pool's state."""
    n_rows = rows_held(manifest_counts(storage, category, iteration))
    partitioning = Partitioning(n_rows, stored_parts(storage, category, iteration))
    rows, p_positive = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for p in range(partitioning.n_partitions):
        table = _state_table(
            storage, category, iteration, partitioning, p, columns=["decided_by", "human_role", "p_positive"]
        )
        keep = column_is(table, "decided_by", "human")
        if without_calibration:
            keep &= ~column_is(table, "human_role", "calibration")
        index = np.flatnonzero(keep)
        rows.append(index.astype(np.int64) + partitioning.rows(p)[0])
        p_positive.append(table.column("p_positive").to_numpy(zero_copy_only=False)[index].astype(np.float32))
    return np.concatenate(rows), np.concatenate(p_positive)


def initial_part(
    storage: Storage,
    category: str,
    partitioning: Partitioning,
    p: int,
    attempt: str,
    next_sample: tuple[int, int] | None = None,
) -> dict:
    """Write partition ``p`` of iteration 0 (every image unlabeled) from the pool's image ids; its counts, and
    with ``next_sample`` (seed, k) the part's share of iteration 1's sample, as ``advance_part``.

    Reads the ``image_id`` column of the pool's row groups that hold the partition's rows."""
    start, stop = partitioning.rows(p)
    ids = read_pool_rows(storage, start, stop, columns=["image_id"]).column("image_id").combine_chunks()
    state = CascadeState.initial(ids)
    write_part(storage, manifest_dir(category, 0), attempt, p, state.to_table())
    counts: dict = part_counts(state, 0)
    if next_sample is not None:
        rows = np.arange(start, stop, dtype=np.int64)
        counts[NEXT_SAMPLE_FILE] = bottom_k(
            rows, sample_keys(rows, seed=next_sample[0], iteration=1, category=category), next_sample[1]
        )
    return counts


def write_initial(
    storage: Storage, category: str, partitioning: Partitioning, next_sample: tuple[int, int] | None = None
) -> None:
    """Write and commit iteration 0's manifest, one part after another (this process holds one part), with
    iteration 1's sample drawn on the way when ``next_sample`` (seed, k) is given."""
    attempt = new_attempt()
    counts, mapped = split_off_next_sample(
        [
            initial_part(storage, category, partitioning, p, attempt, next_sample)
            for p in range(partitioning.n_partitions)
        ]
    )
    meta: dict = {"counts": counts}
    if next_sample is not None:
        directory = manifest_dir(category, 0)
        meta["next_sample"] = store_next_sample(
            storage, directory, attempt, mapped, iteration=1, seed=next_sample[0], k=next_sample[1]
        )
    commit(storage, manifest_dir(category, 0), attempt, partitioning.n_partitions, partitioning.n_rows, meta)


def sum_counts(parts: list[dict[str, int]]) -> dict[str, int]:
    """The reduce of ``advance_part``'s counts."""
    return {k: int(sum(c[k] for c in parts)) for k in parts[0]} if parts else {}
