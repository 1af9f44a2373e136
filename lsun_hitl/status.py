"""Where every category of a storage root stands: one row per category, read from what the runs stored.

Answers "which categories wait for people, for how many images, since when" without asking Prefect: each
run's state is in the root (manifests' commit counts, label requests and whether the run took them, the
operator's decision file, the step being worked on, the finished summary). ``lsun-hitl status``, the
``lsun-status`` artifact of every run and the labeling service's admin page show the same rows.

A category is, in this order of precedence:

- ``finished``: its dataset and summary are written;
- ``waiting for an operator``: it asks whether people should label a large remainder;
- ``waiting for people``: a label request the run has not taken yet (images, answered, since when);
- ``<step>`` (``sample``, ``train``, ``score``, ...): the step a run started last and has not finished;
- ``between steps``: none of the above (a run that stopped, or one between two steps).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from .labels import LabelRequest, list_requests, read_votes, was_taken
from .manifest import manifest_counts, manifest_iterations
from .steps import CURRENT_STEP, step_key
from .storage import SERVICE_KEY, Storage, dataset_key, decision_key, report_key, request_key


@dataclass(frozen=True)
class CategoryStatus:
    """One category's row of the status table."""

    category: str
    iteration: int  # the last iteration whose manifest is written (0: none yet)
    state: str  # finished, waiting for people, waiting for an operator, a step's name, between steps
    since: float | None  # when that state began (epoch seconds), where known
    request: str | None  # the label request people are asked to finish
    request_images: int
    request_answered: int  # images of it with at least one yes/no answer
    human_labeled: int  # images people decided so far
    positive: int
    negative: int
    decided_by_model: int
    unlabeled: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, now: float | None = None) -> str:
        """The state in words: what the run waits for or does, and for how long."""
        age = "" if self.since is None else f" for {_duration((now or time.time()) - self.since)}"
        if self.state == "waiting for people":
            return (
                f"waiting for people on {self.request}: {self.request_answered:,} of {self.request_images:,} "
                f"images answered{age}"
            )
        return f"{self.state}{age}" if self.state != "finished" else "finished"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def categories(storage: Storage) -> list[str]:
    """Every category with a run under ``storage`` (a manifest or a label request), sorted."""
    found = {p.rstrip("/").rsplit("/", 1)[-1] for p in storage.glob(storage.path("manifests/*"))}
    found |= {p.split("/labels/", 1)[1].split("/")[0] for p in storage.glob(storage.path("labels/*/requests"))}
    return sorted(found)


def category_status(storage: Storage, category: str) -> CategoryStatus:
    """Where ``category`` stands under ``storage`` (see the module's docstring)."""
    done = manifest_iterations(storage, category)
    counts = manifest_counts(storage, category, done[-1]) if done else {}
    model = sum(
        f["model_positive"] + f["model_negative"]
        for f in map(storage.read_json, storage.glob(storage.path(report_key(category, "funnel/iteration=*.json"))))
    )
    state, since, request, images, answered = _state(storage, category)
    return CategoryStatus(
        category=category,
        iteration=done[-1] if done else 0,
        state=state,
        since=since,
        request=request,
        request_images=images,
        request_answered=answered,
        human_labeled=counts.get("human", 0),
        positive=counts.get("positive", 0),
        negative=counts.get("negative", 0),
        decided_by_model=model,
        unlabeled=counts.get("unlabeled", 0),
    )


def _state(storage: Storage, category: str) -> tuple[str, float | None, str | None, int, int]:
    """``(state, since, request, its images, of them answered)`` of ``category``."""
    summary = storage.path(dataset_key(category, "summary.json"))
    if storage.exists(summary):
        return "finished", storage.fs.modified(summary).timestamp(), None, 0, 0
    decision = storage.path(decision_key(category, "remainder"))
    if storage.exists(decision) and storage.read_json(decision).get("decision") is None:
        return "waiting for an operator", storage.fs.modified(decision).timestamp(), None, 0, 0
    open_requests = [r for r in list_requests(storage, category) if not was_taken(storage, category, r.request_id)]
    if open_requests:
        r = max(open_requests, key=lambda r: (r.iteration, r.request_id))
        meta = storage.read_json(storage.path(request_key(category, r.request_id, "json")))
        return "waiting for people", meta.get("published_at"), r.request_id, r.n_images, answered(storage, r)
    current = storage.path(report_key(category, CURRENT_STEP))
    if storage.exists(current):
        step = storage.read_json(current)
        if not storage.exists(storage.path(step_key(category, step["iteration"], step["step"]))):
            return step["step"], step["since"], None, 0, 0
    return "between steps", None, None, 0, 0


def answered(storage: Storage, request: LabelRequest) -> int:
    """Images of ``request`` with at least one yes or no answer stored (answers on gold left out)."""
    votes = read_votes(storage, request.category, request.request_id)
    if votes.num_rows == 0:
        return 0
    df = votes.select(["image_id", "answer", "gold"]).to_pandas()
    df = df[~df["gold"].fillna(False).astype(bool) & df["answer"].isin(["yes", "no"])]
    return int(df["image_id"].nunique())


def status(storage: Storage) -> list[CategoryStatus]:
    """Every category's row, sorted by name."""
    return [category_status(storage, c) for c in categories(storage)]


HEADER = ("category", "iteration", "state", "people labeled", "positive", "negative", "by the model", "open")


def status_rows(rows: list[CategoryStatus], now: float | None = None) -> list[tuple[str, ...]]:
    """The table's cells, one tuple per category in ``HEADER``'s order."""
    return [
        (
            r.category,
            str(r.iteration),
            r.describe(now),
            f"{r.human_labeled:,}",
            f"{r.positive:,}",
            f"{r.negative:,}",
            f"{r.decided_by_model:,}",
            f"{r.unlabeled:,}",
        )
        for r in rows
    ]


def status_markdown(rows: list[CategoryStatus], now: float | None = None) -> str:
    """The status as a Markdown table (the Prefect artifact)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in status_rows(rows, now)]
    return "\n".join(lines) + "\n"


def status_text(rows: list[CategoryStatus], now: float | None = None) -> str:
    """The status as aligned columns (the terminal)."""
    table = [HEADER, *status_rows(rows, now)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table)


def labeling_url(storage: Storage) -> str | None:
    """The labeling page's URL the last service over ``storage`` announced (``service.announce``), or None."""
    path = storage.path(SERVICE_KEY)
    return storage.read_json(path).get("url") if storage.exists(path) else None


def waiting_description(storage: Storage, category: str, request: LabelRequest) -> str:
    """What a run waiting for ``request`` shows on its resume form in the Prefect UI (Markdown)."""
    done = answered(storage, request)
    url = labeling_url(storage)
    page = (
        f"[the labeling page]({url}) (a token from `lsun-hitl labelers add`)"
        if url
        else (
            f"the labeling service (`lsun-hitl serve --root {storage.url}`) or a label file "
            f"(`lsun-hitl resume --category {category} --request {request.request_id} --labels FILE`)"
        )
    )
    return (
        f"**{category}**, iteration {request.iteration}: waiting for people to label **{request.n_images:,} images** "
        f"(request `{request.request_id}`); {done:,} answered so far, {request.n_images - done:,} left.\n\n"
        f"People label them on {page}. The run resumes by itself once every image has an answer. Resuming it "
        "here earlier is harmless: it checks the stored answers and waits again."
    )
