"""The end of an iteration: split the pool by people's labels and the thresholds, then stop or go on."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..calibration import zero_error_size
from ..cluster import run_on_dask
from ..config import CascadeParams
from ..manifest import manifest_counts, rows_held
from ..manifest_parts import (
    IterationUpdate,
    advance_part,
    split_off_next_sample,
    split_off_next_train,
    store_next_sample,
    store_next_train,
)
from ..partitions import commit, new_attempt
from ..plan import forecast
from ..split import Funnel, remainder_to_people, stalled, stop_reason, train_size
from ..storage import Storage, manifest_dir
from .calibrate import calibrate
from .candidates import executor, locate, partitioning_before
from .common import funnels, request_id_for, stored_funnel
from .people import checked_posteriors, posteriors
from .sample import (
    carried_calibration,
    largest_sample,
    largest_train,
    new_calibration_size,
    sample,
    sample_ids,
    train_sample_size,
)


def split(
    storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None = None
) -> Funnel:
    """Write the iteration's manifest: people's labels, then the model's decisions beyond the thresholds."""
    return stored_funnel(
        storage, category, iteration, lambda: _split(storage, category, params, iteration, dask_address)
    )


def _split(storage: Storage, category: str, params: CascadeParams, iteration: int, dask_address: str | None) -> Funnel:
    """Decide the iteration's images part by part (a map over the manifest's partitions, on Dask when there
    are several), commit its manifest; return its funnel (the caller stores it).

    This process holds only the sample, people's answers to it, the thresholds and the parts' counts.
    """
    drawn = sample(storage, category, params, iteration)
    thresholds = calibrate(storage, category, params, iteration, dask_address)
    rid = request_id_for(iteration)
    partitioning = partitioning_before(storage, category, params, iteration)
    with executor(dask_address, params, partitioning) as client:
        where = locate(client, storage, category, iteration, partitioning, drawn.train)
        update = IterationUpdate(
            iteration=iteration,
            train=drawn.train,
            train_p=posteriors(storage, category, rid, sample_ids(storage, category, params, iteration, "train")),
            calibration=drawn.calibration,
            calibration_p=checked_posteriors(
                storage, category, rid, sample_ids(storage, category, params, iteration, "calibration")
            ),
            thresholds=thresholds,
            score_files=where.score_files,
            score_sizes=where.score_sizes,
            next_sample=(params.seed, largest_sample(params)),  # drawn while each part is in memory
            next_train=(params.seed, largest_train(params)) if params.train_draw == "active" else None,
        )
        attempt = new_attempt()
        counts = run_on_dask(
            client,
            _advance,
            [(p, int(where.first[p])) for p in range(partitioning.n_partitions)],
            storage=storage,
            category=category,
            partitioning=partitioning,
            update=update,
            attempt=attempt,
        )
    next_trains = split_off_next_train(counts)
    counts, next_draws = split_off_next_sample(counts)
    total = {k: int(sum(c[k] for c in counts)) for k in counts[0]}
    held = rows_held(total)
    if held != partitioning.n_rows:  # never commit a set of parts that does not hold the pool
        raise RuntimeError(f"iteration {iteration}: the parts hold {held:,} rows, not the pool's {partitioning.n_rows}")
    funnel = Funnel(
        iteration=iteration,
        unlabeled_before=total["unlabeled_before"],
        human_labeled=len(drawn.train) + len(drawn.calibration),
        human_positive=total["human_positive"],
        scored=total["scored"],
        model_positive=total["model_positive"],
        model_negative=total["model_negative"],
        unlabeled_after=total["unlabeled"],
        threshold_positive=thresholds.positive,
        threshold_negative=thresholds.negative,
        precision=thresholds.precision.estimate if thresholds.precision else None,
        precision_low=thresholds.precision.low if thresholds.precision else None,
        false_omission=thresholds.false_omission.estimate if thresholds.false_omission else None,
        false_omission_high=thresholds.false_omission.high if thresholds.false_omission else None,
    )
    funnel = with_forecast(storage, category, params, funnel, pool=held, human=total["human"])
    keep = ("unlabeled", "positive", "negative", "human", "human_positive")
    meta = {"counts": [{k: c[k] for k in keep} for c in counts], "funnel": funnel.to_dict()}
    meta["next_sample"] = store_next_sample(
        storage,
        manifest_dir(category, iteration),
        attempt,
        next_draws,
        iteration=iteration + 1,
        seed=params.seed,
        k=largest_sample(params),
    )
    if next_trains:
        meta["next_train"] = store_next_train(
            storage,
            manifest_dir(category, iteration),
            attempt,
            next_trains,
            iteration=iteration + 1,
            seed=params.seed,
            k=largest_train(params),
        )
    commit(
        storage, manifest_dir(category, iteration), attempt, partitioning.n_partitions, partitioning.n_rows, meta=meta
    )
    return funnel


def with_forecast(
    storage: Storage, category: str, params: CascadeParams, funnel: Funnel, *, pool: int, human: int
) -> Funnel:
    """``funnel`` with what people are expected to label in all (``plan.forecast``), projected at its rate with
    the next iteration's sample size (grown after stalls, as ``train_sample_size`` grows it)."""
    earlier = [f for f in funnels(storage, category) if f.iteration < funnel.iteration]
    n_train = train_size(params.train_sample, params.train_growth, params.train_sample_max, stalled([*earlier, funnel]))
    ahead = forecast(
        pool=pool,
        human=human,
        open_=funnel.unlabeled_after,
        scored=funnel.scored,
        decided=funnel.model_positive + funnel.model_negative,
        iteration=funnel.iteration,
        next_sample=n_train + new_calibration_size(params, 0, funnel.iteration + 1),
        params=params,
    )
    return replace(funnel, forecast_human=ahead.human, forecast_share=ahead.share, decided_share=ahead.decided_share)


def _advance(item: tuple[int, int], **kwargs: Any) -> dict:
    """``advance_part`` of ``(partition, its first candidate)``: the split's map."""
    p, candidate_start = item
    return advance_part(p=p, candidate_start=candidate_start, **kwargs)


def should_stop(storage: Storage, category: str, params: CascadeParams, iteration: int) -> str | None:
    """Why the cascade stops after ``iteration`` (``split.stop_reason``), or None when it goes on."""
    counts = manifest_counts(storage, category, iteration)
    unlabeled, spent = counts["unlabeled"], counts["human"]
    # "people finishing is cheaper than another round" holds only where people will finish
    people_finish = params.remainder == "people" and remainder_to_people(unlabeled, spent, params.human_budget)
    return stop_reason(
        unlabeled=unlabeled,
        pool=rows_held(counts),
        iteration=iteration,
        human_labeled=spent,
        max_iterations=params.max_iterations,
        stop_unlabeled=params.stop_unlabeled,
        stop_unlabeled_fraction=params.stop_unlabeled_fraction,
        human_budget=params.human_budget,
        next_sample=next_sample_size(storage, category, params, iteration)
        if params.stop_when_cheaper and people_finish
        else None,
        min_sample=zero_error_size(params.target_false_omission, params.threshold_confidence(iteration + 1)),
    )


def next_sample_size(storage: Storage, category: str, params: CascadeParams, iteration: int) -> int:
    """Images iteration ``iteration + 1`` would send to people (before the cap on its share)."""
    carried = carried_calibration(storage, category, params, iteration + 1).num_rows
    return train_sample_size(storage, category, params, iteration + 1) + new_calibration_size(
        params, carried, iteration + 1
    )
