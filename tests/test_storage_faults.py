"""Storage that misbehaves for a whole run (issue 28).

An S3 endpoint that fails a share of its requests from the first to the last: the small cascade runs on moto's
S3 server through ``tests/s3_fault_proxy.py``, which answers about 8% of the requests with 503 SlowDown, 500
InternalError, a dropped connection (before the request reaches the server, after it was applied, or half-way
through the answer's body) or a late answer. The run finishes, no Prefect task needed a second try (the
storage layer absorbed every fault), and it writes what the same run writes on a clean endpoint, byte for byte.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs

from flows.runner import run_cascade, simulated_crowd
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool, read_pool
from lsun_hitl.integrity import result_files, temporary_files, unreadable_files
from lsun_hitl.labels import list_requests
from lsun_hitl.storage import Storage
from lsun_hitl.truth import read_truth
from tests import small_cascade
from tests.conftest import png_bytes
from tests.s3_fault_proxy import DROPS, FaultProxy

REPO = Path(__file__).resolve().parents[1]
CATEGORY = "trouser"
BUCKET = "flaky-run"
IMAGES = 2000
# the small cascade, one iteration of it with a model trained for one epoch (a few minutes a run on two busy
# cores): every kind of object a run writes is written (samples, requests, answers, a model, scores, calibration,
# manifests, the dataset); more iterations would write more of the same
PARAMS = dataclasses.replace(
    small_cascade.PARAMS, max_iterations=1, model=dataclasses.replace(small_cascade.PARAMS.model, epochs=1)
)
SHARE = 0.08


def test_the_proxy_forwards_requests_and_answers_as_they_are(s3_bucket):
    """With no faults asked, everything S3 clients do goes through unchanged: puts, a streamed multipart upload,
    ranged reads, listings, heads and deletes, signed for the Host the client used."""
    url, options = s3_bucket
    with FaultProxy(options["endpoint_url"], share=0.0) as proxy:
        storage = Storage(url + "/through", {**options, "endpoint_url": proxy.url})
        small, big = os.urandom(100_000), os.urandom(12 * 2**20)  # big: three parts of s3fs's 5 MiB blocks
        storage.write_bytes(storage.path("small.bin"), small)
        storage.write_stream(storage.path("big.bin"), lambda f: f.write(big))
        assert storage.read_bytes(storage.path("small.bin")) == small
        with storage.fs.open(storage.path("big.bin"), "rb", block_size=2**20) as f:
            f.seek(7 * 2**20)
            assert f.read(1000) == big[7 * 2**20 : 7 * 2**20 + 1000]
        assert storage.glob(storage.path("*.bin")) == [storage.path("big.bin"), storage.path("small.bin")]
        assert storage.write_if_absent(storage.path("small.bin"), b"other") is False
        storage.fs.rm(storage.path("small.bin"))
        assert not storage.exists(storage.path("small.bin"))
        assert proxy.requests >= 10 and not proxy.counts
    direct = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    assert direct.cat_file(f"{url}/through/big.bin") == big


def written(options: dict, url: str) -> dict[str, bytes]:
    """``integrity.result_files`` of the run under ``url``, read on the clean endpoint with no listing cache."""
    return result_files(Storage(url, {**options, "use_listings_cache": False}), CATEGORY)


def cascade_on(storage: Storage) -> dict:
    """Import the images, build the pool and run the small cascade with the simulated crowd, all on ``storage``."""
    build_pool(storage, import_fashion_mnist(storage, limit=IMAGES, seed=1))
    crowd = SimulatedCrowd(read_truth(storage, CATEGORY), CrowdParams(seed=3))
    with simulated_crowd(storage, CATEGORY, crowd):
        return run_cascade(CATEGORY, storage.url, params=PARAMS, storage_options=storage.options)


def task_run_counts(storage: Storage) -> dict[str, int]:
    """How many times Prefect ran each task of the flow run that published ``storage``'s requests."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    run_id = list_requests(storage, CATEGORY)[0].flow_run_id
    runs: list = []
    with get_client(sync_client=True) as client:
        while True:  # the API answers at most 200 a call
            page = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
                offset=len(runs),
            )
            runs += page
            if len(page) < 200:
                break
    assert len(runs) > 10
    return {r.name: r.run_count for r in runs}


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_on_s3_failing_a_share_of_requests_writes_what_a_clean_run_writes(s3_server, caplog):
    s3fs.S3FileSystem(**s3_server, skip_instance_cache=True).mkdir(BUCKET)
    url = f"s3://{BUCKET}/root"

    # the same run, at the same URL (the pool's uris name it), once on the clean endpoint...
    clean = Storage(url, s3_server)
    clean_summary = cascade_on(clean)
    expected = written(s3_server, url)
    s3fs.S3FileSystem(**s3_server, skip_instance_cache=True).rm(f"{BUCKET}/root", recursive=True)

    # ...and once through the proxy, every request of it (the flow's, the Dask workers', the crowd's)
    with FaultProxy(s3_server["endpoint_url"], share=SHARE, seed=11, slow_s=(0.1, 0.6)) as proxy:
        faulty = Storage(url, {**s3_server, "endpoint_url": proxy.url})
        with caplog.at_level(logging.WARNING, logger="lsun_hitl.storage"):
            summary = cascade_on(faulty)
        counts, requests = dict(proxy.counts), proxy.requests
        reruns = {name: n for name, n in task_run_counts(faulty).items() if n > 1}
    print(f"{requests} requests through the proxy, {sum(counts.values())} faults injected: {counts}")
    print(f"storage-level retries: {sum('storage:' in r.getMessage() for r in caplog.records)}")

    for kind in ("slowdown", "internal", "slow", *DROPS):
        assert counts.get(kind, 0) > 0, f"no {kind} was injected: {counts}"
    assert sum(counts.values()) >= 0.05 * requests
    assert reruns == {}, f"Prefect ran tasks again after a storage failure: {reruns}"
    assert summary == clean_summary and summary["unresolved"] == 0

    got = written(s3_server, url)
    assert sorted(got) == sorted(expected)
    differ = [k for k in got if got[k] != expected[k]]
    assert differ == [], f"{len(differ)} of {len(got)} objects differ, first {differ[:5]}"
    assert any(k.startswith("manifests/") for k in got) and any(k.startswith("datasets/") for k in got)
    assert any(k.startswith("models/") for k in got) and any(k.startswith("calibration/") for k in got)
    after = Storage(url, {**s3_server, "use_listings_cache": False})
    assert temporary_files(after) == [] and unreadable_files(after) == []


