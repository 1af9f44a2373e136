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
  background thread (the service resumes the waiting flow run there).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .labels import LabelError, RunEnded, batch_votes, list_requests, read_request, read_votes, write_votes
from .quality import QCParams, image_done, is_flagged, labeler_stats, read_gold, votes_wanted, write_qc
from .storage import Storage, batch_key, votes_dir

log = logging.getLogger(__name__)


class DeskError(LabelError):
    """A request the desk refuses; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Batch:
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
        return {k: v for k, v in self.__dict__.items() if k not in ("submitted", "persisted")}


@dataclass
class _Request:
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

    def done(self, qc: QCParams) -> np.ndarray:
        return image_done(self.yes, self.no, self.unsure, qc)

    def count(self, image_id: str, labeler: str, answer: str, *, counts: bool) -> None:
        """Take one answer; a labeler's first answer to an image is the one that counts (a late batch
        after its lease may repeat an image); ``counts=False`` for flagged labelers."""
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


class LabelingDesk:
    """Thread-safe assignment and intake of human labels over a storage root."""

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
        self._requests: dict[tuple[str, str], _Request] = {}
        self._batches: dict[str, Batch] = {}
        self._open: dict[str, Batch] = {}  # labeler -> its latest unsubmitted batch
        self._refreshing = False
        self._threads: set[threading.Thread] = set()  # background refreshes and resumes, joined by close()
        self._closed = False
        self._votes: dict[str, list[pa.Table]] = {}
        self._gold: dict[str, pa.Table] = {}
        self._flagged: dict[str, set[str]] = {}
        self._gold_truth: dict[str, dict[str, str]] = {}
        self._gold_seen: dict[str, dict[str, set[str]]] = {}
        self._gold_score: dict[str, dict[str, list[int]]] = {}
        self._scanned = 0.0
        write_qc(storage, self.qc)
        self.refresh(force=True)
        _warm_up(self.qc)

    # ---- loading ---------------------------------------------------------------------------------
    def categories(self) -> list[str]:
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
                if category not in self._votes:
                    self._load_category(category)
                for meta in metas:
                    key = (category, meta.request_id)
                    if key not in self._requests:
                        self._add_request(category, meta.request_id)
                    elif meta.flow_run_id != self._requests[key].flow_run_id:
                        # the run was restarted and waits again: make sure it gets resumed
                        req = self._requests[key]
                        req.flow_run_id, req.attempts = meta.flow_run_id, 0
                        if req.complete:
                            self._notify(category, meta.request_id)
            for req in self._requests.values():
                if req.complete and not req.notified and req.attempts < 5:
                    self._notify(req.category, req.request_id)  # an earlier resume failed: try again

    def _load_category(self, category: str) -> None:
        gold = self._gold[category] = read_gold(self.storage, category)
        self._gold_truth[category] = dict(
            zip(gold.column("image_id").to_pylist(), gold.column("answer").to_pylist(), strict=True)
        )
        self._gold_seen[category], self._gold_score[category] = {}, {}
        votes = read_votes(self.storage, category)
        self._votes[category] = [votes]
        self._score_gold(category, votes)
        self._flagged[category] = self._flag(category)
        for path in self.storage.glob(self.storage.path(f"labels/{category}/batches/*.json")):
            batch = Batch(**self.storage.read_json(path))
            done = self.storage.path(votes_dir(category, batch.request_id), f"{batch.batch_id}.parquet")
            batch.submitted = self.storage.exists(done)
            self._batches[batch.batch_id] = batch
            latest = self._open.get(batch.labeler)
            if not batch.submitted and (latest is None or latest.created_at < batch.created_at):
                self._open[batch.labeler] = batch

    def _add_request(self, category: str, request_id: str) -> None:
        meta, table = read_request(self.storage, category, request_id)
        ids = table.column("image_id").to_pylist()
        n = len(ids)
        req = _Request(
            category=category,
            request_id=request_id,
            flow_run_id=meta.flow_run_id,
            image_ids=ids,
            uris=table.column("uri").to_pylist(),
            order=self._rng.permutation(n),
            index={i: k for k, i in enumerate(ids)},
            yes=np.zeros(n, np.int32),
            no=np.zeros(n, np.int32),
            unsure=np.zeros(n, np.int32),
            answered_by=[set() for _ in range(n)],
        )
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

    def _score_gold(self, category: str, votes: pa.Table) -> None:
        truth = self._gold_truth.get(category, {})
        seen, score = self._gold_seen[category], self._gold_score[category]
        for image_id, labeler, answer, gold in zip(
            *(votes.column(c).to_pylist() for c in ("image_id", "labeler", "answer", "gold")), strict=True
        ):
            if not gold:
                continue
            seen.setdefault(labeler, set()).add(image_id)
            if answer != "unsure" and image_id in truth:
                n_correct = score.setdefault(labeler, [0, 0])
                n_correct[0] += 1
                n_correct[1] += answer == truth[image_id]

    def _flag(self, category: str) -> set[str]:
        return {who for who, (n, c) in self._gold_score[category].items() if is_flagged(n, c, self.qc)}

    def _all_votes(self, category: str) -> pa.Table:
        tables = self._votes.get(category) or []
        if len(tables) > 1:
            self._votes[category] = tables = [pa.concat_tables(tables)]
        return tables[0] if tables else read_votes(self.storage, category).slice(0, 0)

    def _recount(self, req: _Request) -> None:
        """Counts of usable answers (no gold, no flagged labelers) of one request, from the vote log."""
        votes = self._all_votes(req.category).to_pandas()
        votes = votes[(votes["request_id"] == req.request_id) & ~votes["gold"].fillna(False).astype(bool)]
        req.yes[:] = req.no[:] = req.unsure[:] = 0
        for s in req.answered_by:
            s.clear()
        flagged = self._flagged.get(req.category, set())
        for image_id, labeler, answer in zip(votes["image_id"], votes["labeler"], votes["answer"], strict=True):
            req.count(image_id, labeler, answer, counts=labeler not in flagged)
        req.complete = bool(req.done(self.qc).all())

    # ---- assignment --------------------------------------------------------------------------------
    def is_flagged(self, labeler: str) -> bool:
        with self._lock:
            return any(labeler in f for f in self._flagged.values())

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

    def refresh_due(self) -> bool:
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

        if not self._spawn(run, "desk-refresh"):
            self._refreshing = False

    def _spawn(self, target: Callable[[], None], name: str) -> bool:
        """Run ``target`` in a daemon thread that ``close`` waits for; False (nothing started) once closed."""

        def run() -> None:
            try:
                target()
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        with self._lock:
            if self._closed:
                return False
            thread = threading.Thread(target=run, name=name, daemon=True)
            self._threads.add(thread)
            thread.start()
        return True

    def open(self) -> None:
        """Allow background work again after ``close`` (the service's app does so when it starts)."""
        with self._lock:
            self._closed = False

    def close(self, timeout: float = 30.0) -> None:
        """Start no more background work and wait up to ``timeout`` seconds for what is running.

        Background refreshes read storage and resumes call the Prefect API; left running while the
        interpreter shuts down they can abort it (a native thread calling back into Python). Idempotent.
        """
        with self._lock:
            self._closed = True
            running = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = [t.name for t in running if t.is_alive()]
        if left:
            log.warning("labeling desk closed with background work still running: %s", ", ".join(left))

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
                rows = self._pick(req, labeler, now)
                if rows:
                    return self._make_batch(req, labeler, rows, now)
            return None

    def persist(self, batch: Batch) -> None:
        """Write a newly assigned batch to storage (idempotent); if that fails, the reservation is undone
        and the error raised, so no labeler works on a batch the desk could not record."""
        try:
            self.storage.write_json(self.storage.path(batch_key(batch.category, batch.batch_id)), batch.to_json())
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

    def _pick(self, req: _Request, labeler: str, now: float) -> list[int]:
        for bid, (_, _, expires) in list(req.pending.items()):
            if expires < now:
                del req.pending[bid]
        n_pending = np.zeros(len(req.image_ids), np.int32)
        mine: set[int] = set()
        for who, rows, _ in req.pending.values():
            np.add.at(n_pending, rows, 1)
            if who == labeler:
                mine.update(rows)
        n = req.yes + req.no + req.unsure
        want = votes_wanted(req.yes, req.no, req.unsure, self.qc)
        open_ = ~req.done(self.qc) & (n + n_pending < want)
        size = self.qc.batch_size - self._n_gold(req.category)
        out = []
        for k in req.order[open_[req.order]]:  # only open images, in the request's order
            if labeler not in req.answered_by[k] and k not in mine:
                out.append(int(k))
                if len(out) == size:
                    break
        return out

    def _n_gold(self, category: str) -> int:
        gold = self._gold.get(category)
        if gold is None or gold.num_rows == 0 or self.qc.gold_rate == 0:
            return 0
        return min(gold.num_rows, max(1, round(self.qc.batch_size * self.qc.gold_rate)))

    def _make_batch(self, req: _Request, labeler: str, rows: list[int], now: float) -> Batch:
        ids = [req.image_ids[k] for k in rows]
        uris = [req.uris[k] for k in rows]
        gold_flags = [False] * len(rows)
        n_gold = self._n_gold(req.category)
        if n_gold:
            gold = self._gold[req.category]
            seen = self._gold_seen[req.category].get(labeler, set())
            gids = gold.column("image_id").to_pylist()
            fresh = [k for k in range(len(gids)) if gids[k] not in seen and gids[k] not in ids]
            pool = fresh if len(fresh) >= n_gold else [k for k in range(len(gids)) if gids[k] not in ids]
            for k in self._rng.choice(pool, size=min(n_gold, len(pool)), replace=False):
                at = int(self._rng.integers(0, len(ids) + 1))
                ids.insert(at, gids[k])
                uris.insert(at, gold.column("uri")[k].as_py())
                gold_flags.insert(at, True)
        batch = Batch(
            batch_id=f"b{int(now * 1000):x}-{secrets.token_hex(4)}",
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
        indices = [i for i, _ in answers]
        if sorted(indices) != list(range(len(batch.image_ids))):
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
            order = [i for i, _ in answers]
            table = batch_votes(
                batch.request_id,
                batch.batch_id,
                labeler,
                [batch.image_ids[i] for i in order],
                [a for _, a in answers],
                [batch.gold[i] for i in order],
            )
            stored = write_votes(self.storage, batch.category, batch.request_id, table, batch.batch_id)
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
        with self._lock:
            category = batch.category
            self._votes.setdefault(category, []).append(table)
            req = self._requests.get((category, batch.request_id))
            if req is not None:
                req.pending.pop(batch.batch_id, None)
            recounted = False
            if any(batch.gold):
                self._score_gold(category, table)
                # only this labeler's gold figures changed: re-check it alone, not every labeler
                flagged = set(self._flagged.get(category, set()))
                n_gold, n_correct = self._gold_score[category].get(batch.labeler, (0, 0))
                if is_flagged(n_gold, n_correct, self.qc):
                    flagged.add(batch.labeler)
                else:
                    flagged.discard(batch.labeler)
                if flagged != self._flagged.get(category, set()):
                    log.warning("labelers flagged for %s: %s", category, sorted(flagged))
                    self._flagged[category] = flagged
                    for other in self._requests.values():
                        if other.category == category and not other.complete:
                            self._recount(other)
                    recounted = True
            if req is None or req.complete and not recounted:
                return
            if not recounted:
                counts = batch.labeler not in self._flagged.get(category, set())
                for image_id, answer, gold in zip(
                    *(table.column(c).to_pylist() for c in ("image_id", "answer", "gold")), strict=True
                ):
                    if not gold:  # answers on gold images never count (as in aggregation)
                        req.count(image_id, batch.labeler, answer, counts=counts)
                req.complete = bool(req.done(self.qc).all())
            if req.complete and not req.notified:
                self._notify(category, req.request_id)

    def _notify(self, category: str, request_id: str) -> None:
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

        self._spawn(call, f"resume-{request_id}")

    # ---- reports -----------------------------------------------------------------------------------
    def progress(self) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for req in self._requests.values():
                done = req.done(self.qc)
                out.append(
                    {
                        "category": req.category,
                        "request_id": req.request_id,
                        "images": len(req.image_ids),
                        "done": int(done.sum()),
                        "answers": int((req.yes + req.no + req.unsure).sum()),
                        "complete": req.complete,
                        "outstanding_batches": len(req.pending),
                    }
                )
            return out

    def labeler_figures(self, category: str | None = None) -> pd.DataFrame:
        with self._lock:
            frames = []
            for c in [category] if category else sorted(self._votes):
                gold = self._gold[c] if c in self._gold else read_gold(self.storage, c)
                stats = labeler_stats(self._all_votes(c), gold, self.qc)
                frames.append(stats.assign(category=c))
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _warm_up(qc: QCParams) -> None:
    """Import what the first submission needs -- scipy for the gold check's Clopper-Pearson bound,
    Parquet with its zstd codec for the answer file -- before any labeler arrives: loading them takes
    about a second and holds the GIL, which stalled every labeler's call at the first submission."""
    import pyarrow.parquet as pq

    is_flagged(10, 9, qc)
    pq.write_table(pa.table({"x": [1]}), pa.BufferOutputStream(), compression="zstd")
