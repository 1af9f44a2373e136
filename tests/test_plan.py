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


def test_the_forecast_projects_the_run_at_the_last_model_s_rate_and_warns_with_the_fix():
    """After an iteration: people's labels so far, plus each later sample, plus the remainder, with the model
    deciding the same share of what it scores as the last did; a stall forecasts that people label the rest."""
    from lsun_hitl.plan import FORECAST_WARN_SHARE, forecast
    from lsun_hitl.split import Funnel

    params = CascadeParams(max_iterations=10, stop_unlabeled=1000)
    # 70,000 images; iteration 1 labeled 5,500 and decided 90% of the 64,500 it scored: 6,450 open
    f = forecast(
        pool=70_000,
        human=5_500,
        open_=6_450,
        scored=64_500,
        decided=58_050,
        iteration=1,
        next_sample=4_000,
        params=params,
    )
    # iteration 2 asks min(4,000, 25% of 6,450) = 1,612 and decides 90% of the other 4,838: 484 left for people
    assert f.decided_share == pytest.approx(0.9) and f.iterations == 1
    assert f.human == round(5_500 + 1_612 + (6_450 - 1_612) * 0.1)
    assert f.warning is None and "forecast: people will label ~7,596 images in all (10.9% of the pool)" in str(f)
    stalled = forecast(
        pool=6_000, human=1_118, open_=4_882, scored=5_700, decided=0, iteration=1, next_sample=1_400, params=params
    )
    assert stalled.human == 6_000 and stalled.share == 1.0
    assert stalled.warning.startswith("at this rate people will label ~100% of the pool: give the model known")
    assert "lsun-hitl seed-positives" in stalled.warning and "--weights" in stalled.warning
    # an unresolved remainder is no label; the iteration limit ends the projection
    unresolved = forecast(
        pool=6_000,
        human=1_118,
        open_=4_882,
        scored=5_700,
        decided=0,
        iteration=1,
        next_sample=1_400,
        params=CascadeParams(remainder="unresolved", max_iterations=2),
    )
    assert unresolved.human == 1_118 + 1_220 and unresolved.iterations == 1
    # the funnel the run prints carries the forecast, and its warning past the share
    funnel = Funnel(
        1,
        4_882,
        1_118,
        50,
        5_700,
        0,
        0,
        4_882,
        None,
        None,
        None,
        None,
        None,
        None,
        forecast_human=6_000,
        forecast_share=1.0,
        decided_share=0.0,
    )
    lines = str(funnel).splitlines()
    assert lines[1].strip().startswith("forecast: people will label ~6,000 images in all (100.0% of the pool)")
    assert lines[2].startswith("WARNING: at this rate") and FORECAST_WARN_SHARE == 0.5
