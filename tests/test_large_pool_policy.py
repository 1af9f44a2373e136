"""The loop's policy for large pools: more training labels after a stall, and no large remainder handed to
people without an operator's yes (the real flow: Prefect's harness, a Dask LocalCluster, the simulated crowd)."""

import dataclasses
import threading
import time

from flows.runner import resume_decision, run_cascade, simulated_crowd
from lsun_hitl.cascade import Summary, decide_remainder
from lsun_hitl.config import CascadeParams, ConfigError, validate
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool
from lsun_hitl.labels import LabelError, list_requests
from lsun_hitl.split import Funnel, stalled, train_size
from lsun_hitl.steps import read_steps, steps_markdown
from lsun_hitl.storage import Storage, decision_key
from lsun_hitl.truth import read_truth

from .small_cascade import PARAMS


def funnel(iteration: int, labeled: int, decided: int, scored: int = 1000) -> Funnel:
    return Funnel(iteration, 0, labeled, 0, scored, decided, 0, 0, None, None, None, None, None, None)


def test_stalls_count_the_last_iterations_that_decided_less_than_people_labeled():
    assert stalled([]) == 0
    assert stalled([funnel(1, 4000, 60000), funnel(2, 4000, 0), funnel(3, 4000, 3999)]) == 2
    assert stalled([funnel(1, 4000, 0), funnel(2, 4000, 4000)]) == 0, "deciding as many as labeled is no stall"
    assert stalled([funnel(1, 4000, 0), funnel(2, 900, 0, scored=0)]) == 1, "the remainder is no iteration"
    assert [train_size(2500, 2.0, 10_000, k) for k in range(4)] == [2500, 5000, 10_000, 10_000]
    assert train_size(2500, 1.0, 10_000, 3) == 2500 and train_size(2500, 2.0, 100, 1) == 2500


def test_the_new_settings_are_validated():
    for bad, name in (
        ({"train_growth": 0.5}, "train_growth"),
        ({"train_sample_max": 10}, "train_sample_max"),
        ({"large_remainder_share": 2.0}, "large_remainder_share"),
        ({"large_remainder": "maybe"}, "large_remainder"),
    ):
        try:
            validate("bag", dataclasses.replace(CascadeParams(), **bad))
        except ConfigError as exc:
            assert name in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")
    validate("bag", CascadeParams())  # the defaults, ten iterations included, fit the run's error budget


def test_a_large_remainder_waits_for_an_operator_and_stays_unresolved_on_no(tmp_path, dask_cluster, prefect_harness):
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=2000, seed=6), client=dask_cluster)
    category = "shirt"
    # one iteration, then at least 2000 - 700 - what the model decides is left: far above 1% of the pool
    params = dataclasses.replace(PARAMS, max_iterations=1, large_remainder_share=0.01, large_remainder="ask")
    try:
        decide_remainder(storage, category, "people")
    except LabelError as exc:
        assert "no run" in str(exc)
    else:
        raise AssertionError("a decision nobody asked for was stored")
    answered: list[str | None] = []

    def operator() -> None:  # waits for the question, then answers no, as a person at the CLI would
        path = storage.path(decision_key(category, "remainder"))
        deadline = time.monotonic() + 300
        while not storage.exists(path) and time.monotonic() < deadline:
            time.sleep(0.5)
        answered.append(resume_decision(storage, category, "unresolved"))

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    crowd = SimulatedCrowd(read_truth(storage, category), CrowdParams(seed=4))
    with simulated_crowd(storage, category, crowd):
        summary = Summary(
            **run_cascade(category, storage.url, params=params, dask_address=dask_cluster.scheduler.address)
        )
    thread.join(30)

    question = storage.read_json(storage.path(decision_key(category, "remainder")))
    assert answered and answered[0] == question["flow_run_id"], "the paused run was resumed by the decision"
    assert question["decision"] == "unresolved" and question["n_images"] == summary.unresolved > 20
    assert not any(r.request_id == "remainder" for r in list_requests(storage, category)), "nobody was asked"
    assert summary.positive + summary.negative + summary.unresolved == 2000

    # every step of the iteration recorded its figures; scoring's first pass decoded the pool once, on the workers
    rows = {r["step"]: r for r in read_steps(storage, category) if r["iteration"] == 1}
    assert {"sample", "publish", "train", "score", "calibrate", "split"} <= set(rows)
    assert rows["train"]["flow_decoded"] == 300 and rows["train"]["flow_peak_rss_mb"] > 0
    workers = rows["score"]["workers"]
    assert workers["decoded"] == 2000 and workers["candidates"] == 2000 - 300 and workers["worker_peak_rss_mb"]
    assert "| 1 | score |" in steps_markdown(category, read_steps(storage, category))


def test_a_yes_from_the_prefect_ui_s_resume_form_sends_the_remainder_to_people_and_the_run_completes(
    tmp_path, dask_cluster, prefect_harness
):
    """The operator answers yes the way the Prefect UI's Resume form does (``resume_flow_run`` with the form's
    input, no decision stored first): the run stores it, publishes the remainder, waits for its labels under a
    key of its own (it once waited under the decision's key and was handed the decision: a failed run) and
    completes with nothing unresolved."""
    from prefect.flow_runs import resume_flow_run

    from flows.runner import run_state
    from flows.waiting import pause_is_for_remainder

    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=1500, seed=7), client=dask_cluster)
    category = "shirt"
    params = dataclasses.replace(PARAMS, max_iterations=1, large_remainder_share=0.01, large_remainder="ask")
    resumed: list[str] = []

    def operator() -> None:  # waits for the run to pause on the question, then posts the form's input
        path = storage.path(decision_key(category, "remainder"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            run_id = storage.read_json(path).get("flow_run_id") if storage.exists(path) else None
            state = run_state(run_id) if run_id else None
            if state is not None and state.is_paused() and pause_is_for_remainder(state.state_details.pause_key):
                resume_flow_run(run_id, run_input={"people": True})
                resumed.append(run_id)
                return
            time.sleep(0.5)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    crowd = SimulatedCrowd(read_truth(storage, category), CrowdParams(seed=4))
    with simulated_crowd(storage, category, crowd):
        summary = Summary(
            **run_cascade(category, storage.url, params=params, dask_address=dask_cluster.scheduler.address)
        )
    thread.join(30)
    question = storage.read_json(storage.path(decision_key(category, "remainder")))
    assert resumed == [question["flow_run_id"]] and question["decision"] == "people"
    assert run_state(resumed[0]).is_completed()
    remainder = [r for r in list_requests(storage, category) if r.request_id == "remainder"]
    assert len(remainder) == 1 and remainder[0].n_images == question["n_images"] > 15
    assert summary.unresolved == 0 and summary.positive + summary.negative == 1500
