"""Faults injected on purpose: a Dask worker killed while scoring, the flow process killed in the
middle of an iteration. Nothing is lost, nothing is done twice, no manifest is torn."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from lsun_hitl import model as model_lib
from lsun_hitl.config import ModelParams
from lsun_hitl.scoring import score_candidates
from lsun_hitl.storage import Storage, scores_dir

from .conftest import png_bytes


def test_a_worker_killed_while_scoring_changes_nothing_every_image_scored_once(tmp_path, fashion):
    from distributed import Client, LocalCluster

    images, _ = fashion
    src = tmp_path / "images"
    src.mkdir()
    n = 1200
    for i in range(n):
        (src / f"{i:05d}.png").write_bytes(png_bytes(images[i]))
    candidates = pa.table(
        {"image_id": [f"id{i:05d}" for i in range(n)], "uri": [str(src / f"{i:05d}.png") for i in range(n)]}
    )
    storage = Storage(str(tmp_path / "root"))
    model_path = storage.path("models/kill/iteration=1/model.pt")
    storage.write_bytes(model_path, model_lib.save(model_lib.build(ModelParams(image_size=64)).eval()))
    out_dir = storage.path(scores_dir("kill", 1))

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        killed: list[int] = []  # the killed worker's process id
        parts_at_kill: list[int] = []

        def kill_one_worker_mid_way() -> None:
            while not storage.glob(f"{out_dir}/part-*.parquet"):
                time.sleep(0.05)
            busy = [w for w, tasks in client.processing().items() if tasks]
            target = busy[0] if busy else list(client.scheduler_info()["workers"])[0]
            pid = client.run(os.getpid, workers=[target])[target]
            # SIGKILL, mid-task: no clean-up runs; the worker's nanny starts a new process. (client.run(os._exit,
            # wait=False) killed nothing: Dask refuses wait=False for plain functions before calling them.)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            parts_at_kill.append(len(storage.glob(f"{out_dir}/part-*.parquet")))

        killer = threading.Thread(target=kill_one_worker_mid_way, daemon=True)
        killer.start()
        scores = score_candidates(
            storage, "kill", 1, candidates, model_path, client=client, partition_size=50, batch_size=25
        )
        killer.join(30)
        assert killed, "a worker was killed while scoring"
        assert killed[0] not in client.run(os.getpid).values(), "the killed worker process is gone from the cluster"
        parts_done_before_end = len(storage.glob(f"{out_dir}/part-*.parquet"))

    assert parts_done_before_end == n // 50
    assert parts_at_kill[0] < n // 50, "the worker died while parts were still to be scored"
    ids = scores.column("image_id").to_pylist()
    assert ids == candidates.column("image_id").to_pylist() and len(set(ids)) == n  # each once, in order
    assert np.isfinite(scores.column("score").to_numpy(zero_copy_only=False)).all()
    assert not [p for p in os.listdir(out_dir) if p.startswith(".tmp-")], "no half-written part left behind"


SMALL_CASCADE = os.path.join(os.path.dirname(__file__), "small_cascade.py")


@pytest.fixture()
def small_pool(tmp_path):
    from lsun_hitl.fashion_mnist import import_fashion_mnist
    from lsun_hitl.ingest import build_pool

    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=1500, seed=4))
    return storage


def test_flow_process_killed_mid_iteration_restarts_from_the_last_step(small_pool, tmp_path):
    """SIGKILL the whole flow process once the model of iteration 1 is stored (before scoring ends),
    start the cascade again: it goes on from the stored steps; no label lost, nobody asked twice."""
    from lsun_hitl.cascade import request_id_for
    from lsun_hitl.evaluation import evaluate
    from lsun_hitl.labels import list_requests, read_request, read_votes
    from lsun_hitl.manifest import manifest_iterations, read_manifest
    from lsun_hitl.storage import model_key

    storage = small_pool
    env = os.environ | {
        "PYTHONPATH": os.getcwd(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),  # both runs share one Prefect database
    }
    cmd = [sys.executable, SMALL_CASCADE, storage.url, "trouser"]

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    model = storage.path(model_key("trouser", 1))
    deadline = time.time() + 300
    while not storage.exists(model) and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert storage.exists(model), "the first run stored the iteration-1 model"
    os.killpg(first.pid, signal.SIGKILL)  # the flow process and its Dask workers, mid-iteration
    first.wait(30)
    assert manifest_iterations(storage, "trouser") == [0], "iteration 1 had not finished"
    _, asked_before = read_request(storage, "trouser", request_id_for(1))
    votes_before = read_votes(storage, "trouser", request_id_for(1))
    model_bytes = storage.read_bytes(model)

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "SUMMARY" in second.stdout

    # the restart reused the stored request, answers and model: nothing asked or trained twice
    _, asked_after = read_request(storage, "trouser", request_id_for(1))
    assert asked_after.equals(asked_before)
    votes_after = read_votes(storage, "trouser", request_id_for(1))
    assert votes_after.num_rows == votes_before.num_rows
    assert storage.read_bytes(model) == model_bytes
    asked = {r.request_id for r in list_requests(storage, "trouser")}
    assert asked <= {"iteration-1", "iteration-1-recheck", "iteration-2", "iteration-2-recheck", "remainder"}
    # every manifest whole and consistent; the dataset complete
    for k in manifest_iterations(storage, "trouser"):
        assert len(read_manifest(storage, "trouser", k)) == 1500
    result = evaluate(storage, "trouser")
    assert result.positives + result.negatives == 1500 and result.unresolved == 0
    tmp_left = [p for p in storage.fs.find(storage.root) if os.path.basename(p).startswith(".tmp-")]
    assert not tmp_left, f"half-written files left: {tmp_left}"
