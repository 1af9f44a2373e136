"""Evaluation against ground truth (never used by the pipeline itself)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .dataset_parts import read_dataset
from .storage import Storage
from .truth import read_truth


@dataclass(frozen=True)
class Evaluation:
    category: str
    positives: int
    negatives: int
    unresolved: int
    precision: float
    false_omission: float
    recall: float
    model_precision: float | None
    model_false_omission: float | None
    human_label_accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        return (
            f"against ground truth: positive-set precision {self.precision:.4f}, negative-set false omission "
            f"{self.false_omission:.4f}, recall {self.recall:.4f}\n"
            f"  model-decided only: precision {f(self.model_precision)}, false omission "
            f"{f(self.model_false_omission)}; aggregated human labels {self.human_label_accuracy:.4f} accurate"
        )


def evaluate(storage: Storage, category: str) -> Evaluation:
    """Compare the final dataset of ``category`` with its registered ground truth (``lsun_hitl.truth``).

    Raises ValueError naming the category when it has no finished dataset under ``storage``.
    """
    try:
        table = read_dataset(storage, category, columns=["uri", "label", "decided_by"])
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from exc
    truth_map = read_truth(storage, category)
    truth = np.array([truth_map[u] for u in table.column("uri").to_pylist()], bool)
    label = np.array(table.column("label").to_pylist())
    by = np.array(table.column("decided_by").to_pylist(), dtype=object)
    pos, neg = label == "positive", label == "negative"
    model, human = by == "model", by == "human"

    def rate(mask: np.ndarray, value: bool) -> float | None:
        return float(np.mean(truth[mask] == value)) if mask.any() else None

    return Evaluation(
        category=category,
        positives=int(pos.sum()),
        negatives=int(neg.sum()),
        unresolved=int((label == "unresolved").sum()),
        precision=rate(pos, True) or 0.0,
        false_omission=rate(neg, True) or 0.0,
        recall=float(np.mean(pos[truth])) if truth.any() else 0.0,
        model_precision=rate(pos & model, True),
        model_false_omission=rate(neg & model, True),
        human_label_accuracy=float(np.mean(truth[human] == pos[human])) if human.any() else 0.0,
    )
