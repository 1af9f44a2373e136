"""Benchmark: ingest (``build_pool`` on Dask) against a bare single-process loop's ceiling, in one run.

    python benchmarks/ingest.py --images /data/scale-1m/images/scale --root /data/ingest-bench
    python benchmarks/ingest.py --images /data/scale-1m/images/scale --s3 --s3-files 50000

The pool is a folder of images (``benchmarks/scale_pool.py`` makes LSUN-sized JPEGs); ``--root`` is the
storage root the benchmark's pool manifest goes to, separate from the images. Figures printed:

- **ceiling**: one process pinned to one core lists the prefix (``ingest.list_prefix``), then reads a
  sample of the files (in chunks, with ``fs.cat`` as ingest does) and opens each with PIL for its header
  only (size and format, no pixels decoded). Listing per file plus read and header per file give the ceiling in images/s
  on one core. On the same sample, the cost per file of each part of ingest's own work: the read, the
  header, the BLAKE2b content hash, a full decode (``load()``), the decode ingest does
  (``images.probe``), a marker-only check that decodes nothing (not used by ingest), and
  ``ingest.probe_chunk`` as a whole.
- **build_pool**: the real step on a ``LocalCluster`` of ``--workers`` processes (one thread each) over
  every file under the prefix: images/s, per core, and the ratio of per core to the ceiling; the wall
  time before the first chunk finished (listing, writing the listing file, the first task), while
  chunks finished, and after the last (gathering, de-duplicating, writing the manifests); CPU seconds
  per file of the workers, the driver and (with ``--s3``) the S3 server; the driver's peak RSS
  (``getrusage``) and whether Dask warned about a large task graph.

``--s3`` starts moto's S3 server (``moto_server``) in its own process on loopback, uploads the first
``--s3-files`` files of the prefix to a bucket, and measures both through s3fs. The upload and the
ceiling run in child processes, so the driver's peak RSS is that of ingest alone. Cluster start-up is excluded; the
workers import ingest's modules before the clock starts.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import psutil
from fsspec.core import url_to_fs
from PIL import Image, JpegImagePlugin

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lsun_hitl.cluster import dask_client  # noqa: E402
from lsun_hitl.images import ImageError, probe  # noqa: E402
from lsun_hitl.ingest import build_pool, list_prefix, one_request_per_file, probe_chunk  # noqa: E402
from lsun_hitl.progress import Bar  # noqa: E402
from lsun_hitl.storage import Storage  # noqa: E402

ALL_CPUS = sorted(os.sched_getaffinity(0))
BUCKET = "bench"


def _header(data: bytes) -> None:
    img = Image.open(io.BytesIO(data))
    img.size, img.format  # noqa: B018 - the header read is the work being timed


def _full_decode(data: bytes) -> None:
    try:
        Image.open(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001 - a bad file costs what it costs; the timing is the point
        pass


def _probe(data: bytes) -> None:
    try:
        probe(data)
    except ImageError:
        pass


def _hash(data: bytes) -> None:
    hashlib.blake2b(data, digest_size=16).hexdigest()


def _marker_check(data: bytes) -> None:
    """A check that decodes nothing: the header, and for a JPEG an end-of-image marker after the scan start.

    It rejects every truncation but not every file libjpeg refuses (a damaged Huffman table, say), so
    ingest does not use it; it is timed to show what a decode-free check would cost.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if isinstance(img, JpegImagePlugin.JpegImageFile):
            data.find(b"\xff\xd9", img.tile[0][2])
    except Exception:  # noqa: BLE001 - as _full_decode
        pass


