"""Quality control of human labels: gold images, per-labeler accuracy, and how many votes an image needs.

Gold images are pool images whose answer an expert fixed in advance (``gold/<category>.parquet``:
``image_id``, ``uri``, ``answer``). They are mixed into labelers' batches at ``gold_rate``; a
labeler's answers on them estimate its accuracy. A labeler is *flagged* once its gold accuracy is
below ``min_gold_accuracy`` with confidence ``flag_confidence`` (the one-sided Clopper-Pearson upper
bound of its accuracy is below the threshold, after at least ``min_gold_answers`` gold answers), so
an accurate labeler's unlucky streak does not flag it. Flagged labelers get no more work and their
answers are left out of aggregation (the images they answered are asked again).

The vote policy is the paper's: ``labels_per_image`` independent answers per image, and more
answers, up to ``max_labels_per_image``, while the yes and no answers differ by less than
``min_margin`` -- more effort exactly where people disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from .storage import QC_KEY, Storage, gold_key

GOLD_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("answer", pa.string())])


class QualityError(ValueError):
    """Malformed gold set or quality settings."""


AGGREGATIONS: tuple[str, ...] = ("dawid-skene", "majority")


@dataclass(frozen=True)
class QCParams:
    """How labels are collected and checked.

    Parameters
    ----------
    labels_per_image : independent answers every image gets.
    max_labels_per_image : most answers an image gets while people disagree.
    min_margin : an image is done once ``|yes - no| >= min_margin`` (after ``labels_per_image``).
    gold_rate : share of a batch that is gold images.
    min_gold_answers : gold answers needed before a labeler can be flagged.
    min_gold_accuracy : labelers confidently below this accuracy on gold are flagged.
    flag_confidence : confidence of that judgement (one-sided Clopper-Pearson).
    batch_size : images per batch given to one labeler (gold included).
    lease_s : seconds a labeler holds an unsubmitted batch before its images go to others.
    aggregation : ``"dawid-skene"`` or ``"majority"`` (see ``labels.aggregate``).
    """

    labels_per_image: int = 3
    max_labels_per_image: int = 7
    min_margin: int = 3
    gold_rate: float = 0.1
    min_gold_answers: int = 5
    min_gold_accuracy: float = 0.8
    flag_confidence: float = 0.99
    batch_size: int = 20
    lease_s: float = 1800.0
    aggregation: str = "dawid-skene"  # one of AGGREGATIONS

    def validate(self) -> QCParams:
        if not 1 <= self.labels_per_image <= self.max_labels_per_image:
            raise QualityError("labels_per_image must be between 1 and max_labels_per_image")
        if self.min_margin < 1:
            raise QualityError("min_margin must be at least 1")
        if not 0.0 <= self.gold_rate < 1.0:
            raise QualityError("gold_rate must be in [0, 1)")
        if not 0.5 <= self.min_gold_accuracy <= 1.0:
            raise QualityError("min_gold_accuracy must be in [0.5, 1]")
        if self.batch_size < 1:
            raise QualityError("batch_size must be at least 1")
        if self.aggregation not in AGGREGATIONS:
            raise QualityError("aggregation must be 'dawid-skene' or 'majority'")
        return self


def image_done(n_yes: np.ndarray, n_no: np.ndarray, n_unsure: np.ndarray, qc: QCParams) -> np.ndarray:
    """Whether each image has the answers it needs (arrays of shape (n,), from unflagged labelers)."""
    n = n_yes + n_no + n_unsure
    decided = (n >= qc.labels_per_image) & (np.abs(n_yes - n_no) >= qc.min_margin)
    exhausted = (n >= qc.max_labels_per_image) & (n_yes + n_no > 0)
    return decided | exhausted


def votes_wanted(n_yes: np.ndarray, n_no: np.ndarray, n_unsure: np.ndarray, qc: QCParams) -> np.ndarray:
    """How many answers each image should have in total right now (counting ones already given)."""
    n = n_yes + n_no + n_unsure
    more = np.where(n < qc.labels_per_image, qc.labels_per_image, n + 1)
    return np.where(image_done(n_yes, n_no, n_unsure, qc), n, more)


# ---- gold ----------------------------------------------------------------------------------------------
def write_gold(storage: Storage, category: str, gold: pa.Table | pd.DataFrame) -> int:
    """Store the gold set of a category (``image_id``, ``uri``, ``answer`` yes/no); returns its size."""
    df = gold.to_pandas() if isinstance(gold, pa.Table) else gold.copy()
    missing = {"image_id", "uri", "answer"} - set(df.columns)
    if missing:
        raise QualityError(f"gold labels are missing column(s) {sorted(missing)}; need image_id, uri, answer")
    df["answer"] = df["answer"].astype(str).str.strip().str.lower()
    bad = sorted(set(df["answer"]) - {"yes", "no"})
    if bad:
        raise QualityError(f"gold answers must be yes or no, not {bad[:5]}")
    if df["image_id"].duplicated().any():
        raise QualityError("gold labels name an image twice")
    table = pa.Table.from_pandas(df[GOLD_SCHEMA.names], schema=GOLD_SCHEMA, preserve_index=False)
    storage.write_table(storage.path(gold_key(category)), table)
    return table.num_rows


def read_gold(storage: Storage, category: str) -> pa.Table:
    """The category's gold set, or an empty table when none was stored."""
    path = storage.path(gold_key(category))
    return storage.read_table(path).cast(GOLD_SCHEMA) if storage.exists(path) else GOLD_SCHEMA.empty_table()


