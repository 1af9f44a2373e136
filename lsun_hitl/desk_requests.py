"""One open label request as the labeling desk (``lsun_hitl.desk``) tracks it in memory.

Per image: how many usable answers of each kind it has and who has answered it; per request: the
batches handed out and not yet submitted, which reserve their images until their lease ends, and
whether the waiting flow run has been told that the request is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .quality import QCParams, image_done, votes_wanted


@dataclass
class OpenRequest:
    """The answer counts and reservations of one request.

    ``order`` is the (shuffled) order in which images are handed out, ``index`` maps an image id to
    its row, and ``pending`` maps a batch id to ``(labeler, rows, lease expiry)`` for batches handed
    out and not yet submitted. ``notified`` and ``attempts`` track ``on_complete`` calls.
    """

    category: str
    request_id: str
    flow_run_id: str | None
    image_ids: list[str]
    uris: list[str]
    order: np.ndarray
    index: dict[str, int]
    yes: np.ndarray
    no: np.ndarray
    unsure: np.ndarray
    answered_by: list[set[str]]
    pending: dict[str, tuple[str, list[int], float]] = field(default_factory=dict)
    complete: bool = False
    notified: bool = False
    attempts: int = 0

    @classmethod
    def new(
        cls,
        category: str,
        request_id: str,
        flow_run_id: str | None,
        image_ids: list[str],
        uris: list[str],
        rng: np.random.Generator,
    ) -> OpenRequest:
        """A request with no answers yet, its images handed out in an order drawn from ``rng``."""
        n = len(image_ids)
        return cls(
            category=category,
            request_id=request_id,
            flow_run_id=flow_run_id,
            image_ids=image_ids,
            uris=uris,
            order=rng.permutation(n),
            index={i: k for k, i in enumerate(image_ids)},
            yes=np.zeros(n, np.int32),
            no=np.zeros(n, np.int32),
            unsure=np.zeros(n, np.int32),
            answered_by=[set() for _ in range(n)],
        )

    def done(self, qc: QCParams) -> np.ndarray:
        """Per image: whether it has the answers it needs."""
        return image_done(self.yes, self.no, self.unsure, qc)

    def count(self, image_id: str, labeler: str, answer: str, *, counts: bool) -> None:
        """Take one answer; ``counts=False`` for flagged labelers (noted as answered, not counted).

        A labeler's first answer to an image is the one that counts: a batch submitted after its
        lease ended may repeat an image that labeler answered since.
        """
        k = self.index.get(image_id)
        if k is None or labeler in self.answered_by[k]:
            return
        self.answered_by[k].add(labeler)
        if not counts:
            return
        if answer == "yes":
            self.yes[k] += 1
        elif answer == "no":
            self.no[k] += 1
        else:
            self.unsure[k] += 1

    def count_batch(self, labeler: str, table: pa.Table, qc: QCParams, *, counts: bool) -> None:
        """Take the answers of one submitted batch and update ``complete``.

        Answers on gold images never count, as in aggregation.
        """
        for image_id, answer, gold in zip(
            *(table.column(c).to_pylist() for c in ("image_id", "answer", "gold")), strict=True
        ):
            if not gold:
                self.count(image_id, labeler, answer, counts=counts)
        self.complete = bool(self.done(qc).all())

    def recount(self, votes: pa.Table, flagged: set[str], qc: QCParams) -> None:
        """Rebuild the counts from the category's vote log: no gold answers, none of ``flagged``."""
        frame = votes.to_pandas()
        frame = frame[(frame["request_id"] == self.request_id) & ~frame["gold"].fillna(False).astype(bool)]
        self.yes[:] = self.no[:] = self.unsure[:] = 0
        for answered in self.answered_by:
            answered.clear()
        for image_id, labeler, answer in zip(frame["image_id"], frame["labeler"], frame["answer"], strict=True):
            self.count(image_id, labeler, answer, counts=labeler not in flagged)
        self.complete = bool(self.done(qc).all())

    def pick(self, labeler: str, now: float, size: int, qc: QCParams) -> list[int]:
        """Up to ``size`` rows for a new batch of ``labeler``, in the request's order.

        A row qualifies when its image still wants answers counting those reserved by unexpired
        batches, ``labeler`` has not answered it, and no batch of ``labeler`` reserves it. Expired
        reservations are dropped first.
        """
        for bid, (_, _, expires) in list(self.pending.items()):
            if expires < now:
                del self.pending[bid]
        n_pending = np.zeros(len(self.image_ids), np.int32)
        mine: set[int] = set()
        for who, rows, _ in self.pending.values():
            np.add.at(n_pending, rows, 1)
            if who == labeler:
                mine.update(rows)
        n = self.yes + self.no + self.unsure
        want = votes_wanted(self.yes, self.no, self.unsure, qc)
        open_ = ~self.done(qc) & (n + n_pending < want)
        out = []
        for k in self.order[open_[self.order]]:
            if labeler not in self.answered_by[k] and k not in mine:
                out.append(int(k))
                if len(out) == size:
                    break
        return out

    def progress(self, qc: QCParams) -> dict[str, Any]:
        """The request's figures for the admin API."""
        return {
            "category": self.category,
            "request_id": self.request_id,
            "images": len(self.image_ids),
            "done": int(self.done(qc).sum()),
            "answers": int((self.yes + self.no + self.unsure).sum()),
            "complete": self.complete,
            "outstanding_batches": len(self.pending),
        }
