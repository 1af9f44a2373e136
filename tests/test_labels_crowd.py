import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from lsun_hitl import labels
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd, deliver
from lsun_hitl.storage import Storage


def request(n=400, seed=0, base_rate=0.3):
    rng = np.random.default_rng(seed)
    uris = [f"mem://img/{i}.png" for i in range(n)]
    truth = dict(zip(uris, rng.random(n) < base_rate, strict=True))
    table = pa.table({"image_id": [f"id{i:05d}" for i in range(n)], "uri": uris})
    return table, truth


def test_crowd_asks_more_where_people_disagree():
    table, truth = request()
    crowd = SimulatedCrowd(truth, CrowdParams(seed=1, min_margin=3))
    votes = crowd.answer(table)
    per_image = votes.groupby("image_id").size()
    assert per_image.min() >= 3 and per_image.max() <= 7 and per_image.mean() > 3.1
    assert crowd.spammer.sum() == 3  # 10% of 30
    decisive = votes[votes.answer != "unsure"]
    for image_id, group in list(decisive.groupby("image_id"))[:50]:
        counts = group.answer.value_counts()
        margin = abs(counts.get("yes", 0) - counts.get("no", 0))
        assert margin >= 3 or len(votes[votes.image_id == image_id]) == 7


def test_dawid_skene_beats_a_single_labeler_with_spammers():
    table, truth = request(n=1500, seed=3, base_rate=0.15)
    crowd = SimulatedCrowd(truth, CrowdParams(seed=3, spammer_share=0.2, accuracy=0.85))
    votes = crowd.answer(table)
    votes["request_id"] = "r"
    votes["submitted_at"] = pd.Timestamp.now(tz="UTC")
    agg = labels.aggregate(pa.Table.from_pandas(votes))
    y = {
        i: truth[u] for i, u in zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist(), strict=True)
    }
    p = dict(zip(agg.column("image_id").to_pylist(), agg.column("p_positive").to_pylist(), strict=True))
    aggregated_acc = np.mean([(p[i] >= 0.5) == y[i] for i in y])
    single = votes[votes.answer != "unsure"]
    single_acc = np.mean([(a == "yes") == y[i] for i, a in zip(single.image_id, single.answer, strict=True)])
    # a plain majority over the same answers, for comparison
    maj = labels.aggregate(pa.Table.from_pandas(votes), method="majority")
    pm = dict(zip(maj.column("image_id").to_pylist(), maj.column("p_positive").to_pylist(), strict=True))
    majority_acc = np.mean([(pm[i] > 0.5) == y[i] for i in y])
    print(f"single {single_acc:.3f}, majority {majority_acc:.3f}, Dawid-Skene {aggregated_acc:.3f}")
    assert single_acc < 0.82
    assert aggregated_acc > 0.95 and aggregated_acc > single_acc + 0.15
    assert aggregated_acc >= majority_acc > single_acc


@pytest.fixture()
def published(tmp_path):
    storage = Storage(str(tmp_path))
    table, truth = request(n=50)
    labels.publish_request(storage, "cat", "iteration-1", 1, table, "run-1")
    return storage, table, truth


def test_submission_is_idempotent_and_append_only(published):
    storage, table, truth = published
    crowd = SimulatedCrowd(truth)
    assert deliver(storage, "cat", crowd, "iteration-1") is True
    n = labels.read_votes(storage, "cat").num_rows
    assert deliver(storage, "cat", crowd, "iteration-1") is False
    frame = pd.DataFrame({"image_id": ["id00000"], "labeler": ["alice"], "answer": ["Yes"]})
    assert labels.submit_votes(storage, "cat", "iteration-1", frame, "alice-1") is True
    assert labels.submit_votes(storage, "cat", "iteration-1", frame, "alice-1") is False
    assert labels.read_votes(storage, "cat").num_rows == n + 1
    agg = labels.collect(storage, "cat", "iteration-1")
    assert agg.num_rows == 50 and not np.isnan(agg.column("p_positive").to_numpy()).any()


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"image_id": ["id00000"], "answer": ["yes"]}), "missing column"),
        (pd.DataFrame({"image_id": ["id00000"], "labeler": ["a"], "answer": ["maybe"]}), "unknown answer"),
        (pd.DataFrame({"image_id": ["nope"], "labeler": ["a"], "answer": ["no"]}), "not in request"),
        (pd.DataFrame({"image_id": [], "labeler": [], "answer": []}), "no labels"),
    ],
    ids=["missing-column", "bad-answer", "unknown-image", "empty"],
)
def test_malformed_labels_are_refused_and_nothing_is_stored(published, frame, message):
    storage, _, _ = published
    with pytest.raises(labels.LabelError, match=message):
        labels.submit_votes(storage, "cat", "iteration-1", frame, "bad")
    assert labels.read_votes(storage, "cat").num_rows == 0


def test_incomplete_request_names_missing_images(published):
    storage, _, _ = published
    frame = pd.DataFrame({"image_id": ["id00001"], "labeler": ["a"], "answer": ["no"]})
    labels.submit_votes(storage, "cat", "iteration-1", frame, "partial")
    with pytest.raises(labels.LabelError, match="49 of 50 images have no yes/no answer"):
        labels.collect(storage, "cat", "iteration-1")


