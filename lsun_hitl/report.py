"""Plots and tables people look at: score histograms per iteration and the cascade funnel."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .calibration import Thresholds  # noqa: E402
from .split import Funnel  # noqa: E402


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


SCORE_BINS = np.linspace(0, 1, 51)  # the histogram's bins: scores are probabilities


def score_histogram(
    category: str,
    iteration: int,
    candidate_counts: np.ndarray,
    cal_scores: np.ndarray,
    cal_p: np.ndarray,
    thresholds: Thresholds,
) -> bytes:
    """PNG: how many candidates scored in each of ``SCORE_BINS`` (``candidate_counts``, counted part by part
    where the candidates are), and the calibration sample's scores split by the human answer."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    bins = SCORE_BINS
    top.stairs(np.asarray(candidate_counts), bins, fill=True, color="#888")
    top.set_yscale("log")
    top.set_ylabel("candidates (log)")
    top.set_title(f"{category}: model scores, iteration {iteration}")
    pos = cal_p >= 0.5
    bottom.hist(
        [cal_scores[~pos], cal_scores[pos]],
        bins=bins,
        stacked=True,
        log=True,
        color=["#c44", "#3a3"],
        label=["people: no", "people: yes"],
    )
    bottom.set_ylabel("calibration (log)")
    bottom.set_xlabel("score")
    for ax in (top, bottom):
        for t, c in ((thresholds.negative, "#c44"), (thresholds.positive, "#3a3")):
            if t is not None:
                ax.axvline(t, color=c, ls="--")
    bottom.legend(loc="upper center")
    return _png(fig)


def funnel_plot(category: str, funnels: Sequence[Funnel], pool: int) -> bytes:
    """PNG: per iteration, images decided by people, by the model (pos/neg), and still unlabeled."""
    its = [f"it {f.iteration}" for f in funnels]
    human = np.array([f.human_labeled for f in funnels])
    mpos = np.array([f.model_positive for f in funnels])
    mneg = np.array([f.model_negative for f in funnels])
    left = np.array([f.unlabeled_after for f in funnels])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(funnels))
    ax.bar(x, human, color="#46a", label="labeled by people")
    ax.bar(x, mpos, bottom=human, color="#3a3", label="model: positive")
    ax.bar(x, mneg, bottom=human + mpos, color="#c44", label="model: negative")
    ax.bar(x, left, bottom=human + mpos + mneg, color="#ccc", label="still unlabeled")
    ax.set_xticks(x, its)
    ax.set_ylabel("images")
    ax.set_title(f"{category}: the cascade funnel (pool of {pool:,})")
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


def funnel_markdown(category: str, funnels: Sequence[Funnel]) -> str:
    """A Markdown table of the funnel (the Prefect artifact and the README's example)."""

    def f3(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"### {category}: cascade funnel",
        "",
        "| it | unlabeled before | people | model + | model - | unlabeled after | t- | t+ "
        "| precision (low) | false omission (high) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in funnels:
        lines.append(
            f"| {f.iteration} | {f.unlabeled_before:,} | {f.human_labeled:,} | {f.model_positive:,} "
            f"| {f.model_negative:,} | {f.unlabeled_after:,} | {f3(f.threshold_negative)} "
            f"| {f3(f.threshold_positive)} | {f3(f.precision)} ({f3(f.precision_low)}) "
            f"| {f3(f.false_omission)} ({f3(f.false_omission_high)}) |"
        )
    return "\n".join(lines)
