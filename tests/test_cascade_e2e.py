"""End to end: the real flow, a real pause and resume through the Prefect API, a real Dask
LocalCluster, and storage on moto's S3 server through s3fs, on 3,000 Fashion-MNIST images."""

import numpy as np
import pytest
from prefect import get_client

from flows.runner import resume, run_cascade, simulated_crowd
from lsun_hitl.cascade import Audit, Summary
from lsun_hitl.config import CascadeParams, ModelParams
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd, deliver
from lsun_hitl.dataset_parts import read_dataset
from lsun_hitl.evaluation import evaluate
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool, read_pool
from lsun_hitl.labels import RunEnded, list_requests, publish_request, read_request, read_votes
from lsun_hitl.manifest import UNLABELED, manifest_iterations, read_manifest
from lsun_hitl.storage import Storage, calibration_key, calibration_set_key, dataset_key, sample_key
from lsun_hitl.truth import read_truth

CATEGORY = "trouser"
PARAMS = CascadeParams(
    train_sample=500,
    calibration_sample=600,
    first_calibration_sample=600,
    max_sample_fraction=0.3,
    target_false_omission=0.02,
    max_iterations=2,
    large_remainder="people",  # the remainder goes to people without asking an operator
    allow_small_pool=True,  # 3,000 images: the plan would refuse the run
    stop_unlabeled=200,
    label_poll_s=1,
    label_timeout_s=900,
    score_partition=400,
    score_batch=128,
    audit_sample=100,
    model=ModelParams(image_size=32, epochs=5, batch_size=64),
)


@pytest.fixture(scope="module")
def pool_on_s3(s3_server, dask_cluster):
    import s3fs

    s3fs.S3FileSystem(**s3_server, skip_instance_cache=True).mkdir("cascade")
    storage = Storage("s3://cascade/root", s3_server)
    prefix = import_fashion_mnist(storage, limit=3000, seed=1)
    report = build_pool(storage, prefix, client=dask_cluster)
    assert report.images == 3000
    return storage


