"""A human-label budget, end to end: the real flow (Prefect's harness, a Dask LocalCluster, the simulated
crowd) stops when the budget cannot buy another useful iteration, and what is left undecided goes to people
only if it fits in what the budget leaves: here it does not, so it stays out of both label sets."""

import dataclasses

import numpy as np

from flows.runner import run_cascade, simulated_crowd
from lsun_hitl.cascade import Summary
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd
from lsun_hitl.dataset_parts import read_dataset
from lsun_hitl.evaluation import evaluate
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool
from lsun_hitl.labels import list_requests
from lsun_hitl.manifest import UNLABELED, manifest_iterations, read_manifest
from lsun_hitl.storage import Storage, sample_key
from lsun_hitl.truth import read_truth

from .small_cascade import PARAMS

CATEGORY = "dress"
BUDGET = 1_100  # the first iteration takes 700 (300 to train, 400 to calibrate); 400 are left for a second


def test_a_budgeted_run_stops_within_it_and_leaves_the_rest_unresolved(tmp_path, dask_cluster, prefect_harness):
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=2000, seed=6), client=dask_cluster)
    params = dataclasses.replace(PARAMS, human_budget=BUDGET, remainder="people", max_iterations=4)
    crowd = SimulatedCrowd(read_truth(storage, CATEGORY), CrowdParams(seed=4))
    address = dask_cluster.scheduler.address
    with simulated_crowd(storage, CATEGORY, crowd):
        summary = Summary(**run_cascade(CATEGORY, storage.url, params=params, dask_address=address))

    # People labeled exactly the images the samples drew, never more than the budget: the remainder did not
    # fit in it, so nobody was asked to finish it.
    iterations = [k for k in manifest_iterations(storage, CATEGORY) if k > 0]
    drawn = sum(storage.read_table(storage.path(sample_key(CATEGORY, k))).num_rows for k in iterations)
    assert summary.human_labeled_images == drawn <= BUDGET
    assert not any(r.request_id == "remainder" for r in list_requests(storage, CATEGORY))
    # The second iteration lives on what the first left: its sample is the 400 labels left, not 700.
    assert len(iterations) >= 2
    second = storage.read_table(storage.path(sample_key(CATEGORY, 2))).num_rows
    assert second == BUDGET - 700
    assert "budget" in summary.stop_reason

    # What no model decided and nobody labeled is unresolved in the dataset, the manifest's unlabeled rows.
    last = read_manifest(storage, CATEGORY, iterations[-1])
    left = int(np.sum(last.state == UNLABELED))
    assert summary.unresolved == left > 0
    assert summary.positive + summary.negative + summary.unresolved == summary.pool == 2000
    labels = read_dataset(storage, CATEGORY, columns=["label"]).column("label")
    assert labels.to_pylist().count("unresolved") == left
    ev = evaluate(storage, CATEGORY)
    assert ev.unresolved == left and 0 < ev.recall < 1  # positives among the unresolved are not found
