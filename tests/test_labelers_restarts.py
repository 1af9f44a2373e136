"""Labelers under load and restarts, CI-sized (issue 28): ``benchmarks/labelers_restarts.py`` with 40 labelers for
45 s while ``lsun-hitl serve`` is SIGKILLed and restarted every 12 s. Every submission answered 200 is stored once,
whole, with the answers sent; nothing is stored twice; the live counts equal storage's. The full-size run (200
labelers, 10 minutes, a restart a minute) is in docs/benchmarks/README.md."""

import json

from benchmarks import labelers_restarts


def test_labelers_through_sigkilled_restarts_lose_and_double_count_nothing(tmp_path):
    out = tmp_path / "result.json"
    status = labelers_restarts.main(
        ["--labelers", "40", "--seconds", "45", "--restart-every", "12", "--think-ms", "250", "--ramp-s", "3",
         "--request-size", "1000", "--work", str(tmp_path / "work"), "--out", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert status == 0, result["failed"]
    assert len(result["restarts"]) >= 2
    votes = result["audit"]["votes"]
    assert votes["answers_accepted"] > 0 and votes["answers_stored"] == votes["answers_accepted"]
    assert votes["lost_batches"] == votes["short_batches"] == votes["counted_twice"] == 0
    assert result["audit"]["answers_altered"] == 0 and result["audit"]["accepted_twice_as_stored"] == 0
    assert result["audit"]["live_counts_differ_from_storage"] == []
    # calls were cut by the kills and retried through them: the audit saw resubmissions, not a quiet run
    assert sum(r["retries"] for r in result["calls"]) > 0
