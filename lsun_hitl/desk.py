"""The labeling desk: hands out batches of open label requests to labelers and takes their answers.

It is the state behind the labeling service (``lsun_hitl.service``), kept free of HTTP so it can be
tested alone. Everything it knows is rebuilt from the storage root when it starts -- requests,
batches handed out, answers stored -- so restarting the service loses no accepted answer.

- A *batch* is ``QCParams.batch_size`` images for one labeler: images of the oldest open request
  that still want answers (see ``quality.votes_wanted``) and that this labeler has not answered,
  with gold images mixed in at ``gold_rate``. It is written to ``labels/<c>/batches/<id>.json``.
- Answers to a batch are stored as one append-only Parquet file named by the batch id, so a batch
  sent twice is stored once.
- Labelers whose gold accuracy falls below the threshold are flagged: they get no more batches and
  their answers stop counting, so the images they answered are asked again.
- When every image of a request is done, ``on_complete(category, request_id)`` is called in a
  background thread (the service's caller passes one that resumes the waiting flow run).

The batch and its file are in ``desk_batches``, the per-request counts in ``desk_requests``, the
per-category gold bookkeeping in ``desk_ledger``, the background threads in ``desk_threads``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .desk_batches import Batch, new_batch_id, read_batches, write_answers, write_batch
from .desk_ledger import CategoryLedger
from .desk_requests import OpenRequest
from .desk_threads import BackgroundThreads
from .labels import LabelError, LabelRequest, RunEnded, list_requests, read_request, read_votes
from .quality import QCParams, is_flagged, labeler_stats, read_gold, write_qc
from .storage import Storage

__all__ = ["Batch", "DeskError", "LabelingDesk"]

log = logging.getLogger(__name__)


class DeskError(LabelError):
    """A request the desk refuses; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class LabelingDesk:
    """Thread-safe assignment and intake of human labels over a storage root.

    Parameters
    ----------
    storage
        The storage root.
    qc
        Quality-control parameters; written to the root (``quality.write_qc``).
    on_complete
        Called as ``on_complete(category, request_id)`` in a background thread once a request is
        fully labeled. If it raises, it is called again on a later refresh (up to 5 attempts),
        except for ``RunEnded``.
    refresh_s
        How often, at most, storage is listed for new requests.
    seed
        Seeds the order images are handed out in and where gold images go.
    """

    def __init__(
        self,
        storage: Storage,
        qc: QCParams | None = None,
        *,
        on_complete: Callable[[str, str], None] | None = None,
        refresh_s: float = 2.0,
        seed: int = 0,
    ) -> None:
        self.storage = storage
        self.qc = (qc or QCParams()).validate()
        self.on_complete = on_complete
        self.refresh_s = refresh_s
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self._batch_locks: dict[str, threading.Lock] = {}
        self._requests: dict[tuple[str, str], OpenRequest] = {}
        self._batches: dict[str, Batch] = {}
        self._open: dict[str, Batch] = {}  # labeler -> its latest unsubmitted batch
        self._ledgers: dict[str, CategoryLedger] = {}
        self._background = BackgroundThreads()  # refreshes and resumes, joined by close()
        self._refreshing = False
        self._scanned = 0.0
        write_qc(storage, self.qc)
        self.refresh(force=True)
        _warm_up(self.qc)

    # ---- loading ---------------------------------------------------------------------------------
    def categories(self) -> list[str]:
        """The categories with published requests."""
        paths = self.storage.glob(self.storage.path("labels/*/requests/*.json"))
        return sorted({p.split("/")[-3] for p in paths})

    def refresh(self, force: bool = False) -> None:
        """Pick up requests published since the last look (at most every ``refresh_s``)."""
        with self._lock:
            if not force and not self.refresh_due():
                return
            self._scanned = time.monotonic()
        # list storage without the lock: labelers' calls go on meanwhile
        found = {category: list_requests(self.storage, category) for category in self.categories()}
        with self._lock:
            for category, metas in found.items():
                if category not in self._ledgers:
                    self._load_category(category)
                for meta in metas:
                    self._see_request(category, meta)
            for req in self._requests.values():
                if req.complete and not req.notified and req.attempts < 5:
                    self._notify(req.category, req.request_id)  # an earlier resume failed: try again

    def _see_request(self, category: str, meta: LabelRequest) -> None:
        """Add a newly found request; resume again for one whose flow run was restarted."""
        req = self._requests.get((category, meta.request_id))
        if req is None:
            self._add_request(category, meta.request_id)
        elif meta.flow_run_id != req.flow_run_id:
            # the run was restarted and waits again: make sure it gets resumed
            req.flow_run_id, req.attempts = meta.flow_run_id, 0
            if req.complete:
                self._notify(category, meta.request_id)

    def _load_category(self, category: str) -> None:
        """Read a category's gold set, answers and batches from storage."""
        self._ledgers[category] = CategoryLedger.read(self.storage, category, self.qc)
        for batch in read_batches(self.storage, category):
            self._batches[batch.batch_id] = batch
            latest = self._open.get(batch.labeler)
            if not batch.submitted and (latest is None or latest.created_at < batch.created_at):
                self._open[batch.labeler] = batch

    def _add_request(self, category: str, request_id: str) -> None:
        """Track a request: its counts from the stored answers, its unsubmitted batches as reservations."""
        meta, table = read_request(self.storage, category, request_id)
        ids = table.column("image_id").to_pylist()
        uris = table.column("uri").to_pylist()
        req = OpenRequest.new(category, request_id, meta.flow_run_id, ids, uris, self._rng)
        self._requests[(category, request_id)] = req
        self._recount(req)
        for batch in self._batches.values():
            if batch.category == category and batch.request_id == request_id and not batch.submitted:
                rows = [req.index[i] for i, g in zip(batch.image_ids, batch.gold, strict=True) if not g]
                req.pending[batch.batch_id] = (batch.labeler, rows, batch.created_at + self.qc.lease_s)
        if req.complete:
            self._notify(category, request_id)

    def resync(self, category: str) -> None:
        """Rebuild a category's answers and counts from storage (the same view aggregation has)."""
        with self._lock:
            log.warning("re-reading the answers of %s from storage", category)
            self._load_category(category)
            for req in self._requests.values():
                if req.category == category:
                    self._recount(req)

    def _recount(self, req: OpenRequest) -> None:
        """Counts of usable answers (no gold, no flagged labelers) of one request, from the vote log."""
        ledger = self._ledgers[req.category]
        req.recount(ledger.all_votes(), ledger.flagged, self.qc)

    # ---- background work ---------------------------------------------------------------------------
    def refresh_due(self) -> bool:
        """Whether ``refresh_s`` has passed since storage was last listed."""
        return time.monotonic() - self._scanned >= self.refresh_s

    def refresh_in_background(self) -> None:
        """Start a refresh in a thread of its own unless one is running (callers never wait on storage)."""
        with self._lock:
            if self._refreshing or not self.refresh_due():
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the next call tries again
                log.warning("refreshing the label requests failed: %s", exc)
            finally:
                self._refreshing = False

        if not self._background.spawn(run, "desk-refresh"):
            self._refreshing = False

    def open(self) -> None:
        """Allow background work again after ``close`` (the service's app does so when it starts)."""
        self._background.open()

    def close(self, timeout: float = 30.0) -> None:
        """Start no more background work and wait up to ``timeout`` seconds for what is running.

        Background refreshes read storage and resumes call ``on_complete``; left running while the
        interpreter shuts down they can abort it. Idempotent.
        """
        left = self._background.close(timeout)
        if left:
            log.warning("labeling desk closed with background work still running: %s", ", ".join(left))

    def _notify(self, category: str, request_id: str) -> None:
        """Call ``on_complete`` for a complete request in a background thread (under the lock)."""
        req = self._requests[(category, request_id)]
        req.notified = True
        req.attempts += 1
        if self.on_complete is None:
            return
        log.info("request %s/%s is fully labeled", category, request_id)

        def call() -> None:
            try:
                self.on_complete(category, request_id)  # type: ignore[misc]
            except RunEnded as exc:  # nothing left to resume; retrying would not change that
                log.log(exc.log_level, "not resuming %s/%s: %s", category, request_id, exc)
            except Exception as exc:  # noqa: BLE001 - report, retry on a later refresh; the CLI can resume too
                log.warning(
                    "resuming the run waiting for %s/%s failed (attempt %s): %s",
                    category,
                    request_id,
                    req.attempts,
                    exc,
                )
                with self._lock:
                    req.notified = False
                if isinstance(exc, LabelError):
                    self.resync(category)

        self._background.spawn(call, f"resume-{request_id}")

    # ---- assignment --------------------------------------------------------------------------------
    def is_flagged(self, labeler: str) -> bool:
        """Whether ``labeler`` is flagged in any category."""
        with self._lock:
            return any(labeler in ledger.flagged for ledger in self._ledgers.values())

    def next_batch(self, labeler: str) -> Batch | None:
        """The labeler's unsubmitted batch if it has one, else a new one, else None (nothing to do).

        The batch is on storage when this returns. (The service calls the parts -- ``assign`` in
        memory, ``persist`` and ``refresh`` off its event loop -- itself.)
        """
        self.refresh()
        batch = self.assign(labeler)
        if batch is not None and not batch.persisted:
            self.persist(batch)
        return batch

    def assign(self, labeler: str) -> Batch | None:
        """In memory only, under the desk's lock (no storage I/O): the labeler's open batch, or a new
        one reserved for it (``persisted=False`` until ``persist`` wrote it), or None."""
        with self._lock:
            if self.is_flagged(labeler):
                raise DeskError(
                    f"labeler {labeler!r} is flagged: its answers on gold images fall below "
                    f"{self.qc.min_gold_accuracy:.0%}; an admin can review it with `lsun-hitl labelers`",
                    status=403,
                )
            now = time.time()
            batch = self._open.get(labeler)
            if batch is not None and not batch.submitted and now < batch.created_at + self.qc.lease_s:
                return batch
            for req in sorted(self._requests.values(), key=lambda r: r.request_id):
                if req.complete:
                    continue
                size = self.qc.batch_size - self._ledgers[req.category].n_gold()
                rows = req.pick(labeler, now, size, self.qc)
                if rows:
                    return self._make_batch(req, labeler, rows, now)
            return None

    def _make_batch(self, req: OpenRequest, labeler: str, rows: list[int], now: float) -> Batch:
        """A new batch of ``rows`` of ``req`` with gold mixed in, reserved for ``labeler``."""
        ids = [req.image_ids[k] for k in rows]
        uris = [req.uris[k] for k in rows]
        gold_flags = self._ledgers[req.category].mix_in_gold(ids, uris, labeler, self._rng)
        batch = Batch(
            batch_id=new_batch_id(now),
            category=req.category,
            request_id=req.request_id,
            labeler=labeler,
            image_ids=ids,
            uris=uris,
            gold=gold_flags,
            created_at=now,
            persisted=False,
        )
        self._batches[batch.batch_id] = batch
        self._open[labeler] = batch
        req.pending[batch.batch_id] = (labeler, rows, now + self.qc.lease_s)
        return batch

    def persist(self, batch: Batch) -> None:
        """Write a newly assigned batch to storage (idempotent); if that fails, the reservation is undone
        and the error raised, so no labeler works on a batch the desk could not record."""
        try:
            write_batch(self.storage, batch)
        except BaseException:
            with self._lock:
                if not batch.persisted:
                    self._batches.pop(batch.batch_id, None)
                    if self._open.get(batch.labeler) is batch:
                        del self._open[batch.labeler]
                    req = self._requests.get((batch.category, batch.request_id))
                    if req is not None:
                        req.pending.pop(batch.batch_id, None)
            raise
        batch.persisted = True

    # ---- intake ------------------------------------------------------------------------------------
    def batch_for(self, batch_id: str, labeler: str) -> Batch:
        """The batch, if it belongs to ``labeler`` (DeskError 404 / 403 otherwise)."""
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            raise DeskError(f"no batch {batch_id!r}", status=404)
        if batch.labeler != labeler:
            raise DeskError(f"batch {batch_id!r} is assigned to another labeler", status=403)
        return batch

    def submit(self, batch_id: str, labeler: str, answers: list[tuple[int, str]]) -> dict[str, Any]:
        """Store the answers ``[(index, answer), ...]`` to a whole batch; idempotent per batch.

        Returns ``{"stored": bool, "request_complete": bool}``; ``stored`` is False when the batch
        had already been submitted (nothing changes).
        """
        batch = self.batch_for(batch_id, labeler)
        if sorted(i for i, _ in answers) != list(range(len(batch.image_ids))):
            raise DeskError(
                f"batch {batch_id!r} has {len(batch.image_ids)} images: answer each index 0.."
                f"{len(batch.image_ids) - 1} exactly once (got {len(answers)} answers)",
                status=422,
            )
        with self._lock:
            lock = self._batch_locks.setdefault(batch_id, threading.Lock())
        with lock:
            if batch.submitted:
                return {"stored": False, "request_complete": self._complete(batch)}
            stored = write_answers(self.storage, batch, answers)
            batch.submitted = True
            with self._lock:
                if self._open.get(labeler) is batch:
                    del self._open[labeler]
            if stored is not None:
                self._take(batch, stored)
        return {"stored": stored is not None, "request_complete": self._complete(batch)}

    def _complete(self, batch: Batch) -> bool:
        req = self._requests.get((batch.category, batch.request_id))
        return bool(req and req.complete)

    def _take(self, batch: Batch, table: pa.Table) -> None:
        """Count a stored batch: score its gold, flag or unflag its labeler, update its request."""
        with self._lock:
            ledger = self._ledgers[batch.category]
            ledger.add_votes(table)
            req = self._requests.get((batch.category, batch.request_id))
            if req is not None:
                req.pending.pop(batch.batch_id, None)
            recounted = any(batch.gold) and ledger.rescore(batch.labeler, table)
            if recounted:  # someone's answers start or stop counting: recount what is still open
                for other in self._requests.values():
                    if other.category == batch.category and not other.complete:
                        self._recount(other)
            if req is None or req.complete and not recounted:
                return
            if not recounted:
                req.count_batch(batch.labeler, table, self.qc, counts=batch.labeler not in ledger.flagged)
            if req.complete and not req.notified:
                self._notify(batch.category, req.request_id)

    # ---- reports -----------------------------------------------------------------------------------
    def progress(self) -> list[dict[str, Any]]:
        """Per request: images, images done, answers, whether complete, batches outstanding."""
        with self._lock:
            return [req.progress(self.qc) for req in self._requests.values()]

    def labeler_figures(self, category: str | None = None) -> pd.DataFrame:
        """Per labeler and category: ``quality.labeler_stats`` (all categories seen by default)."""
        with self._lock:
            frames = []
            for c in [category] if category else sorted(self._ledgers):
                ledger = self._ledgers.get(c)
                if ledger is None:  # not seen yet: its gold set, no answers
                    gold, votes = read_gold(self.storage, c), read_votes(self.storage, c).slice(0, 0)
                else:
                    gold, votes = ledger.gold, ledger.all_votes()
                frames.append(labeler_stats(votes, gold, self.qc).assign(category=c))
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _warm_up(qc: QCParams) -> None:
    """Import what the first submission needs before any labeler arrives.

    That is scipy (the gold check's Clopper-Pearson bound) and Parquet with its zstd codec (the answer
    file). Loading them holds the GIL, which would stall every labeler's call at the first submission.
    """
    import pyarrow.parquet as pq

    is_flagged(10, 9, qc)
    pq.write_table(pa.table({"x": [1]}), pa.BufferOutputStream(), compression="zstd")
