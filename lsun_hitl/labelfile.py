"""Label files people bring back: CSV, JSONL, or Label Studio's JSON export.

CSV and JSONL rows need ``image_id``, ``labeler`` and ``answer`` (yes / no / unsure). A Label
Studio export is a JSON list of tasks; each task's ``data`` names the image (``image_id``, or the
image URL in ``image`` matched against the request's URIs) and each of its ``annotations`` gives one
labeler's choice (``Yes``/``No``/``Unsure``, or the category's name for yes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from .labels import LabelError

YES = {"yes", "y", "true", "1", "positive"}
NO = {"no", "n", "false", "0", "negative"}


# what a spreadsheet reads as the start of a formula in a CSV cell
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def text_cell(value: str) -> str:
    """``value`` as a spreadsheet shows it as text: a cell starting like a formula (``FORMULA_STARTS``) gets a
    leading apostrophe (OWASP's advice for CSV injection); ``from_text_cell`` undoes it."""
    return "'" + value if value[:1] in FORMULA_STARTS else value


def from_text_cell(value: object) -> object:
    """A cell ``text_cell`` wrote, as it was (other values unchanged)."""
    if isinstance(value, str) and value[:1] == "'" and value[1:2] in FORMULA_STARTS:
        return value[1:]
    return value


MAX_LABEL_FILE_ENV = "LSUN_HITL_MAX_LABEL_FILE_MB"
MAX_LABEL_FILE_MB = 256  # a label file is read whole into memory: a few million answers fit well under this


def max_label_file_bytes() -> int:
    """The largest label file read: ``$LSUN_HITL_MAX_LABEL_FILE_MB`` megabytes, else ``MAX_LABEL_FILE_MB``."""
    value = os.environ.get(MAX_LABEL_FILE_ENV, "")
    return int(float(value) * 2**20) if value.replace(".", "", 1).isdigit() else MAX_LABEL_FILE_MB * 2**20


def read_label_file(path: str, request: pa.Table, category: str) -> pd.DataFrame:
    """Rows ``image_id, labeler, answer`` from a label file; LabelError naming the file and the fix."""
    p = Path(path)
    if not p.is_file():
        raise LabelError(f"label file {path!r} does not exist")
    limit = max_label_file_bytes()
    if p.stat().st_size > limit:
        raise LabelError(
            f"label file {path!r} is {p.stat().st_size:,} bytes, over the limit of {limit:,}: split it by labeler or"
            f" image, or raise {MAX_LABEL_FILE_ENV} (MB)"
        )
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
    # a handout's cells that looked like formulas were written with a leading apostrophe (text_cell)
    frame["image_id"] = frame["image_id"].map(from_text_cell)
    return frame


def _typed(value: object, kind: type, where: str, what: str) -> Any:
    """``value`` when it is None or a ``kind``; else a LabelError naming ``where`` (the task and field)."""
    if value is not None and not isinstance(value, kind):
        raise LabelError(
            f"{where} is {type(value).__name__} {str(value)[:40]!r}, not {what}: is this a Label Studio export?"
        )
    return value


def _choices(annotation: dict, where: str) -> list:
    """The choices of an annotation's ``choices`` results, each field's type checked (``_typed``)."""
    choices: list = []
    for r, result in enumerate(_typed(annotation.get("result"), list, f"{where}, field result", "a list") or []):
        result = _typed(result, dict, f"{where}, result {r}", "an object")
        if result.get("type") == "choices":
            value = _typed(result.get("value"), dict, f"{where}, result {r}, field value", "an object") or {}
            choices += _typed(value.get("choices"), list, f"{where}, result {r}, field value.choices", "a list") or []
    return choices


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
        image_id = _typed(data.get("image_id"), str, f"task {n}, field data.image_id", "a string")
        image = _typed(data.get("image"), str, f"task {n}, field data.image", "an image URL string")
        image_id = image_id or by_uri.get(image or "")
        if not image_id:
            raise LabelError(f"task {n} names no image_id and its data.image is not an image of the request")
        annotations = _typed(task.get("annotations"), list, f"task {n}, field annotations", "a list") or []
        for a, annotation in enumerate(annotations):
            where = f"task {n}, annotation {a}"
            annotation = _typed(annotation, dict, where, "an object")
            if annotation.get("was_cancelled"):
                continue
            who = annotation.get("completed_by")
            if isinstance(who, dict):
                who = who.get("email") or who.get("id")
            choices = _choices(annotation, where)
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
