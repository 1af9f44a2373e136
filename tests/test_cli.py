import pytest

from cli import main
from lsun_hitl.config import CascadeParams, ConfigError, validate


def test_unknown_category_is_refused_before_any_work(tmp_path, capsys):
    assert main(["demo", "--root", str(tmp_path / "r"), "--category", "unicorn"]) == 2
    err = capsys.readouterr().err
    assert "unknown Fashion-MNIST category 'unicorn'" in err and "sneaker" in err
    assert not (tmp_path / "r").exists()


def test_impossible_targets_name_the_setting(tmp_path, capsys):
    assert main(["demo", "--root", str(tmp_path), "--target-precision", "1.5"]) == 2
    assert "target_precision" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, setting",
    [
        ({"calibration_sample": 100}, "calibration_sample"),
        ({"remainder": "maybe"}, "remainder"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"positive_start_errors": -1}, "positive_start_errors"),
        ({"start_share": 1.0}, "start_share"),
    ],
)
def test_validate_names_the_setting(change, setting):
    with pytest.raises(ConfigError, match=setting):
        validate("sneaker", CascadeParams(**change))


def test_a_later_iteration_that_could_never_certify_is_refused():
    # 500 calibration images pass at iteration 2 (437 needed at 98.75%) but not at iteration 3 (99.375%)
    validate("sneaker", CascadeParams(calibration_sample=500, max_iterations=2))
    with pytest.raises(ConfigError, match=r"calibration_sample = 500 .*iteration 3's.*lower max_iterations \(3\)"):
        validate("sneaker", CascadeParams(calibration_sample=500, max_iterations=3))
    validate("sneaker", CascadeParams())  # the defaults certify up to their last iteration


def test_a_budget_smaller_than_the_first_iteration_is_refused():
    with pytest.raises(ConfigError, match=r"human_budget = 5000 .*first_calibration_sample 3000 = 5500"):
        validate("sneaker", CascadeParams(human_budget=5000))
    validate("sneaker", CascadeParams(human_budget=5500))


def test_unreachable_dask_scheduler_is_a_clear_error():
    from lsun_hitl.cluster import ClusterError, dask_client

    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"), dask_client("tcp://127.0.0.1:9"):
        pass


def test_missing_pool_says_how_to_build_it(tmp_path, capsys):
    assert main(["run", "--root", str(tmp_path), "--category", "sneaker"]) == 2
    assert "lsun-hitl ingest" in capsys.readouterr().err
