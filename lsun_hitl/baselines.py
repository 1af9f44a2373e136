"""Baselines the cascade is measured against (evaluation only; they read the ground truth through the
simulated crowd, as the cascade's crowd does).

- ``all_by_crowd``: every pool image labeled by the same crowd (k answers, more where people
  disagree), aggregated by Dawid-Skene.
- ``single_round``: one round of threshold-based auto-labeling with a given human budget: the crowd
  labels a uniform sample, 80% trains one model, 20% validates; the positive threshold is the lowest
  score whose validation precision reaches the target, the negative threshold the highest whose
  validation false omission stays under it (point estimates, as common auto-labeling does); images
  between the thresholds stay unresolved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from .config import ModelParams
from .crowd import CrowdParams, SimulatedCrowd
from .labels import aggregate


@dataclass(frozen=True)
class BaselineResult:
    name: str
    precision: float
    false_omission: float
    coverage: float
    human_images: int
    human_answers: int
    pool: int
    recall: float  # share of the true positives in the positive set

    def to_dict(self) -> dict:
        return asdict(self)


def _crowd_labels(crowd: SimulatedCrowd, image_ids: list[str], uris: list[str]) -> tuple[np.ndarray, int]:
    """Aggregated p_positive for the images (in order) and how many answers it took."""
    votes = crowd.answer(pa.table({"image_id": image_ids, "uri": uris}))
    votes["request_id"], votes["batch_id"], votes["gold"] = "baseline", None, False
    votes["submitted_at"] = np.datetime64("2026-01-01", "ms")
    agg = aggregate(pa.Table.from_pandas(votes, preserve_index=False)).to_pandas().set_index("image_id")
    p = agg.reindex(image_ids)["p_positive"].fillna(0.5).to_numpy(np.float32)
    return p, len(votes)


def _rates(label_pos: np.ndarray, label_neg: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Precision of the positive set, false omission of the negative set, recall of the positives."""
    precision = float(truth[label_pos].mean()) if label_pos.any() else float("nan")
    false_omission = float(truth[label_neg].mean()) if label_neg.any() else float("nan")
    recall = float(label_pos[truth].mean()) if truth.any() else float("nan")
    return precision, false_omission, recall


def all_by_crowd(
    image_ids: list[str], uris: list[str], truth_by_uri: dict[str, bool], params: CrowdParams
) -> BaselineResult:
    crowd = SimulatedCrowd(truth_by_uri, params)
    p, answers = _crowd_labels(crowd, image_ids, uris)
    truth = np.array([truth_by_uri[u] for u in uris])
    precision, false_omission, recall = _rates(p >= 0.5, p < 0.5, truth)
    n = len(image_ids)
    return BaselineResult("all-by-crowd", precision, false_omission, 1.0, n, answers, n, recall)


def thresholds_on_validation(
    scores: np.ndarray, labels: np.ndarray, target_precision: float, target_false_omission: float
) -> tuple[float, float]:
    """Point-estimate thresholds: (t_pos, t_neg); inf / -inf when none reaches the target."""
    order = np.argsort(-scores)
    s, y = scores[order], labels[order].astype(float)
    prec = np.cumsum(y) / np.arange(1, len(y) + 1)  # precision of the top-k
    ok = np.flatnonzero(prec >= target_precision)
    t_pos = float(s[ok.max()]) if len(ok) else float("inf")
    asc = np.argsort(scores)
    s2, y2 = scores[asc], labels[asc].astype(float)
    fo = np.cumsum(y2) / np.arange(1, len(y2) + 1)  # false omission of the bottom-k
    ok2 = np.flatnonzero(fo <= target_false_omission)
    t_neg = float(s2[ok2.max()]) if len(ok2) else float("-inf")
    return t_pos, min(t_neg, t_pos)


def single_round(
    images: np.ndarray,
    image_ids: list[str],
    uris: list[str],
    truth_by_uri: dict[str, bool],
    *,
    budget: int,
    crowd_params: CrowdParams,
    model_params: ModelParams,
    target_precision: float = 0.95,
    target_false_omission: float = 0.01,
    seed: int = 0,
) -> BaselineResult:
    """``images``: every pool image decoded, (N, H, W, 3) uint8 in pool order."""
    from . import model as model_lib

    n = len(image_ids)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=min(budget, n), replace=False)
    crowd = SimulatedCrowd(truth_by_uri, crowd_params)
    p, answers = _crowd_labels(crowd, [image_ids[k] for k in chosen], [uris[k] for k in chosen])
    cut = int(0.8 * len(chosen))
    train_rows, val_rows = chosen[:cut], chosen[cut:]
    net = model_lib.train(images[train_rows], p[:cut], model_params, seed=seed)
    rest = np.setdiff1d(np.arange(n), chosen)
    val_scores = model_lib.predict(net, images[val_rows])
    t_pos, t_neg = thresholds_on_validation(val_scores, p[cut:] >= 0.5, target_precision, target_false_omission)
    scores = model_lib.predict(net, images[rest])
    truth = np.array([truth_by_uri[u] for u in uris])
    label_pos = np.zeros(n, bool)
    label_neg = np.zeros(n, bool)
    label_pos[rest[scores >= t_pos]] = True
    label_neg[rest[scores < t_neg]] = True
    label_pos[chosen] = p >= 0.5
    label_neg[chosen] = p < 0.5
    precision, false_omission, recall = _rates(label_pos, label_neg, truth)
    coverage = float((label_pos | label_neg).mean())
    return BaselineResult("single-round", precision, false_omission, coverage, len(chosen), answers, n, recall)
