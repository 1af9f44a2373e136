"""A real cluster shape: ``dask scheduler`` and ``dask worker`` processes started from the command line, the
score step run against the scheduler's address (what ``lsun-hitl run --dask-address tcp://...`` does), one
worker SIGKILLed mid-scoring and another started by hand that joins and takes over. Every candidate is still
scored exactly once.

The workers run with ``--no-nanny``: the process started is the worker itself, so a SIGKILL of its pid kills
exactly the worker and nothing brings it back. Under a nanny the worker is the nanny's child and the nanny
restarts it at once, which would hide the kill (the "replacement" would be the nanny's, not ours)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from lsun_hitl import cascade
from lsun_hitl import model as model_lib
from lsun_hitl.ingest import read_pool
from lsun_hitl.storage import Storage, model_key, sample_key, scores_dir

from .conftest import free_port
from .small_cascade import PARAMS as SMALL

DASK = str(Path(sys.executable).with_name("dask"))  # the venv's CLI
REPO = Path(__file__).resolve().parents[1]
CATEGORY = "trouser"
POOL_SIZE = 2000
# 1,700 candidates (the pool less the 300 training images) in 34 partitions of 50. Without the model-input
# cache: with it a partition is a whole pool shard (at least 512 rows, 16,384 at this image size), one part
# here and nothing left to kill a worker in the middle of; this test is about the cluster.
PARAMS = dataclasses.replace(SMALL, score_partition=50, score_batch=25, input_cache=False)
N_CAND = POOL_SIZE - PARAMS.train_sample
N_PARTS = -(-N_CAND // PARAMS.score_partition)
# --no-dashboard still serves Dask's HTTP routes (health, metrics), on 0.0.0.0 unless told: loopback only
LOOPBACK_HTTP = ("--no-dashboard", "--dashboard-address", "127.0.0.1:0")
WAIT_S = 180  # any one gate; generous for a loaded 2-core machine (a gate met returns at once)


class DaskProcesses:
    """``dask scheduler`` / ``dask worker`` subprocesses, each in its own session, logging to a file."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = os.environ | {"PYTHONPATH": str(REPO)}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [DASK, *args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def logs(self) -> str:
        """The last lines of every process's log, for failure messages."""
        out = []
        for name in self.procs:
            lines = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {name} (exit {self.procs[name].poll()}):\n" + "\n".join(lines))
        return "\n".join(out)

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):  # workers first, the scheduler last
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # also ends a stopped (SIGSTOP) process
                except ProcessLookupError:
                    pass
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture()
def dask_processes(tmp_path):
    procs = DaskProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


def start_worker(procs: DaskProcesses, name: str, address: str) -> subprocess.Popen:
    return procs.start(
        name,
        "worker",
        address,
        "--name",
        name,
        "--host",
        "127.0.0.1",
        "--nthreads",
        "1",
        "--no-nanny",
        *LOOPBACK_HTTP,
        "--memory-limit",
        "4GiB",
        "--death-timeout",
        "60",  # leaves by itself if the scheduler is gone
    )


