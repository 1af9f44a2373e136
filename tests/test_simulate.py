"""``lsun-hitl simulate`` on data nobody tuned for: scikit-learn's handwritten digits as a class-folder tree,
registered as the truth, the real cascade (Prefect's harness, a Dask LocalCluster) per seed with a simulated
crowd answering from it; its figures are checked against the truth, recomputed here."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.digits_tree import write_tree
from cli import main as cli
from lsun_hitl.dataset_parts import read_dataset
from lsun_hitl.ingest import build_pool, read_pool
from lsun_hitl.simulate import run_root
from lsun_hitl.storage import Storage
from lsun_hitl.truth import read_truth

SMALL = [
    "--allow-small-pool",
    "--train-sample",
    "200",
    "--first-calibration-sample",
    "400",
    "--calibration-sample",
    "400",
    "--max-iterations",
    "2",
    "--target-false-omission",
    "0.05",
    "--arch",
    "small_convnet",
    "--image-size",
    "32",
    "--epochs",
    "4",
    "--large-remainder",
    "people",
]


def test_simulate_digits_reports_effort_and_quality_against_the_truth_and_replays_other_targets(
    tmp_path, dask_cluster, prefect_harness, capsys
):
    images = tmp_path / "digits"
    assert write_tree(str(images)) == 1797
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, str(images), client=dask_cluster)
    assert cli(["truth", "--root", storage.url, "--folder", str(images), "--name", "digits"]) == 0
    assert "categories 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in capsys.readouterr().out
    address = dask_cluster.scheduler.address
    work = tmp_path / "sim"
    argv = ["simulate", "--root", storage.url, "--categories", "3", "--seeds", "0", "1", "--work", str(work)]
    assert cli([*argv, "--dask-address", address, *SMALL]) == 0
    out = capsys.readouterr().out
    rows = json.loads((work / "report" / "results.json").read_text())
    assert [(r["category"], r["seed"]) for r in rows] == [("3", 0), ("3", 1)]
    truth = read_truth(storage, "3")
    pool = read_pool(storage).num_rows
    for row in rows:
        c = row["cascade"]
        assert (
            row["pool"] == pool
            and 0 < c["human_labeled_images"] <= pool
            and c["human_answers"] >= c["human_labeled_images"]
        )
        # the reported quality is the dataset's against the truth
        run = Storage(str(work / f"seed={row['seed']}"))
        dataset = read_dataset(run, "3", columns=["uri", "label"])
        label = np.array(dataset.column("label").to_pylist())
        is3 = np.array([truth[u] for u in dataset.column("uri").to_pylist()])
        assert c["eval_precision"] == float(np.mean(is3[label == "positive"]))
        assert c["eval_false_omission"] == float(np.mean(is3[label == "negative"]))
        assert (work / "report" / f"3-seed{row['seed']}-funnel.png").stat().st_size > 1000
    line = next(x for x in out.splitlines() if x.startswith("| 3 | 2 |"))
    shares = [r["cascade"]["human_labeled_share"] for r in rows]
    assert f"{min(shares):.1%}" in line and f"{max(shares):.1%}" in line  # the range over the seeds
    assert "Mean share of the pool labeled by people" in out
    check_replay(Storage(str(work / "seed=0")), truth, capsys)


def check_replay(run: Storage, truth: dict[str, bool], capsys) -> None:
    """``replay`` of a finished simulation: its own settings give back the run's thresholds and decisions; other
    targets give other ones, in the direction they should; the CLI prints the table."""
    import dataclasses

    from lsun_hitl.cascade import funnels
    from lsun_hitl.config import CascadeParams
    from lsun_hitl.manifest import BY_MODEL, NEGATIVE, read_manifest
    from lsun_hitl.replay import replay

    own = CascadeParams(target_false_omission=0.05)  # SMALL's only threshold setting
    rows = replay(run, "3", own, truth)
    funnel = {f.iteration: f for f in funnels(run, "3")}
    assert rows and rows[0].iteration == 1
    final = read_manifest(run, "3", max(funnel))
    is3 = np.array([truth[u] for u in read_pool(run, columns=["uri"]).column("uri").to_pylist()])
    for r in rows:
        assert (r.new.positive, r.new.negative) == (r.run.positive, r.run.negative)
        assert (r.positive, r.negative) == (r.run_positive, r.run_negative)
        assert (r.run_positive, r.run_negative) == (
            funnel[r.iteration].model_positive,
            funnel[r.iteration].model_negative,
        )
        by_model = (final.decided_by == BY_MODEL) & (final.decided_iteration == r.iteration)
        if r.negative:
            assert r.false_omission == float(is3[by_model & (final.state == NEGATIVE)].mean())
    loose = replay(run, "3", dataclasses.replace(own, target_false_omission=0.3, target_precision=0.5), truth)[0]
    strict = replay(run, "3", dataclasses.replace(own, target_false_omission=0.001, target_precision=0.999), truth)[0]
    assert loose.negative >= rows[0].negative >= strict.negative and loose.negative > strict.negative
    assert loose.positive >= rows[0].positive >= strict.positive
    assert cli(["replay", "--root", run.url, "--category", "3", "--target-false-omission", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "target_false_omission=0.3" in out and f"| 1 | {rows[0].open:,} |" in out
    assert f"{loose.positive:,} / {loose.negative:,}" in out


def test_partial_truth_runs_on_the_covered_part(tmp_path, dask_cluster):
    images = tmp_path / "digits"
    write_tree(str(images), limit=120)
    data = Storage(str(tmp_path / "root"))
    build_pool(data, str(images), client=dask_cluster)
    uris = read_pool(data, columns=["uri"]).column("uri").to_pylist()
    part = run_root(tmp_path / "sim", data, 0, uris[:50], "7")
    assert read_pool(part, columns=["uri"]).column("uri").to_pylist() == uris[:50]
    assert not (tmp_path / "sim" / "seed=0-part=7" / "pool").is_symlink()  # its own pool: the covered part
    full = run_root(tmp_path / "sim", data, 0)
    assert (tmp_path / "sim" / "seed=0" / "pool").is_symlink() and read_pool(full).num_rows == len(uris)


def test_a_noisy_crowd_makes_the_summary_warn_in_the_cli_and_the_prefect_artifact(
    tmp_path, dask_cluster, prefect_harness, capsys
):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    images = tmp_path / "digits"
    write_tree(str(images), limit=900)
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, str(images), client=dask_cluster)
    assert cli(["truth", "--root", storage.url, "--folder", str(images), "--name", "digits"]) == 0
    work = tmp_path / "sim"
    noisy = ["--accuracy", "0.75", "--accuracy-spread", "0", "--answers-per-image", "3", "--labelers", "10"]
    argv = ["simulate", "--root", storage.url, "--categories", "3", "--seeds", "0", "--work", str(work), *noisy]
    small = list(SMALL)
    small[small.index("--max-iterations") + 1] = "1"  # one iteration: the rest goes to the noisy crowd
    assert cli([*argv, "--dask-address", dask_cluster.scheduler.address, *small]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads((work / "report" / "results.json").read_text())
    warnings = row["cascade"]["warnings"]
    # people decided most of the pool with 75%-right answers: the estimate misses the target and says so
    assert row["cascade"]["estimated_precision"] < 0.95
    assert warnings and "estimated precision" in warnings[0] and "--labels-per-image" in warnings[0]
    assert f"   warning: {warnings[0]}" in out
    with get_client(sync_client=True) as client:
        # (Prefect 3.8's sync client sends unset filters and offset as null, which its server refuses)
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["summary-3"])),
            flow_run_filter=FlowRunFilter(),
            task_run_filter=TaskRunFilter(),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
            offset=0,
        )  # the latest: this run's
    assert f"WARNING: {warnings[0]}" in artifact.data
