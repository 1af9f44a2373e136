"""The labeling desk's per-category bookkeeping of labelers: vote log, gold set, gold scores, flags.

The desk (``lsun_hitl.desk``) keeps one :class:`CategoryLedger` per category it has seen. Gold images
are mixed into batches; each labeler's answers on them are scored against the gold answers, and a
labeler whose score falls below the threshold (``quality.is_flagged``) is flagged: its answers stop
counting. Not thread-safe by itself: the desk calls it under its lock.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from .labels import read_votes
from .quality import QCParams, is_flagged, read_gold
from .storage import Storage

log = logging.getLogger("lsun_hitl.desk")


class CategoryLedger:
    """One category's vote log and gold bookkeeping.

    Parameters
    ----------
    category
        The category.
    gold
        The gold set: ``image_id``, ``uri`` and ``answer`` columns.
    votes
        The answers stored so far (``labels.read_votes``).
    qc
        The quality-control parameters (gold rate, batch size, flagging threshold).
    """

    def __init__(self, category: str, gold: pa.Table, votes: pa.Table, qc: QCParams) -> None:
        self.category = category
        self.qc = qc
        self.gold = gold
        self.truth: dict[str, str] = dict(
            zip(gold.column("image_id").to_pylist(), gold.column("answer").to_pylist(), strict=True)
        )
        self.seen: dict[str, set[str]] = {}  # labeler -> gold image ids it has answered
        self.score: dict[str, list[int]] = {}  # labeler -> [gold answers scored, correct ones]
        self._votes = [votes]  # appended to per batch, concatenated when read
        self.score_gold(votes)
        self.flagged: set[str] = {who for who, (n, c) in self.score.items() if is_flagged(n, c, qc)}

    @classmethod
    def read(cls, storage: Storage, category: str, qc: QCParams) -> CategoryLedger:
        """The ledger of ``category`` as stored: its gold set and every answer so far."""
        gold = read_gold(storage, category)
        return cls(category, gold, read_votes(storage, category), qc)

    def add_votes(self, table: pa.Table) -> None:
        """Append a submitted batch's answers to the vote log."""
        self._votes.append(table)

    def all_votes(self) -> pa.Table:
        """The whole vote log as one table."""
        if len(self._votes) > 1:
            self._votes = [pa.concat_tables(self._votes)]
        return self._votes[0]

    def score_gold(self, votes: pa.Table) -> None:
        """Add the gold answers among ``votes`` to the labelers' scores ("unsure" is not scored)."""
        for image_id, labeler, answer, gold in zip(
            *(votes.column(c).to_pylist() for c in ("image_id", "labeler", "answer", "gold")), strict=True
        ):
            if not gold:
                continue
            self.seen.setdefault(labeler, set()).add(image_id)
            if answer != "unsure" and image_id in self.truth:
                n_correct = self.score.setdefault(labeler, [0, 0])
                n_correct[0] += 1
                n_correct[1] += answer == self.truth[image_id]

    def rescore(self, labeler: str, votes: pa.Table) -> bool:
        """Score a batch of ``labeler`` with gold in it; True when that changed who is flagged.

        Only this labeler's figures changed, so only it is checked again.
        """
        self.score_gold(votes)
        n_gold, n_correct = self.score.get(labeler, (0, 0))
        flagged = set(self.flagged)
        if is_flagged(n_gold, n_correct, self.qc):
            flagged.add(labeler)
        else:
            flagged.discard(labeler)
        if flagged == self.flagged:
            return False
        log.warning("labelers flagged for %s: %s", self.category, sorted(flagged))
        self.flagged = flagged
        return True

    def n_gold(self) -> int:
        """How many gold images go into each batch: 0 without a gold set or with ``gold_rate=0``."""
        if self.gold.num_rows == 0 or self.qc.gold_rate == 0:
            return 0
        return min(self.gold.num_rows, max(1, round(self.qc.batch_size * self.qc.gold_rate)))

    def mix_in_gold(self, image_ids: list[str], uris: list[str], labeler: str, rng: np.random.Generator) -> list[bool]:
        """Insert gold images at random places in a new batch (``image_ids`` and ``uris`` in place).

        Gold images ``labeler`` has not answered yet are preferred; once too few are left, any gold
        image not already in the batch may come again. Returns the batch's gold flags.
        """
        gold_flags = [False] * len(image_ids)
        n_gold = self.n_gold()
        if not n_gold:
            return gold_flags
        seen = self.seen.get(labeler, set())
        gids = self.gold.column("image_id").to_pylist()
        fresh = [k for k in range(len(gids)) if gids[k] not in seen and gids[k] not in image_ids]
        pool = fresh if len(fresh) >= n_gold else [k for k in range(len(gids)) if gids[k] not in image_ids]
        for k in rng.choice(pool, size=min(n_gold, len(pool)), replace=False):
            at = int(rng.integers(0, len(image_ids) + 1))
            image_ids.insert(at, gids[k])
            uris.insert(at, self.gold.column("uri")[k].as_py())
            gold_flags.insert(at, True)
        return gold_flags
