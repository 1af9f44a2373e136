"""Per-category, per-iteration manifests: every pool image's state after each iteration.

The state of a category is a set of arrays aligned with the pool manifest's rows (sorted by
image_id), so joins are positional and no step holds the pool as Python objects. On disk each
iteration is a committed set of Parquet parts under ``manifests/<category>/iteration=<k>/`` (contiguous ranges
of pool rows, in pool order: ``_committed.json`` names ``attempt=<id>/part-<p>.parquet``; see
``lsun_hitl.partitions``), with columns

    image_id           string
    state              'positive' | 'negative' | 'unlabeled'
    decided_iteration  int16, null while unlabeled
    decided_by         'human' | 'model', null while unlabeled
    human_role         'train' | 'calibration' | 'remainder', null unless people labeled it
    score              float32: the latest model score, null if never scored
    p_positive         float32: aggregated human answer (probability of positive), null if none

Iteration 0 is the initial state (everything unlabeled). Decided images never flip. The commit record also
holds each part's counts (``manifest_counts``), so the loop's stop rule reads no manifest. A root written before
manifests were partitioned holds one ``manifest.parquet`` per iteration instead; it still opens everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from .partitions import Partitioning, commit, commit_record, committed_files, new_attempt, write_part
from .storage import Storage, manifest_dir, manifest_key

UNLABELED, POSITIVE, NEGATIVE = 0, 1, 2
STATES = ("unlabeled", "positive", "negative")
BY_NONE, BY_HUMAN, BY_MODEL = 0, 1, 2
DECIDERS = (None, "human", "model")
ROLE_NONE, ROLE_TRAIN, ROLE_CALIBRATION, ROLE_REMAINDER = 0, 1, 2, 3
ROLES = (None, "train", "calibration", "remainder")


@dataclass
class CascadeState:
    """Arrays of equal length, one entry per pool image (pool row order)."""

    image_id: pa.Array
    state: np.ndarray  # int8 codes into STATES
    decided_iteration: np.ndarray  # int16, -1 = not decided
    decided_by: np.ndarray  # int8 codes into DECIDERS
    human_role: np.ndarray  # int8 codes into ROLES
    score: np.ndarray  # float32, NaN = not scored
    p_positive: np.ndarray  # float32, NaN = no human answer

    def __len__(self) -> int:
        return len(self.state)

    @classmethod
    def initial(cls, image_ids: pa.Array) -> CascadeState:
        n = len(image_ids)
        return cls(
            image_id=image_ids,
            state=np.zeros(n, np.int8),
            decided_iteration=np.full(n, -1, np.int16),
            decided_by=np.zeros(n, np.int8),
            human_role=np.zeros(n, np.int8),
            score=np.full(n, np.nan, np.float32),
            p_positive=np.full(n, np.nan, np.float32),
        )

    def copy(self) -> CascadeState:
        return replace(
            self,
            **{
                k: getattr(self, k).copy()
                for k in ("state", "decided_iteration", "decided_by", "human_role", "score", "p_positive")
            },
        )

    def slice(self, start: int, stop: int) -> CascadeState:
        """Rows ``[start, stop)`` (views where numpy allows)."""
        return CascadeState(
            image_id=self.image_id.slice(start, stop - start),
            **{
                k: getattr(self, k)[start:stop]
                for k in ("state", "decided_iteration", "decided_by", "human_role", "score", "p_positive")
            },
        )

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.state, minlength=3)
        return {name: int(c[i]) for i, name in enumerate(STATES)}

    def unlabeled_index(self) -> np.ndarray:
        return np.flatnonzero(self.state == UNLABELED)

    def human_labeled(self) -> int:
        """Images people decided so far (what a human budget counts)."""
        return int(np.sum(self.decided_by == BY_HUMAN))

    def to_table(self) -> pa.Table:
        decided = self.state != UNLABELED
        return pa.table(
            {
                "image_id": self.image_id,
                "state": pa.DictionaryArray.from_arrays(pa.array(self.state, pa.int8()), pa.array(STATES)),
                "decided_iteration": pa.array(self.decided_iteration, pa.int16(), mask=~decided),
                "decided_by": pa.DictionaryArray.from_arrays(
                    pa.array(self.decided_by, pa.int8(), mask=~decided), pa.array(["none", "human", "model"])
                ),
                "human_role": pa.DictionaryArray.from_arrays(
                    pa.array(self.human_role, pa.int8(), mask=self.human_role == ROLE_NONE),
                    pa.array(["none", "train", "calibration", "remainder"]),
                ),
                "score": pa.array(self.score, pa.float32(), from_pandas=True),
                "p_positive": pa.array(self.p_positive, pa.float32(), from_pandas=True),
            }
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> CascadeState:
        def codes(name: str, names: tuple) -> np.ndarray:
            col = table.column(name).combine_chunks()
            if isinstance(col, pa.DictionaryArray):
                lookup = {v: i for i, v in enumerate(names)}
                remap = np.array([lookup.get(v, 0) for v in col.dictionary.to_pylist()] or [0], np.int8)
                idx = col.indices.fill_null(0).to_numpy(zero_copy_only=False)
                out = remap[idx] if len(col.dictionary) else np.zeros(len(col), np.int8)
                return np.where(col.is_null().to_numpy(zero_copy_only=False), 0, out).astype(np.int8)
            values = col.to_pylist()
            lookup = {v: i for i, v in enumerate(names)}
            return np.array([lookup.get(v, 0) for v in values], np.int8)

        return cls(
            image_id=table.column("image_id").combine_chunks(),
            state=codes("state", STATES),
            decided_iteration=table.column("decided_iteration").fill_null(-1).to_numpy().astype(np.int16),
            decided_by=codes("decided_by", DECIDERS),
            human_role=codes("human_role", ROLES),
            score=table.column("score").to_numpy(zero_copy_only=False).astype(np.float32),
            p_positive=table.column("p_positive").to_numpy(zero_copy_only=False).astype(np.float32),
        )


def part_counts(state: CascadeState, iteration: int | None = None) -> dict[str, int]:
    """A manifest part's counts: ``unlabeled``, ``positive``, ``negative``, ``human`` (decided by people so far)
    and, given the ``iteration`` that wrote it, ``human_positive`` (people's positives of that iteration)."""
    out = {**state.counts(), "human": state.human_labeled()}
    if iteration is not None:
        new = (state.decided_iteration == iteration) & (state.decided_by == BY_HUMAN)
        out["human_positive"] = int(np.sum(new & (state.state == POSITIVE)))
    return out


def rows_held(counts: dict[str, int]) -> int:
    """The rows a manifest (or part) with these ``part_counts`` holds: every image is in exactly one state."""
    return counts["unlabeled"] + counts["positive"] + counts["negative"]


def n_manifest_parts(n_rows: int, partition_rows: int) -> int:
    """How many parts a manifest of ``n_rows`` rows has at ``partition_rows`` rows a part (at least one)."""
    return max(1, -(-int(n_rows) // max(1, int(partition_rows))))


def write_manifest(
    storage: Storage, category: str, iteration: int, state: CascadeState, n_parts: int = 1, meta: dict | None = None
) -> str:
    """Write ``iteration``'s manifest from this process as ``n_parts`` committed parts (atomic as a whole: a
    reader sees the old commit or this one); return its folder's URL. ``meta`` goes into the commit record
    beside the parts' counts (the funnel of the step that wrote it).

    The loop's split writes its parts on the cluster instead (``manifest_parts.advance_part``); this is for
    the steps whose state is small or already whole here (the start, the remainder)."""
    directory = manifest_dir(category, iteration)
    partitioning = Partitioning(len(state), n_parts)
    attempt, table, counts = new_attempt(), state.to_table(), []
    for p in range(partitioning.n_partitions):
        start, stop = partitioning.rows(p)
        write_part(storage, directory, attempt, p, table.slice(start, stop - start))
        counts.append(part_counts(state.slice(start, stop), iteration))
    commit(storage, directory, attempt, partitioning.n_partitions, len(state), meta={"counts": counts, **(meta or {})})
    return storage.url_of(directory)


def read_manifest(storage: Storage, category: str, iteration: int) -> CascadeState:
    """The whole manifest of ``iteration`` (committed parts, or a one-file manifest of an older root)."""
    files = committed_files(storage, manifest_dir(category, iteration))
    if files is None:
        return CascadeState.from_table(storage.read_table(storage.path(manifest_key(category, iteration))))
    return CascadeState.from_table(pa.concat_tables([storage.read_table(f) for f in files]))


def stored_parts(storage: Storage, category: str, iteration: int) -> int:
    """How many parts ``iteration``'s manifest was committed in (1 for an older root's one file)."""
    files = committed_files(storage, manifest_dir(category, iteration))
    return 1 if files is None else len(files)


def stored_part_counts(storage: Storage, category: str, iteration: int) -> list[dict[str, int]] | None:
    """Each part's ``part_counts`` as ``iteration``'s commit recorded them (None for an older root's one file)."""
    record = commit_record(storage, manifest_dir(category, iteration))
    return None if record is None else record.get("counts")


def committed_funnel(storage: Storage, category: str, iteration: int) -> dict | None:
    """The funnel ``iteration``'s commit recorded (the split's or the remainder's), or None."""
    record = commit_record(storage, manifest_dir(category, iteration))
    return None if record is None else record.get("funnel")


def manifest_counts(storage: Storage, category: str, iteration: int) -> dict[str, int]:
    """``part_counts`` of ``iteration``'s whole manifest: from its commit record (no manifest read), or counted
    from an older root's one file."""
    parts = stored_part_counts(storage, category, iteration)
    if parts:
        return {k: int(sum(c.get(k, 0) for c in parts)) for k in parts[0]}
    return part_counts(read_manifest(storage, category, iteration))


def manifest_iterations(storage: Storage, category: str) -> list[int]:
    """The iterations whose manifest has been written, ascending (either layout)."""
    paths = storage.glob(storage.path(f"manifests/{category}/iteration=*/_committed.json")) + storage.glob(
        storage.path(f"manifests/{category}/iteration=*/manifest.parquet")
    )
    return sorted({int(p.split("iteration=")[1].split("/")[0]) for p in paths})


def check_transition(before: CascadeState, after: CascadeState) -> None:
    """Raise if any decided image changed state or provenance (decisions are final)."""
    if len(before) != len(after):
        raise AssertionError("manifest length changed between iterations")
    decided = before.state != UNLABELED
    if np.any(after.state[decided] != before.state[decided]) or np.any(
        after.decided_iteration[decided] != before.decided_iteration[decided]
    ):
        raise AssertionError("a decided image changed state between iterations")
