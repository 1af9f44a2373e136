"""The per-category cascade as one Prefect flow: the LSUN paper's loop.

    (once per pool, if asked: learn a backbone from the unlabeled pool itself)
    repeat:  sample -> people label it -> train -> score the rest -> people recheck the calibration
             labels the model disputes -> calibrate -> split
    until few images are left unlabeled, the human budget is spent, or the iteration limit is hit;
    then people label the remainder (or it stays unresolved) and the dataset is written;
    optionally people audit a random sample of what the model decided.

While people label, the run is *paused* (``pause_flow_run`` with a ``LabelsDelivered`` input), or, when
it runs from a deployment, *suspended* (its process exits and Prefect reschedules it on resume; every step
skips work whose output is stored, so it goes on where it stopped). Whoever delivers the labels resumes
it through the Prefect API (``lsun_hitl.runner.resume``; the labeling service does it by itself). Run it with
``lsun-hitl run --category sneaker --root ./lsun-data``, or ``lsun-hitl demo`` with a simulated crowd.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run

from lsun_hitl.config import CascadeParams
from lsun_hitl.labels import LabelRequest
from lsun_hitl.storage import Storage
from tasks.cascade import (
    audit_dataset,
    calibrate_thresholds,
    check_stop,
    collect_labels,
    draw_sample,
    finish_dataset,
    label_remainder,
    labels_complete,
    pretrain_backbone,
    publish_audit,
    publish_audit_recheck,
    publish_labels,
    publish_recheck,
    publish_remainder,
    report_funnel,
    score_pool,
    split_pool,
    start_cascade,
    train_model,
)


class LabelsDelivered(RunInput):
    """What resumes a paused cascade: the request whose labels are now stored."""

    request_id: str


def wait_for_labels(storage: Storage, category: str, request: LabelRequest, params: CascadeParams) -> int:
    """Pause until every image of ``request`` has a stored answer; return how many were aggregated."""
    attempt = 0
    while not labels_complete(storage, category, request.request_id):
        attempt += 1
        get_run_logger().info(
            "waiting for people to label %s images (%s); paused up to %s s",
            request.n_images,
            request.request_id,
            params.label_timeout_s,
        )
        key = f"{request.request_id}-{attempt}"
        if params.wait == "suspend" or (params.wait == "auto" and deployment.id):
            # ends this process; Prefect reschedules the run on resume and it goes on from stored outputs
            suspend_flow_run(wait_for_input=LabelsDelivered, timeout=params.label_timeout_s, key=key)
        else:
            pause_flow_run(
                wait_for_input=LabelsDelivered,
                timeout=params.label_timeout_s,
                poll_interval=params.label_poll_s,
                key=key,
            )
    return collect_labels(storage, category, request.request_id)


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
        draw_sample(storage, category, params, iteration)
        wait_for_labels(storage, category, publish_labels(storage, category, params, iteration, run_id), params)
        train_model(storage, category, params, iteration)
        score_pool(storage, category, params, iteration, dask_address)
        if (recheck := publish_recheck(storage, category, params, iteration, run_id)) is not None:
            wait_for_labels(storage, category, recheck, params)
        calibrate_thresholds(storage, category, params, iteration)
        print(split_pool(storage, category, params, iteration))
        report_funnel(storage, category)
        stop = check_stop(storage, category, params, iteration)
    print(f"stopping after iteration {iteration}: {stop}")
    if params.remainder == "people":
        remainder = publish_remainder(storage, category, params, iteration, run_id)  # within the budget
        if remainder is not None:
            wait_for_labels(storage, category, remainder, params)
            label_remainder(storage, category, iteration)
            report_funnel(storage, category)
    summary = finish_dataset(storage, category, stop)
    print(summary)
    if params.audit_sample and (audit := publish_audit(storage, category, params, run_id)) is not None:
        wait_for_labels(storage, category, audit, params)
        if (recheck := publish_audit_recheck(storage, category, params, run_id)) is not None:
            wait_for_labels(storage, category, recheck, params)
        print(audit_dataset(storage, category, params))
    return summary.to_dict()
