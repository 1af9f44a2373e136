"""Finishing: the dataset (every pool image, its final label and provenance, in committed parts) and its summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import labels as labels_lib
from .. import report
from ..cluster import run_on_dask
from ..config import CascadeParams
from ..dataset_parts import finish_part, reduce_totals
from ..integrity import LIVE_WRITE_S, remove_temporary, run_folders
from ..manifest import manifest_counts, manifest_iterations, rows_held, stored_parts
from ..partitions import Partitioning, commit, commit_record, new_attempt, sweep
from ..split import Funnel
from ..storage import Storage, dataset_dir, dataset_key, manifest_dir, report_key
from .candidates import executor
from .common import funnels


@dataclass(frozen=True)
class Summary:
    category: str
    pool: int
    positive: int
    negative: int
    unresolved: int
    decided_by_model: int
    human_labeled_images: int
    human_labeled_share: float
    human_answers: int
    estimated_precision: float | None
    estimated_precision_low: float | None
    amplification: float
    iterations: int
    stop_reason: str | None
    # the negative set's estimated false omission: people's negatives by their posterior, the model's by each
    # iteration's calibration estimate (and its upper bound)
    estimated_false_omission: float | None = None
    estimated_false_omission_high: float | None = None
    # what the estimates miss of the run's targets, each with what would fix it (empty: both met)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        est = (
            "-"
            if self.estimated_precision is None
            else (f"{self.estimated_precision:.3f} (lower bound {self.estimated_precision_low:.3f})")
        )
        fo = (
            "-"
            if self.estimated_false_omission is None
            else f"{self.estimated_false_omission:.4f} (upper bound {self.estimated_false_omission_high:.4f})"
        )
        return (
            f"{self.category}: pool {self.pool:,}; positive {self.positive:,}, negative {self.negative:,}, "
            f"unresolved {self.unresolved:,}\n"
            f"  decided by the model: {self.decided_by_model:,}; labeled by people: {self.human_labeled_images:,} "
            f"images ({self.human_labeled_share:.1%} of the pool), {self.human_answers:,} answers\n"
            f"  estimated precision of the positive set: {est}; false omission of the negative set: {fo}\n"
            f"  amplification: {self.amplification:.1f} images decided per image people labeled; "
            f"{self.iterations} iteration(s); stopped: {self.stop_reason}"
            + "".join(f"\n  WARNING: {w}" for w in self.warnings)
        )


def positive_share(
    human: int, human_p_sum: float, model_parts: list[tuple[int, float, float]]
) -> tuple[float | None, float | None]:
    """Estimated share of true positives in a set, and its bound; (None, None) for an empty set.

    People's ``human`` images count by their aggregated posteriors (``human_p_sum``: their sum, no answer
    counting 0); each iteration's model-decided part ``(count, estimate, bound)`` by its calibration estimate
    and bound, weighted by its count.
    """
    n = human + sum(count for count, _, _ in model_parts)
    if not n:
        return None, None
    est = bound = float(human_p_sum)
    for count, rate, rate_bound in model_parts:
        est, bound = est + count * rate, bound + count * rate_bound
    return est / n, bound / n


def target_warnings(
    precision: float | None, false_omission: float | None, human_share: float, params: CascadeParams
) -> tuple[str, ...]:
    """What the dataset's estimates miss of ``params``' targets, each with what would fix it."""
    out = []
    fix = (
        f"people's labels are the weak part when they decide much of it ({human_share:.0%} here): ask more answers "
        "per image (lsun-hitl serve --labels-per-image / --min-margin), give gold so poor labelers are flagged "
        "(lsun-hitl gold; handouts mix it in), and measure it with --audit-sample"
    )
    if precision is not None and precision < params.target_precision:
        out.append(f"estimated precision {precision:.3f} is below the target {params.target_precision}: {fix}")
    if false_omission is not None and false_omission > params.target_false_omission:
        out.append(
            f"estimated false omission {false_omission:.4f} is above the target {params.target_false_omission}: {fix}"
        )
    return tuple(out)


def finish(
    storage: Storage,
    category: str,
    stop: str | None = None,
    params: CascadeParams | None = None,
    dask_address: str | None = None,
) -> Summary:
    """Write the dataset (every pool image, final label, provenance) and the summary.

    The dataset is a map over the last manifest's parts (``dataset_parts.finish_part``: in this process for a
    one-part manifest, on the Dask cluster at ``dask_address`` or a LocalCluster otherwise) committed as a set
    of parts; the summary comes from the parts' counts and sums. A dataset already committed from the same
    manifest commit is kept (a restarted step). With ``params``, the summary warns where the estimated
    precision or false omission misses its target. The run is over, so no writer is active: manifest parts no
    commit names are removed (``partitions.sweep``)."""
    done = manifest_iterations(storage, category)
    last = done[-1]
    for k in done:  # parts of split attempts that died before their commit (a retried step) go
        sweep(storage, manifest_dir(category, k))
    # and the temporaries of writes killed before their rename: the run's own folders now (no writer of them is
    # active), people's answers once no live write can be that old
    remove_temporary(storage, run_folders(category), older_than_s=0)
    remove_temporary(storage, [f"labels/{category}"], older_than_s=LIVE_WRITE_S)
    totals = write_dataset(storage, category, last, params or CascadeParams(), dask_address)
    fs = funnels(storage, category)
    summary = summarize(category, totals, fs, labels_lib.human_votes_spent(storage, category), last, stop, params)
    storage.write_json(storage.path(dataset_key(category, "summary.json")), summary.to_dict())
    if fs:
        storage.write_bytes(
            storage.path(report_key(category, "funnel.png")), report.funnel_plot(category, fs, summary.pool)
        )
        storage.write_bytes(
            storage.path(report_key(category, "funnel.md")), report.funnel_markdown(category, fs).encode()
        )
    return summary


def write_dataset(
    storage: Storage, category: str, iteration: int, params: CascadeParams, dask_address: str | None = None
) -> dict[str, int | float]:
    """Commit ``category``'s dataset from ``iteration``'s manifest, one part per manifest part; its totals
    (``dataset_parts.reduce_totals``). Returns the stored totals when the committed dataset was made from the
    manifest commit there now."""
    directory = dataset_dir(category)
    manifest = commit_record(storage, manifest_dir(category, iteration))
    source = {"iteration": iteration, "manifest_attempt": None if manifest is None else manifest["attempt"]}
    record = commit_record(storage, directory)
    if record is not None and record.get("source") == source:
        return record["totals"]
    n_rows = rows_held(manifest_counts(storage, category, iteration))
    partitioning = Partitioning(n_rows, stored_parts(storage, category, iteration))
    sweep(storage, directory)  # attempts of a finish that died before its commit
    attempt = new_attempt()
    with executor(dask_address, params, partitioning) as client:
        parts = run_on_dask(
            client,
            finish_part,
            list(range(partitioning.n_partitions)),
            storage=storage,
            category=category,
            iteration=iteration,
            partitioning=partitioning,
            attempt=attempt,
        )
    totals = reduce_totals(parts)
    commit(storage, directory, attempt, partitioning.n_partitions, n_rows, meta={"source": source, "totals": totals})
    one_file = storage.path(dataset_key(category))
    if storage.exists(one_file):  # an older root's dataset, superseded by the commit
        storage.fs.rm(one_file)
    return totals


def summarize(
    category: str,
    totals: dict[str, int | float],
    fs: list[Funnel],
    human_answers: int,
    iterations: int,
    stop: str | None,
    params: CascadeParams | None,
) -> Summary:
    """The summary of a dataset from its ``totals`` (``dataset_parts.reduce_totals``) and the run's funnels."""
    est, low, fo, fo_high = estimates(totals, fs)
    human = int(totals["human"])
    share = human / max(1, int(totals["pool"]))
    return Summary(
        category=category,
        pool=int(totals["pool"]),
        positive=int(totals["positive"]),
        negative=int(totals["negative"]),
        unresolved=int(totals["unresolved"]),
        decided_by_model=int(totals["decided_by_model"]),
        human_labeled_images=human,
        human_labeled_share=share,
        human_answers=human_answers,
        estimated_precision=est,
        estimated_precision_low=low,
        amplification=(int(totals["positive"]) + int(totals["negative"])) / max(1, human),
        iterations=iterations,
        stop_reason=stop,
        estimated_false_omission=fo,
        estimated_false_omission_high=fo_high,
        warnings=() if params is None else target_warnings(est, fo, share, params),
    )


def estimates(
    totals: dict[str, int | float], fs: list[Funnel]
) -> tuple[float | None, float | None, float | None, float | None]:
    """The share of true positives in each final set: the positive set's precision (and its lower bound),
    the negative set's false omission (and its upper bound)."""
    est, low = positive_share(
        int(totals["human_positive"]),
        totals["p_sum_human_positive"],
        [(f.model_positive, f.precision, f.precision_low or 0.0) for f in fs if f.precision is not None],
    )
    fo, fo_high = positive_share(
        int(totals["human_negative"]),
        totals["p_sum_human_negative"],
        [
            (f.model_negative, f.false_omission, f.false_omission_high or 1.0)
            for f in fs
            if f.false_omission is not None
        ],
    )
    return est, low, fo, fo_high