# ---- labelers ------------------------------------------------------------------------------------------
def labeler_stats(votes: pa.Table, gold: pa.Table, qc: QCParams) -> pd.DataFrame:
    """Per-labeler figures from stored answers and the gold set.

    Returns one row per labeler: ``answers`` (all), ``gold_answers``, ``gold_correct``,
    ``gold_accuracy`` (NaN without gold answers), ``gold_accuracy_high`` (its upper confidence
    bound), ``agreement`` (share of its yes/no answers on
    non-gold images that match the other labelers' majority), ``flagged``.
    """
    df = votes.select(["image_id", "labeler", "answer", "gold"]).to_pandas()
    cols = [
        "labeler",
        "answers",
        "gold_answers",
        "gold_correct",
        "gold_accuracy",
        "gold_accuracy_high",
        "agreement",
        "flagged",
    ]
    if df.empty:
        return pd.DataFrame(columns=cols)
    truth = dict(zip(gold.column("image_id").to_pylist(), gold.column("answer").to_pylist(), strict=True))
    g = df[df["gold"].astype(bool) & (df["answer"] != "unsure")].copy()
    g["correct"] = g["answer"] == g["image_id"].map(truth)
    gstats = g.groupby("labeler")["correct"].agg(gold_answers="size", gold_correct="sum")
    # agreement with the majority of the others, on ordinary images
    o = df[~df["gold"].astype(bool) & (df["answer"] != "unsure")].copy()
    o["yes"] = (o["answer"] == "yes").astype(int)
    tot = o.groupby("image_id")["yes"].agg(["sum", "size"])
    o = o.join(tot, on="image_id")
    others_yes = o["sum"] - o["yes"]
    others_n = o["size"] - 1
    o = o[(others_n > 0) & (2 * others_yes != others_n)]
    others_majority = 2 * (o["sum"] - o["yes"]) > (o["size"] - 1)
    o = o.assign(agree=(o["yes"] == 1) == others_majority)
    out = pd.DataFrame({"answers": df.groupby("labeler").size()})
    out = out.join(gstats).join(o.groupby("labeler")["agree"].mean().rename("agreement"))
    out["gold_answers"] = out["gold_answers"].fillna(0).astype(int)
    out["gold_correct"] = out["gold_correct"].fillna(0).astype(int)
    out["gold_accuracy"] = out["gold_correct"] / out["gold_answers"].where(out["gold_answers"] > 0)
    from .calibration import clopper_pearson

    upper = [
        clopper_pearson(c, n, qc.flag_confidence)[1] if n else 1.0
        for c, n in zip(out["gold_correct"], out["gold_answers"], strict=True)
    ]
    out["gold_accuracy_high"] = upper
    out["flagged"] = [is_flagged(n, c, qc) for c, n in zip(out["gold_correct"], out["gold_answers"], strict=True)]
    return out.reset_index().rename(columns={"index": "labeler"})[cols]


def is_flagged(gold_answers: int, gold_correct: int, qc: QCParams) -> bool:
    """Whether a labeler with these gold figures is confidently below ``qc.min_gold_accuracy``."""
    from .calibration import clopper_pearson

    if gold_answers < qc.min_gold_answers:
        return False
    return clopper_pearson(gold_correct, gold_answers, qc.flag_confidence)[1] < qc.min_gold_accuracy


def read_qc(storage: Storage) -> QCParams:
    """The quality settings stored under ``labels/qc.json`` (written by ``lsun-hitl serve``), or defaults."""
    path = storage.path(QC_KEY)
    if not storage.exists(path):
        return QCParams()
    try:
        return QCParams(**storage.read_json(path)).validate()
    except TypeError as exc:
        raise QualityError(f"{storage.url_of(QC_KEY)} holds unknown settings ({exc}); delete it or fix it") from exc


def write_qc(storage: Storage, qc: QCParams) -> None:
    storage.write_json(storage.path(QC_KEY), asdict(qc.validate()))


def flagged_labelers(votes: pa.Table, gold: pa.Table, qc: QCParams) -> set[str]:
    return flagged_in(labeler_stats(votes, gold, qc))


def flagged_in(stats: pd.DataFrame) -> set[str]:
    """The flagged labelers of a ``labeler_stats`` table."""
    return set(stats.loc[stats["flagged"], "labeler"]) if len(stats) else set()
