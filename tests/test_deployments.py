"""Per-category deployments from one config, and long waits: a deployed run waiting for people is
suspended (no process holds it) and Prefect runs it again when the labels arrive."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from prefect import get_client
from prefect.deployments import run_deployment

from deployments import build, load_config
from flows.runner import resume
from lsun_hitl.config import ConfigError
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd, deliver
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool
from lsun_hitl.labels import list_requests
from lsun_hitl.manifest import manifest_iterations
from lsun_hitl.storage import Storage
from lsun_hitl.truth import read_truth

REPO = Path(__file__).resolve().parents[1]


def test_one_deployment_per_category_from_one_config():
    config = load_config()
    deployments = build(config)
    assert [d.name for d in deployments] == [
        "lsun-sneaker",
        "lsun-bag",
        "lsun-ankle-boot",
        "lsun-trouser",
        "lsun-dress",
    ]
    by_name = {d.name: d for d in deployments}
    bag = by_name["lsun-bag"]
    assert bag.parameters["category"] == "bag" and bag.concurrency_limit == 1
    assert bag.schedules[0].schedule.cron == "30 3 * * 1"
    assert by_name["lsun-sneaker"].schedules[0].schedule.cron == "0 3 * * 1"
    assert by_name["lsun-ankle-boot"].parameters["params"]["target_precision"] == 0.97
    assert by_name["lsun-sneaker"].parameters["params"]["target_precision"] == 0.95
    assert all(d.entrypoint == "flows/cascade.py:category_cascade" for d in deployments)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[defaults]\n", "no [categories"),
        ("[categories.bag]\nschedule = 'x'\n", "unknown key(s) ['schedule']"),
        ("[categories.bag]\nparams = { train_samples = 3 }\n", "unknown cascade setting(s) ['train_samples']"),
        ("[categories.bag]\nparams = { target_precision = 1.5 }\n", "target_precision"),
        ("[categories.bag]\nparams = { train_sample = '2500' }\n", "train_sample = '2500' cannot work; use a whole"),
        ("[categories.bag]\nparams = { wait = 'later' }\n", "use one of 'auto', 'pause', 'suspend'"),
        ("[categories.bag]\nparams = { model = { epochs = 2.5 } }\n", "model.epochs = 2.5 cannot work"),
        ("[categories.Bag]\n", "not a valid name"),
        ("[categories.bag\n", "cannot read deployment config"),
    ],
)
def test_config_mistakes_name_the_file_and_the_fix(tmp_path, text, message):
    path = tmp_path / "categories.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and "categories.toml" in str(err.value)


def test_a_deployed_run_is_suspended_while_people_label_and_resumes_on_arrival(tmp_path, dask_cluster, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    category = "trouser"
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=300, seed=4), client=dask_cluster)
    config = tmp_path / "categories.toml"
    config.write_text(
        f"""
