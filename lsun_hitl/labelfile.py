"""Label files people bring back: CSV, JSONL, or Label Studio's JSON export.

CSV and JSONL rows need ``image_id``, ``labeler`` and ``answer`` (yes / no / unsure). A Label
Studio export is a JSON list of tasks; each task's ``data`` names the image (``image_id``, or the
image URL in ``image`` matched against the request's URIs) and each of its ``annotations`` gives one
labeler's choice (``Yes``/``No``/``Unsure``, or the category's name for yes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa

from .labels import LabelError

YES = {"yes", "y", "true", "1", "positive"}
NO = {"no", "n", "false", "0", "negative"}


def read_label_file(path: str, request: pa.Table, category: str) -> pd.DataFrame:
    """Rows ``image_id, labeler, answer`` from a label file; LabelError naming the file and the fix."""
    p = Path(path)
    if not p.is_file():
        raise LabelError(f"label file {path!r} does not exist")
    try:
        if p.suffix in (".jsonl", ".ndjson"):
            frame = pd.read_json(p, lines=True, dtype=False)
        elif p.suffix == ".json":
            frame = label_studio_answers(json.loads(p.read_text()), request, category)
        else:
            frame = pd.read_csv(p, dtype=str, skipinitialspace=True)
    except LabelError as exc:
        raise LabelError(f"label file {path!r}: {exc}") from exc
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise LabelError(
            f"cannot parse label file {path!r} ({type(exc).__name__}: {exc}); give a CSV or JSONL file with "
            "columns image_id, labeler, answer, or a Label Studio JSON export"
        ) from exc
    missing = {"image_id", "labeler", "answer"} - set(frame.columns)
    if missing:
        raise LabelError(f"label file {path!r} lacks column(s) {sorted(missing)}; need image_id, labeler, answer")
    # a handout's cells that looked like formulas were written with a leading apostrophe (handout.text_cell)
    frame["image_id"] = frame["image_id"].map(
        lambda v: v[1:] if isinstance(v, str) and v[:1] == "'" and v[1:2] in ("=", "+", "-", "@", "\t", "\r") else v
    )
    return frame


def label_studio_answers(tasks: object, request: pa.Table, category: str) -> pd.DataFrame:
    """People's answers in a Label Studio JSON export, as rows ``image_id, labeler, answer``.

    Parameters
    ----------
    tasks
        The parsed export: a list of tasks, each with ``data`` and ``annotations``.
    request
        ``image_id, uri`` of the images the tasks may name by URL (``data.image``) instead of by
        ``data.image_id``.
    category
        The category asked about: a choice naming it counts as yes.

    Returns
    -------
    pandas.DataFrame
        One row per annotation with a choice (cancelled ones are skipped); the labeler is
        ``label-studio-<email or id>`` and the answer yes, no or unsure.

    Raises
    ------
    LabelError
        The export is not a list of tasks, a task names no image of ``request``, or it holds no
        choice annotations.
    """
    if not isinstance(tasks, list):
        raise LabelError("a Label Studio export is a JSON list of tasks")
    by_uri = dict(zip(request.column("uri").to_pylist(), request.column("image_id").to_pylist(), strict=True))
    rows = []
    for n, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise LabelError(f"task {n} has no 'data' object")
        data = task["data"]
        image_id = data.get("image_id") or by_uri.get(data.get("image", ""))
        if not image_id:
            raise LabelError(f"task {n} names no image_id and its data.image is not an image of the request")
        for annotation in task.get("annotations") or []:
            if annotation.get("was_cancelled"):
                continue
            who = annotation.get("completed_by")
            if isinstance(who, dict):
                who = who.get("email") or who.get("id")
            choices = [
                c
                for r in annotation.get("result") or []
                if r.get("type") == "choices"
                for c in (r.get("value") or {}).get("choices") or []
            ]
            if not choices:
                continue
            choice = str(choices[0]).strip().lower()
            answer = "yes" if choice in YES or choice == category else "no" if choice in NO else "unsure"
            rows.append({"image_id": image_id, "labeler": f"label-studio-{who}", "answer": answer})
    if not rows:
        raise LabelError("the export holds no choice annotations")
    return pd.DataFrame(rows)


def label_studio_tasks(request: pa.Table, category: str, scores: dict[str, float] | None = None) -> list[dict]:
    """Label Studio tasks for a request (with the model's score as a prediction when given)."""
    tasks = []
    for image_id, uri in zip(request.column("image_id").to_pylist(), request.column("uri").to_pylist(), strict=True):
        task: dict = {"data": {"image": uri, "image_id": image_id, "question": f"Is this a {category}?"}}
        if scores and image_id in scores:
            s = float(scores[image_id])
            task["predictions"] = [
                {
                    "model_version": "lsun-hitl",
                    "score": s,
                    "result": [
                        {
                            "from_name": "answer",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": ["Yes" if s >= 0.5 else "No"]},
                        }
                    ],
                }
            ]
        tasks.append(task)
    return tasks
