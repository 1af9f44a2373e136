"""A simulated crowd that answers label requests the way people will (used by the demo and tests).

Each labeler has its own accuracy; a share of them are spammers who answer at random. Every
image gets ``labels_per_image`` answers from distinct labelers; while the yes and no answers
disagree by less than ``min_margin`` (ties included), one more labeler is asked, up to
``max_labels_per_image``: more answers exactly where people disagree. With 90%-accurate labelers a
margin of 3 costs about 3.7 answers per image and leaves about 0.2% of images wrong before
Dawid-Skene aggregation, against 2.8% for a plain majority of 3.
The crowd reads only the ground truth and the published requests; it delivers by writing an
answer file and calling ``on_delivered`` (which resumes the waiting flow run).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from .labels import LabelRequest, list_requests, read_request, submit_votes
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
        self._rng = rng

    def answer(self, request: pa.Table) -> pd.DataFrame:
        """Answers (image_id, labeler, answer) for every image of ``request`` (image_id, uri)."""
        p, rng = self.params, self._rng
        rows: list[tuple[str, str, str]] = []
        for image_id, uri in zip(
            request.column("image_id").to_pylist(), request.column("uri").to_pylist(), strict=True
        ):
            if uri not in self.truth:
                raise KeyError(f"no ground truth for {uri}")
            truth = self.truth[uri]
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


SUBMISSION = "simulated-crowd"


def deliver(storage: Storage, category: str, crowd: SimulatedCrowd, request_id: str) -> bool:
    """Answer one request and store the answers; False if this crowd had already delivered it."""
    path = storage.path(votes_dir(category, request_id), f"{SUBMISSION}.parquet")
    if storage.exists(path):
        return False
    _, table = read_request(storage, category, request_id)
    return submit_votes(storage, category, request_id, crowd.answer(table), SUBMISSION)


def serve(
    storage: Storage,
    category: str,
    crowd: SimulatedCrowd,
    on_delivered: Callable[[LabelRequest], None],
    stop: threading.Event,
    poll_s: float = 1.0,
) -> None:
    """Watch for published requests, answer each once, and call ``on_delivered`` after storing.

    Runs until ``stop`` is set. ``on_delivered`` is retried on the next poll if it raises.
    """
    notified: set[str] = set()
    while not stop.is_set():
        for request in list_requests(storage, category):
            key = f"{request.request_id}:{request.flow_run_id}"
            if key in notified:
                continue
            try:
                deliver(storage, category, crowd, request.request_id)
                on_delivered(request)
                notified.add(key)
            except Exception as exc:  # noqa: BLE001 - keep serving; retry on the next poll
                log.warning("crowd: delivering %s failed (%s); will retry", request.request_id, exc)
        stop.wait(poll_s)
