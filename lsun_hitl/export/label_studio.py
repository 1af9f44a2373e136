"""Label Studio review tasks (JSON) with the model's score as a prediction, and the labeling config they
need; people's answers come back through ``import_review``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..progress import Progress
from ..storage import Storage
from .dataset import SPLITS, dataset_batches, dataset_files
from .report import ExportReport
from .staging import export_target, timed_export

LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Header value="$question"/>
  <Choices name="answer" toName="image" choice="single" showInline="true">
    <Choice value="Yes"/>
    <Choice value="No"/>
    <Choice value="Unsure"/>
  </Choices>
</View>
"""
_TASK_COLUMNS = ["image_id", "uri", "label", "decided_by", "decided_iteration", "probability"]


def export_label_studio(
    storage: Storage,
    category: str,
    out: str,
    *,
    splits: Sequence[str] = SPLITS,
    decided_by: Sequence[str] = ("human", "model", "review"),
    image_url: str = "{uri}",
    batch_size: int = 4096,
    out_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Label Studio tasks for reviewing a category: ``<out>/tasks.json`` (a JSON list, written in a
    stream) and ``<out>/label_config.xml`` (the labeling interface the tasks' predictions refer to).

    Each task's ``data`` holds ``image``, ``image_id``, ``question``, the cascade's ``label``,
    ``decided_by`` and ``decided_iteration``. Images the model scored carry a prediction: its choice
    (the dataset's label) and its probability as ``score``. People's answers come back with
    ``import_review``.

    Parameters
    ----------
    out, out_options
        Any fsspec URL or local path, and its storage options (by default those of ``storage`` when
        both are remote).
    splits, decided_by
        The labels, and who decided them (human / model / review), of the images to review.
    image_url
        The task's image: a template with ``{uri}``, ``{path}`` (the image's path under the storage
        root) or ``{image_id}``; e.g. ``/data/local-files/?d=lsun/{path}`` for Label Studio's local
        storage.
    """
    dataset_files(storage, category)
    target = export_target(storage, out, out_options)
    report = ExportReport("label-studio", target.url)
    written = 0

    def write(f: Any) -> None:
        nonlocal written
        written = 0
        f.write(b"[")
        batches = dataset_batches(storage, category, batch_size=batch_size, splits=splits, progress=progress)
        for task in _tasks(storage, category, batches, decided_by, image_url):
            f.write((",\n" if written else "\n").encode() + json.dumps(task).encode())
            written += 1
        f.write(b"\n]\n")

    with timed_export(report):
        target.write_stream(target.path("tasks.json"), write)
        target.write_bytes(target.path("label_config.xml"), LABEL_STUDIO_CONFIG.encode())
        report.written["tasks"] = written
    return report


def _tasks(
    storage: Storage, category: str, batches: Iterator[pa.Table], decided_by: Sequence[str], image_url: str
) -> Iterator[dict[str, Any]]:
    """One task per image of ``batches`` that ``decided_by`` names."""
    question = f"Is this a {category}?"
    deciders = pa.array(list(decided_by))
    for batch in batches:
        batch = batch.filter(pc.is_in(batch.column("decided_by"), value_set=deciders))
        for r in batch.select(_TASK_COLUMNS).to_pylist():
            task: dict[str, Any] = {
                "data": {
                    "image": _image_url(image_url, r["uri"], r["image_id"], storage),
                    "image_id": r["image_id"],
                    "question": question,
                    "label": r["label"],
                    "decided_by": r["decided_by"],
                    "decided_iteration": r["decided_iteration"],
                }
            }
            p = r["probability"]
            if p is not None and p == p:
                task["predictions"] = [_prediction(category, r, p)]
            yield task


def _prediction(category: str, row: dict[str, Any], p: float) -> dict[str, Any]:
    """The model's answer as a Label Studio prediction: the dataset's label (for an unresolved image,
    the side of 0.5 its probability ``p`` falls on), scored by ``p``."""
    yes = row["label"] == "positive" if row["label"] != "unresolved" else p >= 0.5
    return {
        "model_version": f"lsun-hitl {category} iteration {row['decided_iteration']}",
        "score": round(float(p), 6),
        "result": [
            {
                "from_name": "answer",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["Yes" if yes else "No"]},
            }
        ],
    }


def _image_url(template: str, uri: str, image_id: str, storage: Storage) -> str:
    root = storage.url_of("")
    path = uri[len(root) :].lstrip("/") if uri.startswith(root) else uri.split("://", 1)[-1]
    return template.format(uri=uri, image_id=image_id, path=path)
