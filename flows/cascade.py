"""The per-category cascade as one Prefect flow: the LSUN paper's loop.

    (once per pool, if asked: learn a backbone from the unlabeled pool itself)
    repeat:  sample -> people label it -> train -> score the rest -> people recheck the calibration
             labels the model disputes -> calibrate -> split
    until few images are left unlabeled, the human budget is spent, or the iteration limit is hit;
    then people label the remainder (or it stays unresolved; one larger than a set share of the pool waits
    for an operator's yes) and the dataset is written;
    optionally people audit a random sample of what the model decided.

While people label, the run is *paused* (``pause_flow_run`` with a ``LabelsDelivered`` input), or, when
it runs from a deployment, *suspended* (its process exits and Prefect reschedules it on resume; every step
skips work whose output is stored, so it goes on where it stopped). Whoever delivers the labels resumes
it through the Prefect API (``flows.runner.resume``; the labeling service does it by itself). Run it with
``lsun-hitl run --category sneaker --root ./lsun-data``, or ``lsun-hitl demo`` with a simulated crowd.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.logs import quiet_completed_tasks
from flows.waiting import RemainderDecision, remainder_pause_key, wait, wait_for_labels
from lsun_hitl.config import CascadeParams
from lsun_hitl.storage import Storage
from tasks.cascade import (
    ask_remainder,
    audit_dataset,
    calibrate_thresholds,
    check_stop,
    draw_sample,
    finish_dataset,
    label_remainder,
    pretrain_backbone,
    publish_audit,
    publish_audit_recheck,
    publish_labels,
    publish_recheck,
    publish_remainder,
    remainder_decision,
    report_funnel,
    score_pool,
    split_pool,
    start_cascade,
    store_decision,
    train_model,
)

quiet_completed_tasks()  # the terminal keeps the run's own lines and progress bars (a worker's process too)


def decide_remainder(
    storage: Storage, category: str, params: CascadeParams, iteration: int, run_id: str | None, stop: str
) -> str:
    """Whether people label what is left after ``iteration`` ("people") or it stays "unresolved".

    A remainder larger than ``params.large_remainder_share`` of the pool, with no decision stored and
    ``params.large_remainder == "ask"``, makes the run wait for an operator's answer (the resume form in the
    Prefect UI, or ``lsun-hitl decide``) before anyone is asked to label so many images."""
    attempt = 0
    while (decision := remainder_decision(storage, category, params, iteration)) == "ask":
        question = ask_remainder(storage, category, iteration, run_id, stop)
        attempt += 1
        share = question["n_images"] / max(1, question["pool"])
        description = (
            f"**{category}**: the loop stopped after iteration {iteration} ({stop}) with **{question['n_images']:,} "
            f"images ({share:.1%} of the pool)** that no model decided. Should people label them? Resume with "
            "`people` on to ask them, off to leave them unresolved (or `lsun-hitl decide --category "
            f"{category} --remainder people|unresolved`)."
        )
        get_run_logger().warning(
            "waiting for an operator: %s images (%.1f%% of the pool) left undecided; answer with `lsun-hitl decide"
            " --category %s --remainder people` (or `unresolved`), or the Resume form of this paused run in the"
            " Prefect UI",
            question["n_images"],
            100 * share,
            category,
        )
        got = wait(
            params,
            RemainderDecision.with_initial_data(description=description, people=False),
            remainder_pause_key(attempt),
        )
        if got is not None:
            store_decision(storage, category, "people" if got.people else "unresolved")
    return decision


@flow(name="lsun-cascade", flow_run_name="{category}", persist_result=True, log_prints=True)
def category_cascade(
    category: str,
    root: str = "lsun-data",
    dask_address: str | None = None,
    params: CascadeParams | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Build the labeled dataset of one category from the pool under ``root``."""
    params = params or CascadeParams()
    storage = Storage(root, storage_options or {})
    run_id = str(flow_run.id) if flow_run.id else None
    iteration = start_cascade(storage, category, params)
    pretrain_backbone(storage, params)  # once per pool, when the model starts from the pool's own backbone
    stop = check_stop(storage, category, params, iteration) if iteration else None
    while stop is None:
        iteration += 1
        draw_sample(storage, category, params, iteration, dask_address)
        wait_for_labels(storage, category, publish_labels(storage, category, params, iteration, run_id), params)
        train_model(storage, category, params, iteration)
        score_pool(storage, category, params, iteration, dask_address)
        if (recheck := publish_recheck(storage, category, params, iteration, run_id, dask_address)) is not None:
            wait_for_labels(storage, category, recheck, params)
        calibrate_thresholds(storage, category, params, iteration, dask_address)
        print(split_pool(storage, category, params, iteration, dask_address))
        report_funnel(storage, category)
        stop = check_stop(storage, category, params, iteration)
    print(f"stopping after iteration {iteration}: {stop}")
    if decide_remainder(storage, category, params, iteration, run_id, stop) == "people":
        remainder = publish_remainder(storage, category, params, iteration, run_id)  # within the budget
        if remainder is not None:
            wait_for_labels(storage, category, remainder, params)
            label_remainder(storage, category, iteration)
            report_funnel(storage, category)
    summary = finish_dataset(storage, category, stop, params, dask_address)
    print(summary)
    if params.audit_sample and (audit := publish_audit(storage, category, params, run_id)) is not None:
        wait_for_labels(storage, category, audit, params)
        if (recheck := publish_audit_recheck(storage, category, params, run_id)) is not None:
            wait_for_labels(storage, category, recheck, params)
        print(audit_dataset(storage, category, params))
    return summary.to_dict()
