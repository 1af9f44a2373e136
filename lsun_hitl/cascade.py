"""The steps of the per-category cascade (the paper's loop), each a plain function over the storage.

Every step reads what earlier steps wrote and writes its own output at a fixed place in the layout;
a step whose output already exists returns it instead of redoing the work, so a run that crashed or
was restarted goes on from the last completed step, and nothing is sent to people twice.

    start        -> iteration-0 manifest (everything unlabeled)
    sample       -> samples/<c>/iteration=k        (train + calibration images for people)
    publish      -> labels/<c>/requests/iteration-k (people are asked)
    collect      -> labels/<c>/aggregated/...       (answers aggregated with Dawid-Skene)
    train        -> models/<c>/iteration=k
    score        -> scores/<c>/iteration=k          (every still-unlabeled image, on Dask)
    recheck      -> labels/<c>/requests/iteration-k-recheck (calibration images whose label the model
                                                     disputes go back to people for more answers)
    calibrate    -> calibration/<c>/iteration=k     (thresholds from held-out labels; the calibration
                                                     set, carried over while it stays undecided)
    split        -> manifests/<c>/iteration=k       (positive / negative / unlabeled)
    finish       -> datasets/<c>/dataset.parquet, summary.json
    audit        -> datasets/<c>/audit.json         (people check a random sample of each model split;
                                                     answers the model disputes are rechecked too)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import labels as labels_lib
from . import model as model_lib
from . import report
from .calibration import Interval, Thresholds, choose_thresholds, rate_interval, zero_error_size
from .cluster import dask_client
from .config import CascadeParams, ModelParams, validate
from .ingest import read_pool
from .inputs import InputCache
from .manifest import (
    BY_HUMAN,
    BY_MODEL,
    NEGATIVE,
    POSITIVE,
    ROLE_CALIBRATION,
    ROLE_REMAINDER,
    ROLE_TRAIN,
    UNLABELED,
    CascadeState,
    check_transition,
    manifest_iterations,
    read_manifest,
    write_manifest,
)
from .plan import Plan, plan
from .plan import check as check_plan
from .pretrain import POOL_WEIGHTS, pretrain_on_pool, pretrained_weights
from .progress import Progress
from .sampling import Sample, draw_sample
from .scoring import read_pool_images, score_candidates
from .split import (
    Funnel,
    apply_human_labels,
    apply_thresholds,
    remainder_to_people,
    stalled,
    stop_reason,
    train_size,
)
from .storage import (
    Storage,
    aggregated_key,
    calibration_key,
    calibration_set_key,
    dataset_key,
    decision_key,
    manifest_key,
    model_key,
    pretrained_key,
    report_key,
    request_key,
    sample_key,
)

REMAINDER = "remainder"
AUDIT = "audit"

log = logging.getLogger(__name__)


def request_id_for(iteration: int) -> str:
    return f"iteration-{iteration}"


def recheck_id_for(request_id: str) -> str:
    """The request that asks people again about some images of ``request_id``."""
    return f"{request_id}-recheck"


# ---- start ----------------------------------------------------------------------------------------
def preflight(
    storage: Storage,
    category: str,
    params: CascadeParams,
    dask_address: str | None = None,
    need_pool: bool = True,
    base_rate: float | None = None,
) -> Plan | None:
    """Check everything a run needs before any work starts; raise an error naming the fix.

    Returns the first iteration's plan for a new cascade (None when it has started, or without ``need_pool``);
    a pool too small for the settings to save labels is refused unless ``params.allow_small_pool``.
    ``base_rate`` is the user's estimate of the category's share of the pool, for the plan (a gold set says
    little about it: gold is usually balanced on purpose).
    """
    validate(category, params)
    storage.check_writable()
    pool_size = read_pool(storage, columns=["image_id"]).num_rows if need_pool else None
    # Pretrained weights are first used after people labeled the first sample: check them now.
    for m in {m for m in (params.model, *params.model_schedule) if m.weights and m.weights != POOL_WEIGHTS}:
        model_lib.build(m, pretrained_weights(storage, m))  # missing file or wrong architecture: a clear error
    if dask_address:
        with dask_client(dask_address):
            pass
    if pool_size is None or manifest_iterations(storage, category):
        return None
    first = plan(category, pool_size, params, base_rate)
    check_plan(first, params, params.allow_small_pool)
    return first


def start(storage: Storage, category: str, params: CascadeParams) -> int:
    """Validate the settings and the storage, write the iteration-0 manifest if missing.

    Returns the last iteration whose manifest exists (0 for a new cascade), so a restarted run
    continues after it.
    """
    preflight(storage, category, params, need_pool=False)
    done = manifest_iterations(storage, category)
    if not done:
        pool = read_pool(storage, columns=["image_id"])
        if pool.num_rows == 0:
            raise ValueError(f"the pool at {storage.url} is empty: ingest images first")
        first = plan(category, pool.num_rows, params)
        check_plan(first, params, params.allow_small_pool)
        log.info("%s", first)
        write_manifest(storage, category, 0, CascadeState.initial(pool.column("image_id").combine_chunks()))
        return 0
    return done[-1]


def _state(storage: Storage, category: str, iteration: int) -> CascadeState:
    return read_manifest(storage, category, iteration)


def pool_backbones(params: CascadeParams) -> list[ModelParams]:
    """The run's models that start from the pool's own backbone (``weights == "pool"``), one per arch and size."""
    models = {(m.arch, m.image_size): m for m in [params.model, *params.model_schedule] if m.weights == POOL_WEIGHTS}
    return list(models.values())


def backbones_missing(storage: Storage, params: CascadeParams) -> bool:
    """Whether one of the run's pool backbones is not stored yet (``pretrain`` would train)."""
    return any(not storage.exists(storage.path(pretrained_key(m.arch, m.image_size))) for m in pool_backbones(params))


