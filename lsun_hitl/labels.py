"""Human labels: label requests, append-only answer files, and their aggregation.

People answer "Is this a <category>?" with ``yes``, ``no`` or ``unsure``. Every submission is
stored as its own Parquet file under ``labels/<category>/votes/request=<id>/``; a submission id
names the file, so sending the same submission twice stores it once. Answers from several people
are aggregated per image with Dawid-Skene (crowd-kit), which learns each labeler's confusion
matrix and down-weights spammers; the result is ``p_positive``, the posterior that the image is a
positive. Answers on gold images and answers of labelers flagged by quality control
(``lsun_hitl.quality``) are left out of aggregation but kept in storage.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .storage import Storage, aggregated_key, request_key, taken_key, votes_dir

ANSWERS = ("yes", "no", "unsure")
VOTE_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("image_id", pa.string()),
        ("labeler", pa.string()),
        ("answer", pa.string()),
        ("submitted_at", pa.timestamp("ms", tz="UTC")),
        ("batch_id", pa.string()),
        ("gold", pa.bool_()),
    ]
)
AGG_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("p_positive", pa.float32()),
        ("n_yes", pa.int16()),
        ("n_no", pa.int16()),
        ("n_unsure", pa.int16()),
    ]
)
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class LabelError(ValueError):
    """Malformed or inconsistent labels; nothing is stored when this is raised."""


class RunEnded(LabelError):
    """The flow run that waited for a request has ended, so there is nothing to resume.

    ``state`` is the run's final state name (``Completed``, ``Failed``, ``Crashed``, ``Cancelled``).
    """

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state

    @property
    def log_level(self) -> int:
        """How loudly whoever tried to resume reports it: INFO when the run completed (it read the stored labels
        itself and went on: it polls storage too), WARNING when it failed, crashed or was cancelled."""
        return logging.INFO if self.state == "Completed" else logging.WARNING


@dataclass(frozen=True)
class LabelRequest:
    """A batch of images published to people; ``flow_run_id`` is the run waiting for the answers."""

    category: str
    request_id: str
    iteration: int
    n_images: int
    flow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "request_id": self.request_id,
            "iteration": self.iteration,
            "n_images": self.n_images,
            "flow_run_id": self.flow_run_id,
        }


def publish_request(
    storage: Storage,
    category: str,
    request_id: str,
    iteration: int,
    images: pa.Table,
    flow_run_id: str | None = None,
) -> LabelRequest:
    """Write the request (``image_id``, ``uri``) and its metadata. Idempotent.

    If the request already exists its images are kept as they were (people may be labeling them);
    only the waiting ``flow_run_id`` is updated, so a restarted run picks up the same request.
    """
    _check_id(request_id, "request id")
    table_path = storage.path(request_key(category, request_id))
    if not storage.exists(table_path):
        storage.write_table(table_path, images.select(["image_id", "uri"]))
        n = images.num_rows
    else:
        n = storage.read_table(table_path, columns=["image_id"]).num_rows
    request = LabelRequest(category, request_id, iteration, n, flow_run_id)
    meta_path = storage.path(request_key(category, request_id, "json"))
    first = storage.read_json(meta_path).get("published_at") if storage.exists(meta_path) else None
    storage.write_json(meta_path, request.to_dict() | {"published_at": first or time.time()})  # when people were asked
    return request


def read_request(storage: Storage, category: str, request_id: str) -> tuple[LabelRequest, pa.Table]:
    meta_path = storage.path(request_key(category, request_id, "json"))
    if not storage.exists(meta_path):
        raise LabelError(f"no label request {request_id!r} for category {category!r} under {storage.url}")
    meta = storage.read_json(meta_path)
    request = LabelRequest(
        meta["category"], meta["request_id"], meta["iteration"], meta["n_images"], meta.get("flow_run_id")
    )
    return request, storage.read_table(storage.path(request_key(category, request_id)))


def list_requests(storage: Storage, category: str) -> list[LabelRequest]:
    out = []
    for path in storage.glob(storage.path(f"labels/{category}/requests/*.json")):
        meta = storage.read_json(path)
        out.append(
            LabelRequest(
                meta["category"], meta["request_id"], meta["iteration"], meta["n_images"], meta.get("flow_run_id")
            )
        )
    return out


def _check_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise LabelError(f"{what} {value!r} is invalid: use 1-128 letters, digits, '.', '_' or '-'")


def validate_votes(
    votes: pa.Table | pd.DataFrame,
    requested_ids: Iterable[str],
    request_id: str,
    *,
    gold_ids: Iterable[str] = (),
    batch_id: str | None = None,
) -> pa.Table:
    """Check a submission against its request; return it in VOTE_SCHEMA or raise LabelError.

    Rows naming one of ``gold_ids`` (gold images mixed into the batch) are kept with ``gold=True``.
    """
    df = votes.to_pandas() if isinstance(votes, pa.Table) else votes.copy()
    missing = {"image_id", "labeler", "answer"} - set(df.columns)
    if missing:
        raise LabelError(
            f"labels are missing column(s) {sorted(missing)}; each row needs image_id, labeler "
            "and answer (yes/no/unsure)"
        )
    if df.empty:
        raise LabelError("the submission holds no labels")
    df["answer"] = df["answer"].astype(str).str.strip().str.lower()
    df["answer"] = df["answer"].replace({"1": "yes", "true": "yes", "0": "no", "false": "no"})
    bad = df.loc[~df["answer"].isin(ANSWERS), "answer"]
    if len(bad):
        raise LabelError(f"unknown answer(s) {sorted(set(bad))[:5]}; answers must be yes, no or unsure")
    if df["labeler"].isna().any() or (df["labeler"].astype(str).str.len() == 0).any():
        raise LabelError("every label needs a labeler")
    if "request_id" in df.columns and (df["request_id"].astype(str) != request_id).any():
        raise LabelError(f"labels name another request than {request_id!r}")
    gold = set(gold_ids)
    known = set(requested_ids) | gold
    unknown = sorted(set(df["image_id"].astype(str)) - known)
    if unknown:
        raise LabelError(f"{len(unknown)} image id(s) were not in request {request_id!r}, e.g. {unknown[:3]}")
    if "submitted_at" not in df.columns:
        df["submitted_at"] = pd.Timestamp.now(tz="UTC")
    try:
        df["submitted_at"] = pd.to_datetime(df["submitted_at"], utc=True).dt.floor("ms")
    except (ValueError, TypeError) as exc:
        raise LabelError(f"submitted_at holds values that are not times ({exc}); use ISO 8601") from exc
    df["request_id"] = request_id
    df["labeler"] = df["labeler"].astype(str)
    df["image_id"] = df["image_id"].astype(str)
    df["batch_id"] = batch_id
    df["gold"] = df["image_id"].isin(gold)
    df = df.drop_duplicates(["image_id", "labeler"], keep="first")
    return pa.Table.from_pandas(df[VOTE_SCHEMA.names], schema=VOTE_SCHEMA, preserve_index=False)


def store_votes(
    storage: Storage,
    category: str,
    request_id: str,
    votes: pa.Table | pd.DataFrame,
    submission_id: str,
    *,
    gold_ids: Iterable[str] = (),
    batch_id: str | None = None,
    requested_ids: Iterable[str] | None = None,
) -> pa.Table | None:
    """Validate and store one submission; return what was stored (VOTE_SCHEMA), or None if that
    submission was already stored.

    ``requested_ids``: the request images this submission may name (the labeling desk passes the
    batch's); by default every image of the request, read from storage."""
    _check_id(submission_id, "submission id")
    if requested_ids is None:
        _, request = read_request(storage, category, request_id)
        requested_ids = request.column("image_id").to_pylist()
    table = validate_votes(votes, requested_ids, request_id, gold_ids=gold_ids, batch_id=batch_id)
    return write_votes(storage, category, request_id, table, submission_id)


def write_votes(
    storage: Storage, category: str, request_id: str, table: pa.Table, submission_id: str
) -> pa.Table | None:
    """Store a validated submission (VOTE_SCHEMA) once; None if ``submission_id`` was already stored."""
    _check_id(submission_id, "submission id")
    path = storage.path(votes_dir(category, request_id), f"{submission_id}.parquet")
    if storage.exists(path):
        return None
    storage.write_table(path, table.cast(VOTE_SCHEMA))
    return table


def batch_votes(
    request_id: str, batch_id: str, labeler: str, image_ids: list[str], answers: list[str], gold: list[bool]
) -> pa.Table:
    """A labeling-desk submission in VOTE_SCHEMA: one answer per image of the batch, already checked
    (answers by the API model, indices by the desk), built without pandas."""
    if any(a not in ANSWERS for a in answers):
        raise LabelError(
            f"unknown answer(s) {sorted(set(answers) - set(ANSWERS))[:5]}; answers must be yes, no or unsure"
        )
    n = len(image_ids)
    now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
    return pa.table(
        {
            "request_id": pa.array([request_id] * n, pa.string()),
            "image_id": pa.array(image_ids, pa.string()),
            "labeler": pa.array([labeler] * n, pa.string()),
            "answer": pa.array(answers, pa.string()),
            "submitted_at": pa.array([now] * n, pa.timestamp("ms", tz="UTC")),
            "batch_id": pa.array([batch_id] * n, pa.string()),
            "gold": pa.array(gold, pa.bool_()),
        },
        schema=VOTE_SCHEMA,
    )


def submit_votes(
    storage: Storage,
    category: str,
    request_id: str,
    votes: pa.Table | pd.DataFrame,
    submission_id: str,
    *,
    gold_ids: Iterable[str] = (),
    batch_id: str | None = None,
) -> bool:
    """Validate and store one submission; return False if that submission was already stored."""
    stored = store_votes(storage, category, request_id, votes, submission_id, gold_ids=gold_ids, batch_id=batch_id)
    return stored is not None


def read_votes(storage: Storage, category: str, request_id: str | None = None) -> pa.Table:
    """All stored answers (of one request, or of every request), each (image, labeler) counted once.

    An answer to an image shown as gold and one to the same image shown as a request item are both
    kept (gold images are pool images and may be sampled for a request too), and every showing of a
    gold image counts (a labeler may see a gold image again once it has seen them all).
    """
    pattern = votes_dir(category, request_id or "*") + "/*.parquet"
    paths = storage.glob(storage.path(pattern))
    if not paths:
        return VOTE_SCHEMA.empty_table()
    table = pa.concat_tables([_as_votes(storage.read_table(p)) for p in paths])
    df = table.to_pandas()
    showing = df["batch_id"].fillna("").where(df["gold"].fillna(False).astype(bool), "")
    df = df[~df.assign(showing=showing).duplicated(["request_id", "image_id", "labeler", "gold", "showing"])]
    return pa.Table.from_pandas(df, schema=VOTE_SCHEMA, preserve_index=False)


def _as_votes(table: pa.Table) -> pa.Table:
    """A stored answer file in VOTE_SCHEMA (files written before batches and gold get them empty)."""
    if "batch_id" not in table.column_names:
        table = table.append_column("batch_id", pa.nulls(table.num_rows, pa.string()))
    if "gold" not in table.column_names:
        table = table.append_column("gold", pa.array([False] * table.num_rows, pa.bool_()))
    return table.select(VOTE_SCHEMA.names).cast(VOTE_SCHEMA)


def usable_votes(votes: pa.Table, flagged: Iterable[str] = ()) -> pa.Table:
    """Answers that count for aggregation: not on gold images, not from flagged labelers."""
    df = votes.to_pandas()
    keep = ~df["gold"].fillna(False).astype(bool) & ~df["labeler"].isin(set(flagged))
    return pa.Table.from_pandas(df[keep], schema=VOTE_SCHEMA, preserve_index=False)


def aggregate(votes: pa.Table, *, method: str = "dawid-skene", n_iter: int = 100) -> pa.Table:
    """Aggregate yes/no answers per image; ``unsure`` answers carry no vote.

    ``method="dawid-skene"`` (crowd-kit) learns each labeler's confusion matrix; ``"majority"``
    counts every answer as from a 90%-accurate labeler, so ``p_positive`` is the posterior of a
    plain majority (ties give 0.5). Returns AGG_SCHEMA rows for every image with at least one
    answer; ``p_positive`` is NaN for images that only got ``unsure``. When the answers cannot
    identify a two-class model (a single class seen, or a single labeler), Dawid-Skene falls back to
    the majority.
    """
    if method not in ("dawid-skene", "majority"):
        raise LabelError(f"aggregation method {method!r} is unknown: use 'dawid-skene' or 'majority'")
    df = votes.select(["image_id", "labeler", "answer"]).to_pandas()
    if df.empty:
        return AGG_SCHEMA.empty_table()
    counts = pd.crosstab(df["image_id"], df["answer"]).reindex(columns=list(ANSWERS), fill_value=0)
    decisive = df[df["answer"] != "unsure"]
    p = pd.Series(np.nan, index=counts.index)
    if not decisive.empty:
        frame = pd.DataFrame(
            {
                "task": decisive["image_id"],
                "worker": decisive["labeler"],
                "label": (decisive["answer"] == "yes").astype(int),
            }
        )
        if method == "dawid-skene" and frame["label"].nunique() == 2 and frame["worker"].nunique() >= 2:
            from crowdkit.aggregation import DawidSkene

            proba = DawidSkene(n_iter=n_iter).fit_predict_proba(frame)
            p.loc[proba.index] = proba[1].to_numpy()
        else:
            diff = counts["yes"] - counts["no"]
            one_coin = 1.0 / (1.0 + np.power(9.0, -diff.astype(float)))
            has = (counts["yes"] + counts["no"]) > 0
            p.loc[has] = one_coin[has]
    return pa.table(
        {
            "image_id": pa.array(counts.index.astype(str)),
            "p_positive": pa.array(p.to_numpy(np.float32), from_pandas=True),
            "n_yes": pa.array(counts["yes"].to_numpy(np.int16)),
            "n_no": pa.array(counts["no"].to_numpy(np.int16)),
            "n_unsure": pa.array(counts["unsure"].to_numpy(np.int16)),
        },
        schema=AGG_SCHEMA,
    )


def collect(storage: Storage, category: str, request_id: str) -> pa.Table:
    """Aggregate the answers to one request (Dawid-Skene fit on all of the category's answers).

    Raises LabelError naming the missing images if some requested image has no decisive answer to this
    request (answers to the same image in other requests count in its posterior, not as this request's answer:
    a recheck is complete once people answered it again). The result is stored under
    ``labels/<category>/aggregated/<request>.parquet``.
    """
    from .quality import flagged_labelers, read_gold, read_qc

    _, request = read_request(storage, category, request_id)
    votes = read_votes(storage, category)
    flagged = flagged_labelers(votes, read_gold(storage, category), read_qc(storage))
    usable = usable_votes(votes, flagged)
    agg = aggregate(usable, method=read_qc(storage).aggregation)
    df = request.select(["image_id"]).to_pandas().merge(agg.to_pandas(), on="image_id", how="left")
    # complete when each image has a decisive answer to THIS request: a recheck's images were all answered
    # before, and their earlier answers must not make it complete before people answer it again
    mine = usable.filter(
        pc.and_(pc.equal(usable.column("request_id"), request_id), pc.not_equal(usable.column("answer"), "unsure"))
    )
    answered = set(mine.column("image_id").to_pylist())
    missing = df.loc[~df["image_id"].isin(answered), "image_id"]  # a decisive answer gives a posterior too
    if len(missing):
        raise LabelError(
            f"request {request_id!r}: {len(missing)} of {len(df)} images have no yes/no answer yet "
            f"(e.g. {list(missing[:3])})"
        )
    out = pa.Table.from_pandas(df[AGG_SCHEMA.names], schema=AGG_SCHEMA, preserve_index=False)
    storage.write_table(storage.path(aggregated_key(category, request_id)), out)
    return out


def take(storage: Storage, category: str, request_id: str) -> pa.Table:
    """The run's step that takes a request's labels: aggregate them (``collect``) and record that it did.

    The record (``labels/<c>/taken/<request>.json``) tells whoever resumes the run later that there is
    nothing left to resume: labels that arrive before the run reaches its pause are taken without one. A
    request taken before returns what was taken then, so a run restarted after later requests were answered
    decides its iterations from the same posteriors.
    """
    path = storage.path(taken_key(category, request_id))
    stored = storage.path(aggregated_key(category, request_id))
    if storage.exists(path) and storage.exists(stored):
        # taken once already (a restarted run): the same posteriors, not a new fit over answers given since
        return storage.read_table(stored)
    table = collect(storage, category, request_id)
    if not storage.exists(path):
        storage.write_json(path, {"request_id": request_id, "images": table.num_rows, "at": time.time()})
    return table


def was_taken(storage: Storage, category: str, request_id: str) -> bool:
    """True once the run took ``request_id``'s labels and went on (see ``take``)."""
    return storage.exists(storage.path(taken_key(category, request_id)))


def human_votes_spent(storage: Storage, category: str) -> int:
    """Every stored answer of the category (redundant, gold and flagged answers counted)."""
    return read_votes(storage, category).num_rows
