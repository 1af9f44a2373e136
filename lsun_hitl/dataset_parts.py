"""The final dataset as a committed set of parts: one part per partition of the last manifest, written on the
cluster, read back in order; with the counts and sums the summary and the audit need, so neither reads it whole.

Layout: ``datasets/<category>/dataset/_committed.json`` names ``attempt=<a>/part-<p>.parquet`` (contiguous
ranges of pool rows in pool order, the last manifest's partitioning; ``partitions.commit``). The record keeps
``totals`` (``reduce_totals`` of every part's ``part_totals``) and ``source``, the manifest commit the parts were
made from. A root finished before datasets were partitioned holds one ``datasets/<category>/dataset.parquet``
instead; every reader here still reads it.

Columns: image_id, uri, label (unresolved / positive / negative), decided_by (human / model), decided_iteration,
score (the model's last logit), p_positive (people's aggregated answer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from .ingest import read_pool_rows
from .manifest import STATES, CascadeState
from .manifest_parts import column_is, read_part
from .partitions import Partitioning, commit_record, committed_files, write_part
from .storage import Storage, dataset_dir, dataset_key

LABELS = ("unresolved", *STATES[1:])  # the manifest's state codes, the dataset's names for them
COUNTS = (
    "pool",
    "positive",
    "negative",
    "unresolved",
    "decided_by_model",
    "human",
    "human_positive",
    "human_negative",
    "model_positive",
    "model_negative",
)
SUMS = ("p_sum_human_positive", "p_sum_human_negative")  # people's posteriors summed over their positives, negatives
# a finite float32 is m * 2**(e - 150) with an integer m < 2**24 and 1 <= e < 255: times 2**150 it is an integer
_SCALE = 150


def exact_sum(values: np.ndarray) -> int:
    """The sum of ``values``' finite entries, exactly, as an integer multiple of 2**-150 (NaN left out, as in
    ``np.nansum``).

    Parameters
    ----------
    values : array of float32

    Returns
    -------
    total : int
        The sum times 2**150. Parts' totals add up to the whole's whatever the grouping, where a float sum's
        rounding depends on it; ``total / 2**150`` is the exact sum correctly rounded.
    """
    bits = np.asarray(values, np.float32).ravel().view(np.uint32).astype(np.int64)
    exponent = (bits >> 23) & 0xFF
    finite = exponent < 0xFF
    mantissa = (bits & 0x7FFFFF) | np.where(exponent > 0, 1 << 23, 0)
    signed = np.where(bits >> 31, -mantissa, mantissa)
    by_exponent = np.zeros(256, np.int64)  # at most 2**24 each per row: no overflow below 2**39 rows
    np.add.at(by_exponent, exponent[finite], signed[finite])
    return sum(int(s) << max(e, 1) for e, s in enumerate(by_exponent.tolist()) if s)


def dataset_table(state: CascadeState, uri: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Rows of the dataset from the same rows of the final manifest and the pool's ``uri``."""
    # dictionary-encoded straight from the state codes: no per-image strings, even for 100M images
    label = pa.DictionaryArray.from_arrays(pa.array(state.state, pa.int8()), pa.array(LABELS))
    columns = state.to_table()
    return pa.table(
        {
            "image_id": state.image_id,
            "uri": uri,
            "label": label,
            "decided_by": columns.column("decided_by"),
            "decided_iteration": columns.column("decided_iteration"),
            "score": columns.column("score"),
            "p_positive": columns.column("p_positive"),
        }
    )


