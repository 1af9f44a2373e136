"""The adapter from the library to Prefect: start a cascade run, resume a waiting one, stand in for people."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flows.waiting import LabelsDelivered, RemainderDecision, pause_is_for, pause_is_for_remainder
from lsun_hitl.config import CascadeParams
from lsun_hitl.labels import LabelError, RunEnded, read_request, was_taken
from lsun_hitl.storage import Storage

if TYPE_CHECKING:
    from lsun_hitl.crowd import CrowdParams, SimulatedCrowd, StoredAnswers

log = logging.getLogger(__name__)


def run_cascade(
    category: str,
    root: str,
    *,
    params: CascadeParams | None = None,
    dask_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict:
    """Run the per-category cascade flow in this process (Prefect's local server unless configured)."""
    from flows.cascade import category_cascade

    return category_cascade(
        category=category, root=root, dask_address=dask_address, params=params, storage_options=storage_options
    )


@dataclass(frozen=True)
class Resumed:
    """What ``resume`` did: ``how`` is "resumed" (the run was paused for the request and goes on now),
    "taken" (the run took the labels without pausing) or "moved on" (it waits for a later request)."""

    run_id: str
    how: str

    def __str__(self) -> str:
        return {
            "resumed": f"resumed flow run {self.run_id}",
            "taken": f"flow run {self.run_id} already took these labels and went on; nothing to resume",
            "moved on": f"flow run {self.run_id} has moved past this request; nothing to resume",
        }[self.how]


def resume(storage: Storage, category: str, request_id: str, *, wait_s: float = 300.0) -> Resumed:
    """Resume the flow run waiting for ``request_id``, once its labels are all stored.

    Validates before resuming (a run resumed with bad input would not ask again): raises LabelError
    if the request is unknown or some of its images have no answer yet. Returns at once when the run
    already took the labels (labels stored before the run reached its pause are taken without one) or
    is paused for a later request; otherwise waits up to ``wait_s`` for the run to reach its pause.
    Raises RunEnded (a LabelError) if the run has ended, and LabelError if it neither pauses nor takes
    the labels within ``wait_s``.
    """
    from prefect.exceptions import NotPausedError, ObjectNotFound
    from prefect.flow_runs import resume_flow_run
    from prefect.states import StateType

    from lsun_hitl.cascade import labels_complete
    from lsun_hitl.handout import root_request

    request, _ = read_request(storage, category, request_id)
    if not request.flow_run_id:
        raise LabelError(f"request {request_id!r} names no waiting flow run")
    if not labels_complete(storage, category, request_id):
        raise LabelError(f"request {request_id!r} is not fully labeled yet; store every image's answer first")
    request_id = root_request(request_id)  # a follow-up's answers are its root request's: the run waits for that
    deadline = time.monotonic() + wait_s
    while True:
        if was_taken(storage, category, request_id):
            return Resumed(request.flow_run_id, "taken")
        state = run_state(request.flow_run_id)
        key = state.state_details.pause_key if state is not None else None
        # resume only a pause for this request (keys are "<request>-<attempt>"): "iteration-1" must not
        # resume the pause of "iteration-1-recheck"
        if state is not None and state.is_paused() and (not key or pause_is_for(key, request_id)):
            try:
                resume_flow_run(request.flow_run_id, run_input=LabelsDelivered(request_id=request_id).model_dump())
                log.info("resumed flow run %s with %s", request.flow_run_id, request_id)
                return Resumed(request.flow_run_id, "resumed")
            except (RuntimeError, ObjectNotFound, NotPausedError) as exc:  # NotPaused: another resume won the race
                log.info("resume of %s not accepted yet (%s)", request.flow_run_id, exc)
        elif state is not None and state.is_paused():
            return Resumed(request.flow_run_id, "moved on")
        elif state is not None and state.type in (
            StateType.COMPLETED,
            StateType.FAILED,
            StateType.CRASHED,
            StateType.CANCELLED,
        ):
            raise RunEnded(
                f"flow run {request.flow_run_id} waiting for {request_id!r} has ended ({state.name}); "
                "start the cascade again and it will pick up the stored labels",
                state.name,
            )
        if time.monotonic() > deadline:
            raise LabelError(
                f"flow run {request.flow_run_id} neither paused for {request_id!r} nor took its labels within "
                f"{wait_s:g} s (it is {state.name if state is not None else 'not found'}); the labels are stored: "
                f"run `lsun-hitl resume --category {category} --request {request_id}` again once it waits"
            )
        time.sleep(1.0)


def resume_decision(storage: Storage, category: str, decision: str, *, wait_s: float = 300.0) -> str | None:
    """Store an operator's decision on a large remainder and resume the run waiting for it.

    Returns the run id resumed, or None when no run is paused for it (a run started again later reads the
    stored decision).
    """
    from prefect.flow_runs import resume_flow_run

    from lsun_hitl.cascade import decide_remainder

    question = decide_remainder(storage, category, decision)
    run_id = question.get("flow_run_id")
    deadline = time.monotonic() + wait_s
    while run_id:
        state = run_state(run_id)
        key = (state.state_details.pause_key or "") if state is not None else ""
        if state is not None and state.is_paused() and pause_is_for_remainder(key):
            resume_flow_run(run_id, run_input=RemainderDecision(people=decision == "people").model_dump())
            log.info("resumed flow run %s: remainder %s", run_id, decision)
            return run_id
        if state is None or state.is_final() or time.monotonic() > deadline:
            return None
        time.sleep(1.0)
    return None


@contextmanager
def simulated_operator(storage: Storage, category: str, decision: str = "people") -> Iterator[threading.Thread]:
    """While the block runs, a daemon thread answers the run's question about a large remainder with
    ``decision``, as an operator would with ``lsun-hitl decide``: the demo's stand-in, beside its simulated
    crowd. The thread is stopped when the block ends."""
    from lsun_hitl.storage import decision_key

    stop = threading.Event()

    def answer() -> None:
        path = storage.path(decision_key(category, "remainder"))
        while not stop.wait(1.0):
            question = storage.read_json(path) if storage.exists(path) else None
            if question and question.get("decision") is None and question.get("flow_run_id"):
                print(
                    f"== the demo's operator answers {decision!r} (lsun-hitl decide --category {category}"
                    f" --remainder {decision})",
                    flush=True,
                )
                resume_decision(storage, category, decision)
                return

    thread = threading.Thread(target=answer, name="simulated-operator", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(10)


@contextmanager
def simulated_crowd(
    storage: Storage,
    category: str,
    crowd: SimulatedCrowd | StoredAnswers,
    *,
    poll_s: float = 0.5,
    on_resumed: Callable[[str], None] | None = None,
) -> Iterator[threading.Thread]:
    """While the block runs, a daemon thread answers every label request of ``category`` with ``crowd``
    and resumes the flow run waiting for it (``on_resumed(run_id)`` after each resume): the stand-in for people
    in ``lsun-hitl crowd``, the tests and the benchmarks. The thread is stopped when the block ends."""
    from lsun_hitl.crowd import serve

    def delivered(request: Any) -> None:
        resumed = resume(storage, category, request.request_id)
        if on_resumed is not None and resumed.how == "resumed":
            on_resumed(resumed.run_id)

    stop = threading.Event()
    thread = threading.Thread(
        target=serve, name="simulated-crowd", args=(storage, category, crowd, delivered, stop, poll_s), daemon=True
    )
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(10)


def run_with_crowd(
    storage: Storage, category: str, params: CascadeParams, crowd: CrowdParams, dask_address: str | None = None
) -> dict:
    """Run the cascade flow for ``category`` under ``storage`` while a simulated crowd (answering from the
    registered truth) labels every request: ``lsun_hitl.simulate``'s runner."""
    from lsun_hitl.crowd import SimulatedCrowd
    from lsun_hitl.truth import read_truth

    with simulated_crowd(storage, category, SimulatedCrowd(read_truth(storage, category), crowd)):
        return run_cascade(category, storage.url, params=params, dask_address=dask_address)


def resume_waiting_run(storage: Storage) -> Callable[[str, str], None]:
    """The labeling service's ``on_complete``: resume the flow run waiting for a request once it is labeled."""

    def on_complete(category: str, request_id: str) -> None:
        resume(storage, category, request_id)

    return on_complete


def run_state(flow_run_id: str) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state