def pretrain(storage: Storage, params: CascadeParams, progress: Progress | None = None) -> list[str]:
    """Pretrain, once per pool, every model of the run whose weights are ``"pool"``; return their paths."""
    return [pretrain_on_pool(storage, m, seed=params.seed, progress=progress) for m in pool_backbones(params)]


# ---- sample and ask people ---------------------------------------------------------------------------
def sample(storage: Storage, category: str, params: CascadeParams, iteration: int) -> Sample:
    """The images people label at ``iteration`` (drawn once; the stored draw is reused after)."""
    key = storage.path(sample_key(category, iteration))
    if storage.exists(key):
        table = storage.read_table(key)
        idx = table.column("row").to_numpy()
        role = table.column("role").to_numpy(zero_copy_only=False)
        return Sample(train=idx[role == "train"], calibration=idx[role == "calibration"])
    state = _state(storage, category, iteration - 1)
    spent = state.human_labeled()
    budget_left = None if params.human_budget is None else params.human_budget - spent
    drawn = draw_sample(
        state.unlabeled_index(),
        n_train=train_sample_size(storage, category, params, iteration),
        n_calibration=new_calibration_size(
            params, carried_calibration(storage, category, params, iteration).num_rows, iteration
        ),
        max_fraction=params.max_sample_fraction,
        seed=params.seed,
        iteration=iteration,
        budget_left=budget_left,
        category=category,
    )
    rows = np.concatenate([drawn.train, drawn.calibration])
    table = pa.table(
        {
            "row": pa.array(rows, pa.int64()),
            "image_id": pc.take(state.image_id, pa.array(rows)),
            "role": ["train"] * len(drawn.train) + ["calibration"] * len(drawn.calibration),
        }
    )
    storage.write_table(key, table)
    return drawn


def train_sample_size(storage: Storage, category: str, params: CascadeParams, iteration: int) -> int:
    """New training labels ``iteration`` asks for: more after iterations that stalled (``split.train_size``)."""
    stalls = stalled([f for f in funnels(storage, category) if f.iteration < iteration])
    return train_size(params.train_sample, params.train_growth, params.train_sample_max, stalls)


def new_calibration_size(params: CascadeParams, carried: int, iteration: int) -> int:
    """New calibration images ``iteration`` asks for, given ``carried`` ones still usable."""
    wanted = params.first_calibration_sample if iteration == 1 else params.calibration_sample
    if not params.carry_calibration:
        return wanted
    return max(params.calibration_min_new, wanted - carried)


def carried_calibration(storage: Storage, category: str, params: CascadeParams, iteration: int) -> pa.Table:
    """Calibration images of earlier iterations still in the undecided band after ``iteration - 1``.

    Each was drawn uniformly from what was unlabeled when it was drawn, and kept only while every
    later model left it between the thresholds, exactly as the images still unlabeled were; so they
    are a uniform sample of the undecided region and can calibrate the next model (which never
    trains on them). Columns: row, image_id, p_positive, from_iteration.
    """
    key = storage.path(calibration_set_key(category, iteration - 1))
    if not params.carry_calibration or iteration <= 1 or not storage.exists(key):
        return pa.table(
            {
                "row": pa.array([], pa.int64()),
                "image_id": pa.array([], pa.string()),
                "p_positive": pa.array([], pa.float32()),
                "from_iteration": pa.array([], pa.int32()),
            }
        )
    table = storage.read_table(key)
    th = thresholds_from_dict(storage.read_json(storage.path(calibration_key(category, iteration - 1))))
    s = table.column("score").to_numpy(zero_copy_only=False)
    keep = np.isfinite(s)
    if th.positive is not None:
        keep &= s < th.positive
    if th.negative is not None:
        keep &= s > th.negative
    return table.filter(pa.array(keep)).drop_columns(["score"])


def publish_iteration(
    storage: Storage, category: str, params: CascadeParams, iteration: int, flow_run_id: str | None = None
) -> labels_lib.LabelRequest:
    """Ask people to label the iteration's sample (train and calibration images, mixed)."""
    drawn = sample(storage, category, params, iteration)
    rows = np.concatenate([drawn.train, drawn.calibration])
    return publish(storage, category, request_id_for(iteration), iteration, rows, flow_run_id)


def publish_remainder(
    storage: Storage, category: str, params: CascadeParams, iteration: int, flow_run_id: str | None = None
) -> labels_lib.LabelRequest | None:
    """Ask people to label every image still unlabeled after ``iteration``; None if there is none, or if
    they do not fit in what ``params.human_budget`` leaves (they stay unresolved)."""
    state = _state(storage, category, iteration)
    rows = state.unlabeled_index()
    spent = state.human_labeled()
    if not remainder_to_people(len(rows), spent, params.human_budget):
        return None
    return publish(storage, category, REMAINDER, iteration + 1, rows, flow_run_id)


