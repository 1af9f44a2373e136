"""The cascade's settings, validated before any work starts."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from .calibration import SCANS, Scan, iteration_confidence, zero_error_size

CATEGORY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ARCHITECTURES = (
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "convnext_tiny",
    "small_convnet",  # lsun_hitl.model.small_convnet: for small images such as Fashion-MNIST
)


ConfidenceScope = Literal["run", "threshold"]
LARGE_REMAINDER: tuple[str, ...] = ("ask", "people", "unresolved")
CONFIDENCE_SCOPES: tuple[str, ...] = ("run", "threshold")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and the fix."""


@dataclass(frozen=True)
class ModelParams:
    """The classifier trained at each iteration (a torchvision architecture, binary head)."""

    arch: str = "mobilenet_v3_small"
    image_size: int = 64
    epochs: int = 10
    max_steps: int = 500  # caps training time as the labels grow
    batch_size: int = 128
    learning_rate: float = 2e-3
    weights: str | None = None  # a local file with pretrained weights (a torchvision state dict), or "pool"
    # (the backbone lsun_hitl.pretrain learns from the unlabeled pool itself: `lsun-hitl pretrain`)
    # with weights: False fine-tunes the whole network, True trains only the new head (a linear probe)
    freeze_backbone: bool = False
    threads: int = 2


