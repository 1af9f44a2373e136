"""A batch: the images the labeling desk (``lsun_hitl.desk``) hands to one labeler, and its file.

Each batch is written to ``labels/<category>/batches/<batch id>.json`` before the labeler sees it,
and its answers are stored under the batch id (``labels.write_votes``), so both survive a restart of
the service: a batch is submitted when its answer file exists.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from .labels import batch_votes, write_votes
from .storage import Storage, batch_key, votes_dir


@dataclass
class Batch:
    """Images handed to one labeler; ``gold`` flags the gold images among them."""

    batch_id: str
    category: str
    request_id: str
    labeler: str
    image_ids: list[str]
    uris: list[str]
    gold: list[bool]
    created_at: float
    submitted: bool = False
    persisted: bool = True  # False between assignment and the batch file being written

    def public(self) -> dict[str, Any]:
        """What the labeler's page sees (which images are gold is not shown)."""
        return {
            "batch_id": self.batch_id,
            "category": self.category,
            "question": f"Is this a {self.category}?",
            "items": [{"index": i, "image_id": image_id} for i, image_id in enumerate(self.image_ids)],
            "submitted": self.submitted,
        }

    def to_json(self) -> dict[str, Any]:
        """The batch file's content."""
        return {k: v for k, v in self.__dict__.items() if k not in ("submitted", "persisted")}


def new_batch_id(now: float) -> str:
    """A unique batch id: the creation time ``now`` (seconds since the epoch) in hex milliseconds, a random tail."""
    return f"b{int(now * 1000):x}-{secrets.token_hex(4)}"


def read_batches(storage: Storage, category: str) -> list[Batch]:
    """The batches of ``category`` on storage, ``submitted`` set from their answer files."""
    batches = []
    for path in storage.glob(storage.path(f"labels/{category}/batches/*.json")):
        batch = Batch(**storage.read_json(path))
        done = storage.path(votes_dir(category, batch.request_id), f"{batch.batch_id}.parquet")
        batch.submitted = storage.exists(done)
        batches.append(batch)
    return batches


def write_batch(storage: Storage, batch: Batch) -> None:
    """Write the batch file (the same content again if it exists)."""
    storage.write_json(storage.path(batch_key(batch.category, batch.batch_id)), batch.to_json())


def write_answers(storage: Storage, batch: Batch, answers: list[tuple[int, str]]) -> pa.Table | None:
    """Store the answers ``[(index, answer), ...]`` to ``batch`` as its answer file.

    Returns the stored table, or None when the batch's answers were stored before (nothing written).
    """
    order = [i for i, _ in answers]
    table = batch_votes(
        batch.request_id,
        batch.batch_id,
        batch.labeler,
        [batch.image_ids[i] for i in order],
        [a for _, a in answers],
        [batch.gold[i] for i in order],
    )
    return write_votes(storage, batch.category, batch.request_id, table, batch.batch_id)