def remainder_decision(storage: Storage, category: str, params: CascadeParams, iteration: int) -> str:
    """Whether the images left after ``iteration`` go to people: "people", "unresolved", or "ask".

    None go to people with ``params.remainder == "unresolved"`` or when they do not fit in the human budget. A
    remainder up to ``params.large_remainder_share`` of the pool goes to people as ``params.remainder`` says.
    A larger one takes the decision an operator stored (``decide_remainder``), else ``params.large_remainder``:
    "ask" means the run should wait for that decision before anyone is asked to label so many images.
    """
    state = _state(storage, category, iteration)
    left = int(np.sum(state.state == UNLABELED))
    if params.remainder != "people" or not remainder_to_people(left, state.human_labeled(), params.human_budget):
        return "unresolved"  # by choice, or it does not fit in what the budget leaves: nobody is asked
    if left <= params.large_remainder_share * len(state):
        return "people"
    path = storage.path(decision_key(category, REMAINDER))
    stored = storage.read_json(path).get("decision") if storage.exists(path) else None
    return stored or params.large_remainder


def ask_remainder(storage: Storage, category: str, iteration: int, flow_run_id: str | None, why: str) -> dict:
    """Record that the run waits for a decision on the remainder after ``iteration``; return the question."""
    state = _state(storage, category, iteration)
    left = int(np.sum(state.state == UNLABELED))
    path = storage.path(decision_key(category, REMAINDER))
    question = storage.read_json(path) if storage.exists(path) else {}
    question |= {
        "category": category,
        "iteration": iteration,
        "n_images": left,
        "pool": len(state),
        "human_labeled": state.human_labeled(),
        "stopped": why,
        "flow_run_id": flow_run_id,
        "decision": question.get("decision"),
    }
    storage.write_json(path, question)
    return question


def decide_remainder(storage: Storage, category: str, decision: str) -> dict:
    """Store an operator's decision on a large remainder ("people" or "unresolved"); return the question."""
    if decision not in ("people", "unresolved"):
        raise ValueError(f"decision {decision!r}: use 'people' (label the remainder) or 'unresolved' (leave it)")
    path = storage.path(decision_key(category, REMAINDER))
    if not storage.exists(path):
        raise labels_lib.LabelError(
            f"no run of {category!r} waits for a decision on its remainder (nothing at {storage.url_of(path)})"
        )
    question = storage.read_json(path) | {"decision": decision}
    storage.write_json(path, question)
    return question


def publish(
    storage: Storage, category: str, request_id: str, iteration: int, rows: np.ndarray, flow_run_id: str | None
) -> labels_lib.LabelRequest:
    """Publish the images at pool ``rows`` to people as request ``request_id`` (shuffled order)."""
    pool = read_pool(storage, columns=["image_id", "uri"])
    order = np.random.default_rng([iteration, len(rows)]).permutation(len(rows))
    images = pool.take(pa.array(np.asarray(rows)[order], pa.int64()))
    return labels_lib.publish_request(storage, category, request_id, iteration, images, flow_run_id)


def labels_complete(storage: Storage, category: str, request_id: str) -> bool:
    """True when every image of the request has at least one yes/no answer stored."""
    try:
        labels_lib.collect(storage, category, request_id)
        return True
    except labels_lib.LabelError:
        return False


def _aggregated(storage: Storage, category: str, request_id: str) -> dict[str, float]:
    key = storage.path(aggregated_key(category, request_id))
    table = storage.read_table(key) if storage.exists(key) else labels_lib.collect(storage, category, request_id)
    return dict(zip(table.column("image_id").to_pylist(), table.column("p_positive").to_pylist(), strict=True))


def _p_for(storage: Storage, category: str, request_id: str, state: CascadeState, rows: np.ndarray) -> np.ndarray:
    agg = _aggregated(storage, category, request_id)
    ids = pc.take(state.image_id, pa.array(rows, pa.int64())).to_pylist()
    return np.array([agg[i] for i in ids], np.float32)


def recheck_size(storage: Storage, category: str, request_id: str) -> int:
    """Images people were asked about again for ``request_id`` (0 when nothing was rechecked)."""
    path = storage.path(request_key(category, recheck_id_for(request_id), "json"))
    return int(storage.read_json(path)["n_images"]) if storage.exists(path) else 0


def _p_checked(storage: Storage, category: str, request_id: str, state: CascadeState, rows: np.ndarray) -> np.ndarray:
    """``_p_for``, with the posteriors of rechecked images (every answer to them, both requests) in place."""
    p = _p_for(storage, category, request_id, state, rows)
    if len(rows) and recheck_size(storage, category, request_id):
        agg = _aggregated(storage, category, recheck_id_for(request_id))
        ids = pc.take(state.image_id, pa.array(rows, pa.int64())).to_pylist()
        p = np.array([agg.get(i, v) for i, v in zip(ids, p.tolist(), strict=True)], np.float32)
    return p