def part_totals(table: pa.Table) -> dict[str, int]:
    """A dataset part's ``COUNTS`` and its ``SUMS`` (``exact_sum``'s integers), from label, decided_by and
    p_positive; ``reduce_totals`` of the parts' is the dataset's."""
    pos, neg = column_is(table, "label", "positive"), column_is(table, "label", "negative")
    human, model = column_is(table, "decided_by", "human"), column_is(table, "decided_by", "model")
    p = table.column("p_positive").to_numpy(zero_copy_only=False).astype(np.float32)
    return {
        "pool": table.num_rows,
        "positive": int(pos.sum()),
        "negative": int(neg.sum()),
        "unresolved": int(column_is(table, "label", "unresolved").sum()),
        "decided_by_model": int(model.sum()),
        "human": int(human.sum()),
        "human_positive": int((pos & human).sum()),
        "human_negative": int((neg & human).sum()),
        "model_positive": int((pos & model).sum()),
        "model_negative": int((neg & model).sum()),
        "p_sum_human_positive": exact_sum(p[pos & human]),
        "p_sum_human_negative": exact_sum(p[neg & human]),
    }


def reduce_totals(parts: Sequence[dict[str, int]]) -> dict[str, int | float]:
    """The dataset's totals from its parts' ``part_totals``: counts summed, ``SUMS`` as floats (the exact sum,
    rounded once: the same for any partitioning)."""
    out: dict[str, int | float] = {k: int(sum(p[k] for p in parts)) for k in COUNTS}
    out.update({k: sum(p[k] for p in parts) / (1 << _SCALE) for k in SUMS})
    return out


def finish_part(
    p: int, *, storage: Storage, category: str, iteration: int, partitioning: Partitioning, attempt: str
) -> dict[str, int]:
    """The map of a dataset's write: partition ``p`` of ``iteration``'s manifest beside the pool's rows of that
    range, written as part ``p`` of ``attempt``; its ``part_totals``. Runs on workers.

    Raises ``ValueError`` if the manifest's image ids are not the pool's (the pool was rebuilt after the run)."""
    start, stop = partitioning.rows(p)
    state = read_part(storage, category, iteration, partitioning, p)
    pool = read_pool_rows(storage, start, stop, columns=["image_id", "uri"])
    if not pool.column("image_id").combine_chunks().equals(state.image_id):
        raise ValueError(
            f"the manifest of {category} iteration {iteration} does not match the pool in rows [{start}, {stop}) "
            "(was the pool rebuilt after the run?); run the category again on this pool"
        )
    table = dataset_table(state, pool.column("uri").combine_chunks())
    write_part(storage, dataset_dir(category), attempt, p, table)
    return part_totals(table)


def dataset_files(storage: Storage, category: str) -> list[str] | None:
    """The files of ``category``'s dataset in pool order (its committed parts, or an older root's one file), or
    None when it has none."""
    files = committed_files(storage, dataset_dir(category))
    if files is not None:
        return files
    one_file = storage.path(dataset_key(category))
    return [one_file] if storage.exists(one_file) else None


def _files(storage: Storage, category: str) -> list[str]:
    files = dataset_files(storage, category)
    if files is None:
        raise FileNotFoundError(
            f"category {category!r} has no finished dataset under {storage.url} ({dataset_dir(category)}); "
            "run its cascade to the end first (lsun-hitl run or demo)"
        )
    return files


def read_dataset(storage: Storage, category: str, columns: list[str] | None = None) -> pa.Table:
    """``category``'s whole dataset (``columns`` of it) as one table, in pool order: for small uses (evaluation,
    tests); exports read it in batches (``export.dataset_batches``). ``FileNotFoundError`` if it has none."""
    tables = [storage.read_table(f, columns=columns) for f in _files(storage, category)]
    return pa.concat_tables(tables).unify_dictionaries()


def dataset_totals(storage: Storage, category: str) -> dict[str, int | float]:
    """``reduce_totals`` of ``category``'s dataset: from its commit record, or counted from an older root's one
    file. ``FileNotFoundError`` if it has none."""
    record = commit_record(storage, dataset_dir(category))
    if record is not None and "totals" in record:
        return record["totals"]
    columns = ["label", "decided_by", "p_positive"]
    return reduce_totals([part_totals(storage.read_table(f, columns=columns)) for f in _files(storage, category)])
