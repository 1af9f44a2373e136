"""Benchmark: one iteration's manifest work at 10 million images, against raw Parquet I/O.

    python benchmarks/manifest.py                 # 10,000,000 synthetic pool rows
    python benchmarks/manifest.py --rows 1000000

The iteration (what the cascade does between people and the model, minus training and scoring):
read the previous manifest, draw the sample, record people's labels for it, apply the thresholds to
the scored candidates, check that no decision flipped, and write the new manifest (atomically).
The baseline: ``pyarrow.parquet.read_table`` of the same previous manifest and ``write_table`` of the
same rows the iteration wrote, with the same compression and row groups (no fsync, no atomic rename).
Each runs in its own process, so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lsun_hitl.calibration import Thresholds
from lsun_hitl.manifest import (
    ROLE_CALIBRATION,
    ROLE_TRAIN,
    CascadeState,
    check_transition,
    read_manifest,
    write_manifest,
)
from lsun_hitl.sampling import draw_sample
from lsun_hitl.split import apply_human_labels, apply_thresholds
from lsun_hitl.storage import Storage, manifest_key

CATEGORY = "bench"


def synthetic_ids(n: int, seed: int = 0) -> pa.Array:
    """``n`` distinct-looking 32-character hex ids (like content hashes), built without Python objects."""
    rng = np.random.default_rng(seed)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)[rng.integers(0, 16, (n, 32), dtype=np.uint8)]
    offsets = (np.arange(n + 1, dtype=np.int64) * 32).astype(np.int32 if n * 32 < 2**31 else np.int64)
    kind = pa.string() if offsets.dtype == np.int32 else pa.large_string()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())])


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_iteration(root: str) -> dict:
    storage = Storage(root)
    start = time.perf_counter()
    before = read_manifest(storage, CATEGORY, 0)
    t_read = time.perf_counter() - start
    drawn = draw_sample(
        before.unlabeled_index(), n_train=2500, n_calibration=1500, max_fraction=0.25, seed=0, iteration=1
    )
    rng = np.random.default_rng(1)
    after = before.copy()
    apply_human_labels(after, drawn.train, rng.random(len(drawn.train)).astype(np.float32), ROLE_TRAIN, 1)
    apply_human_labels(
        after, drawn.calibration, rng.random(len(drawn.calibration)).astype(np.float32), ROLE_CALIBRATION, 1
    )
    mask = before.state == 0
    mask[drawn.train] = False
    mask[drawn.calibration] = False
    rows = np.flatnonzero(mask)
    scores = rng.random(len(rows), dtype=np.float32)
    apply_thresholds(after, rows, scores, Thresholds(0.9, 0.1, None, None, 1500, 0, 0, 0.95), 1)
    check_transition(before, after)
    t_mid = time.perf_counter()
    write_manifest(storage, CATEGORY, 1, after)
    end = time.perf_counter()
    return {"seconds": end - start, "read_s": t_read, "write_s": end - t_mid, "peak_mb": peak_mb()}


def phase_raw(root: str) -> dict:
    """Raw I/O of the same rows: read the previous manifest, write the rows the iteration wrote."""
    storage = Storage(root)
    src = storage.path(manifest_key(CATEGORY, 0))
    rows = pq.read_table(storage.path(manifest_key(CATEGORY, 1)))  # the iteration's output, not timed
    start = time.perf_counter()
    pq.read_table(src)
    t_read = time.perf_counter() - start
    pq.write_table(rows, str(Path(root) / "raw-copy.parquet"), compression="zstd", row_group_size=256 * 1024)
    end = time.perf_counter()
    return {"seconds": end - start, "read_s": t_read, "write_s": end - start - t_read, "peak_mb": peak_mb()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--phase", choices=["iteration", "raw"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        print(json.dumps((phase_iteration if args.phase == "iteration" else phase_raw)(args.root)))
        return 0

    root = tempfile.mkdtemp(prefix="bench-manifest-")
    start = time.perf_counter()
    write_manifest(Storage(root), CATEGORY, 0, CascadeState.initial(synthetic_ids(args.rows)))
    size = Path(Storage(root).path(manifest_key(CATEGORY, 0))).stat().st_size
    print(f"synthetic pool manifest: {args.rows:,} rows, {size / 1e6:,.0f} MB ({time.perf_counter() - start:.1f} s)")

    def run(phase: str) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, "--phase", phase, "--root", root], check=True, capture_output=True, text=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    results: dict[str, list[dict]] = {"raw": [], "iteration": []}
    for _ in range(args.repeat):
        for phase in ("iteration", "raw"):  # raw writes the rows the iteration wrote
            results[phase].append(run(phase))
    best = {p: min(r, key=lambda x: x["seconds"]) for p, r in results.items()}
    peak = {p: max(x["peak_mb"] for x in r) for p, r in results.items()}
    ratio = best["iteration"]["seconds"] / best["raw"]["seconds"]
    print(f"\nmanifest iteration at {args.rows:,} rows (best of {args.repeat}; peak = max RSS of the process)")
    print("| work | seconds | read s | write s | peak memory MB |")
    print("|---|---|---|---|---|")
    for p, name in (("raw", "raw pyarrow read + write"), ("iteration", "sample + split + write manifest")):
        b = best[p]
        print(f"| {name} | {b['seconds']:.2f} | {b['read_s']:.2f} | {b['write_s']:.2f} | {peak[p]:,.0f} |")
    print(f"ratio iteration / raw I/O: {ratio:.2f}x (goal <= 2x); peak {peak['iteration']:,.0f} MB (goal <= 4,096)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
