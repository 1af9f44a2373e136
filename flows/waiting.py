"""How a cascade run waits for people: pause (or suspend) until resumed with a run input.

Each wait has a pause key, so that whoever resumes knows what the run waits for: ``<request>-<attempt>``
while it waits for a label request's answers, ``remainder-decision-<attempt>`` while it asks an operator
whether people label a large remainder. No two waits share a key: Prefect hands a run the input stored under
its pause key, so a labels wait that reused the decision's key (the remainder's request is ``remainder``) was
handed the stored decision. ``flows.runner`` resumes a run only for the key it waits on.
"""

from __future__ import annotations

import uuid

from prefect import get_run_logger
from prefect.events import emit_event
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment

from lsun_hitl.config import CascadeParams
from lsun_hitl.labels import LabelRequest
from lsun_hitl.status import labeling_url, waiting_description
from lsun_hitl.storage import Storage
from tasks.cascade import collect_labels, labels_complete

REMAINDER_KEY = "remainder-decision"  # not a request id: the remainder's labels wait under "remainder-<attempt>"


class LabelsDelivered(RunInput):
    """What resumes a paused cascade: the request whose labels are now stored (empty from the UI's form: the
    run checks the stored answers either way)."""

    request_id: str = ""


class RemainderDecision(RunInput):
    """What resumes a run that asks whether its large remainder goes to people: yes (people) or no."""

    people: bool


def wait(params: CascadeParams, wait_for_input: type[RunInput] | RunInput, key: str) -> RunInput | None:
    """Pause (or, when deployed, suspend) this run until it is resumed with ``wait_for_input``; return the input."""
    if params.wait == "suspend" or (params.wait == "auto" and deployment.id):
        # ends this process; Prefect reschedules the run on resume and it goes on from stored outputs
        return suspend_flow_run(wait_for_input=wait_for_input, timeout=params.label_timeout_s, key=key)
    return pause_flow_run(
        wait_for_input=wait_for_input, timeout=params.label_timeout_s, poll_interval=params.label_poll_s, key=key
    )


def labels_pause_key(request_id: str, attempt: int) -> str:
    """The pause key of the ``attempt``-th wait for ``request_id``'s answers."""
    return f"{request_id}-{attempt}"


def remainder_pause_key(attempt: int) -> str:
    """The pause key of the ``attempt``-th wait for an operator's decision on a large remainder."""
    return f"{REMAINDER_KEY}-{attempt}"


def pause_is_for(key: str, request_id: str) -> bool:
    """True when pause ``key`` waits for ``request_id``'s answers ("iteration-1" is not "iteration-1-recheck")."""
    head, _, attempt = key.rpartition("-")
    return head == request_id and attempt.isdigit()


def pause_is_for_remainder(key: str) -> bool:
    """True when pause ``key`` waits for an operator's decision on a large remainder."""
    return pause_is_for(key, REMAINDER_KEY)


REQUEST_EVENTS = ("published", "completed")  # lsun.label-request.<what>: what automations can trigger on


def emit_request_event(storage: Storage, request: LabelRequest, what: str) -> None:
    """Emit the Prefect event ``lsun.label-request.<what>`` for ``request`` (resource: the category's request;
    related: the category; payload: images, iteration, the labeling page). Its id is a function of the root,
    category, request and event, so a run that emits it again (after a restart) adds nothing: Prefect drops
    events whose id it has seen."""
    emit_event(
        event=f"lsun.label-request.{what}",
        resource={
            "prefect.resource.id": f"lsun.label-request.{request.category}.{request.request_id}",
            "prefect.resource.name": f"{request.category}/{request.request_id}",
            "lsun.category": request.category,
            "lsun.request": request.request_id,
        },
        related=[{"prefect.resource.id": f"lsun.category.{request.category}", "prefect.resource.role": "category"}],
        payload={"n_images": request.n_images, "iteration": request.iteration, "labeling_url": labeling_url(storage)},
        id=uuid.uuid5(uuid.NAMESPACE_URL, f"{storage.url}/{request.category}/{request.request_id}/{what}"),
    )


def wait_for_labels(storage: Storage, category: str, request: LabelRequest, params: CascadeParams) -> int:
    """Pause until every image of ``request`` has a stored answer; return how many were aggregated. Emits
    ``lsun.label-request.published`` before and ``lsun.label-request.completed`` after."""
    emit_request_event(storage, request, "published")
    attempt = 0
    while not labels_complete(storage, category, request.request_id):
        attempt += 1
        logger = get_run_logger()
        if attempt > 1:
            logger.info("resumed before every image of %s had an answer: waiting again", request.request_id)
        logger.info(
            "waiting for people to label %s images (%s); paused up to %s s",
            request.n_images,
            request.request_id,
            params.label_timeout_s,
        )
        form = LabelsDelivered.with_initial_data(
            description=waiting_description(storage, category, request), request_id=request.request_id
        )
        wait(params, form, labels_pause_key(request.request_id, attempt))
    collected = collect_labels(storage, category, request.request_id)
    emit_request_event(storage, request, "completed")
    return collected
