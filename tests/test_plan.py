"""A plan before people are paid: what iteration 1 asks of people, whether it can decide anything, and a small
pool refused with samples that fit (``lsun_hitl.plan``, printed by ``lsun-hitl run``)."""

from __future__ import annotations

import re

import pytest

from cli import main as cli
from lsun_hitl.config import CascadeParams, ConfigError, validate
from lsun_hitl.fashion_mnist import import_fashion_mnist
from lsun_hitl.ingest import build_pool
from lsun_hitl.plan import SMALL_POOL_SHARE, check, plan
from lsun_hitl.storage import Storage


def test_plan_of_a_large_pool_runs():
    p = plan("bag", 70_000, CascadeParams())
    assert (p.train, p.calibration, p.first_ask) == (2500, 3000, 5500)
    assert p.need_negatives == 368 and p.need_positives == 72  # 1% and 5% at 97.5% with no error
    assert p.negatives_expected and p.positives_expected is None and not p.small
    assert p.min_base_rate == pytest.approx(0.048)
    check(p, CascadeParams())  # no error
    assert "iteration 1 asks people to label 5,500 (7.9%)" in str(p)
    assert "if the category is >= 4.8% of the pool (base rate: unknown)" in str(p)


def test_small_pool_is_refused_with_samples_that_fit():
    """The issue's case: 6,300 images, a category at ~5%: the defaults would send half the pool to people."""
    d = CascadeParams()
    p = plan("bag", 6_300, d, 0.05, "your estimate")
    assert p.first_ask == 3_150 and p.small and p.positives_expected is False
    with pytest.raises(ConfigError) as refused:
        check(p, d)
    message = str(refused.value)
    assert "would ask people to label 3,150 of its 6,300 images (50.0%)" in message
    assert "--allow-small-pool" in message
    flags = dict(re.findall(r"--([a-z-]+) (\d+)", message))
    smaller = CascadeParams(
        train_sample=int(flags["train-sample"]),
        first_calibration_sample=int(flags["first-calibration-sample"]),
        calibration_sample=int(flags["calibration-sample"]),
        max_iterations=int(flags.get("max-iterations", d.max_iterations)),
    )
    validate("bag", smaller)  # the suggestion is a valid run ...
    fits = plan("bag", 6_300, smaller, 0.05, "your estimate")
    assert fits.share <= SMALL_POOL_SHARE and fits.negatives_expected and not fits.small  # ... that fits the pool
    check(fits, smaller)
    check(p, d, allow_small_pool=True)  # asked for: runs anyway


def test_tiny_pool_says_label_it_by_hand():
    with pytest.raises(ConfigError, match=r"Label it by hand .* or pass --allow-small-pool"):
        check(plan("bag", 1_000, CascadeParams()), CascadeParams())


def test_run_prints_nothing_and_writes_nothing_for_a_small_pool(tmp_path, dask_cluster, capsys):
    storage = Storage(str(tmp_path / "root"))
    build_pool(storage, import_fashion_mnist(storage, limit=400, seed=2), client=dask_cluster)
    code = cli(["run", "--root", storage.url, "--category", "bag", "--expected-base-rate", "0.1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1  # one message, no traceback
    assert "too small for these settings to save labels" in err and "Label it by hand" in err
    assert not storage.exists(storage.path("manifests/bag"))


def test_summary_says_which_target_its_estimates_miss_and_the_fix():
    from lsun_hitl.cascade import target_warnings

    p = CascadeParams()
    assert target_warnings(0.97, 0.004, 0.1, p) == ()
    (precision,) = target_warnings(0.883, 0.004, 0.5, p)
    assert "estimated precision 0.883 is below the target 0.95" in precision and "--labels-per-image" in precision
    both = target_warnings(0.9, 0.0113, 0.5, p)
    assert len(both) == 2 and "estimated false omission 0.0113 is above the target 0.01" in both[1]
    assert "lsun-hitl gold" in both[1] and "(50% here)" in both[1]
