"""A simulated crowd that answers label requests the way people will (used by the demo and tests).

Each labeler has its own accuracy; a share of them are spammers who answer at random. Every
image gets ``labels_per_image`` answers from distinct labelers; while the yes and no answers
disagree by less than ``min_margin`` (ties included), one more labeler is asked, up to
``max_labels_per_image``: more answers exactly where people disagree, so a few more answers per image
leave far fewer images wrong than a plain majority of a fixed number would (docs/tuning.md).
The crowd reads only the ground truth and the published requests; it delivers by writing an
answer file and calling ``on_delivered`` (which resumes the waiting flow run).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from .labels import LabelRequest, RunEnded, list_requests, read_request, submit_votes
from .storage import Storage, votes_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrowdParams:
    n_labelers: int = 30
    accuracy: float = 0.9
    accuracy_spread: float = 0.04
    spammer_share: float = 0.1
    labels_per_image: int = 3
    max_labels_per_image: int = 7
    min_margin: int = 3
    unsure_rate: float = 0.02
    seed: int = 0


class SimulatedCrowd:
    """Labelers with known accuracies answering "Is this a <category>?" against ground truth."""

    def __init__(self, truth: Mapping[str, bool], params: CrowdParams = CrowdParams()) -> None:
        if params.labels_per_image > params.n_labelers:
            raise ValueError("labels_per_image cannot exceed n_labelers")
        self.truth = truth
        self.params = params
        rng = np.random.default_rng(params.seed)
        n = params.n_labelers
        self.accuracy = np.clip(rng.normal(params.accuracy, params.accuracy_spread, n), 0.55, 0.995)
        self.spammer = np.zeros(n, bool)
        self.spammer[rng.permutation(n)[: round(params.spammer_share * n)]] = True
        self.accuracy[self.spammer] = 0.5
        self.names = [f"sim-{i:03d}" for i in range(n)]
        self._calls = 0

    def answer(self, request: pa.Table, key: str | None = None) -> pd.DataFrame:
        """Answers (image_id, labeler, answer) for every image of ``request`` (image_id, uri).

        Each image's answers are drawn from a generator seeded by (crowd seed, ``key``, image id) alone, so
        they do not depend on which requests were answered before or in what order: a run is reproducible
        even when requests, rechecks and audits race. ``key`` names the request (the same image in another
        request gets fresh answers); without one, each call is a fresh key (its number in this crowd's calls).
        """
        p = self.params
        if key is None:
            key, self._calls = f"call-{self._calls}", self._calls + 1
        rows: list[tuple[str, str, str]] = []
        for image_id, uri in zip(
            request.column("image_id").to_pylist(), request.column("uri").to_pylist(), strict=True
        ):
            if uri not in self.truth:
                raise KeyError(f"no ground truth for {uri}")
            truth = self.truth[uri]
            rng = np.random.default_rng((p.seed, _stable_hash(key), _stable_hash(image_id)))
            order = rng.permutation(p.n_labelers)
            yes = no = 0
            for asked, who in enumerate(order[: p.max_labels_per_image], start=1):
                if rng.random() < p.unsure_rate:
                    answer = "unsure"
                else:
                    correct = rng.random() < self.accuracy[who]
                    answer = "yes" if correct == truth else "no"
                    yes, no = yes + (answer == "yes"), no + (answer == "no")
                rows.append((image_id, self.names[who], answer))
                if asked >= p.labels_per_image and abs(yes - no) >= p.min_margin:
                    break
        return pd.DataFrame(rows, columns=["image_id", "labeler", "answer"])


def _stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


SUBMISSION = "simulated-crowd"


class StoredAnswers:
    """A crowd that answers each request with the answers another root stored for the request of that name
    (a replay): every answer file of the request, copied as it is (labelers, gold showings, batches, times).

    A run over a copy of a finished root's pool with these answers, delivered when each request is published
    as the simulated crowd delivers its own, decides exactly what the first run decided where that run took
    each request after all of its answers were in (the simulated crowd's runs; ``tests/test_replay.py``).
    Answers people gave after a live run took the request count in the replay from the start.
    """

    def __init__(self, source: Storage) -> None:
        self.source = source

    def deliver_to(self, storage: Storage, category: str, request_id: str) -> bool:
        """Copy the source's answers to ``request_id`` into ``storage``; False if all were there already.

        Raises ``LookupError`` naming the request if the source holds no answer to it: the replay asked
        something the first run did not (other settings, another pool), and no one else will answer it."""
        files = sorted(self.source.glob(self.source.path(votes_dir(category, request_id), "*.parquet")))
        if not files:
            raise LookupError(
                f"{self.source.url} holds no answers to {category} request {request_id!r}: the replay asked what "
                "the first run did not (replay with that run's settings and pool)"
            )
        copied = False
        for path in files:
            target = storage.path(votes_dir(category, request_id), path.rstrip("/").rsplit("/", 1)[-1])
            if not storage.exists(target):
                storage.write_bytes(target, self.source.read_bytes(path))
                copied = True
        return copied


def deliver(storage: Storage, category: str, crowd: SimulatedCrowd | StoredAnswers, request_id: str) -> bool:
    """Answer one request and store the answers; False if this crowd had already delivered it."""
    if isinstance(crowd, StoredAnswers):
        return crowd.deliver_to(storage, category, request_id)
    path = storage.path(votes_dir(category, request_id), f"{SUBMISSION}.parquet")
    if storage.exists(path):
        return False
    _, table = read_request(storage, category, request_id)
    return submit_votes(storage, category, request_id, crowd.answer(table, key=request_id), SUBMISSION)


def serve(
    storage: Storage,
    category: str,
    crowd: SimulatedCrowd | StoredAnswers,
    on_delivered: Callable[[LabelRequest], None],
    stop: threading.Event,
    poll_s: float = 1.0,
) -> None:
    """Watch for published requests, answer each once, and call ``on_delivered`` after storing.

    Runs until ``stop`` is set. ``on_delivered`` runs in a thread of its own (resuming a run may wait
    for it to pause), so one slow notice never holds up answering the next request; it is retried on
    a later poll if it raises, except with RunEnded (the run is over: it is logged once, not retried).
    """
    notified: set[str] = set()
    outcome: dict[str, BaseException | None] = {}  # key -> None when notified, the error when it failed
    running: set[str] = set()

    def notify(key: str, request: LabelRequest) -> None:
        try:
            on_delivered(request)
            outcome[key] = None
        except BaseException as exc:  # noqa: BLE001 - reported and retried by the loop
            outcome[key] = exc

    while not stop.is_set():
        for request in list_requests(storage, category):
            key = f"{request.request_id}:{request.flow_run_id}"
            if _settled(key, notified, running, outcome):
                continue
            try:
                deliver(storage, category, crowd, request.request_id)
            except Exception as exc:  # noqa: BLE001 - keep serving; retry on the next poll
                log.warning("crowd: delivering %s failed (%s); will retry", request.request_id, exc)
                continue
            running.add(key)
            threading.Thread(target=notify, args=(key, request), daemon=True, name=f"crowd-{key}").start()
        stop.wait(poll_s)


def _settled(key: str, notified: set[str], running: set[str], outcome: dict[str, BaseException | None]) -> bool:
    """True when request ``key`` needs no delivery now: its run was notified (or has ended), or the notice
    is still running. A notice that failed otherwise is logged and delivered again."""
    if key in notified:
        return True
    if key not in running:
        return False
    if key not in outcome:
        return True  # the notice is still running
    running.discard(key)
    error = outcome.pop(key)
    if error is None or isinstance(error, RunEnded):  # RunEnded: nothing left to resume, retrying changes nothing
        if error is not None:
            log.log(error.log_level, "crowd: not resuming for %s: %s", key, error)
        notified.add(key)
        return True
    log.warning("crowd: notice for %s failed (%s); will retry", key, error)
    return False


# ---- the crowd as clients of the labeling service: the same path as people ------------------------------
def truth_by_image_id(storage: Storage, category: str) -> dict[str, bool]:
    """``{image_id: is a <category>}`` for every pool image (pool ids joined with the ground truth)."""
    from .ingest import read_pool
    from .truth import read_truth

    truth = read_truth(storage, category)
    pool = read_pool(storage, columns=["image_id", "uri"])
    return {
        i: truth[u]
        for i, u in zip(pool.column("image_id").to_pylist(), pool.column("uri").to_pylist(), strict=True)
        if u in truth
    }


class HttpLabeler(threading.Thread):
    """One simulated person: asks the service for a batch, answers it, submits, repeats until ``stop``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        accuracy: float,
        truth: Mapping[str, Mapping[str, bool]],
        stop: threading.Event,
        *,
        unsure_rate: float = 0.02,
        seed: int = 0,
        poll_s: float = 0.5,
        fetch_images: bool = False,
        name: str = "labeler",
        on_accepted: Callable[[str, str, dict], None] | None = None,
    ) -> None:
        """``on_accepted(labeler, batch_id, response)`` is called for each submission the service answered
        with 200 (the client side of a count audit: ``response["stored"]`` is False for a repeat)."""
        super().__init__(name=f"http-{name}", daemon=True)
        self.label, self.on_accepted = name, on_accepted
        self.base_url, self.token, self.accuracy, self.truth = base_url, token, accuracy, truth
        self.stop, self.unsure_rate, self.poll_s, self.fetch_images = stop, unsure_rate, poll_s, fetch_images
        self.rng = np.random.default_rng(seed)
        self.submitted = 0
        self.flagged = False

    def answer(self, category: str, image_id: str) -> str:
        """This person's answer to "Is ``image_id`` a ``category``?" (``truth``: per category, per image)."""
        if self.rng.random() < self.unsure_rate:
            return "unsure"
        correct = self.rng.random() < self.accuracy
        return "yes" if correct == self.truth[category][image_id] else "no"

    def run(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    r = client.post("/api/batches/next")
                    if r.status_code == 403:
                        self.flagged = True
                        return
                    if r.status_code == 401:  # a token created a moment ago: the service reloads its registry
                        self.stop.wait(self.poll_s)
                        continue
                    r.raise_for_status()
                    batch = r.json()["batch"]
                    if batch is None:
                        self.stop.wait(self.poll_s)
                        continue
                    answers = []
                    for item in batch["items"]:
                        if self.fetch_images:
                            client.get(f"/api/batches/{batch['batch_id']}/images/{item['index']}").raise_for_status()
                        answers.append(
                            {"index": item["index"], "answer": self.answer(batch["category"], item["image_id"])}
                        )
                    url = f"/api/batches/{batch['batch_id']}/labels"
                    r = client.post(url, json={"answers": answers})
                    r.raise_for_status()
                    self.submitted += 1
                    if self.on_accepted is not None:
                        self.on_accepted(self.label, batch["batch_id"], r.json() | {"answers": len(answers)})
                except httpx.HTTPError as exc:
                    log.warning("%s: %s; retrying", self.name, exc)
                    self.stop.wait(1.0)


def http_crowd(
    base_url: str,
    storage: Storage,
    categories: str | Sequence[str],
    stop: threading.Event,
    params: CrowdParams = CrowdParams(),
    **kwargs: object,
) -> list[HttpLabeler]:
    """Create the simulated labelers (tokens in the storage's registry) and start them against the service; they
    answer the batches of any of ``categories`` from the registered truth."""
    from .labelers import create_labeler

    names = [categories] if isinstance(categories, str) else list(categories)
    truth = {c: truth_by_image_id(storage, c) for c in names}
    crowd = SimulatedCrowd({}, params)
    workers = []
    for k, name in enumerate(crowd.names):
        token = create_labeler(storage, name, replace=True)
        workers.append(
            HttpLabeler(
                base_url,
                token,
                float(crowd.accuracy[k]),
                truth,
                stop,
                unsure_rate=params.unsure_rate,
                seed=params.seed * 1000 + k,
                name=name,
                **kwargs,  # type: ignore[arg-type]
            )
        )
    for w in workers:
        w.start()
    return workers
