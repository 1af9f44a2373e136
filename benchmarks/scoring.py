"""Benchmark: the Dask scoring step against a bare single-process loop doing the same work.

    python benchmarks/scoring.py                      # 4,000 images, local folder and S3 (moto on loopback)
    python benchmarks/scoring.py --images 20000 --storage local

Same images (Fashion-MNIST PNGs), same model (mobilenet_v3_small at 64 px, untrained weights: the
cost of a forward pass does not depend on them), same batch size, same read, decode and resize
(``scoring.read_batch``). The bare loop reads a batch, decodes it and runs the model, one batch
after another, in one process with one torch thread. Figures printed:

- per core: bare loop pinned to one core vs the Dask step with one worker pinned to the same core;
- scaling: the Dask step with two workers on two cores vs one worker on one core;
- for images in a local folder and in S3 (moto's server on loopback, through s3fs).

Cluster start-up and the first model load are excluded (a warm-up pass runs first); the step's
own work is timed: writing the candidates file, the tasks, reading the parts back.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from lsun_hitl import model as model_lib
from lsun_hitl.config import ModelParams
from lsun_hitl.fashion_mnist import load_arrays
from lsun_hitl.scoring import read_batch, score_candidates
from lsun_hitl.storage import Storage


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


ALL_CPUS = sorted(os.sched_getaffinity(0))


def pin(cores: int) -> None:
    """Restrict this process (and the processes it starts) to the first ``cores`` CPUs."""
    os.sched_setaffinity(0, set(ALL_CPUS[:cores]))


def bare_loop(uris: list[str], options: dict, model_bytes: bytes, batch_size: int) -> tuple[float, np.ndarray]:
    """One process, one thread: read a batch, decode it, run the model; return (seconds, scores)."""
    import torch

    torch.set_num_threads(1)
    net = model_lib.load(model_bytes)
    model_lib.predict(net, np.zeros((2, net.image_size, net.image_size, 3), np.uint8))  # warm-up
    start = time.perf_counter()
    out = []
    for i in range(0, len(uris), batch_size):
        images, ok, _ = read_batch(uris[i : i + batch_size], options, net.image_size)
        out.append(model_lib.predict(net, images[ok], batch_size))
    return time.perf_counter() - start, np.concatenate(out)


def dask_step(
    storage: Storage, candidates: pa.Table, model_path: str, workers: int, batch_size: int, partition: int
) -> float:
    import dask
    from distributed import Client, LocalCluster

    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),  # as dask_client
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        warm = candidates.slice(0, batch_size * workers)
        score_candidates(
            storage, "bench", 0, warm, model_path, client=client, partition_size=batch_size, batch_size=batch_size
        )
        clear_scores(storage)
        start = time.perf_counter()
        scores = score_candidates(
            storage, "bench", 1, candidates, model_path, client=client, partition_size=partition, batch_size=batch_size
        )
        took = time.perf_counter() - start
    assert scores.num_rows == candidates.num_rows
    clear_scores(storage)
    return took


def clear_scores(storage: Storage) -> None:
    if storage.exists(storage.path("scores")):
        storage.fs.rm(storage.path("scores"), recursive=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--storage", choices=["local", "s3", "both"], default="both")
    args = ap.parse_args(argv)
    if len(ALL_CPUS) < 2:
        print("needs two CPU cores", file=sys.stderr)
        return 2
    (_, pixels, _), _ = load_arrays()
    blobs = [png(p) for p in pixels[: args.images]]
    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    net = model_lib.build(ModelParams(image_size=args.image_size)).eval()
    model_bytes = model_lib.save(net)
    partition = max(args.batch_size, args.images // 16)  # enough tasks to balance two workers
    rows = []
    setups = []
    server = None
    if args.storage in ("local", "both"):
        setups.append(("local folder", Storage(str(work / "root"))))
    if args.storage in ("s3", "both"):
        import logging

        import s3fs
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        options = {"key": "bench", "secret": "bench", "endpoint_url": f"http://127.0.0.1:{port}"}
        s3fs.S3FileSystem(**options).mkdir("bench")
        setups.append(("S3 (moto, loopback)", Storage("s3://bench/root", options)))
    try:
        for label, storage in setups:
            storage.fs.makedirs(storage.path("images"), exist_ok=True)
            storage.fs.pipe({storage.path(f"images/{i:06d}.png"): b for i, b in enumerate(blobs)})
            uris = [storage.url_of(f"images/{i:06d}.png") for i in range(len(blobs))]
            candidates = pa.table({"image_id": [f"{i:06d}" for i in range(len(uris))], "uri": uris})
            model_path = storage.path("models/bench/model.pt")
            storage.write_bytes(model_path, model_bytes)

            pin(1)
            bare_s, _ = bare_loop(uris, storage.options, model_bytes, args.batch_size)
            one_s = dask_step(storage, candidates, model_path, 1, args.batch_size, partition)
            pin(2)
            two_s = dask_step(storage, candidates, model_path, 2, args.batch_size, partition)
            n = len(uris)
            rows.append((label, n / bare_s, n / one_s, n / two_s))
            print(
                f"{label}: bare loop {n / bare_s:,.0f} img/s (1 core); Dask 1 worker {n / one_s:,.0f} img/s "
                f"(1 core); Dask 2 workers {n / two_s:,.0f} img/s (2 cores)",
                flush=True,
            )
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nscoring: {args.images:,} images, batch {args.batch_size}, {args.image_size} px, mobilenet_v3_small")
    print("| storage | bare loop img/s (1 core) | Dask 1 worker img/s (1 core) | per-core ratio |", end="")
    print(" Dask 2 workers img/s | 2 vs 1 |")
    print("|---|---|---|---|---|---|")
    for label, bare, one, two in rows:
        print(f"| {label} | {bare:,.0f} | {one:,.0f} | {one / bare:.2f}x | {two:,.0f} | {two / one:.2f}x |")
    print("goals: per-core ratio >= 0.9x, 2 vs 1 >= 1.7x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