def wait_until(what: str, check: Callable[[], object], logs: Callable[[], str], timeout: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")
        time.sleep(0.02)
    return got


def stopped(pid: int) -> bool:
    """True when every thread of ``pid`` is in the stopped state (a SIGSTOP has taken effect)."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        states.append(stat.rsplit(")", 1)[1].split()[0])
    return bool(states) and all(s in "tT" for s in states)


def listing(out_dir: str) -> dict[str, int]:
    """The files in ``out_dir``: name -> inode."""
    try:
        return {e.name: e.inode() for e in os.scandir(out_dir)}
    except FileNotFoundError:
        return {}


def parts_of(files: dict[str, int]) -> dict[str, int]:
    return {n: i for n, i in files.items() if n.startswith("part-") and n.endswith(".parquet")}


def test_cli_cluster_worker_killed_and_replaced_every_candidate_scored_once(dask_processes, tmp_path):
    from distributed import Client, get_task_stream

    from lsun_hitl.fashion_mnist import import_fashion_mnist
    from lsun_hitl.ingest import build_pool

    procs = dask_processes
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # (--idle-timeout: a scheduler left behind by a killed pytest goes away by itself)
    procs.start(
        "scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), *LOOPBACK_HTTP, "--idle-timeout", "600"
    )
    workers = {name: start_worker(procs, name, address) for name in ("w1", "w2")}

    # meanwhile: a pool, the iteration-0 manifest and an iteration-1 model (untrained: scores are what we count)
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=POOL_SIZE, seed=4))
    cascade.start(storage, CATEGORY, PARAMS)
    model = model_lib.build(PARAMS.model_for(1)).eval()
    storage.write_bytes(storage.path(model_key(CATEGORY, 1)), model_lib.save(model))
    out_dir = storage.path(scores_dir(CATEGORY, 1))

    with Client(address, timeout="120s") as client:
        client.wait_for_workers(2, timeout=WAIT_S)

        def address_of(name: str) -> str | None:
            got = [a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w["name"] == name]
            return got[0] if got else None

        # each worker process is the one we started (no nanny in between, no child process doing the work)
        pids = client.run(os.getpid)
        assert {pids[address_of(n)] for n in workers} == {p.pid for p in workers.values()}

        events: dict[str, object] = {}  # what the controller saw, for the assertions after scoring
        first_seen: dict[str, int] = {}  # part name -> inode when the watcher first saw it
        done = threading.Event()

        def watch() -> None:
            while True:
                finished = done.is_set()  # one more look after scoring returned: the last part is seen too
                for name, inode in parts_of(listing(out_dir)).items():
                    first_seen.setdefault(name, inode)
                if finished:
                    return
                time.sleep(0.02)

        def kill_and_replace() -> None:
            paused: list[subprocess.Popen] = []
            try:
                wait_until("the first score part", lambda: parts_of(listing(out_dir)), procs.logs)
                busy = {a for a, keys in client.processing().items() if keys}
                victim, survivor = ("w2", "w1") if address_of("w2") in busy else ("w1", "w2")
                events["victim_busy"] = address_of(victim) in busy
                victim_proc, survivor_proc = workers[victim], workers[survivor]
                events["victim_address"] = address_of(victim)
                # Freeze both workers and SIGKILL the victim only when no part is being written (no .tmp- file):
                # a SIGKILL inside Storage's write window would orphan its temporary file (see the report);
                # the kill still lands in the middle of scoring (parts left, a partition in flight).
                deadline = time.monotonic() + WAIT_S
                while True:
                    for p in (victim_proc, survivor_proc):
                        os.kill(p.pid, signal.SIGSTOP)
                        paused.append(p)
                    wait_until("SIGSTOP to take effect", lambda: stopped(victim_proc.pid), procs.logs, 30)
                    wait_until("SIGSTOP to take effect", lambda: stopped(survivor_proc.pid), procs.logs, 30)
                    files = listing(out_dir)
                    if not any(n.startswith(".tmp-") for n in files) or time.monotonic() > deadline:
                        break
                    for p in (victim_proc, survivor_proc):
                        os.kill(p.pid, signal.SIGCONT)
                    paused.clear()
                    time.sleep(0.01)
                os.kill(victim_proc.pid, signal.SIGKILL)
                events["parts_at_kill"] = parts_of(files)
                assert len(parts_of(files)) < N_PARTS, "every part was written before the kill"
                events["tmp_at_kill"] = [n for n in files if n.startswith(".tmp-")]
                events["victim_exit"] = victim_proc.wait(30)
                events["victim_proc_gone"] = not os.path.exists(f"/proc/{victim_proc.pid}")
                wait_until("the scheduler to drop the killed worker", lambda: address_of(victim) is None, procs.logs)

                # a new `dask worker` joins while the survivor stays frozen: a part written now is the new one's
                workers["w3"] = start_worker(procs, "w3", address)
                events["new_address"] = wait_until("w3 to join", lambda: address_of("w3"), procs.logs)
                events["new_pid_ok"] = client.run(os.getpid, workers=[events["new_address"]]) == {
                    events["new_address"]: workers["w3"].pid
                }
                new = wait_until(
                    "a part written by w3 alone",
                    lambda: set(parts_of(listing(out_dir))) - set(events["parts_at_kill"]),
                    procs.logs,
                )
                events["parts_by_new_alone"] = sorted(new)
            except BaseException as exc:  # re-raised in the test's thread
                events["error"] = exc
            finally:
                for p in paused:
                    if p.poll() is None:
                        os.kill(p.pid, signal.SIGCONT)

        watcher = threading.Thread(target=watch, daemon=True)
        controller = threading.Thread(target=kill_and_replace, daemon=True)
        watcher.start()
        controller.start()
        with get_task_stream(client) as stream, ThreadPoolExecutor(1) as pool:
            scoring = pool.submit(cascade.score, storage, CATEGORY, PARAMS, 1, dask_address=address)
            try:
                n_scored = scoring.result(timeout=300)
            finally:
                controller.join(WAIT_S)
                done.set()
                watcher.join(10)
        if "error" in events:
            raise events["error"]
        tasks = stream.data
        workers_now = set(client.scheduler_info(n_workers=-1)["workers"])

    # the kill: mid-scoring, by pid, the process gone and out of the cluster; the new worker joined
    assert events["victim_busy"], "the killed worker had a partition in flight"
    assert 0 < len(events["parts_at_kill"]) < N_PARTS, "killed after the first part, with parts still to score"
    assert events["victim_exit"] == -signal.SIGKILL and events["victim_proc_gone"]
    assert events["victim_address"] not in workers_now and events["new_address"] in workers_now
    assert events["new_pid_ok"], "the joined worker is the process we started"
    # the new worker did work: a part appeared while it was the only live worker (one dead, the other frozen),
    # and the scheduler recorded tasks finished by it
    assert events["parts_by_new_alone"]
    assert any(t["worker"] == events["new_address"] for t in tasks)
    # one task per partition; only a task that had finished on the killed worker ran again (its result died
    # with the worker and Dask recomputed it; the part was there, so nothing was scored again: see below)
    runs: dict[str, list[str]] = {}
    for t in tasks:
        runs.setdefault(t["key"], []).append(t["worker"])
    assert sum(k.startswith("plan_range") for k in runs) == 1, "one manifest part: one plan task"
    runs = {k: w for k, w in runs.items() if k.startswith("score_group")}
    assert len(runs) == N_PARTS
    assert all(w[0] == events["victim_address"] and len(w) == 2 for w in runs.values() if len(w) > 1), runs

    # every candidate scored exactly once, in candidate order, by the part files alone
    pool_ids = read_pool(storage, columns=["image_id"]).column("image_id").to_pylist()
    drawn = storage.read_table(storage.path(sample_key(CATEGORY, 1)))
    train_rows = set(pc.filter(drawn.column("row"), pc.equal(drawn.column("role"), "train")).to_pylist())
    expected = [image_id for row, image_id in enumerate(pool_ids) if row not in train_rows]
    assert len(expected) == N_CAND and n_scored == N_CAND
    files = listing(out_dir)
    names = sorted(parts_of(files))
    assert names == [f"part-{i:05d}.parquet" for i in range(N_PARTS)], "one part file per partition"
    scored = [storage.read_table(f"{out_dir}/{n}") for n in names]
    ids = [i for t in scored for i in t.column("image_id").to_pylist()]
    assert len(ids) == len(set(ids)), "no image scored twice"
    assert ids == expected, "every candidate, none missing, in candidate order"
    size = PARAMS.score_partition
    assert [len(t) for t in scored] == [min(size, N_CAND - i * size) for i in range(N_PARTS)], "partition sizes"
    scores = np.concatenate([t.column("score").to_numpy(zero_copy_only=False) for t in scored])
    assert np.isfinite(scores).all(), "every image read and scored"
    # no part written twice: each file is the one first seen (a rewrite is a new inode: temp file + rename),
    # though the killed worker's finished tasks were run again (their results died with it)
    assert {n: first_seen.get(n) for n in names} == parts_of(files), "a part file was written again"
    assert {n: files[n] for n in events["parts_at_kill"]} == events["parts_at_kill"]
    tmp_left = [p for p in storage.fs.find(storage.root) if os.path.basename(p).startswith(".tmp-")]
    assert not tmp_left and not events["tmp_at_kill"], f"temporary files left: {tmp_left}"