def test_a_recheck_is_complete_only_once_people_answered_it_again(published):
    """A recheck asks again about images people answered before: their earlier answers count in the posterior
    but do not make the recheck complete (the run would otherwise take it before anyone answered it)."""
    from lsun_hitl.cascade.people import labels_complete

    storage, table, truth = published
    crowd = SimulatedCrowd(truth)
    deliver(storage, "cat", crowd, "iteration-1")
    labels.publish_request(storage, "cat", "iteration-1-recheck", 1, table.slice(0, 10), "run-1")
    assert not labels_complete(storage, "cat", "iteration-1-recheck")
    with pytest.raises(labels.LabelError, match="10 of 10 images have no yes/no answer"):
        labels.collect(storage, "cat", "iteration-1-recheck")
    first = labels.collect(storage, "cat", "iteration-1")
    deliver(storage, "cat", crowd, "iteration-1-recheck")
    assert labels_complete(storage, "cat", "iteration-1-recheck")
    both = labels.collect(storage, "cat", "iteration-1-recheck")
    decisive = [t.column("n_yes").to_numpy() + t.column("n_no").to_numpy() for t in (both, first.slice(0, 10))]
    assert (decisive[0] > decisive[1]).all()  # the posterior counts both requests' answers


def test_a_resume_matches_only_its_own_requests_pause():
    from flows.waiting import labels_pause_key, pause_is_for, pause_is_for_remainder, remainder_pause_key

    assert pause_is_for(labels_pause_key("iteration-1", 2), "iteration-1")
    assert not pause_is_for("iteration-1-recheck-1", "iteration-1")
    assert pause_is_for("iteration-1-recheck-1", "iteration-1-recheck")
    assert not pause_is_for("audit-recheck-1", "audit") and pause_is_for("audit-1", "audit")
    assert not pause_is_for("iteration-12-1", "iteration-1")
    assert pause_is_for_remainder(remainder_pause_key(3)) and not pause_is_for_remainder("iteration-1-1")
    # no labels wait shares a key with the decision's (Prefect would hand it the stored decision)
    from lsun_hitl.cascade import AUDIT, REMAINDER, recheck_id_for, request_id_for

    requests = [request_id_for(1), recheck_id_for(request_id_for(1)), REMAINDER, AUDIT, recheck_id_for(AUDIT)]
    for attempt in (1, 2):
        labels_keys = {labels_pause_key(r, attempt) for r in requests}
        assert len(labels_keys) == len(requests) and remainder_pause_key(attempt) not in labels_keys
        assert not any(pause_is_for_remainder(k) for k in labels_keys)
        assert pause_is_for(labels_pause_key(REMAINDER, attempt), REMAINDER)


def test_crowd_answers_do_not_depend_on_what_it_answered_before():
    """The evaluation's figures must reproduce: a request's answers are fixed by the crowd's seed, the
    request and the image, not by the order in which requests, rechecks and audits were answered."""
    table, truth = request(n=300, seed=4)
    first = SimulatedCrowd(truth, CrowdParams(seed=7)).answer(table, key="iteration-1")
    other = SimulatedCrowd(truth, CrowdParams(seed=7))
    other.answer(table.slice(0, 100), key="iteration-1-recheck")  # something else answered first
    again = other.answer(table.slice(100), key="iteration-1")  # and a part of the request, in another call
    pd.testing.assert_frame_equal(
        first[first.image_id.isin(table.column("image_id").to_pylist()[100:])].reset_index(drop=True), again
    )
    # the same images in another request (a recheck) get answers of their own; another seed is another crowd
    recheck = other.answer(table, key="iteration-1-recheck")
    assert not recheck.equals(first)
    assert not SimulatedCrowd(truth, CrowdParams(seed=8)).answer(table, key="iteration-1").equals(first)


def test_the_crowd_stops_notifying_a_run_that_has_ended(published):
    """A notice that fails is retried on a later poll; one whose run has ended (RunEnded) is logged once and
    dropped, so a serving crowd does not retry it for as long as it runs."""
    import threading
    import time

    from lsun_hitl.crowd import serve

    storage, table, truth = published
    labels.publish_request(storage, "cat", "iteration-2", 2, table, "run-2")
    calls: dict[str, int] = {}

    def on_delivered(request: labels.LabelRequest) -> None:
        calls[request.request_id] = calls.get(request.request_id, 0) + 1
        if request.request_id == "iteration-1":
            raise labels.RunEnded("flow run run-1 waiting for 'iteration-1' has ended (Completed)", "Completed")
        raise TimeoutError("flow run run-2 did not pause for 'iteration-2'")

    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(storage, "cat", SimulatedCrowd(truth), on_delivered, stop, 0.02))
    thread.start()
    time.sleep(1.0)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert calls["iteration-1"] == 1, calls
    assert calls["iteration-2"] >= 3, calls  # other failures are still retried
    for request_id in ("iteration-1", "iteration-2"):  # both were answered before their notices
        assert labels.read_votes(storage, "cat", request_id).num_rows >= table.num_rows


def test_resume_returns_at_once_when_the_run_took_the_labels(published, capsys):
    """Labels stored before the run reached its pause are taken without one: resuming then says so and
    returns at once (it used to wait 300 s for a pause that never came, then end in a traceback)."""
    from cli import main as cli
    from flows.runner import resume

    storage, _, truth = published
    deliver(storage, "cat", SimulatedCrowd(truth), "iteration-1")
    assert not labels.was_taken(storage, "cat", "iteration-1")
    labels.take(storage, "cat", "iteration-1")  # what the run's collect_labels step does
    assert labels.was_taken(storage, "cat", "iteration-1")
    got = resume(storage, "cat", "iteration-1", wait_s=0)  # no waiting: the record answers
    assert got.how == "taken" and got.run_id == "run-1"
    assert cli(["resume", "--root", storage.url, "--category", "cat", "--request", "iteration-1"]) == 0
    assert "already took these labels and went on; nothing to resume" in capsys.readouterr().out
