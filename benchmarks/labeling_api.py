"""Benchmark: the labeling API under 50 concurrent labelers on loopback.

    python benchmarks/labeling_api.py                 # 50 clients, 4,000 images, 3 answers each
    python benchmarks/labeling_api.py --clients 100 --images 10000
    python benchmarks/labeling_api.py --think-ms 500   # labelers at a (fast) human pace

The real service, ``lsun-hitl serve`` in a process of its own (FastAPI + uvicorn), over a local storage
root with one open request of Fashion-MNIST PNGs and a gold set. ``--profile FILE`` runs it under
cProfile and writes the profile there. Each client is a thread with its own HTTP
connection doing what the labeling page does: take the next batch, fetch each image, submit the
answers. Latency is measured per call, client side. Printed: p50 / p99 / max per call type.
"""

from __future__ import annotations

import argparse
import io
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

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
    cmd = [sys.executable, "-m", "lsun_hitl.cli", "serve", "--root", storage.url, "--port", str(port)]
    cmd += ["--batch-size", str(args.batch_size), "--no-resume"]
    if args.profile:
        cmd[1:1] = ["-m", "cProfile", "-o", args.profile]
    server = subprocess.Popen(cmd)
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
    latencies: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def labeler(k: int) -> None:
        rng = np.random.default_rng(k)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[k]}"}, timeout=30) as client:

            def call(kind: str, method: str, path: str, **kw: object) -> httpx.Response:
                t = time.perf_counter()
                r = client.request(method, path, **kw)
                dt = time.perf_counter() - t
                with lock:
                    latencies[kind].append(dt)
                if r.status_code >= 400:
                    errors.append(f"{kind} {r.status_code} {r.text[:100]}")
                return r

            while not stop.is_set():
                batch = call("next batch", "POST", "/api/batches/next").json().get("batch")
                if not batch:
                    stop.wait(0.2)
                    continue
                answers = []
                for item in batch["items"]:
                    call("image", "GET", f"/api/batches/{batch['batch_id']}/images/{item['index']}")
                    if args.think_ms:
                        stop.wait(rng.exponential(args.think_ms / 1000))
                    right = rng.random() < 0.9
                    answers.append(
                        {"index": item["index"], "answer": "yes" if right == truth[item["image_id"]] else "no"}
                    )
                call("submit labels", "POST", f"/api/batches/{batch['batch_id']}/labels", json={"answers": answers})

    try:
        threads = [threading.Thread(target=labeler, args=(k,), daemon=True) for k in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as watcher:
            while time.perf_counter() - start < 600 and not watcher.get("/api/admin/requests").json()[0]["complete"]:
                time.sleep(1)
        stop.set()
        for t in threads:
            t.join(30)
        took = time.perf_counter() - start
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)

    total = sum(len(v) for v in latencies.values())
    print(
        f"\nlabeling API: {args.clients} concurrent clients, {n:,} images, batches of {args.batch_size}, {took:.0f} s"
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
    if errors:
        print("first errors:", errors[:3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