def test_cascade_flow_pauses_resumes_and_writes_consistent_manifests(pool_on_s3, prefect_harness):
    storage = pool_on_s3
    crowd = SimulatedCrowd(read_truth(storage, CATEGORY), CrowdParams(seed=2))
    resumed: list[str] = []
    with simulated_crowd(storage, CATEGORY, crowd, on_resumed=resumed.append):
        summary = Summary(**run_cascade(CATEGORY, storage.url, params=PARAMS, storage_options=storage.options))

    # People were asked through published requests, and each resume went through the Prefect API.
    requests = list_requests(storage, CATEGORY)
    # (a small request, a recheck say, can be fully answered before the run reaches its pause: then the
    # run goes on without pausing and nothing needs resuming)
    assert len(requests) >= len(resumed) >= 2
    run_id = requests[0].flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        states = client.read_flow_run_states(run_id)
    assert run.state.is_completed()
    assert sum(s.is_paused() for s in states) == len(resumed)
    # A request the finished run took: resuming says so at once (the labeling desk takes it as final).
    taken = resume(storage, CATEGORY, requests[0].request_id, wait_s=5)
    assert taken.how == "taken" and taken.run_id == run_id

    # Every pool image appears exactly once in every manifest; decisions only ever move forward.
    pool_ids = read_pool(storage, columns=["image_id"]).column("image_id").to_pylist()
    iterations = manifest_iterations(storage, CATEGORY)
    assert iterations[0] == 0 and iterations == list(range(len(iterations))) and len(iterations) >= 2
    previous = None
    for k in iterations:
        state = read_manifest(storage, CATEGORY, k)
        ids = state.image_id.to_pylist()
        assert ids == pool_ids and len(set(ids)) == len(ids)
        counts = state.counts()
        assert sum(counts.values()) == len(pool_ids)
        decided = state.state != UNLABELED
        assert np.all(state.decided_iteration[decided] <= k) and np.all(state.decided_iteration[~decided] == -1)
        if previous is not None:
            was = previous.state != UNLABELED
            assert np.array_equal(state.state[was], previous.state[was]), f"a decision flipped at iteration {k}"
            assert np.array_equal(state.decided_by[was], previous.decided_by[was])
            assert np.all(state.decided_iteration[decided & ~was] == k)
        previous = state

    # The final dataset: every image once, all decided (the remainder went to people).
    dataset = read_dataset(storage, CATEGORY)
    assert dataset.num_rows == len(pool_ids) == summary.pool
    assert summary.positive + summary.negative + summary.unresolved == summary.pool
    assert summary.unresolved == 0 and summary.decided_by_model > 0
    assert summary.human_labeled_images + summary.decided_by_model == summary.pool
    audit_answers = sum(read_votes(storage, CATEGORY, r).num_rows for r in ("audit", "audit-recheck"))
    assert summary.human_answers == read_votes(storage, CATEGORY).num_rows - audit_answers
    assert summary.human_answers > summary.human_labeled_images * 3 - 1
    # the summary warns exactly where its estimates miss the run's targets
    misses = (
        (summary.estimated_precision or 1.0) < PARAMS.target_precision,
        (summary.estimated_false_omission or 0.0) > PARAMS.target_false_omission,
    )
    assert len(summary.warnings) == sum(misses) and summary.estimated_false_omission is not None

    # Calibration images were never trained on: no model's training set held one (their role says so),
    # and each later calibration set holds only earlier ones that stayed undecided.
    calibrated = [k for k in iterations if storage.exists(storage.path(calibration_set_key(CATEGORY, k)))]
    assert calibrated and calibrated[0] == 1
    for k in calibrated[1:]:
        cal = storage.read_table(storage.path(calibration_set_key(CATEGORY, k))).to_pandas()
        carried = cal[cal.from_iteration < k]
        before = storage.read_table(storage.path(calibration_set_key(CATEGORY, k - 1))).to_pandas()
        assert set(carried.image_id) <= set(before.image_id)

    # Rechecks: only calibration images of their iteration, whose label the model disputed, asked again;
    # their final posterior uses every answer (more answers than the first request alone gave).
    rechecks = [r for r in requests if r.request_id.startswith("iteration-") and r.request_id.endswith("-recheck")]
    for r in rechecks:
        k = r.iteration
        _, asked = read_request(storage, CATEGORY, r.request_id)
        sample = storage.read_table(storage.path(sample_key(CATEGORY, k))).to_pandas()
        calibration_ids = set(sample.image_id[sample.role == "calibration"])
        assert set(asked.column("image_id").to_pylist()) <= calibration_ids
        thresholds = storage.read_json(storage.path(calibration_key(CATEGORY, k)))
        assert thresholds["n_rechecked"] == asked.num_rows > 0
        first = read_votes(storage, CATEGORY, f"iteration-{k}").to_pandas()
        again = read_votes(storage, CATEGORY, r.request_id).to_pandas()
        assert set(again.image_id) == set(asked.column("image_id").to_pylist())
        assert len(again) >= 3 * asked.num_rows and set(again.image_id) <= set(first.image_id)

    # The audit: people checked random samples of what the model decided; 95% intervals around the rates.
    audit = Audit(**storage.read_json(storage.path(dataset_key(CATEGORY, "audit.json"))))
    assert audit_answers >= 3 * (audit.positives_audited + audit.negatives_audited) > 0
    df = dataset.to_pandas()
    by_model = df.decided_by == "model"
    assert audit.positives_audited == min(100, int((by_model & (df.label == "positive")).sum()))
    assert audit.negatives_audited == min(100, int((by_model & (df.label == "negative")).sum()))
    if audit.precision is not None:
        assert audit.precision_low <= audit.precision <= audit.precision_high
    assert audit.false_omission_low <= audit.false_omission <= audit.false_omission_high
    assert "audit" in [r.request_id for r in requests]

    # Measured against ground truth (which the pipeline never read).
    result = evaluate(storage, CATEGORY)
    assert result.precision >= 0.9 and result.false_omission <= 0.03

    # a request of the finished run that it never took cannot resume it, and the error says so
    _, first_request = read_request(storage, CATEGORY, requests[0].request_id)
    publish_request(storage, CATEGORY, "never-taken", 1, first_request.slice(0, 5), run_id)
    deliver(storage, CATEGORY, crowd, "never-taken")
    with pytest.raises(RunEnded, match=r"has ended \(Completed\); start the cascade again") as ended:
        resume(storage, CATEGORY, "never-taken", wait_s=5)
    assert ended.value.state == "Completed"