[defaults]
root = "{storage.url}"
[defaults.params]
train_sample = 20
calibration_sample = 60
first_calibration_sample = 60
allow_small_pool = true
target_false_omission = 0.2
confidence = 0.5
max_iterations = 1
stop_unlabeled = 0
remainder = "unresolved"
recheck = false  # one request, one suspension: this test is about suspend and resume
wait = "auto"
score_partition = 200
model = {{ image_size = 32, epochs = 1, batch_size = 32 }}
[categories.{category}]
"""
    )
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_RUNNER_POLL_FREQUENCY="2")
    server = subprocess.Popen(
        [sys.executable, "-m", "deployments", "serve", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_id = _start_when_deployed(f"lsun-cascade/lsun-{category}")
        state = _wait_for(run_id, lambda s: s.name == "Suspended", 240)
        assert state.is_paused()
        # Suspended means no process holds the run: the serve process has no flow-run child left.
        deadline = time.monotonic() + 30
        while psutil.Process(server.pid).children(recursive=True) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert psutil.Process(server.pid).children(recursive=True) == []

        # People's labels arrive (the simulated crowd writes them) and the run is resumed through the API.
        (request,) = list_requests(storage, category)
        assert request.flow_run_id == str(run_id)
        deliver(storage, category, SimulatedCrowd(read_truth(storage, category), CrowdParams(seed=1)), "iteration-1")
        resume(storage, category, "iteration-1")
        final = _wait_for(run_id, lambda s: s.is_final(), 300)
        assert final.is_completed(), final
    finally:
        server.terminate()
        server.wait(30)
    assert manifest_iterations(storage, category) == [0, 1]
    with get_client(sync_client=True) as client:
        names = [s.name for s in client.read_flow_run_states(run_id)]
    assert "Suspended" in names and names.count("Running") >= 2  # ran, suspended, ran again
    assert len(list_requests(storage, category)) == 1  # the second execution asked people nothing new


def _start_when_deployed(name: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with get_client(sync_client=True) as client:
                client.read_deployment_by_name(name)
            break
        except Exception:  # noqa: BLE001 - not registered yet
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    return run_deployment(name, timeout=0).id


def _wait_for(run_id, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        if state is not None and predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {run_id} is {state} after {timeout} s")
        time.sleep(1)


def test_categories_on_a_process_work_pool_suspend_resume_and_take_turns_scoring(
    tmp_path, dask_cluster, prefect_harness
):
    """The production path: deployments applied to a process work pool (``python -m deployments apply``), a
    ``prefect worker`` process running them, two categories started together. Each run is suspended while
    people label (the worker holds no flow-run process), resumes when its labels arrive and finishes; their
    scoring steps hold a slot of one global concurrency limit (named in the config), so they never overlap."""
    from prefect.settings import PREFECT_API_URL

    from lsun_hitl.steps import read_steps

    categories = ("trouser", "bag")
    limit = "lsun-test-score"
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=300, seed=4), client=dask_cluster)
    config = tmp_path / "categories.toml"
    config.write_text(
        f"""
[defaults]
root = "{storage.url}"
dask_address = "{dask_cluster.scheduler.address}"
[defaults.params]
train_sample = 20
calibration_sample = 60
first_calibration_sample = 60
allow_small_pool = true
target_false_omission = 0.2
confidence = 0.5
max_iterations = 1
stop_unlabeled = 0
remainder = "unresolved"
recheck = false
wait = "auto"
score_partition = 200
score_limit = "{limit}"
model = {{ image_size = 32, epochs = 1, batch_size = 32 }}
"""
        + "".join(f"[categories.{c}]\n" for c in categories)
    )
    env = dict(
        os.environ,
        PREFECT_API_URL=PREFECT_API_URL.value(),
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_PREFETCH_SECONDS="2",
    )
    prefect = str(Path(sys.executable).with_name("prefect"))
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(limit, 1)
    subprocess.run([prefect, "work-pool", "create", "lsun-test", "--type", "process"], env=env, check=True)
    applied = subprocess.run(
        [sys.executable, "-m", "deployments", "apply", "--config", str(config), "--pool", "lsun-test"],
        cwd=tmp_path,  # not the checkout: the deployments must find the flow by themselves
        env=env | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert applied.returncode == 0, applied.stderr
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "lsun-test"],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        runs = {c: _start_when_deployed(f"lsun-cascade/lsun-{c}") for c in categories}
        for run_id in runs.values():
            assert _wait_for(run_id, lambda s: s.name == "Suspended", 300).is_paused()
        deadline = time.monotonic() + 30  # suspended: the worker holds no flow-run process
        while psutil.Process(worker.pid).children(recursive=True) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert psutil.Process(worker.pid).children(recursive=True) == []
        for c in categories:  # people answer; each run is resumed and the worker runs it again
            deliver(storage, c, SimulatedCrowd(read_truth(storage, c), CrowdParams(seed=1)), "iteration-1")
            resume(storage, c, "iteration-1")
        for run_id in runs.values():
            final = _wait_for(run_id, lambda s: s.is_final(), 300)
            assert final.is_completed(), final
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:  # seen under load: its shutdown waiting on the busy sqlite database
            worker.kill()
            worker.wait(30)
    for c, run_id in runs.items():
        assert manifest_iterations(storage, c) == [0, 1]
        with get_client(sync_client=True) as client:
            names = [s.name for s in client.read_flow_run_states(run_id)]
        assert "Suspended" in names and names.count("Running") >= 2
    # the two scoring steps held the limit's one slot in turn (a step's start counts its wait for the slot)
    spans = sorted(
        (s["slot_taken"], s["slot_given"]) for c in categories for s in read_steps(storage, c) if s["step"] == "score"
    )
    assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