def ceiling(prefix: str, options: dict[str, Any], sample: int, chunk: int) -> dict[str, float]:
    """The bare loop (runs in a child process pinned to one core); return seconds per file of each part.

    Parameters
    ----------
    prefix
        URL prefix of the images.
    options
        fsspec storage options for the prefix.
    sample
        How many files (evenly spaced over the sorted listing) to read.
    chunk
        Files read per ``fs.cat`` call, as ingest reads a chunk.

    Returns
    -------
    dict
        ``files`` (listed), ``sample``, and seconds per file: ``list``, ``read``, ``header``, ``hash``,
        ``full_decode``, ``probe``, ``marker_check``, ``probe_chunk``.
    """
    os.sched_setaffinity(0, {ALL_CPUS[0]})
    fs, _ = url_to_fs(prefix, **options)
    start = time.perf_counter()
    listed = list_prefix(prefix, options)
    list_s = time.perf_counter() - start
    urls = listed[:: max(1, len(listed) // sample)][:sample]
    picked = [fs._strip_protocol(u) for u in urls]
    parts = dict.fromkeys(("read", "header", "hash", "full_decode", "probe", "marker_check", "probe_chunk"), 0.0)
    for i in range(0, len(picked), chunk):
        batch = picked[i : i + chunk]
        start = time.perf_counter()
        got = fs.cat(batch, on_error="return", **one_request_per_file(fs))  # as probe_chunk reads
        parts["read"] += time.perf_counter() - start
        blobs = [got[p] for p in batch if isinstance(got.get(p), bytes)]
        timed = [("header", _header), ("hash", _hash), ("full_decode", _full_decode), ("probe", _probe)]
        for name, fn in [*timed, ("marker_check", _marker_check)]:
            start = time.perf_counter()
            for data in blobs:
                fn(data)
            parts[name] += time.perf_counter() - start
        start = time.perf_counter()
        probe_chunk(urls[i : i + chunk], options)
        parts["probe_chunk"] += time.perf_counter() - start
    n = len(picked)
    return {"files": len(listed), "sample": n, "list": list_s / len(listed)} | {k: v / n for k, v in parts.items()}


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def worker_cpu(client: Any) -> float:
    """User plus system CPU seconds of every worker process so far."""
    return sum(client.run(lambda: cpu_seconds(psutil.Process())).values())


class Timeline:
    """A progress callback that drives a bar and remembers when the first and the last chunk finished."""

    def __init__(self) -> None:
        self.bar = Bar("ingest", "chunk")
        self.first: float | None = None
        self.last: float | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.bar(done, total)


def run_ingest(
    storage: Storage, prefix: str, workers: int, chunk: int, server: psutil.Process | None
) -> dict[str, Any]:
    """The real ``build_pool`` on a fresh LocalCluster; return its figures."""
    with dask_client(n_workers=workers) as client:
        client.run(importlib.import_module, "lsun_hitl.ingest")
        timeline = Timeline()
        cpu0, driver0 = worker_cpu(client), cpu_seconds(psutil.Process())
        server0 = cpu_seconds(server) if server else 0.0
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            report = build_pool(storage, prefix, client=client, chunk_size=chunk, progress=timeline)
            wall = time.perf_counter() - start
        worker_s = worker_cpu(client) - cpu0
        driver_s = cpu_seconds(psutil.Process()) - driver0
        server_s = cpu_seconds(server) - server0 if server else 0.0
    graph = [str(w.message).splitlines()[0] for w in caught if "large graph" in str(w.message)]
    return {
        "report": report,
        "wall": wall,
        "before_first": (timeline.first or start) - start,
        "tasks": (timeline.last or start) - (timeline.first or start),
        "after_last": start + wall - (timeline.last or start),
        "worker_cpu": worker_s,
        "driver_cpu": driver_s,
        "server_cpu": server_s,
        "rss_before_mib": rss0 / 1024,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "graph_warning": graph[0] if graph else "none",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, dict[str, Any]]:
    """moto's S3 server in its own process on a free loopback port; return it and s3fs options."""
    port = free_port()
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port}") from None
            time.sleep(0.2)
    return proc, {"key": "bench", "secret": "bench", "endpoint_url": f"http://127.0.0.1:{port}"}


def upload(prefix: str, options: dict[str, Any], n: int, batch: int = 500) -> tuple[str, int, float]:
    """Copy the first ``n`` files (sorted) under the local ``prefix`` to ``s3://bench/images/``.

    Returns
    -------
    url, files, seconds
        The S3 prefix the files went to, how many, and how long the upload took.
    """
    import s3fs

    local, path = url_to_fs(prefix)
    names = [local._strip_protocol(u) for u in list_prefix(prefix)[:n]]
    s3 = s3fs.S3FileSystem(**options)
    s3.mkdir(BUCKET)
    dest = f"{BUCKET}/images/{os.path.basename(path.rstrip('/'))}"
    start = time.perf_counter()
    bar = Bar("upload", "file")
    for i in range(0, len(names), batch):
        part = names[i : i + batch]
        s3.pipe({f"{dest}/{os.path.relpath(p, path)}": local.cat_file(p) for p in part})
        bar(i + len(part), len(names))
    return f"s3://{dest}", len(names), time.perf_counter() - start


def report(label: str, bare: dict[str, float], real: dict[str, Any], workers: int) -> None:
    """Print one setup's figures."""
    us = {k: v * 1e6 for k, v in bare.items() if k not in ("files", "sample")}
    ceiling_s = bare["list"] + bare["read"] + bare["header"]
    r = real["report"]
    rate = r.files / real["wall"]
    cores = min(workers, len(ALL_CPUS))
    per_core = rate / cores
    print(f"\n== {label}: {r.files:,} files ({r})")
    print(
        f"bare loop, 1 core, sample of {bare['sample']:,} of {bare['files']:,}: us per file: "
        + ", ".join(f"{k} {v:,.1f}" for k, v in us.items())
    )
    print(f"ceiling (list + read + header): {1 / ceiling_s:,.0f} img/s on 1 core")
    own = bare["list"] + bare["probe_chunk"]
    print(f"ingest's own work in the bare loop (list + probe_chunk, no Dask): {1 / own:,.0f} img/s on 1 core")
    marker = own - bare["probe"] + bare["marker_check"]
    print(
        f"  the same with the marker-only check instead of the decode: {1 / marker:,.0f} img/s on 1 core, "
        f"{ceiling_s / marker:.2f}x the ceiling"
    )
    print(
        f"build_pool, {workers} workers: {real['wall']:,.1f} s, {rate:,.0f} img/s, {per_core:,.0f} img/s per core "
        f"({cores} cores): {per_core * ceiling_s:.3f}x the ceiling per core (goal >= 0.8x)"
    )
    print(
        f"  wall: {real['before_first']:,.1f} s to the first chunk (listing, listing file, first task), "
        f"{real['tasks']:,.1f} s of chunks, {real['after_last']:,.1f} s after the last (gather, dedupe, write)"
    )
    server = f", S3 server {real['server_cpu'] / r.files * 1e6:,.0f}" if real["server_cpu"] else ""
    print(
        f"  CPU us per file: workers {real['worker_cpu'] / r.files * 1e6:,.0f}, "
        f"driver {real['driver_cpu'] / r.files * 1e6:,.0f}{server}"
    )
    print(
        f"  driver peak RSS {real['rss_peak_mib']:,.0f} MiB ({real['rss_before_mib']:,.0f} MiB before "
        f"build_pool); large-graph warning: {real['graph_warning']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="local folder (or URL prefix) holding the images")
    ap.add_argument("--root", help="storage root for the pool manifest (local mode; default: a temporary folder)")
    ap.add_argument("--sample", type=int, default=20_000, help="files the bare loop reads (default 20,000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=1000, help="files per task (build_pool's default)")
    ap.add_argument("--s3", action="store_true", help="measure through s3fs against moto's server on loopback")
    ap.add_argument("--s3-files", type=int, default=50_000, help="files uploaded with --s3 (default 50,000)")
    args = ap.parse_args(argv)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = None
    tmp_root = None
    try:
        if args.s3:
            server, options = start_moto()
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # its listing is not ours
                prefix, n, took = pool.submit(upload, args.images, options, args.s3_files).result()
            print(f"uploaded {n:,} files to {prefix} in {took:,.0f} s ({n / took:,.0f} files/s)", flush=True)
            storage = Storage(f"s3://{BUCKET}/root", options)
            label = "S3 (moto server on loopback, s3fs)"
        else:
            options, prefix = {}, args.images
            if args.root is None:
                import tempfile

                tmp_root = tempfile.mkdtemp(prefix="bench-ingest-")
            storage = Storage(args.root or tmp_root)
            label = "local folder"
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            bare = pool.submit(ceiling, prefix, options, args.sample, args.chunk_size).result()
        proc = psutil.Process(server.pid) if server else None
        real = run_ingest(storage, prefix, args.workers, args.chunk_size, proc)
        report(label, bare, real, args.workers)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        if tmp_root:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
