"""Chaos over a whole run, CI-sized (issue 28): ``benchmarks/chaos.py`` with a few kills.

The driver runs one category's cascade from the command line (Prefect server, Dask scheduler and workers,
the labeling service, simulated people through it, ``lsun-hitl run``), SIGKILLs the flow process, a Dask
worker, the labeling service and the Prefect server at random moments and restarts each; then replays the
run's stored answers over a copy of the pool uninterrupted and audits the root. The full-size run (20+
kills, every step of the loop hit) is in docs/benchmarks/chaos.md.
"""

import json

from benchmarks import chaos


def test_a_run_killed_on_every_part_finishes_with_the_uninterrupted_run_s_results(tmp_path):
    out = tmp_path / "chaos.json"
    status = chaos.main(
        ["--kills", "5", "--min-kills", "5", "--limit", "1000", "--mean-gap", "6", "--seed", "1", "--iterations", "2",
         "--step-pause", "0.5", "--work", str(tmp_path / "work"), "--out", str(out), "--timeout", "1500"]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert status == 0, result["failed"]
    assert len(result["kills"]) == 5
    assert {k["target"].removesuffix("-2") for k in result["kills"]} == set(chaos.TARGETS)
    assert result["replay"]["finished"] and result["replay"]["differ"] == []
    votes = result["audit"]["votes"]
    assert votes["answers_accepted"] > 0 and votes["answers_stored"] == votes["answers_accepted"]
    assert votes["lost_batches"] == 0 and votes["counted_twice"] == 0
    assert result["audit"]["temporary_files"] == [] and result["audit"]["asked_twice"] == []
