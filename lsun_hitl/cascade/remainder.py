"""The remainder: images still unlabeled when the iterations stop go to people, or stay unresolved.

A large remainder waits for an operator's decision before anyone is asked to label so many images.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import labels as labels_lib
from ..config import CascadeParams
from ..manifest import manifest_counts, rows_held, stored_parts
from ..manifest_parts import NO_DECISION, IterationUpdate, advance_part, open_rows
from ..partitions import Partitioning, commit, new_attempt
from ..split import Funnel, remainder_to_people
from ..storage import Storage, decision_key, manifest_dir
from .common import REMAINDER, stored_funnel
from .people import posteriors, publish


def publish_remainder(
    storage: Storage, category: str, params: CascadeParams, iteration: int, flow_run_id: str | None = None
) -> labels_lib.LabelRequest | None:
    """Ask people to label every image still unlabeled after ``iteration``; None if there is none, or if
    they do not fit in what ``params.human_budget`` leaves (they stay unresolved)."""
    counts = manifest_counts(storage, category, iteration)
    if not remainder_to_people(counts["unlabeled"], counts["human"], params.human_budget):
        return None
    rows, _ = _open_rows(storage, category, iteration)
    return publish(storage, category, REMAINDER, iteration + 1, rows, flow_run_id)


def _open_rows(storage: Storage, category: str, iteration: int) -> tuple[np.ndarray, pa.Array]:
    """Every image unlabeled after ``iteration``, read part by part: global rows, ascending, and image ids."""
    partitioning = _partitioning(storage, category, iteration)
    parts = [open_rows(storage, category, iteration, partitioning, p) for p in range(partitioning.n_partitions)]
    return np.concatenate([np.zeros(0, np.int64)] + [r for r, _ in parts]), pa.concat_arrays(
        [pa.array([], pa.string())] + [ids.cast(pa.string()) for _, ids in parts]
    )


def _partitioning(storage: Storage, category: str, iteration: int) -> Partitioning:
    """The partitions ``iteration``'s manifest was committed in."""
    return Partitioning(
        rows_held(manifest_counts(storage, category, iteration)), stored_parts(storage, category, iteration)
    )


def remainder_decision(storage: Storage, category: str, params: CascadeParams, iteration: int) -> str:
    """Whether the images left after ``iteration`` go to people: "people", "unresolved", or "ask".

    None go to people with ``params.remainder == "unresolved"`` or when they do not fit in the human budget. A
    remainder up to ``params.large_remainder_share`` of the pool goes to people as ``params.remainder`` says.
    A larger one takes the decision an operator stored (``decide_remainder``), else ``params.large_remainder``:
    "ask" means the run should wait for that decision before anyone is asked to label so many images.
    """
    counts = manifest_counts(storage, category, iteration)
    left, pool = counts["unlabeled"], rows_held(counts)
    if params.remainder != "people" or not remainder_to_people(left, counts["human"], params.human_budget):
        return "unresolved"  # by choice, or it does not fit in what the budget leaves: nobody is asked
    if left <= params.large_remainder_share * pool:
        return "people"
    path = storage.path(decision_key(category, REMAINDER))
    stored = storage.read_json(path).get("decision") if storage.exists(path) else None
    return stored or params.large_remainder


def ask_remainder(storage: Storage, category: str, iteration: int, flow_run_id: str | None, why: str) -> dict:
    """Record that the run waits for a decision on the remainder after ``iteration``; return the question."""
    counts = manifest_counts(storage, category, iteration)
    path = storage.path(decision_key(category, REMAINDER))
    question = storage.read_json(path) if storage.exists(path) else {}
    question |= {
        "category": category,
        "iteration": iteration,
        "n_images": counts["unlabeled"],
        "pool": rows_held(counts),
        "human_labeled": counts["human"],
        "stopped": why,
        "flow_run_id": flow_run_id,
        "decision": question.get("decision"),
    }
    storage.write_json(path, question)
    return question


def decide_remainder(storage: Storage, category: str, decision: str) -> dict:
    """Store an operator's decision on a large remainder ("people" or "unresolved"); return the question."""
    if decision not in ("people", "unresolved"):
        raise ValueError(f"decision {decision!r}: use 'people' (label the remainder) or 'unresolved' (leave it)")
    path = storage.path(decision_key(category, REMAINDER))
    if not storage.exists(path):
        raise labels_lib.LabelError(
            f"no run of {category!r} waits for a decision on its remainder (nothing at {storage.url_of(path)})"
        )
    question = storage.read_json(path) | {"decision": decision}
    storage.write_json(path, question)
    return question


def finish_remainder(storage: Storage, category: str, iteration: int) -> Funnel:
    """Record people's labels for every image left unlabeled after ``iteration`` as iteration+1."""
    return stored_funnel(storage, category, iteration + 1, lambda: _label_remainder(storage, category, iteration))


def _label_remainder(storage: Storage, category: str, iteration: int) -> Funnel:
    """Write the manifest of iteration+1 with people's remainder labels, part by part (``advance_part``, the
    split's map, with no scores); return its funnel."""
    final_it = iteration + 1
    rows, ids = _open_rows(storage, category, iteration)
    p = posteriors(storage, category, REMAINDER, ids)
    partitioning = _partitioning(storage, category, iteration)
    update = IterationUpdate(iteration=final_it, remainder=rows, remainder_p=p, thresholds=NO_DECISION)
    attempt = new_attempt()
    counts = [
        advance_part(storage, category, partitioning, q, update, attempt) for q in range(partitioning.n_partitions)
    ]
    funnel = Funnel(
        iteration=final_it,
        unlabeled_before=len(rows),
        human_labeled=len(rows),
        human_positive=int(np.sum(p >= 0.5)),
        scored=0,
        model_positive=0,
        model_negative=0,
        unlabeled_after=sum(c["unlabeled"] for c in counts),
        threshold_positive=None,
        threshold_negative=None,
        precision=None,
        precision_low=None,
        false_omission=None,
        false_omission_high=None,
    )
    keep = ("unlabeled", "positive", "negative", "human", "human_positive")
    meta = {"counts": [{k: c[k] for k in keep} for c in counts], "funnel": funnel.to_dict()}
    commit(storage, manifest_dir(category, final_it), attempt, partitioning.n_partitions, partitioning.n_rows, meta)
    return funnel
