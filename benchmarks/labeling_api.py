"""Benchmark: the labeling API under 50 concurrent labelers on loopback.

    python benchmarks/labeling_api.py                 # 50 clients, 4,000 images, 3 answers each
    python benchmarks/labeling_api.py --clients 100 --images 10000
    python benchmarks/labeling_api.py --think-ms 500   # labelers at a (fast) human pace

The real service, ``lsun-hitl serve`` in a process of its own (FastAPI + uvicorn), over a local storage
root with one open request of Fashion-MNIST PNGs and a gold set. ``--profile FILE`` runs it under
cProfile and writes the profile there. Each client is a thread with its own HTTP
connection doing what the labeling page does: take the next batch, fetch each image, submit the
answers. Latency is measured per call, client side. Printed: p50 / p99 / max per call type.
The clients run as asyncio tasks in ``--client-procs`` processes (one connection each): threads in one
process would add their own GIL queueing to the figures, which no browser has.
``--server-src DIR`` runs the service from another checkout, for before/after figures in one harness.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
from PIL import Image

from lsun_hitl import labels
from lsun_hitl.fashion_mnist import load_arrays
from lsun_hitl.labelers import create_labeler
from lsun_hitl.quality import write_gold
from lsun_hitl.storage import Storage

CATEGORY = "sneaker"


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_process(
    url: str,
    tokens: list[str],
    seeds: list[int],
    delays: list[float],
    truth: dict[str, bool],
    think_ms: float,
    stop: Any,
    results: Any,
) -> None:
    """Labelers as asyncio tasks in one process, each with its own HTTP connection (as browsers would be)."""
    latencies: dict[str, list[tuple[float, float]]] = defaultdict(list)
    errors: list[str] = []

    async def labeler(token: str, seed: int, delay: float) -> None:
        rng = np.random.default_rng(seed)
        await asyncio.sleep(delay)  # labelers arrive one after another over the ramp, not all in one instant
        limits = httpx.Limits(max_connections=1)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:

            async def call(kind: str, method: str, path: str, **kw: Any) -> httpx.Response:
                t = time.perf_counter()
                r = await client.request(method, path, **kw)
                latencies[kind].append((t, time.perf_counter() - t))
                if r.status_code >= 400:
                    errors.append(f"{kind} {r.status_code} {r.text[:100]}")
                return r

            while not stop.is_set():
                batch = (await call("next batch", "POST", "/api/batches/next")).json().get("batch")
                if not batch:
                    await asyncio.sleep(0.2)
                    continue
                answers = []
                for item in batch["items"]:
                    await call("image", "GET", f"/api/batches/{batch['batch_id']}/images/{item['index']}")
                    if think_ms:
                        await asyncio.sleep(rng.exponential(think_ms / 1000))
                    right = rng.random() < 0.9
                    answers.append(
                        {"index": item["index"], "answer": "yes" if right == truth[item["image_id"]] else "no"}
                    )
                await call(
                    "submit labels", "POST", f"/api/batches/{batch['batch_id']}/labels", json={"answers": answers}
                )

    async def all_labelers() -> None:
        await asyncio.gather(*(labeler(t, s, d) for t, s, d in zip(tokens, seeds, delays, strict=True)))

    asyncio.run(all_labelers())
    results.put((dict(latencies), errors))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--profile", help="write a cProfile of the service to this file")
    ap.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="a labeler's time per image before answering (0: clients fire back to back, saturating the service)",
    )
    ap.add_argument(
        "--client-procs", type=int, default=2, help="client processes (each runs its labelers on one asyncio loop)"
    )
    ap.add_argument(
        "--ramp-s", type=float, default=5.0, help="labelers arrive evenly spread over this many seconds (0: at once)"
    )
    ap.add_argument(
        "--server-src",
        help="run the service from another checkout (before/after comparisons); os.pathsep-separated paths "
        "go on its PYTHONPATH, the first is its working directory",
    )
    args = ap.parse_args(argv)
    (_, pixels, classes), _ = load_arrays()
    storage = Storage(tempfile.mkdtemp(prefix="bench-api-"))
    n, n_gold = args.images, 100
    storage.fs.makedirs(storage.path("images"), exist_ok=True)
    storage.fs.pipe({storage.path(f"images/{i}.png"): png(pixels[i]) for i in range(n + n_gold)})
    ids = [f"img{i:06d}" for i in range(n + n_gold)]
    uris = [storage.url_of(f"images/{i}.png") for i in range(n + n_gold)]
    truth = {ids[i]: bool(classes[i] == 7) for i in range(n + n_gold)}
    labels.publish_request(storage, CATEGORY, "iteration-1", 1, pa.table({"image_id": ids[:n], "uri": uris[:n]}), None)
    write_gold(
        storage,
        CATEGORY,
        pa.table({"image_id": ids[n:], "uri": uris[n:], "answer": ["yes" if truth[i] else "no" for i in ids[n:]]}),
    )
    tokens = [create_labeler(storage, f"w{k:03d}") for k in range(args.clients)]
    admin = create_labeler(storage, "admin", role="admin")
    port = free_port()
    cmd = [sys.executable, "-m", "cli", "serve", "--root", storage.url, "--port", str(port)]
    cmd += ["--batch-size", str(args.batch_size), "--no-resume"]
    if args.profile:
        cmd[1:1] = ["-m", "cProfile", "-o", args.profile]
    env = dict(os.environ)
    if args.server_src:
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in args.server_src.split(os.pathsep))
    server = subprocess.Popen(cmd, cwd=args.server_src.split(os.pathsep)[0] if args.server_src else None, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    stop = mp.Event()
    results: mp.Queue = mp.Queue()
    per_proc = np.array_split(np.arange(args.clients), args.client_procs)
    procs = [
        mp.Process(
            target=client_process,
            args=(
                url,
                [tokens[k] for k in ks],
                list(ks),
                [args.ramp_s * k / args.clients for k in ks],
                truth,
                args.think_ms,
                stop,
                results,
            ),
        )
        for ks in per_proc
        if len(ks)
    ]
    try:
        start = time.perf_counter()
        for p in procs:
            p.start()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as watcher:
            while time.perf_counter() - start < 600 and not watcher.get("/api/admin/requests").json()[0]["complete"]:
                time.sleep(1)
        stop.set()
        took = time.perf_counter() - start
        calls: dict[str, list[tuple[float, float]]] = defaultdict(list)
        errors: list[str] = []
        for _ in procs:
            lat, errs = results.get(timeout=120)
            for kind, v in lat.items():
                calls[kind].extend(v)
            errors.extend(errs)
        for p in procs:
            p.join(30)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)

    latencies = {kind: [dt for _, dt in v] for kind, v in calls.items()}
    after_ramp = [dt for v in calls.values() for t, dt in v if t - start >= args.ramp_s]
    total = sum(len(v) for v in latencies.values())
    print(
        f"\nlabeling API: {args.clients} concurrent clients ({args.client_procs} client processes), {n:,} images, "
        f"batches of {args.batch_size}, {took:.0f} s"
    )
    pace = f"labelers think {args.think_ms:.0f} ms per image (exponential)" if args.think_ms else "no think time"
    print(f"{total:,} calls ({total / took:,.0f}/s), {len(errors)} errors; {pace}")
    print("| call | count | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for kind in ("next batch", "image", "submit labels"):
        v = np.array(latencies[kind]) * 1000
        if len(v):
            print(f"| {kind} | {len(v):,} | {np.percentile(v, 50):.1f} | {np.percentile(v, 99):.1f} | {v.max():.1f} |")
    allv = np.concatenate([np.array(v) for v in latencies.values()]) * 1000
    print(f"all calls: p50 {np.percentile(allv, 50):.1f} ms, p99 {np.percentile(allv, 99):.1f} ms (goal p99 <= 50 ms)")
    if args.ramp_s and after_ramp:
        v = np.array(after_ramp) * 1000
        print(
            f"after the {args.ramp_s:.0f} s ramp: p50 {np.percentile(v, 50):.1f} ms, p99 {np.percentile(v, 99):.1f} ms"
        )
    slow = sorted((dt, t - start, kind) for kind, v in calls.items() for t, dt in v)[-5:]
    print("slowest calls (ms at s):", ", ".join(f"{kind} {dt * 1000:.0f} at {at:.1f}" for dt, at, kind in slow))
    if errors:
        print("first errors:", errors[:3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
