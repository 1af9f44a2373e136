"""Per-category, per-iteration manifests: every pool image's state after each iteration.

The state of a category is a set of arrays aligned with the pool manifest's rows (sorted by
image_id), so joins are positional and no step holds the pool as Python objects. On disk each
iteration is one Parquet file ``manifests/<category>/iteration=<k>/manifest.parquet`` with columns

    image_id           string
    state              'positive' | 'negative' | 'unlabeled'
    decided_iteration  int16, null while unlabeled
    decided_by         'human' | 'model', null while unlabeled
    human_role         'train' | 'calibration' | 'remainder', null unless people labeled it
    score              float32: the latest model score, null if never scored
    p_positive         float32: aggregated human answer (probability of positive), null if none

Iteration 0 is the initial state (everything unlabeled). Decided images never flip.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from .storage import Storage, manifest_key

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


def write_manifest(storage: Storage, category: str, iteration: int, state: CascadeState) -> str:
    """Write (atomically) the manifest of ``iteration``; return its URL."""
    key = manifest_key(category, iteration)
    storage.write_table(storage.path(key), state.to_table(), row_group_size=256 * 1024)
    return storage.url_of(key)


def read_manifest(storage: Storage, category: str, iteration: int) -> CascadeState:
    return CascadeState.from_table(storage.read_table(storage.path(manifest_key(category, iteration))))


def manifest_iterations(storage: Storage, category: str) -> list[int]:
    """The iterations whose manifest has been written, ascending."""
    paths = storage.glob(storage.path(f"manifests/{category}/iteration=*/manifest.parquet"))
    return sorted(int(p.split("iteration=")[1].split("/")[0]) for p in paths)


def check_transition(before: CascadeState, after: CascadeState) -> None:
    """Raise if any decided image changed state or provenance (decisions are final)."""
    if len(before) != len(after):
        raise AssertionError("manifest length changed between iterations")
    decided = before.state != UNLABELED
    if np.any(after.state[decided] != before.state[decided]) or np.any(
        after.decided_iteration[decided] != before.decided_iteration[decided]
    ):
        raise AssertionError("a decided image changed state between iterations")