def disputed(p_positive: np.ndarray, model_positive: np.ndarray, *, unsure: float = 0.15) -> np.ndarray:
    """Images whose aggregated human label should be asked again before it is counted as truth.

    Parameters
    ----------
    p_positive : array of float, shape (n,)
        Aggregated human posterior that each image is a positive.
    model_positive : array of bool, shape (n,)
        The model's side for each image (score >= 0.5, or the split the model put it in).
    unsure : float
        Posteriors in ``(unsure, 1 - unsure)`` are disputed whatever the model says (split answers;
        one answer alone, 0.9 under the majority rule, is not).

    Returns
    -------
    array of bool, shape (n,)
        True where people and the model disagree, or people's answers leave the label unsure.

    Why: the errors that set thresholds (and that an audit counts) are exactly the images where people
    and the model disagree, and with ~99.5%-right crowd labels most of those are the crowd's mistakes,
    not the model's. A second round of answers on them alone (a few percent of the calibration set)
    removes that noise floor; images where people and the model agree are not asked again, so no
    error can be hidden by the recheck that was not already hidden without it.
    """
    p = np.asarray(p_positive, np.float64)
    return ((p >= 0.5) != np.asarray(model_positive, bool)) | ((p > unsure) & (p < 1 - unsure))


# ---- train ---------------------------------------------------------------------------------------------
def train(
    storage: Storage, category: str, params: CascadeParams, iteration: int, progress: Progress | None = None
) -> str:
    """Train on every human label so far except this iteration's calibration sample; return the model path."""
    path = storage.path(model_key(category, iteration))
    if storage.exists(path):
        return path
    state = _state(storage, category, iteration - 1)
    drawn = sample(storage, category, params, iteration)
    human = state.decided_by == BY_HUMAN
    if params.carry_calibration:  # calibration images stay held out for good
        human &= state.human_role != ROLE_CALIBRATION
    earlier = np.flatnonzero(human)
    rows = np.concatenate([earlier, drawn.train])
    targets = np.concatenate(
        [state.p_positive[earlier], _p_for(storage, category, request_id_for(iteration), state, drawn.train)]
    )
    model_params = params.model_for(iteration)
    images, ok = read_pool_images(storage, rows, model_params.image_size, input_cache(storage, params, iteration))
    net = model_lib.train(
        images[ok],
        targets[ok],
        model_params,
        seed=params.seed + iteration,
        progress=progress,
        pretrained=pretrained_weights(storage, model_params),
    )
    storage.write_bytes(path, model_lib.save(net))
    return path


# ---- score ---------------------------------------------------------------------------------------------
def candidates(state: CascadeState, drawn: Sample) -> np.ndarray:
    """Pool rows the model scores at this iteration: unlabeled ones not in its training sample."""
    mask = state.state == UNLABELED
    mask[drawn.train] = False
    return np.flatnonzero(mask)


def score(
    storage: Storage,
    category: str,
    params: CascadeParams,
    iteration: int,
    *,
    dask_address: str | None = None,
    progress: Progress | None = None,
) -> int:
    """Score every candidate of ``iteration`` on Dask; return how many were scored."""
    state = _state(storage, category, iteration - 1)
    rows = candidates(state, sample(storage, category, params, iteration))
    pool = read_pool(storage, columns=["image_id", "uri"])
    todo = pool.take(pa.array(rows, pa.int64()))
    cache = input_cache(storage, params, iteration, pool.column("image_id"))
    if cache is not None:  # every category's passes over the pool share one decode of it
        todo = todo.add_column(0, "row", pa.array(rows, pa.int64()))
    with dask_client(dask_address, n_workers=params.dask_workers) as client:
        scores = score_candidates(
            storage,
            category,
            iteration,
            todo,
            model_key_path(storage, category, iteration),
            client=client,
            partition_size=params.score_partition,
            batch_size=params.score_batch,
            progress=progress,
            pool=pool if cache is not None else None,
            cache=cache,
        )
    return int(pc.sum(pc.is_valid(scores.column("score"))).as_py() or 0)


def input_cache(
    storage: Storage, params: CascadeParams, iteration: int, image_ids: pa.ChunkedArray | None = None
) -> InputCache | None:
    """The pool's model-input cache at ``iteration``'s input size, or None when ``params.input_cache`` is off."""
    if not params.input_cache:
        return None
    if image_ids is None:
        image_ids = read_pool(storage, columns=["image_id"]).column("image_id")
    return InputCache.of_pool(storage, image_ids, params.model_for(iteration).image_size)


# ---- recheck -------------------------------------------------------------------------------------------
def recheck_rows(storage: Storage, category: str, params: CascadeParams, iteration: int) -> np.ndarray:
    """Calibration images of ``iteration`` whose label the freshly scored model disputes (``disputed``)."""
    drawn = sample(storage, category, params, iteration)
    if not params.recheck or len(drawn.calibration) == 0:
        return np.zeros(0, np.int64)
    state = _state(storage, category, iteration - 1)
    rows = candidates(state, drawn)
    s = _scores(storage, category, iteration, len(rows))[np.searchsorted(rows, drawn.calibration)]
    p = _p_for(storage, category, request_id_for(iteration), state, drawn.calibration)
    return drawn.calibration[np.isfinite(s) & disputed(p, s >= 0.5)]


def publish_recheck(
    storage: Storage, category: str, params: CascadeParams, iteration: int, flow_run_id: str | None = None
) -> labels_lib.LabelRequest | None:
    """Ask people again about the disputed calibration images; None when there are none (or recheck is off)."""
    rows = recheck_rows(storage, category, params, iteration)
    if len(rows) == 0:
        return None
    return publish(storage, category, recheck_id_for(request_id_for(iteration)), iteration, rows, flow_run_id)


