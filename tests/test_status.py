"""Operating many categories: a run that waits for people says so everywhere a person looks.

One real run (Prefect's harness, a Dask LocalCluster) pauses for its first label request. While it waits:
``lsun-hitl status`` names the request, its images and how many are answered; the paused run's resume form
(its run input's description, what the Prefect UI shows) says the same with the labeling page's URL; resuming
it from that form (the API call the UI's button makes) before the labels are complete is harmless: it waits
again under a new pause key. Prefect events mark the request's publication and completion; every run keeps a
``lsun-status`` artifact with the same table, and the labeling service's admin API serves it."""

from __future__ import annotations

import dataclasses
import re
import threading
import time

from fastapi.testclient import TestClient

from cli.main import main as cli
from flows.runner import run_cascade, simulated_crowd
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool
from lsun_hitl.labelers import create_labeler
from lsun_hitl.labels import read_request, store_votes
from lsun_hitl.service import announce, create_app
from lsun_hitl.status import category_status
from lsun_hitl.storage import Storage, request_key
from lsun_hitl.truth import read_truth

from .small_cascade import PARAMS

WAIT_S = 240


def wait_until(what: str, check, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def paused_key(run_id: str) -> str | None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    return state.state_details.pause_key if state is not None and state.is_paused() else None


def description_of(run_id: str, key: str) -> str:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run_input(flow_run_id=run_id, key=f"paused-{key}-description")


def label_request_events(category: str, run_id: str) -> list[tuple[str, str]]:
    """The label-request events of ``category`` that flow run ``run_id`` emitted (the harness's server keeps
    every test's events: other tests run the same category under other roots)."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(
            filter=EventFilter(
                event=EventNameFilter(prefix=["lsun.label-request."]),
                resource=EventResourceFilter(id_prefix=[f"lsun.label-request.{category}."]),
                related=EventRelatedFilter(id=[f"prefect.flow-run.{run_id}"]),
            ),
            limit=50,
        )
    return sorted((e.event, e.resource["lsun.request"]) for e in page.events)


def latest_status_artifact() -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactCollectionFilter,
        ArtifactCollectionFilterKey,
        FlowRunFilter,
        TaskRunFilter,
    )
    from prefect.client.schemas.sorting import ArtifactCollectionSort

    with get_client(sync_client=True) as client:
        (latest,) = client.read_latest_artifacts(  # every argument set: Prefect 3.8's sync client sends nulls
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=["lsun-status"])),
            flow_run_filter=FlowRunFilter(),
            task_run_filter=TaskRunFilter(),
            sort=ArtifactCollectionSort.UPDATED_DESC,
            limit=1,
            offset=0,
        )
    return latest.data


def test_a_waiting_run_says_what_it_waits_for_in_status_resume_form_events_and_artifact(
    tmp_path, dask_cluster, prefect_harness, capsys
):
    from prefect.flow_runs import resume_flow_run

    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=1500, seed=4), client=dask_cluster)
    announce(storage, "http://labels.example:8700/")  # as `lsun-hitl serve` does when it starts
    params = dataclasses.replace(PARAMS, max_iterations=1)
    done: dict = {}
    runner = threading.Thread(
        target=lambda: done.update(
            summary=run_cascade("trouser", storage.url, params=params, dask_address=dask_cluster.scheduler.address)
        ),
        daemon=True,
    )
    runner.start()
    meta = storage.path(request_key("trouser", "iteration-1", "json"))
    wait_until("the first label request", lambda: storage.exists(meta))
    request, images = read_request(storage, "trouser", "iteration-1")
    run_id = request.flow_run_id
    assert wait_until("the run to pause", lambda: paused_key(run_id)) == "iteration-1-1"

    # people answered 100 of its images so far
    crowd = SimulatedCrowd(read_truth(storage, "trouser"), CrowdParams(seed=2))
    store_votes(storage, "trouser", "iteration-1", crowd.answer(images.slice(0, 100), key="iteration-1"), "early")
    row = category_status(storage, "trouser")
    assert (row.state, row.request, row.request_images, row.request_answered) == (
        "waiting for people",
        "iteration-1",
        request.n_images,
        100,
    )
    assert cli(["status", "--root", storage.url]) == 0
    out = capsys.readouterr().out
    assert re.search(
        rf"waiting for people on iteration-1: 100 of {request.n_images:,} images answered for \d+ min", out
    )

    # the resume form says what the run waits for and where people label
    form = description_of(run_id, "iteration-1-1")
    assert f"waiting for people to label **{request.n_images:,} images** (request `iteration-1`)" in form
    assert "0 answered so far" in form and "http://labels.example:8700/" in form
    # the UI's Resume button before the labels are complete: harmless, the run waits again (a new pause key)
    resume_flow_run(run_id, run_input={"request_id": ""})
    assert wait_until("the run to pause again", lambda: paused_key(run_id) == "iteration-1-2" and "yes")
    assert "100 answered so far" in description_of(run_id, "iteration-1-2")
    assert runner.is_alive() and not done

    # the labeling service's admin API serves the same rows
    token = create_labeler(storage, "ops", role="admin")
    with TestClient(create_app(storage)) as service:
        got = service.get("/api/admin/status", headers={"Authorization": f"Bearer {token}"}).json()
        assert got["categories"][0]["request_answered"] == 100 and "waiting for people" in got["rows"][0][2]
        assert service.get("/admin").status_code == 200

    # people finish; the run takes the labels and goes on to its end
    with simulated_crowd(storage, "trouser", crowd):
        runner.join(WAIT_S)
    assert done["summary"]["category"] == "trouser" and category_status(storage, "trouser").state == "finished"

    completed = ("lsun.label-request.completed", "iteration-1")
    got = wait_until(
        "the label-request events", lambda: (e := label_request_events("trouser", run_id)) and completed in e and e
    )
    assert ("lsun.label-request.published", "iteration-1") in got
    assert ("lsun.label-request.published", "remainder") in got and ("lsun.label-request.completed", "remainder") in got
    assert len(got) == len(set(got)), "each request's event once"
    status_table = latest_status_artifact()
    assert "| trouser |" in status_table and "finished" in status_table


def test_the_terminal_drops_prefect_s_completed_task_lines_and_keeps_the_rest():
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from cli.main import log_to_terminal
    from flows.logs import quiet_completed_tasks

    root_before = list(logging.getLogger().handlers)
    log_to_terminal(logging.INFO)  # the CLI's set-up leaves the root logger to Prefect
    assert logging.getLogger().handlers == root_before
    quiet_completed_tasks()
    quiet_completed_tasks()  # once per process, however often called
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert consoles and all(len(h.filters) == 1 for h in consoles)

    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, (), None)

    console = consoles[0]
    assert not console.filter(record("prefect.task_runs", logging.INFO, "Finished in state Completed()"))
    assert console.filter(record("prefect.task_runs", logging.ERROR, "Finished in state Failed('boom')"))
    assert console.filter(record("prefect.task_runs", logging.INFO, "waiting for people to label 700 images"))
    assert console.filter(record("prefect.flow_runs", logging.INFO, "Finished in state Completed()"))
