"""The steps of the per-category cascade (the paper's loop), each a plain function over the storage.

Every step reads what earlier steps wrote and writes its own output at a fixed place in the layout;
a step whose output already exists returns it instead of redoing the work, so a run that crashed or
was restarted goes on from the last completed step, and nothing is sent to people twice.

    start        -> manifests/<c>/iteration=0        (everything unlabeled)
    pretrain     -> models/pretrained/...            (once per pool, for models whose weights are "pool")
    sample       -> samples/<c>/iteration=k          (train + calibration images for people)
    publish      -> labels/<c>/requests/iteration-k  (people are asked)
    collect      -> labels/<c>/aggregated/...        (answers aggregated, with Dawid-Skene by default)
    train        -> models/<c>/iteration=k
    score        -> scores/<c>/iteration=k           (every still-unlabeled image but the training sample,
                                                      on Dask)
    recheck      -> labels/<c>/requests/iteration-k-recheck (calibration images whose label the model
                                                      disputes go back to people for more answers)
    calibrate    -> calibration/<c>/iteration=k      (thresholds from held-out labels; the calibration
                                                      set, carried over while it stays undecided)
    split        -> manifests/<c>/iteration=k        (positive / negative / unlabeled), and its funnel
    remainder    -> labels/<c>/requests/remainder, manifests/<c>/iteration=k+1 (people label what is left;
                                                      a large one waits for labels/<c>/decisions/remainder.json)
    finish       -> datasets/<c>/dataset/, summary.json (the dataset in committed parts, a map over the last
                                                      manifest's parts)
    audit        -> datasets/<c>/audit.json          (people check a random sample of each model split;
                                                      answers the model disputes are rechecked too)

One module per part of the loop: ``start``, ``sample``, ``people`` (asking people, reading their answers),
``train``, ``score``, ``recheck``, ``calibrate``, ``iterate`` (split, stop or go on), ``remainder``,
``finish`` and ``audit``; ``common`` holds the request ids and the reuse of stored outputs. Every step is
importable from here (``from lsun_hitl import cascade; cascade.sample(...)``).
"""

from .audit import Audit, audit, audit_rows, publish_audit, publish_audit_recheck
from .calibrate import calibrate
from .common import AUDIT, REMAINDER, funnels, recheck_id_for, request_id_for, thresholds_from_dict
from .finish import Summary, finish, positive_share, target_warnings
from .iterate import next_sample_size, should_stop, split
from .people import labels_complete, publish, recheck_size
from .recheck import disputed, publish_recheck, recheck_rows
from .remainder import ask_remainder, decide_remainder, finish_remainder, publish_remainder, remainder_decision
from .sample import carried_calibration, new_calibration_size, publish_iteration, sample, train_sample_size
from .score import candidates, score
from .start import backbones_missing, pool_backbones, preflight, pretrain, start
from .train import input_cache, model_key_path, train

__all__ = [
    "AUDIT",
    "REMAINDER",
    "Audit",
    "Summary",
    "ask_remainder",
    "audit",
    "audit_rows",
    "backbones_missing",
    "calibrate",
    "candidates",
    "carried_calibration",
    "decide_remainder",
    "disputed",
    "finish",
    "finish_remainder",
    "funnels",
    "input_cache",
    "labels_complete",
    "model_key_path",
    "new_calibration_size",
    "next_sample_size",
    "pool_backbones",
    "positive_share",
    "preflight",
    "pretrain",
    "publish",
    "publish_audit",
    "publish_audit_recheck",
    "publish_iteration",
    "publish_recheck",
    "publish_remainder",
    "recheck_id_for",
    "recheck_rows",
    "recheck_size",
    "remainder_decision",
    "request_id_for",
    "sample",
    "score",
    "should_stop",
    "split",
    "start",
    "target_warnings",
    "thresholds_from_dict",
    "train",
    "train_sample_size",
]