def model_key_path(storage: Storage, category: str, iteration: int) -> str:
    return storage.path(model_key(category, iteration))


def _scores(storage: Storage, category: str, iteration: int, n: int) -> np.ndarray:
    from .storage import scores_dir

    paths = storage.glob(storage.path(scores_dir(category, iteration), "part-*.parquet"))
    table = pa.concat_tables([storage.read_table(p, columns=["score"]) for p in paths])
    if table.num_rows != n:
        raise RuntimeError(
            f"iteration {iteration}: {table.num_rows} scores for {n} candidates; run the score step again"
        )
    return table.column("score").to_numpy(zero_copy_only=False).astype(np.float32)


# ---- calibrate -----------------------------------------------------------------------------------------
def calibrate(storage: Storage, category: str, params: CascadeParams, iteration: int) -> Thresholds:
    """Thresholds from the calibration sample's human labels (never trained on) and its scores."""
    key = storage.path(calibration_key(category, iteration))
    if storage.exists(key):
        return thresholds_from_dict(storage.read_json(key))
    state = _state(storage, category, iteration - 1)
    drawn = sample(storage, category, params, iteration)
    rows = candidates(state, drawn)
    all_scores = _scores(storage, category, iteration, len(rows))
    new_scores = all_scores[np.searchsorted(rows, drawn.calibration)]
    new_p = _p_checked(storage, category, request_id_for(iteration), state, drawn.calibration)
    carried = carried_calibration(storage, category, params, iteration)
    carried_rows = carried.column("row").to_numpy()
    cal_scores = np.concatenate([new_scores, _score_rows(storage, category, iteration, carried_rows)])
    cal_p = np.concatenate([new_p, carried.column("p_positive").to_numpy(zero_copy_only=False)]).astype(np.float32)
    cal_rows = np.concatenate([drawn.calibration, carried_rows])
    storage.write_table(
        storage.path(calibration_set_key(category, iteration)),
        pa.table(
            {
                "row": pa.array(cal_rows, pa.int64()),
                "image_id": pc.take(state.image_id, pa.array(cal_rows, pa.int64())),
                "p_positive": pa.array(cal_p, pa.float32()),
                "from_iteration": pa.array(
                    np.concatenate(
                        [np.full(len(drawn.calibration), iteration), carried.column("from_iteration").to_numpy()]
                    ),
                    pa.int32(),
                ),
                "score": pa.array(cal_scores, pa.float32()),
            }
        ),
    )
    thresholds = choose_thresholds(
        cal_scores,
        cal_p,
        target_precision=params.target_precision,
        target_false_omission=params.target_false_omission,
        confidence=params.threshold_confidence(iteration),
        min_region=params.min_region,
        n_carried=len(carried_rows),
        scan=params.threshold_scan,
        start_share=params.start_share,
        positive_start_errors=params.positive_start_errors,
    )
    thresholds = replace(thresholds, n_rechecked=recheck_size(storage, category, request_id_for(iteration)))
    storage.write_json(key, thresholds.to_dict())
    png = report.score_histogram(category, iteration, all_scores, cal_scores, cal_p, thresholds)
    storage.write_bytes(storage.path(report_key(category, f"scores-iteration={iteration}.png")), png)
    return thresholds


def _score_rows(storage: Storage, category: str, iteration: int, rows: np.ndarray) -> np.ndarray:
    """Scores of pool ``rows`` by the iteration's model, in this process (a few thousand at most)."""
    out = np.full(len(rows), np.nan, np.float32)
    if len(rows) == 0:
        return out
    net = model_lib.load(storage.read_bytes(model_key_path(storage, category, iteration)))
    images, ok = read_pool_images(storage, rows, net.image_size)
    out[ok] = model_lib.predict(net, images[ok])
    return out


def thresholds_from_dict(d: dict) -> Thresholds:
    return Thresholds(
        **{
            **d,
            "precision": Interval(**d["precision"]) if d.get("precision") else None,
            "false_omission": Interval(**d["false_omission"]) if d.get("false_omission") else None,
        }
    )