# ``lsun-hitl`` in a process that may not write a file past ``limit`` bytes (RLIMIT_FSIZE, as ``ulimit -f`` sets:
# no privileges needed, and a write crossing it fails half-way through with EFBIG as one crossing a full disk's
# end fails with ENOSPC; the storage layer treats both alike)
LIMITED_CLI = (
    "import resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
    "sys.argv = ['lsun-hitl', *sys.argv[2:]]\n"
    "from cli.main import entry\n"
    "entry()\n"
)
LIMIT = (
    48_000  # bytes: the listing of 4,000 images (~9 KB) and a pool of 1,000 (~26 KB) fit, a pool of 4,000 (~98 KB) not
)


def ingest(root: Path, listing: Path, limit: int | None, dask: str) -> subprocess.CompletedProcess:
    args = ["ingest", "--root", str(root), "--images", f"@{listing}", "--dask-address", dask]
    cmd = [sys.executable, "-c", LIMITED_CLI, str(limit), *args] if limit else [sys.executable, "-m", "cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL)


def test_a_disk_that_fills_mid_write_names_the_object_keeps_the_old_one_and_the_step_runs_again(
    tmp_path, fashion, dask_cluster
):
    images, _ = fashion
    dask = dask_cluster.scheduler.address  # the workers probe the images; the limited process writes the pool
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4000):
        (folder / f"{i:05d}.png").write_bytes(png_bytes(images[i]))
    few, many = tmp_path / "few.txt", tmp_path / "many.txt"
    few.write_text("".join(f"{folder}/{i:05d}.png\n" for i in range(1000)))
    many.write_text("".join(f"{folder}/{i:05d}.png\n" for i in range(4000)))
    root = tmp_path / "root"
    storage = Storage(str(root))
    pool = root / "pool" / "images.parquet"

    first = ingest(root, few, LIMIT, dask)  # a pool of 1,000 fits
    assert first.returncode == 0, first.stderr[-3000:]
    committed = pool.read_bytes()

    full = ingest(root, many, LIMIT, dask)  # 4,000 do not: the pool's write crosses the limit half-way
    err = full.stderr.strip()
    assert full.returncode == 2, (full.stdout[-2000:], err[-3000:])
    # one line for the user, the last (above it only the progress bar and Dask's own warnings), no traceback
    said = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and said == [err.splitlines()[-1]], err
    assert said[0].startswith("lsun-hitl ingest: error: cannot write ") and f"'{pool}'" in said[0], err
    assert "file-size limit" in said[0] and "Nothing was half-written" in said[0], err
    assert temporary_files(storage) == [] and unreadable_files(storage, ["pool"]) == []
    assert pool.read_bytes() == committed  # the pool committed before, whole and unchanged
    assert read_pool(storage).num_rows == 1000

    again = ingest(root, many, None, dask)  # room again: the same step runs and finishes
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_pool(storage).num_rows == 4000 and pool.stat().st_size > LIMIT
    assert temporary_files(storage) == []
