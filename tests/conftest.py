"""Shared fixtures: real components only (Dask LocalCluster, moto's S3 server, Prefect's harness)."""

from __future__ import annotations

import io
import os
import socket
import tempfile

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# Prefect's temporary server gets 20 s to start by default; on a loaded 2-core machine (an evaluation running
# beside the suite) a subprocess's server missed it once. Inherited by the subprocesses the tests start.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# `scripts/test.sh` runs the suite in two pytest-xdist workers: each gets its own Prefect home, so processes
# that start Prefect's ephemeral server never share (and migrate at once) one SQLite database.
if "PYTEST_XDIST_WORKER" in os.environ and "PREFECT_API_URL" not in os.environ:
    os.environ.setdefault(
        "PREFECT_HOME",
        os.path.join(tempfile.gettempdir(), f"lsun-hitl-tests-{os.getuid()}", os.environ["PYTEST_XDIST_WORKER"]),
    )
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)  # Prefect makes the folder, not its parents

# Prefect sets up its logging once, on first import, binding its console handler to the sys.stderr of that
# moment: imported inside a test that captures output (capsys), the handler would keep writing to a stream
# closed when that test ends, and every later flow's log line fails. Imported here, it binds the session's.
import prefect.main  # noqa: E402, F401

from lsun_hitl.fashion_mnist import load_arrays  # noqa: E402


@pytest.fixture(scope="session")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    """The 60,000 Fashion-MNIST training images (N, 28, 28) and labels (Debian dataset-fashion-mnist)."""
    (_, images, labels), _ = load_arrays()
    return images, labels


def png_bytes(pixels: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on loopback; yields fsspec storage options for s3fs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{port}"}
    yield options
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields (url, storage options)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server, skip_instance_cache=True)
    name = "test-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs.mkdir(name)
    return f"s3://{name}", s3_server


@pytest.fixture(scope="session")
def dask_cluster():
    """A real two-process Dask LocalCluster shared by the tests."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: a temporary API server with its own database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# The files that take minutes (the slowest 25 of `--durations`), slowest first: under `-n 2 --dist loadfile
# --no-loadscope-reorder` (scripts/test.sh) each worker takes the next file in collection order, so starting
# with these keeps one of them from running alone at the end.
SLOW_FIRST = (
    "test_storage_faults.py",
    "test_chaos.py",
    "test_export.py",
    "test_cascade_e2e.py",
    "test_simulate.py",
    "test_replay.py",
    "test_deployments.py",
    "test_faults.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