# ---- split ---------------------------------------------------------------------------------------------
def split(storage: Storage, category: str, params: CascadeParams, iteration: int) -> Funnel:
    """Write the iteration's manifest: people's labels, then the model's decisions beyond the thresholds."""
    funnel_path = storage.path(report_key(category, f"funnel/iteration={iteration}.json"))
    if storage.exists(storage.path(manifest_key(category, iteration))) and storage.exists(funnel_path):
        return Funnel(**storage.read_json(funnel_path))
    before = _state(storage, category, iteration - 1)
    drawn = sample(storage, category, params, iteration)
    rows = candidates(before, drawn)
    scores = _scores(storage, category, iteration, len(rows))
    thresholds = calibrate(storage, category, params, iteration)
    rid = request_id_for(iteration)
    after = before.copy()
    apply_human_labels(after, drawn.train, _p_for(storage, category, rid, before, drawn.train), ROLE_TRAIN, iteration)
    apply_human_labels(
        after,
        drawn.calibration,
        _p_checked(storage, category, rid, before, drawn.calibration),
        ROLE_CALIBRATION,
        iteration,
    )
    model_pos, model_neg = apply_thresholds(after, rows, scores, thresholds, iteration)
    check_transition(before, after)
    human_rows = np.concatenate([drawn.train, drawn.calibration])
    funnel = Funnel(
        iteration=iteration,
        unlabeled_before=int(np.sum(before.state == UNLABELED)),
        human_labeled=len(human_rows),
        human_positive=int(np.sum(after.state[human_rows] == POSITIVE)),
        scored=int(np.isfinite(scores).sum()),
        model_positive=model_pos,
        model_negative=model_neg,
        unlabeled_after=int(np.sum(after.state == UNLABELED)),
        threshold_positive=thresholds.positive,
        threshold_negative=thresholds.negative,
        precision=thresholds.precision.estimate if thresholds.precision else None,
        precision_low=thresholds.precision.low if thresholds.precision else None,
        false_omission=thresholds.false_omission.estimate if thresholds.false_omission else None,
        false_omission_high=thresholds.false_omission.high if thresholds.false_omission else None,
    )
    write_manifest(storage, category, iteration, after)
    storage.write_json(funnel_path, funnel.to_dict())
    return funnel


def should_stop(storage: Storage, category: str, params: CascadeParams, iteration: int) -> str | None:
    state = _state(storage, category, iteration)
    unlabeled = int(np.sum(state.state == UNLABELED))
    spent = state.human_labeled()
    # "people finishing is cheaper than another round" holds only where people will finish
    people_finish = params.remainder == "people" and remainder_to_people(unlabeled, spent, params.human_budget)
    return stop_reason(
        unlabeled=unlabeled,
        pool=len(state),
        iteration=iteration,
        human_labeled=spent,
        max_iterations=params.max_iterations,
        stop_unlabeled=params.stop_unlabeled,
        stop_unlabeled_fraction=params.stop_unlabeled_fraction,
        human_budget=params.human_budget,
        next_sample=next_sample_size(storage, category, params, iteration)
        if params.stop_when_cheaper and people_finish
        else None,
        min_sample=zero_error_size(params.target_false_omission, params.threshold_confidence(iteration + 1)),
    )


def next_sample_size(storage: Storage, category: str, params: CascadeParams, iteration: int) -> int:
    """Images iteration ``iteration + 1`` would send to people (before the cap on its share)."""
    carried = carried_calibration(storage, category, params, iteration + 1).num_rows
    return train_sample_size(storage, category, params, iteration + 1) + new_calibration_size(
        params, carried, iteration + 1
    )


def funnels(storage: Storage, category: str) -> list[Funnel]:
    paths = storage.glob(storage.path(report_key(category, "funnel/iteration=*.json")))
    out = [Funnel(**storage.read_json(p)) for p in paths]
    return sorted(out, key=lambda f: f.iteration)


# ---- the remainder -----------------------------------------------------------------------------------
def finish_remainder(storage: Storage, category: str, iteration: int) -> Funnel:
    """Record people's labels for every image left unlabeled after ``iteration`` as iteration+1."""
    final_it = iteration + 1
    funnel_path = storage.path(report_key(category, f"funnel/iteration={final_it}.json"))
    if storage.exists(storage.path(manifest_key(category, final_it))) and storage.exists(funnel_path):
        return Funnel(**storage.read_json(funnel_path))
    before = _state(storage, category, iteration)
    rows = before.unlabeled_index()
    after = before.copy()
    p = _p_for(storage, category, REMAINDER, before, rows)
    apply_human_labels(after, rows, p, ROLE_REMAINDER, final_it)
    check_transition(before, after)
    funnel = Funnel(
        final_it,
        len(rows),
        len(rows),
        int(np.sum(p >= 0.5)),
        0,
        0,
        0,
        int(np.sum(after.state == UNLABELED)),
        None,
        None,
        None,
        None,
        None,
        None,
    )
    write_manifest(storage, category, final_it, after)
    storage.write_json(funnel_path, funnel.to_dict())
    return funnel


# ---- finish --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    category: str
    pool: int
    positive: int
    negative: int
    unresolved: int
    decided_by_model: int
    human_labeled_images: int
    human_labeled_share: float
    human_answers: int
    estimated_precision: float | None
    estimated_precision_low: float | None
    amplification: float
    iterations: int
    stop_reason: str | None
    # the negative set's estimated false omission: people's negatives by their posterior, the model's by each
    # iteration's calibration estimate (and its upper bound)
    estimated_false_omission: float | None = None
    estimated_false_omission_high: float | None = None
    # what the estimates miss of the run's targets, each with what would fix it (empty: both met)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        est = (
            "-"
            if self.estimated_precision is None
            else (f"{self.estimated_precision:.3f} (lower bound {self.estimated_precision_low:.3f})")
        )
        fo = (
            "-"
            if self.estimated_false_omission is None
            else f"{self.estimated_false_omission:.4f} (upper bound {self.estimated_false_omission_high:.4f})"
        )
        return (
            f"{self.category}: pool {self.pool:,}; positive {self.positive:,}, negative {self.negative:,}, "
            f"unresolved {self.unresolved:,}\n"
            f"  decided by the model: {self.decided_by_model:,}; labeled by people: {self.human_labeled_images:,} "
            f"images ({self.human_labeled_share:.1%} of the pool), {self.human_answers:,} answers\n"
            f"  estimated precision of the positive set: {est}; false omission of the negative set: {fo}\n"
            f"  amplification: {self.amplification:.1f} images decided per image people labeled; "
            f"{self.iterations} iteration(s); stopped: {self.stop_reason}"
            + "".join(f"\n  WARNING: {w}" for w in self.warnings)
        )


