"""A small real cascade for tests: ``python tests/small_cascade.py ROOT CATEGORY [CATEGORY...] [--key=value...]``
runs the flow of each category over the pool under ROOT with a simulated crowd answering its label requests,
and prints ``SUMMARY <category> <summary>`` for each. ``--key=value`` overrides a CascadeParams field (e.g.
``--target_precision=0.9``; ``--epochs=5`` the model's). Runs as its own process (tests kill it on purpose)."""

import dataclasses
import sys

from flows.runner import run_cascade, simulated_crowd
from lsun_hitl.config import CascadeParams, ModelParams
from lsun_hitl.crowd import CrowdParams, SimulatedCrowd
from lsun_hitl.storage import Storage
from lsun_hitl.truth import read_truth

PARAMS = CascadeParams(
    train_sample=300,
    calibration_sample=400,
    first_calibration_sample=400,
    max_sample_fraction=0.3,
    target_false_omission=0.02,
    max_iterations=2,
    large_remainder="people",  # the remainder goes to people without asking an operator
    allow_small_pool=True,  # a pool of a few thousand images: the plan would refuse the run
    stop_unlabeled=100,
    label_poll_s=1,
    label_timeout_s=600,
    score_partition=200,
    score_batch=100,
    dask_workers=1,
    model=ModelParams(image_size=32, epochs=3, batch_size=64),
)


def run(storage: Storage, category: str, params: CascadeParams = PARAMS) -> dict:
    crowd = SimulatedCrowd(read_truth(storage, category), CrowdParams(seed=3))
    with simulated_crowd(storage, category, crowd):
        return run_cascade(category, storage.url, params=params)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    overrides = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    model = dataclasses.replace(PARAMS.model, **{k: int(overrides.pop(k)) for k in ("epochs",) if k in overrides})
    params = dataclasses.replace(PARAMS, model=model, **{k: type(getattr(PARAMS, k))(v) for k, v in overrides.items()})
    storage = Storage(args[0])
    for category in args[1:]:
        print("SUMMARY", category, run(storage, category, params), flush=True)


if __name__ == "__main__":  # Dask starts its worker processes by spawning this module again
    main()
