"""Labels from outside tools under the same quality control as the labeling service's.

A request handed to another tool (a CSV for a spreadsheet or a vendor, Label Studio tasks) gets gold images
mixed in, unmarked and shuffled among the request's images (``handout``); which images were gold is recorded
at ``labels/<c>/handouts/<request>.json``. When the answers come back (``lsun-hitl resume --labels``) the
answers on gold images are stored as gold answers, so each labeler's accuracy is measured and a labeler below
the bar is flagged and left out of aggregation, exactly as on the service (``quality.flagged_labelers``).
Images whose usable answers still disagree (``quality.image_done``: fewer than ``labels_per_image`` answers, or
yes and no closer than ``min_margin``, below ``max_labels_per_image``) are asked again in a follow-up request
``<request>-more-<k>`` (``follow_up``), and the run waiting for the request is resumed only once none is left.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .labelfile import text_cell
from .labels import LabelError, publish_request, read_request, read_votes, usable_votes
from .quality import QCParams, flagged_in, image_done, labeler_stats, read_gold, read_qc
from .storage import Storage

FOLLOW_UP = re.compile(r"^(?P<root>.+)-more-(?P<k>\d+)$")


def handout_key(category: str, request_id: str) -> str:
    return f"labels/{category}/handouts/{request_id}.json"


def root_request(request_id: str) -> str:
    """The request a follow-up asks again for (``iteration-1-more-2`` -> ``iteration-1``); itself otherwise."""
    m = FOLLOW_UP.match(request_id)
    return m.group("root") if m else request_id


def handout(storage: Storage, category: str, request_id: str, gold: int = 20, seed: int = 0) -> pa.Table:
    """The images of ``request_id`` with up to ``gold`` of the category's gold images mixed in and shuffled.

    Columns ``image_id``, ``uri``. The gold mixed in is recorded (the same ones on a second call), so the
    answers brought back for them are stored as gold answers.
    """
    _, images = read_request(storage, category, request_id)
    key = storage.path(handout_key(category, request_id))
    gold_table = read_gold(storage, category)
    if storage.exists(key):
        chosen = storage.read_json(key)["gold"]
    else:
        request_ids = set(images.column("image_id").to_pylist())
        candidates = [g for g in gold_table.column("image_id").to_pylist() if g not in request_ids]
        rng = np.random.default_rng([seed, len(request_ids)])
        take = min(gold, len(candidates))
        chosen = sorted(rng.choice(candidates, take, replace=False).tolist()) if take else []
        storage.write_json(key, {"request_id": request_id, "gold": chosen})
    by_id = dict(zip(gold_table.column("image_id").to_pylist(), gold_table.column("uri").to_pylist(), strict=True))
    ids = images.column("image_id").to_pylist() + chosen
    uris = images.column("uri").to_pylist() + [by_id[g] for g in chosen]
    order = np.random.default_rng([seed, 7]).permutation(len(ids))
    return pa.table({"image_id": [ids[i] for i in order], "uri": [uris[i] for i in order]})


def write_handout(table: pa.Table, path: str, category: str) -> None:
    """A CSV (``image_id, uri, labeler, answer``, the last two to fill in) or, for ``.json``, Label Studio tasks."""
    if path.endswith(".json"):
        tasks = [
            {"data": {"image": u, "image_id": i, "category": category}}
            for i, u in zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist(), strict=True)
        ]
        text = json.dumps(tasks, indent=1)
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")  # quotes fields holding commas, quotes or newlines
        writer.writerow(["image_id", "uri", "labeler", "answer"])
        for i, u in zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist(), strict=True):
            writer.writerow([text_cell(i), text_cell(u), "", ""])
        text = buffer.getvalue()
    out = Storage(os.path.dirname(os.path.abspath(path)))
    out.write_bytes(out.path(os.path.basename(path)), text.encode())  # atomic: the old file or the whole new one


def gold_ids(storage: Storage, category: str, request_id: str) -> list[str]:
    """Images of a label file for ``request_id`` whose answers are gold answers: the ones its handout mixed in."""
    key = storage.path(handout_key(category, request_id))
    return storage.read_json(key)["gold"] if storage.exists(key) else []


@dataclass(frozen=True)
class FollowUp:
    """Quality control of a request's answers: labelers flagged, images still disputed, the follow-up asked."""

    request_id: str
    images: int
    flagged: tuple[str, ...]
    gold_answers: int
    disputed: int
    follow_up: str | None  # the request that asks again for the disputed images, None when none are left
    labelers: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"{self.request_id}: {self.images} images; {self.gold_answers} gold answers; "
            + (
                f"labelers flagged (answers not used): {', '.join(self.flagged)}"
                if self.flagged
                else "no labeler flagged"
            )
        ]
        if self.follow_up:
            lines.append(
                f"  {self.disputed} images lack agreeing answers: asked again as {self.follow_up!r} (hand it out "
                f"with `lsun-hitl handout --request {self.follow_up}`, bring the answers with `lsun-hitl resume "
                f"--request {self.follow_up} --labels FILE`); the run goes on once they agree"
            )
        return "\n".join(lines)


def follow_up(storage: Storage, category: str, request_id: str, qc: QCParams | None = None) -> FollowUp:
    """Check the answers of ``request_id``'s root request; publish a follow-up for its disputed images.

    Idempotent: an open follow-up with the same images is not published again.
    """
    qc = qc or read_qc(storage)
    root = root_request(request_id)
    request, images = read_request(storage, category, root)
    votes = read_votes(storage, category)
    gold = read_gold(storage, category)
    stats = labeler_stats(votes, gold, qc)
    flagged = flagged_in(stats)
    usable = usable_votes(votes, flagged).to_pandas()
    ids = images.column("image_id").to_pylist()
    counts = usable[usable["image_id"].isin(set(ids))].groupby(["image_id", "answer"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=ids, columns=["yes", "no", "unsure"], fill_value=0)
    done = image_done(counts["yes"].to_numpy(), counts["no"].to_numpy(), counts["unsure"].to_numpy(), qc)
    disputed = [i for i, d in zip(ids, done, strict=True) if not d]
    name = None
    if disputed:
        k = 1
        while True:
            name = f"{root}-more-{k}"
            try:
                _, asked = read_request(storage, category, name)
            except LabelError:
                break
            if sorted(asked.column("image_id").to_pylist()) == sorted(disputed):
                break  # already asked for exactly these
            k += 1
        keep = images.filter(pa.array([not d for d in done]))
        publish_request(storage, category, name, request.iteration, keep, request.flow_run_id)
    return FollowUp(
        request_id=root,
        images=len(ids),
        flagged=tuple(sorted(flagged)),
        gold_answers=_gold_answers(votes, root),
        disputed=len(disputed),
        follow_up=name,
        labelers=stats.to_dict("records") if len(stats) else [],
    )


def _gold_answers(votes: pa.Table, root: str) -> int:
    """Gold answers given with ``root`` and its follow-ups."""
    df = votes.select(["request_id", "gold"]).to_pandas()
    family = (df["request_id"] == root) | df["request_id"].str.startswith(f"{root}-more-")
    return int(df.loc[family, "gold"].fillna(False).astype(bool).sum())