def positive_share(
    p_human: np.ndarray, model_parts: list[tuple[int, float, float]]
) -> tuple[float | None, float | None]:
    """Estimated share of true positives in a set, and its bound; (None, None) for an empty set.

    People's images count by their aggregated posterior ``p_human``; each iteration's model-decided part
    ``(count, estimate, bound)`` by its calibration estimate and bound, weighted by its count.
    """
    n = len(p_human) + sum(count for count, _, _ in model_parts)
    if not n:
        return None, None
    est = bound = float(np.nansum(p_human))
    for count, rate, rate_bound in model_parts:
        est, bound = est + count * rate, bound + count * rate_bound
    return est / n, bound / n


def target_warnings(
    precision: float | None, false_omission: float | None, human_share: float, params: CascadeParams
) -> tuple[str, ...]:
    """What the dataset's estimates miss of ``params``' targets, each with what would fix it."""
    out = []
    fix = (
        f"people's labels are the weak part when they decide much of it ({human_share:.0%} here): ask more answers "
        "per image (lsun-hitl serve --labels-per-image / --min-margin), give gold so poor labelers are flagged "
        "(lsun-hitl gold; handouts mix it in), and measure it with --audit-sample"
    )
    if precision is not None and precision < params.target_precision:
        out.append(f"estimated precision {precision:.3f} is below the target {params.target_precision}: {fix}")
    if false_omission is not None and false_omission > params.target_false_omission:
        out.append(
            f"estimated false omission {false_omission:.4f} is above the target {params.target_false_omission}: {fix}"
        )
    return tuple(out)


def finish(storage: Storage, category: str, stop: str | None = None, params: CascadeParams | None = None) -> Summary:
    """Write the dataset manifest (every pool image, final label, provenance) and the summary.

    With ``params``, the summary warns where the estimated precision or false omission misses its target."""
    last = manifest_iterations(storage, category)[-1]
    state = _state(storage, category, last)
    pool = read_pool(storage, columns=["image_id", "uri"])
    # dictionary-encoded straight from the state codes: no per-image strings, even for 100M images
    label = pa.DictionaryArray.from_arrays(
        pa.array(state.state, pa.int8()), pa.array(["unresolved", "positive", "negative"])
    )
    table = (
        pa.table(
            {
                "image_id": state.image_id,
                "uri": pool.column("uri"),
                "label": label,
            }
        )
        .append_column("decided_by", state.to_table().column("decided_by"))
        .append_column("decided_iteration", state.to_table().column("decided_iteration"))
        .append_column("score", pa.array(state.score, from_pandas=True))
        .append_column("p_positive", pa.array(state.p_positive, from_pandas=True))
    )
    storage.write_table(storage.path(dataset_key(category)), table)

    # The share of true positives in each set: the positive set's precision, the negative set's false omission.
    pos, neg, by_human = state.state == POSITIVE, state.state == NEGATIVE, state.decided_by == BY_HUMAN
    fs = funnels(storage, category)
    est, low = positive_share(
        state.p_positive[pos & by_human],
        [(f.model_positive, f.precision, f.precision_low or 0.0) for f in fs if f.precision is not None],
    )
    fo, fo_high = positive_share(
        state.p_positive[neg & by_human],
        [
            (f.model_negative, f.false_omission, f.false_omission_high or 1.0)
            for f in fs
            if f.false_omission is not None
        ],
    )
    human = state.human_labeled()
    decided = int(np.sum(state.state != UNLABELED))
    summary = Summary(
        category=category,
        pool=len(state),
        positive=int(pos.sum()),
        negative=int(np.sum(state.state == NEGATIVE)),
        unresolved=int(np.sum(state.state == UNLABELED)),
        decided_by_model=int(np.sum(state.decided_by == BY_MODEL)),
        human_labeled_images=human,
        human_labeled_share=human / max(1, len(state)),
        human_answers=labels_lib.human_votes_spent(storage, category),
        estimated_precision=est,
        estimated_precision_low=low,
        amplification=decided / max(1, human),
        iterations=last,
        stop_reason=stop,
        estimated_false_omission=fo,
        estimated_false_omission_high=fo_high,
    )
    if params is not None:
        summary = replace(
            summary,
            warnings=target_warnings(
                summary.estimated_precision,
                summary.estimated_false_omission,
                human / max(1, len(state)),
                params,
            ),
        )
    storage.write_json(storage.path(dataset_key(category, "summary.json")), summary.to_dict())
    fs = funnels(storage, category)
    if fs:
        storage.write_bytes(
            storage.path(report_key(category, "funnel.png")), report.funnel_plot(category, fs, len(state))
        )
        storage.write_bytes(
            storage.path(report_key(category, "funnel.md")), report.funnel_markdown(category, fs).encode()
        )
    return summary


