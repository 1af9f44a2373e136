"""Benchmark: one iteration's manifest work at 10 million images, against raw Parquet I/O.

    python benchmarks/manifest.py                 # 10,000,000 synthetic pool rows
    python benchmarks/manifest.py --rows 1000000
    python benchmarks/manifest.py --rows 100000000 --partitions 64   # in parts, on a 2-worker LocalCluster

With ``--partitions`` the manifest is in parts and the iteration is the flow's split (``cascade/iterate.py``):
each part's first candidate from the previous commit's counts, then each part advanced where it is (labels,
thresholds over its slice of the scoring step's parts, found by candidate index and checked by image id,
never-flip check, write, and the part's bottom-k of the next iteration's sample while it is in memory) and the
iteration committed with the reduce of those draws; before it, this iteration's sample, read from the draw the
manifest before was committed with (the setup draws it, as iteration 0's write does). The scores are written
between the sample and the split (not timed), one file a part, as a scoring step would. The baseline is
``pyarrow`` reading each previous part and its scores and writing the rows its advance wrote, one task per
part on the same workers. The flow process (this one's child) holds the sample and the counts only; its
peak memory and each worker's are printed.

The iteration (what the cascade does between people and the model, minus training and scoring):
read the previous manifest, draw the sample, record people's labels for it, apply the thresholds to
the scored candidates, check that no decision flipped, and write the new manifest (atomically).
The baseline: ``pyarrow.parquet.read_table`` of the same previous manifest and ``write_table`` of the
same rows the iteration wrote, with the same compression and row groups (no fsync, no atomic rename), with
pyarrow's default encodings and again with the dictionary choice the parts are written with.
Each runs in its own process, so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
from lsun_hitl.partitions import Partitioning
from lsun_hitl.sampling import draw_sample
from lsun_hitl.split import apply_human_labels, apply_thresholds
from lsun_hitl.steps import peak_rss_mb, reset_peak_rss
from lsun_hitl.storage import Storage, manifest_dir, scores_dir

CATEGORY = "bench"


HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
SCORES = scores_dir(CATEGORY, 1)  # the partitioned run's scores: the scoring step's parts, in candidate order


def ids_from_nibbles(nibbles: np.ndarray) -> pa.Array:
    """A string array of one 32-character hex id per row of ``nibbles`` (n, 32), built without Python objects."""
    n = len(nibbles)
    digits = HEX[nibbles]
    offsets = (np.arange(n + 1, dtype=np.int64) * 32).astype(np.int32 if n * 32 < 2**31 else np.int64)
    kind = pa.string() if offsets.dtype == np.int32 else pa.large_string()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())])


def synthetic_ids(n: int, seed: int = 0) -> pa.Array:
    """``n`` distinct-looking 32-character hex ids (like content hashes)."""
    return ids_from_nibbles(np.random.default_rng(seed).integers(0, 16, (n, 32), dtype=np.uint8))


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


def the_part(storage: Storage, iteration: int) -> str:
    """The one part file of an iteration's manifest written whole (``write_manifest``'s one part)."""
    from lsun_hitl.partitions import committed_files

    (path,) = committed_files(storage, manifest_dir(CATEGORY, iteration))
    return path


def phase_raw(root: str) -> dict:
    """Raw I/O of the same rows: read the previous manifest, write the rows the iteration wrote."""
    storage = Storage(root)
    src = the_part(storage, 0)
    rows = pq.read_table(the_part(storage, 1))  # the iteration's output, not timed
    start = time.perf_counter()
    pq.read_table(src)
    t_read = time.perf_counter() - start
    pq.write_table(rows, str(Path(root) / "raw-copy.parquet"), compression="zstd", row_group_size=256 * 1024)
    end = time.perf_counter()
    return {"seconds": end - start, "read_s": t_read, "write_s": end - start - t_read, "peak_mb": peak_mb()}


def hex_ids(start: int, stop: int) -> pa.Array:
    """32-character hex ids of global rows ``[start, stop)``: sorted, distinct, like content hashes in shape."""
    rows = np.arange(start, stop, dtype=np.uint64)
    shifts = np.arange(15, -1, -1, dtype=np.uint64) * np.uint64(4)
    low = ((rows[:, None] >> shifts) & np.uint64(15)).astype(np.uint8)
    return ids_from_nibbles(np.concatenate([np.zeros_like(low), low], axis=1))


def make_part(root: str, part: Partitioning, p: int, attempt: str) -> dict[str, int]:
    """Partition ``p`` of iteration 0 (setup, not timed); its counts, as the commit records them."""
    from lsun_hitl.manifest import part_counts
    from lsun_hitl.manifest_parts import manifest_dir
    from lsun_hitl.partitions import write_part

    storage = Storage(root)
    start, stop = part.rows(p)
    state = CascadeState.initial(hex_ids(start, stop))
    write_part(storage, manifest_dir(CATEGORY, 0), attempt, p, state.to_table())
    return part_counts(state)


def score_file(root: str, part: Partitioning, p: int, train: np.ndarray) -> int:
    """What the scoring step writes for part ``p``'s candidates (its rows less ``train``): image_id, score, in
    pool order, one file (not timed); the rows written."""
    start, stop = part.rows(p)
    index = np.setdiff1d(np.arange(start, stop), train)
    ids = hex_ids(start, stop).take(pa.array(index - start))
    scores = np.random.default_rng(p).random(len(index), dtype=np.float32)
    Storage(root).write_table(
        Storage(root).path(SCORES, f"part-{p:05d}.parquet"), pa.table({"image_id": ids, "score": scores})
    )
    return len(index)


def raw_part(root: str, part: Partitioning, p: int) -> tuple[str, float, float]:
    """The baseline's task: read what the part's advance reads (the previous part, the part's scores) and write
    the rows it wrote, with plain ``pyarrow`` (not atomic, no checks): once with pyarrow's default encodings
    (a dictionary tried on every column), once with the parts' own choice (``partitions.few_valued``).

    Returns the worker and the seconds of each read + write only (reading the rows to write is not the work).
    """
    from distributed import get_worker

    from lsun_hitl.manifest_parts import manifest_dir
    from lsun_hitl.partitions import committed_files, few_valued

    storage = Storage(root)
    rows = pq.read_table(committed_files(storage, manifest_dir(CATEGORY, 1))[p])
    t = time.perf_counter()
    pq.read_table(committed_files(storage, manifest_dir(CATEGORY, 0))[p])
    pq.read_table(storage.path(SCORES, f"part-{p:05d}.parquet"))
    read = time.perf_counter() - t
    written = []
    for dictionary in (True, few_valued(rows.schema)):
        t = time.perf_counter()
        pq.write_table(
            rows,
            str(Path(root) / f"raw-{p:05d}.parquet"),
            compression="zstd",
            row_group_size=256 * 1024,
            use_dictionary=dictionary,
        )
        written.append(read + time.perf_counter() - t)
    return get_worker().address, written[0], written[1]


def make_pool(root: str, part: Partitioning) -> int:
    """The synthetic pool manifest (image_id, uri) the scoring step's plan reads, written part after part in
    the pool's row groups (setup, not timed; runs on a worker); its size in bytes."""
    from lsun_hitl.ingest import POOL_ROW_GROUP
    from lsun_hitl.storage import POOL

    path = Storage(root).path(POOL)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for p in range(part.n_partitions):
            ids = hex_ids(*part.rows(p)).cast(pa.string())
            uris = pc.binary_join_element_wise("s3://pool/images/", ids, ".jpg", "")
            writer.write_table(pa.table({"image_id": ids, "uri": uris}), POOL_ROW_GROUP)
    return Path(path).stat().st_size


def raw_plan(item: tuple[int, int, int], root: str) -> tuple[str, float]:
    """The plan's baseline: read what a range's plan reads (its manifest rows' image_id and state, the pool's
    rows of the range) and write as many rows of (image_id, uri) as its plan held, with plain ``pyarrow``;
    the worker and the seconds."""
    from distributed import get_worker

    from lsun_hitl.manifest_parts import manifest_dir
    from lsun_hitl.partitions import committed_files
    from lsun_hitl.storage import POOL

    r, lo, hi = item
    storage = Storage(root)
    planned = pq.ParquetFile(storage.path(SCORES, "plan", f"range-{r:05d}.parquet")).metadata.num_rows
    t = time.perf_counter()
    pq.read_table(committed_files(storage, manifest_dir(CATEGORY, 0))[r], columns=["image_id", "state"])
    pool = pq.ParquetFile(storage.path(POOL))
    size = pool.metadata.row_group(0).num_rows
    table = pool.read_row_groups(list(range(lo // size, -(-hi // size))), columns=["image_id", "uri"])
    pq.write_table(table.slice(0, planned), str(Path(root) / f"raw-plan-{r:05d}.parquet"), compression="zstd")
    return get_worker().address, time.perf_counter() - t


def _advance(item: tuple[int, int], **kwargs: object) -> dict:
    """The flow's split task: ``advance_part`` of (part, its first candidate)."""
    from lsun_hitl.manifest_parts import advance_part

    p, candidate_start = item
    return advance_part(p=p, candidate_start=candidate_start, **kwargs)  # type: ignore[arg-type]


def phase_partitioned(root: str, rows: int, n_partitions: int, repeat: int) -> dict:
    """One partitioned iteration and its raw baseline on a fresh 2-worker LocalCluster; seconds and peaks."""
    from distributed import Client, LocalCluster

    from lsun_hitl.cascade.candidates import locate
    from lsun_hitl.cascade.sample import largest_sample
    from lsun_hitl.cluster import run_on_dask
    from lsun_hitl.config import CascadeParams
    from lsun_hitl.manifest_parts import (
        IterationUpdate,
        manifest_dir,
        sample_part,
        split_off_next_sample,
        store_next_sample,
        stored_next_sample,
        sum_counts,
    )
    from lsun_hitl.partitions import commit, new_attempt
    from lsun_hitl.scoring import plan_range, score_ranges

    imported = peak_mb()  # the cascade package imports torch: the flow process's floor, whatever the pool
    part = Partitioning(rows, n_partitions)
    n_cal, n_train = 1500, 2500
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        storage = Storage(root)
        setup = new_attempt()
        counts0 = client.gather([client.submit(make_part, root, part, p, setup) for p in range(n_partitions)])
        commit(storage, manifest_dir(CATEGORY, 0), setup, n_partitions, rows, meta={"counts": counts0})
        # iteration 1's sample drawn and stored with manifest 0, as the flow's writes do (setup, not timed)
        largest = largest_sample(CascadeParams())
        mapped = [client.submit(sample_part, storage, CATEGORY, 1, part, p, largest, 0) for p in range(n_partitions)]
        entry = store_next_sample(
            storage, manifest_dir(CATEGORY, 0), setup, client.gather(mapped), iteration=1, seed=0, k=largest
        )
        record = storage.path(manifest_dir(CATEGORY, 0), "_committed.json")
        storage.write_json(record, {**storage.read_json(record), "next_sample": entry})
        # the scores of the sample's candidates as the scoring step writes them (setup, not timed)
        drawn = stored_next_sample(storage, CATEGORY, 1, seed=0, k=n_cal + n_train)
        train = np.sort(drawn[n_cal:])
        sizes = client.gather([client.submit(score_file, root, part, p, train) for p in range(n_partitions)])
        storage.write_json(storage.path(SCORES, "stats.json"), {"candidates": int(sum(sizes)), "part_rows": sizes})
        pool_bytes = client.submit(make_pool, root, part).result()
        client.run(reset_peak_rss)  # worker peaks from here on: the iteration's, not the synthetic pool's setup
        best: dict[str, float] = {}
        for _ in range(repeat):  # best of repeat: the cores may be shared
            start = time.perf_counter()
            drawn = stored_next_sample(storage, CATEGORY, 1, seed=0, k=n_cal + n_train)
            t_sample = time.perf_counter() - start
            rng = np.random.default_rng(1)
            lap = time.perf_counter()
            where = locate(client, storage, CATEGORY, 1, part, train)
            t_locate, lap = time.perf_counter() - lap, time.perf_counter()
            update = IterationUpdate(
                iteration=1,
                train=train,
                train_p=rng.random(n_train).astype(np.float32),
                calibration=np.sort(drawn[:n_cal]),
                calibration_p=rng.random(n_cal).astype(np.float32),
                thresholds=Thresholds(0.9, 0.1, None, None, 1500, 0, 0, 0.95),
                score_files=where.score_files,
                score_sizes=where.score_sizes,
                next_sample=(0, largest),
            )
            attempt = new_attempt()
            counts, next_draws = split_off_next_sample(
                run_on_dask(
                    client,
                    _advance,
                    [(p, int(where.first[p])) for p in range(n_partitions)],
                    storage=storage,
                    category=CATEGORY,
                    partitioning=part,
                    update=update,
                    attempt=attempt,
                )
            )
            t_advance, lap = time.perf_counter() - lap, time.perf_counter()
            counts = sum_counts(counts)
            entry = store_next_sample(
                storage, manifest_dir(CATEGORY, 1), attempt, next_draws, iteration=2, seed=0, k=largest
            )
            commit(storage, manifest_dir(CATEGORY, 1), attempt, n_partitions, rows, meta={"next_sample": entry})
            seconds, t_commit = time.perf_counter() - start, time.perf_counter() - lap
            # the scoring step's plan of the same iteration: each range's candidates with their uris
            shutil.rmtree(storage.path(SCORES, "plan"), ignore_errors=True)
            start = time.perf_counter()
            tasks = run_on_dask(
                client,
                plan_range,
                [(r, lo, hi) for r, (lo, hi) in enumerate(score_ranges(part.starts))],
                storage=storage,
                category=CATEGORY,
                iteration=1,
                n_rows=rows,
                train=train,
                plan_dir=storage.path(SCORES, "plan"),
                partition_size=4000,
                cache=None,
            )
            t_plan = time.perf_counter() - start
            plan_raw: dict[str, float] = {}
            for worker, t in client.gather(
                [
                    client.submit(raw_plan, (r, lo, hi), root, pure=False)
                    for r, (lo, hi) in enumerate(score_ranges(part.starts))
                ]
            ):
                plan_raw[worker] = plan_raw.get(worker, 0.0) + t
            per_worker: dict[str, np.ndarray] = {}
            for worker, *t in client.gather(
                [client.submit(raw_part, root, part, p, pure=False) for p in range(n_partitions)]
            ):
                per_worker[worker] = per_worker.get(worker, np.zeros(2)) + t
            # the busiest worker's read + write time: the baseline's wall on these workers
            raw, raw_few = np.max(list(per_worker.values()), axis=0)
            for key, value in (
                ("seconds", seconds),
                ("sample_s", t_sample),
                ("locate_s", t_locate),
                ("advance_s", t_advance),
                ("commit_s", t_commit),
                ("raw_s", raw),
                ("raw_few_s", raw_few),
                ("plan_s", t_plan),
                ("plan_raw_s", max(plan_raw.values())),
            ):
                best[key] = min(best.get(key, value), value)
        workers = client.run(peak_rss_mb)
    return {
        **best,
        "repeat": repeat,
        "flow_peak_mb": peak_mb(),
        "flow_imported_mb": imported,
        "worker_peak_mb": sorted(workers.values()),
        "counts": counts,
        "score_tasks": sum(len(t) for t in tasks),
        "pool_mb": pool_bytes / 1e6,
    }


def main_partitioned(rows: int, n_partitions: int, repeat: int) -> int:
    root = tempfile.mkdtemp(prefix="bench-manifest-parts-")
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--phase",
            "partitioned",
            "--root",
            root,
            "--rows",
            str(rows),
            "--partitions",
            str(n_partitions),
            "--repeat",
            str(repeat),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(root, ignore_errors=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    c = r["counts"]
    print(f"manifest iteration in {n_partitions} parts at {rows:,} rows, 2-worker LocalCluster, best of {repeat}")
    print("| work | seconds | flow process peak MB | worker peaks MB |")
    print("|---|---|---|---|")
    workers = " / ".join(f"{w:,.0f}" for w in r["worker_peak_mb"])
    print(f"| raw pyarrow read (previous part, scores) + write, a task per part | {r['raw_s']:.2f} | - | {workers} |")
    print(f"| the same, written with the parts' dictionary choice | {r['raw_few_s']:.2f} | - | {workers} |")
    print(
        f"| sample (stored draw) + advance parts (+ next draw) + commit | {r['seconds']:.2f}"
        f" (sample {r['sample_s']:.2f}, locate {r['locate_s']:.2f}, advance {r['advance_s']:.2f},"
        f" store + commit {r['commit_s']:.2f}) |"
        f" {r['flow_peak_mb']:,.0f} | {workers} |"
    )
    print(
        f"| scoring plan: each range's candidates and uris ({r['score_tasks']:,} scoring tasks; pool file"
        f" {r['pool_mb']:,.0f} MB) | {r['plan_s']:.2f} (raw read + write {r['plan_raw_s']:.2f}) | | |"
    )
    print(
        f"ratio iteration / raw I/O: {r['seconds'] / r['raw_s']:.2f}x (goal <= 1.5x), against raw I/O with the"
        f" parts' dictionary choice {r['seconds'] / r['raw_few_s']:.2f}x; scoring plan / raw I/O:"
        f" {r['plan_s'] / r['plan_raw_s']:.2f}x; flow process peak"
        f" {r['flow_peak_mb']:,.0f} MB (goal <= 1,024 at 100M rows), {r['flow_imported_mb']:,.0f} MB of it"
        f" after importing the cascade (torch), {r['flow_peak_mb'] - r['flow_imported_mb']:,.0f} MB the iteration's"
    )
    print(
        f"after the iteration: {c['human']:,} labeled by people, {c['model_positive']:,} positives and"
        f" {c['model_negative']:,} negatives decided, {c['unlabeled']:,} open"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--partitions", type=int, help="the manifest in this many parts, on a 2-worker LocalCluster")
    ap.add_argument("--phase", choices=["iteration", "raw", "partitioned"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase == "partitioned":
        print(json.dumps(phase_partitioned(args.root, args.rows, args.partitions, args.repeat), default=float))
        return 0
    if args.partitions:
        return main_partitioned(args.rows, args.partitions, args.repeat)
    if args.phase:
        print(json.dumps((phase_iteration if args.phase == "iteration" else phase_raw)(args.root)))
        return 0

    root = tempfile.mkdtemp(prefix="bench-manifest-")
    start = time.perf_counter()
    write_manifest(Storage(root), CATEGORY, 0, CascadeState.initial(synthetic_ids(args.rows)))
    size = Path(the_part(Storage(root), 0)).stat().st_size
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