@dataclass(frozen=True)
class CascadeParams:
    """Everything that tunes the per-category cascade (the paper's loop).

    Sample sizes are images sent to people per iteration; each is capped at ``max_sample_fraction``
    of the images still unlabeled. Thresholds are chosen on the calibration sample only, so that the
    positive set meets ``target_precision`` and the negative set ``target_false_omission``, each
    with a one-sided Clopper-Pearson bound at ``confidence``; ``threshold_scan`` says how one threshold is
    picked among those that pass ("fixed-sequence" makes the confidence hold for the pick). With
    ``confidence_scope="run"`` the confidence holds for each side over the whole run. The first iteration
    draws ``first_calibration_sample`` calibration images, later ones ``calibration_sample``.

    With ``carry_calibration`` the calibration images are never trained on, and those of earlier
    iterations that still lie in the undecided band (between the last thresholds) are carried into
    the next iteration's calibration set: they are a uniform sample of what is still unlabeled, so
    each iteration only tops the set up to ``calibration_sample`` (at least ``calibration_min_new``
    new images). ``model_schedule`` gives a model per iteration (the last one repeats); empty means
    ``model`` at every iteration. ``audit_sample`` images of each model-decided split go to people
    after the last iteration, to measure the delivered precision and false omission. With ``recheck``
    the calibration and audit images whose aggregated label the model disputes (people said yes where
    the model scores below 0.5, or no above it, or their answers left it unsure) are sent to people once
    more before they count.
    """

    train_sample: int = 2500
    calibration_sample: int = 1500
    # the first iteration's: its cut decides most of the pool (50,000-65,000 of Fashion-MNIST's 70,000 images),
    # and with the fixed-sequence scan 3,000 calibration images let it decide about what the nested scan did with
    # 1,500, where 1,500 left 4,500 more images to people a category (benchmarks/guarantee.py)
    first_calibration_sample: int = 3000
    max_sample_fraction: float = 0.25
    target_precision: float = 0.95
    target_false_omission: float = 0.01
    confidence: float = 0.95
    min_region: int = 30
    # "fixed-sequence": the confidence holds for the chosen threshold (Learn-then-Test), the negative side
    # starting from the half of the model's predicted negatives it is surest of (start_share); "nested": the
    # widest region that passes its own bound, which holds per threshold only: on real first-model scores its
    # first cut missed a target in 5.5% of calibration draws at 95%, 8.75% on dress (benchmarks/guarantee.py)
    threshold_scan: Scan = "fixed-sequence"
    start_share: float = 0.5
    # the positive side's first region is the smallest that passes with this many wrong "no" answers (110 images at
    # 97.5%): one crowd error left among the highest-scored calibration images no longer stops it (ankle-boot,
    # seed 0, lost its first model's 6,000 positives to one at 72); benchmarks/guarantee.py --label-noise
    positive_start_errors: int = 1
    # "run": ``confidence`` holds for each side over the whole run, its error budget spent over the
    # iterations (calibration.iteration_confidence: 0.975, 0.9875, ...); "threshold": each threshold's own
    confidence_scope: ConfidenceScope = "run"
    # off by default, by measurement: on bag (seed 0) it left 21.5% of the pool to people, against 12.4%
    # without (a smaller training set and noisier thresholds outweighed the calibration it saved)
    carry_calibration: bool = False
    calibration_min_new: int = 500
    # a cap: a stalled iteration still labels its sample, which is part of what people would finish by hand, so
    # the loop goes on; ten iterations fit the run's error budget with 1,500 calibration images (validate)
    max_iterations: int = 10
    stop_unlabeled: int = 1000
    # a share of the pool left to people: 0 keeps the remainder from growing with the pool
    stop_unlabeled_fraction: float = 0.0
    # after an iteration whose model decided fewer images than people labeled for it (a stall), the next one
    # trains on ``train_growth`` times more new labels, up to ``train_sample_max``
    train_growth: float = 2.0
    train_sample_max: int = 10_000
    # a remainder above this share of the pool goes to people only with a yes: "ask" pauses the run for an
    # operator's decision (lsun-hitl decide, or the resume form in the Prefect UI); "people" or "unresolved" decide
    large_remainder_share: float = 0.05
    large_remainder: Literal["ask", "people", "unresolved"] = "ask"
    # a cap on the images people label (None: no cap): the loop stops when what is left cannot buy a calibration
    # sample that certifies anything, and people finish the remainder only if it fits (else it stays unresolved)
    human_budget: int | None = None
    # a new cascade whose first sample is over 30% of the pool, or whose first calibration sample cannot certify
    # either side, is refused with smaller samples that fit (lsun_hitl.plan); True runs it anyway
    allow_small_pool: bool = False
    # stop when the images left are no more than the next iteration would send to people
    stop_when_cheaper: bool = True
    audit_sample: int = 0
    # ask people again about calibration (and audit) images whose label the model disputes, before
    # thresholds are chosen: removes the crowd-noise floor under the false-omission bound
    recheck: bool = True
    remainder: Literal["people", "unresolved"] = "people"
    seed: int = 0
    label_timeout_s: int = 7 * 24 * 3600
    label_poll_s: int = 2
    # how a run waits for people: "pause" keeps the process (embedded default), "suspend" ends it and
    # Prefect reschedules the run when labels arrive (needs a deployment); "auto": suspend when deployed
    wait: Literal["auto", "pause", "suspend"] = "auto"
    score_partition: int = 4000
    score_batch: int = 256
    # keep every pool image's model input (uint8, at the model's input size) in shards on the storage root,
    # decoded by whichever pass reaches a shard first, so later iterations and categories do not decode again
    input_cache: bool = True
    dask_workers: int | None = None
    model: ModelParams = field(default_factory=ModelParams)
    model_schedule: tuple[ModelParams, ...] = ()

    def threshold_confidence(self, iteration: int) -> float:
        """The confidence of ``iteration``'s thresholds (1-based): the run's spent over the iterations, or its own."""
        if self.confidence_scope == "threshold":
            return self.confidence
        return iteration_confidence(self.confidence, iteration)

    def model_for(self, iteration: int) -> ModelParams:
        """The model trained at ``iteration`` (1-based)."""
        if not self.model_schedule:
            return self.model
        return self.model_schedule[min(iteration, len(self.model_schedule)) - 1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> CascadeParams:
        data = dict(data or {})
        model = data.pop("model", None)
        schedule = data.pop("model_schedule", None) or ()
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown cascade setting(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(
            **data,
            model=_model_params(model) if model is not None else ModelParams(),
            model_schedule=tuple(_model_params(m) for m in schedule),
        )


def _model_params(value: ModelParams | dict) -> ModelParams:
    if isinstance(value, ModelParams):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"model setting {value!r} is not a table of model settings (arch, image_size, ...)")
    bad = set(value) - set(ModelParams.__dataclass_fields__)
    if bad:
        raise ConfigError(f"unknown model setting(s) {sorted(bad)}; known: {sorted(ModelParams.__dataclass_fields__)}")
    return ModelParams(**value)


def validate(category: str, params: CascadeParams) -> None:
    """Raise ConfigError naming the first setting that cannot work, and how to fix it."""
    if not CATEGORY_RE.match(category or ""):
        raise ConfigError(
            f"category {category!r} is not a valid name: use lower-case letters, digits, "
            "'-' or '_' (for example 'sneaker')"
        )
    checks = [
        (0.5 < params.target_precision < 1, "target_precision", "a number between 0.5 and 1, e.g. 0.95"),
        (0 < params.target_false_omission < 0.5, "target_false_omission", "a number between 0 and 0.5, e.g. 0.01"),
        (0.5 <= params.confidence < 1, "confidence", "a number in [0.5, 1), e.g. 0.95"),
        (params.train_sample >= 10, "train_sample", "at least 10 images"),
        (params.calibration_sample >= 50, "calibration_sample", "at least 50 images"),
        (0 < params.max_sample_fraction <= 1, "max_sample_fraction", "a fraction in (0, 1]"),
        (params.max_iterations >= 1, "max_iterations", "at least 1"),
        (params.stop_unlabeled >= 0, "stop_unlabeled", "zero or more images"),
        (0 <= params.stop_unlabeled_fraction < 1, "stop_unlabeled_fraction", "a fraction in [0, 1)"),
        (params.human_budget is None or params.human_budget > 0, "human_budget", "a positive number or None"),
        (params.remainder in ("people", "unresolved"), "remainder", "'people' or 'unresolved'"),
        (params.train_growth >= 1, "train_growth", "a factor of 1 (no growth) or more, e.g. 2"),
        (params.train_sample_max >= params.train_sample, "train_sample_max", "at least train_sample"),
        (0 <= params.large_remainder_share <= 1, "large_remainder_share", "a share of the pool in [0, 1], e.g. 0.05"),
        (
            params.large_remainder in LARGE_REMAINDER,
            "large_remainder",
            "'ask' (pause for a decision), 'people' or 'unresolved'",
        ),
        (params.label_timeout_s > 0, "label_timeout_s", "a positive number of seconds"),
        (params.wait in ("auto", "pause", "suspend"), "wait", "'auto', 'pause' or 'suspend'"),
        (params.score_partition >= 1 and params.score_batch >= 1, "score_partition/score_batch", "positive"),
        (params.calibration_min_new >= 0, "calibration_min_new", "zero or more images"),
        (params.audit_sample >= 0, "audit_sample", "zero or more images per split"),
        (
            params.threshold_scan in SCANS,
            "threshold_scan",
            "'fixed-sequence' (the confidence holds for the chosen threshold) or 'nested'",
        ),
        (0 <= params.start_share < 1, "start_share", "a share in [0, 1), e.g. 0.5"),
        (params.positive_start_errors >= 0, "positive_start_errors", "zero or more errors, e.g. 1"),
        (params.confidence_scope in CONFIDENCE_SCOPES, "confidence_scope", "'run' or 'threshold'"),
        (params.first_calibration_sample >= 50, "first_calibration_sample", "at least 50 images"),
    ]
    for i, m in enumerate((params.model, *params.model_schedule)):
        checks += _model_checks(m, "model" if i == 0 else f"model_schedule[{i - 1}]")
    for ok, name, fix in checks:
        if not ok:
            raise ConfigError(f"setting {name} = {_value(params, name)!r} cannot work; use {fix}")
    # A calibration sample this small cannot certify the targets even with zero errors. Each iteration's
    # confidence is higher than the one before (the run's is spent over them), so the last one needs most:
    # an iteration that cannot certify anything would only send its sample to people.
    last = max(2, params.max_iterations)
    for name, size, iteration in (
        ("first_calibration_sample", params.first_calibration_sample, 1),
        ("calibration_sample", params.calibration_sample, last),
    ):
        conf = params.threshold_confidence(iteration)
        need = zero_error_size(params.target_false_omission, conf)
        if size < need:
            also = f", lower max_iterations ({params.max_iterations})" if iteration > 2 else ""
            raise ConfigError(
                f"{name} = {size} cannot show a false-omission rate <= {params.target_false_omission} at "
                f"confidence {conf:g} (iteration {iteration}'s): even with no error the bound needs >= {need} "
                f"negatives. Raise {name}{also} or raise target_false_omission."
            )
    first = params.train_sample + params.first_calibration_sample
    if params.human_budget is not None and params.human_budget < first:
        raise ConfigError(
            f"human_budget = {params.human_budget} is less than the first iteration sends to people "
            f"(train_sample {params.train_sample} + first_calibration_sample {params.first_calibration_sample}"
            f" = {first}): raise human_budget or shrink those samples"
        )


def _model_checks(m: ModelParams, name: str) -> list[tuple[bool, str, str]]:
    """(passes, setting, fix) for each model setting that can be wrong; ``name`` prefixes the settings."""
    return [
        (m.arch in ARCHITECTURES, f"{name}.arch", f"one of {', '.join(ARCHITECTURES)}"),
        (16 <= m.image_size <= 1024, f"{name}.image_size", "between 16 and 1024 pixels"),
        (m.epochs >= 1, f"{name}.epochs", "at least 1"),
        (not m.freeze_backbone or bool(m.weights), f"{name}.freeze_backbone", "weights too (or freeze_backbone=false)"),
    ]


def validate_model(m: ModelParams) -> None:
    """Raise ConfigError naming the first model setting that cannot work (``validate`` checks these too)."""
    for ok, name, fix in _model_checks(m, "model"):
        if not ok:
            raise ConfigError(f"setting {name} = {getattr(m, name.split('.', 1)[1])!r} cannot work; use {fix}")


def _value(params: CascadeParams, name: str) -> object:
    obj: object = params
    for part in name.split("/")[0].split("."):
        if "[" in part:
            attr, index = part.rstrip("]").split("[")
            obj = getattr(obj, attr)[int(index)]
        else:
            obj = getattr(obj, part, None)
    return obj