# ---- audit ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Audit:
    """What people found in random samples of the model's final positive and negative sets.

    Intervals are two-sided Clopper-Pearson at ``confidence``, over the aggregated audit answers; the
    ``rechecked`` images people and the model disagreed on were asked again first (``disputed``), so
    the crowd's own mistakes do not read as the model's.
    ``dataset_precision`` estimates the whole positive set: people's positives by their posterior and
    the model's positives at the audited rate.
    """

    category: str
    confidence: float
    positives_audited: int
    positives_confirmed: int
    precision: float | None
    precision_low: float | None
    precision_high: float | None
    negatives_audited: int
    negatives_found_positive: int
    false_omission: float | None
    false_omission_low: float | None
    false_omission_high: float | None
    dataset_precision: float | None
    human_answers: int
    rechecked: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def rate(v: float | None, lo: float | None, hi: float | None) -> str:
            return "-" if v is None else f"{v:.4f} [{lo:.4f}, {hi:.4f}]"

        return (
            f"{self.category} audit ({self.confidence:.0%} intervals, {self.human_answers} answers): "
            f"model positives precision {rate(self.precision, self.precision_low, self.precision_high)} "
            f"({self.positives_confirmed}/{self.positives_audited} confirmed); model negatives false omission "
            f"{rate(self.false_omission, self.false_omission_low, self.false_omission_high)} "
            f"({self.negatives_found_positive}/{self.negatives_audited} positive; {self.rechecked} rechecked)"
        )


def audit_rows(storage: Storage, category: str, params: CascadeParams) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random samples (``params.audit_sample`` each) of the model's final positives and negatives."""
    state = _state(storage, category, manifest_iterations(storage, category)[-1])
    rng = np.random.default_rng([params.seed, 104729])
    by_model = state.decided_by == BY_MODEL

    def pick(mask: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(mask)
        return np.sort(rng.choice(rows, min(params.audit_sample, len(rows)), replace=False))

    return pick(by_model & (state.state == POSITIVE)), pick(by_model & (state.state == NEGATIVE))


def publish_audit(
    storage: Storage, category: str, params: CascadeParams, flow_run_id: str | None = None
) -> labels_lib.LabelRequest | None:
    """Send the audit samples to people (request ``audit``); None when the model decided nothing."""
    pos, neg = audit_rows(storage, category, params)
    rows = np.concatenate([pos, neg])
    if len(rows) == 0:
        return None
    return publish(storage, category, AUDIT, manifest_iterations(storage, category)[-1] + 1, rows, flow_run_id)


def publish_audit_recheck(
    storage: Storage, category: str, params: CascadeParams, flow_run_id: str | None = None
) -> labels_lib.LabelRequest | None:
    """Ask people again about audit images whose answer the model's split disputes; None if there are none."""
    last = manifest_iterations(storage, category)[-1]
    state = _state(storage, category, last)
    pos, neg = audit_rows(storage, category, params)
    rows = np.concatenate([pos, neg])
    if not params.recheck or len(rows) == 0:
        return None
    p = _p_for(storage, category, AUDIT, state, rows)
    rows = rows[disputed(p, np.arange(len(rows)) < len(pos))]
    if len(rows) == 0:
        return None
    return publish(storage, category, recheck_id_for(AUDIT), last + 1, rows, flow_run_id)


def audit(storage: Storage, category: str, params: CascadeParams) -> Audit:
    """Measure the delivered precision and false omission on the audit answers; write audit.json."""
    key = storage.path(dataset_key(category, "audit.json"))
    if storage.exists(key):
        return Audit(**storage.read_json(key))
    state = _state(storage, category, manifest_iterations(storage, category)[-1])
    pos, neg = audit_rows(storage, category, params)
    yes_pos = int(np.sum(_p_checked(storage, category, AUDIT, state, pos) >= 0.5)) if len(pos) else 0
    yes_neg = int(np.sum(_p_checked(storage, category, AUDIT, state, neg) >= 0.5)) if len(neg) else 0
    rechecked = recheck_size(storage, category, AUDIT)
    conf = params.confidence
    p_lo, p_hi = rate_interval(yes_pos, len(pos), conf) if len(pos) else (None, None)
    f_lo, f_hi = rate_interval(yes_neg, len(neg), conf) if len(neg) else (None, None)
    human_pos = (state.state == POSITIVE) & (state.decided_by == BY_HUMAN)
    model_pos = int(np.sum((state.state == POSITIVE) & (state.decided_by == BY_MODEL)))
    precision = yes_pos / len(pos) if len(pos) else None
    p = 0.0 if precision is None else precision
    dataset_precision, _ = positive_share(state.p_positive[human_pos], [(model_pos, p, p)])
    result = Audit(
        category=category,
        confidence=conf,
        positives_audited=len(pos),
        positives_confirmed=yes_pos,
        precision=precision,
        precision_low=p_lo,
        precision_high=p_hi,
        negatives_audited=len(neg),
        negatives_found_positive=yes_neg,
        false_omission=yes_neg / len(neg) if len(neg) else None,
        false_omission_low=f_lo,
        false_omission_high=f_hi,
        dataset_precision=dataset_precision,
        human_answers=labels_lib.read_votes(storage, category, AUDIT).num_rows
        + (labels_lib.read_votes(storage, category, recheck_id_for(AUDIT)).num_rows if rechecked else 0),
        rechecked=rechecked,
    )
    storage.write_json(key, result.to_dict())
    return result
