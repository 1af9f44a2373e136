"""The cascade's settings, validated before any work starts."""

from __future__ import annotations

import re
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .calibration import Scan, iteration_confidence, zero_error_size
from .images import DEFAULT_MAX_PIXELS

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
Remainder = Literal["people", "unresolved"]
LargeRemainder = Literal["ask", "people", "unresolved"]
Wait = Literal["auto", "pause", "suspend"]
TrainDraw = Literal["active", "uniform"]
LARGE_REMAINDER: tuple[str, ...] = get_args(LargeRemainder)
CONFIDENCE_SCOPES: tuple[str, ...] = get_args(ConfidenceScope)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and the fix."""


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
    default_factory: Any = MISSING,
) -> Any:
    """A settings field declared once: its default and help text, from which the command-line flags and the
    README's option table are made (``lsun_hitl.options``).

    ``flag`` is the command-line name when it is not the field's (``--`` + name with ``-`` for ``_``; a
    boolean that defaults to true gets ``--no-<flag>``); ``choices`` where the type is not a ``Literal``
    (whose values are the choices); ``cli=False`` keeps a setting to the deployments file and the API.
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# The settings that act only after an iteration's scores exist (choosing and applying its thresholds): a stored
# run can be replayed under other values of these without training or scoring again (``lsun_hitl.replay``).
THRESHOLD_SETTINGS = (
    "target_precision",
    "target_false_omission",
    "confidence",
    "confidence_scope",
    "min_region",
    "threshold_scan",
    "start_share",
    "positive_start_errors",
)


@dataclass(frozen=True)
class IngestParams:
    """How ingest decides which files are usable images (``lsun-hitl ingest``'s flags, ``ingest.build_pool``'s
    arguments). They are recorded with the pool, and every later decode of its images (scoring, training,
    calibration, export, on any Dask worker) applies the pool's values, so no step refuses an image ingest
    accepted."""

    max_image_pixels: int = setting(
        DEFAULT_MAX_PIXELS,
        "largest image accepted, in pixels (width x height); a larger one is refused from its header as a possible"
        " decompression bomb and listed in the rejects. Raise it for genuine large scans (a 12000x12000 scan is"
        " 144,000,000); decoding one takes about 4 bytes a pixel of memory",
    )

    links_outside: bool = setting(
        False,
        "ingest files a symbolic link under the image prefix leads to outside it (else they are left out and"
        " counted: a link can reach any file the ingesting user can read)",
    )
    url_schemes: str = setting(
        "",
        "with --images @FILE: URL schemes allowed beside the storage root's, comma-separated (e.g. 's3,gs'); a"
        " list naming http or another scheme is refused without it (the workers would fetch what it names)",
    )

    def validate(self) -> IngestParams:
        """These settings, or a ConfigError naming the one that cannot work and the fix."""
        ok = isinstance(self.max_image_pixels, int) and not isinstance(self.max_image_pixels, bool)
        if not ok or self.max_image_pixels < 1:
            raise ConfigError(
                f"setting max_image_pixels = {self.max_image_pixels!r} cannot work; use a positive whole number of"
                " pixels, e.g. 144000000 for 12000x12000 scans (default 64000000)"
            )
        return self


@dataclass(frozen=True)
class ModelParams:
    """The classifier trained at each iteration (a torchvision architecture, binary head)."""

    arch: str = setting("mobilenet_v3_small", "the classifier's architecture", choices=ARCHITECTURES)
    image_size: int = setting(64, "model input side in pixels")
    epochs: int = setting(10, "passes over the training labels (fewer when they would exceed max_steps)")
    max_steps: int = setting(
        4000, "cap on training steps: training time grows with the labels up to it, then stays bounded"
    )
    min_steps: int = setting(
        0,
        "fewest training steps: more passes over few labels (ten passes over a few hundred labels are a few dozen"
        " steps, from which a network learns little)",
    )
    batch_size: int = setting(128, "training batch", flag="train-batch-size")
    learning_rate: float = setting(2e-3, "AdamW's peak learning rate (one-cycle schedule)")
    weights: str | None = setting(
        None,
        "pretrained torchvision weights for arch: a local file or a URL on the storage root (read with its storage"
        " options), or 'pool' (the backbone `lsun-hitl pretrain` learns from the unlabeled pool)",
    )
    freeze_backbone: bool = setting(
        False,
        "with weights: keep the backbone as loaded and fit only a linear head on its features (a linear probe);"
        " scoring then keeps each image's features, shared by every category on that backbone",
    )
    threads: int = setting(2, "torch threads for training in the flow process", flag="train-threads")


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
    more before they count. Each field's help text says what it does; ``docs/tuning.md`` says why the
    defaults are what they are.
    """

    train_sample: int = setting(2500, "human labels for training per iteration")
    calibration_sample: int = setting(1500, "held-out human labels per iteration, for the thresholds")
    first_calibration_sample: int = setting(
        3000, "the first iteration's calibration sample (its cut decides most of the pool)"
    )
    max_sample_fraction: float = setting(0.25, "cap on one iteration's sample, as a share of what is unlabeled")
    target_precision: float = setting(0.95, "the positive set's precision the thresholds must show")
    target_false_omission: float = setting(
        0.01, "the negative set's false-omission rate (positives among negatives) the thresholds must show"
    )
    confidence: float = setting(0.95, "confidence of each bound (per run and side with confidence_scope run)")
    min_region: int = setting(30, "fewest calibration images a threshold's region may hold")
    threshold_scan: Scan = setting(
        "fixed-sequence",
        "how a threshold is picked among those whose bound passes: fixed-sequence widens from a start chosen by"
        " the scores alone and stops at the first failure, so the confidence holds for the pick; nested takes"
        " the widest that passes, with a per-threshold confidence",
    )
    start_share: float = setting(
        0.5, "fixed-sequence: the negative side starts from this share of predicted negatives the model is surest of"
    )
    positive_start_errors: int = setting(
        1, "fixed-sequence: the positive side's first region is the smallest that passes with this many errors"
    )
    confidence_scope: ConfidenceScope = setting(
        "run",
        "run: the confidence holds for each side over the whole run, its error budget spent over the iterations;"
        " threshold: each threshold at the confidence",
    )
    carry_calibration: bool = setting(
        False,
        "never train on calibration images; carry the still-undecided ones into later calibration sets",
    )
    calibration_min_new: int = setting(500, "with carry_calibration: fewest new calibration images an iteration")
    max_iterations: int = setting(
        10, "a cap on iterations (a stalled iteration still labels part of what people would finish by hand)"
    )
    stop_unlabeled: int = setting(1000, "stop when no more images than this are left unlabeled")
    stop_unlabeled_fraction: float = setting(
        0.0, "stop when no more than this share of the pool is left (0: the remainder does not grow with the pool)"
    )
    train_growth: float = setting(
        2.0,
        "after an iteration whose model decided fewer images than people labeled for it (a stall), the next"
        " trains on this many times more new labels",
    )
    train_sample_max: int = setting(10_000, "cap on the new training labels train_growth reaches")
    train_draw: TrainDraw = setting(
        "active",
        "how training images are chosen after the first iteration: active draws half in proportion to the last"
        " model's score (likely positives and the negatives it confuses with them), half uniformly from what is"
        " open; uniform draws them all uniformly. Calibration images are a uniform draw either way",
    )
    large_remainder_share: float = setting(
        0.05, "a remainder above this share of the pool goes to people only as large_remainder says"
    )
    large_remainder: LargeRemainder = setting(
        "ask",
        "a remainder above large_remainder_share of the pool: ask pauses the run for an operator's decision"
        " (lsun-hitl decide, or the resume form in the Prefect UI); people or unresolved decide now",
    )
    human_budget: int | None = setting(
        None,
        "cap on the images people label, the remainder included: the run stops when what is left cannot buy a"
        " calibration sample that certifies anything, and people finish the remainder only if it fits",
    )
    allow_small_pool: bool = setting(
        False,
        "run a new cascade even where its first sample is over 30% of the pool or cannot certify anything"
        " (else it is refused with smaller samples that fit)",
    )
    stop_when_cheaper: bool = setting(
        True, "stop when the images left are no more than the next iteration would send to people"
    )
    audit_sample: int = setting(0, "images of each model-decided split people audit after the last iteration")
    recheck: bool = setting(
        True,
        "ask people again about calibration and audit images whose label the model disputes, before they count"
        " (removes the crowd-noise floor under the false-omission bound)",
    )
    remainder: Remainder = setting("people", "who takes the images still undecided at the end")
    seed: int = setting(0, "seed of every random draw of the run")
    label_timeout_s: int = setting(7 * 24 * 3600, "seconds a run waits for people", flag="label-timeout")
    label_poll_s: int = setting(2, "seconds between checks for people's labels while a run waits")
    wait: Wait = setting(
        "auto",
        "how a run waits for people: pause keeps the process; suspend ends it and Prefect reschedules the run"
        " when labels arrive (needs a deployment); auto suspends when deployed",
    )
    score_partition: int = setting(4000, "images per scoring task on Dask")
    score_batch: int = setting(256, "images per forward pass when scoring")
    manifest_partition: int = setting(
        1_000_000,
        "pool rows per manifest part: an iteration's split is one task a part (on Dask when there are several),"
        " so no process holds more than a part",
    )
    input_cache: bool = setting(
        True,
        "keep every pool image's model input (uint8, at the model's input size) in shards under cache/, so later"
        " iterations and categories do not decode again",
    )
    dask_workers: int | None = setting(None, "LocalCluster worker processes (none: min(2, cores))")
    score_limit: str | None = setting(
        None,
        "name of a Prefect global concurrency limit each scoring step holds a slot of, so categories scheduled"
        " together take turns on one cluster (create it first: prefect gcl create NAME --limit N)",
    )
    model: ModelParams = setting(default_factory=ModelParams, cli=False)
    model_schedule: tuple[ModelParams, ...] = setting(
        (), "a model per iteration (the last one repeats); empty: model at every iteration", cli=False
    )

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
    models = {
        "model" if i == 0 else f"model_schedule[{i - 1}]": m
        for i, m in enumerate((params.model, *params.model_schedule))
    }
    kinds = kind_checks(params) + [c for name, m in models.items() for c in kind_checks(m, f"{name}.")]
    _raise_first(kinds, params)  # types first: the range checks below compare values
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
        (params.train_growth >= 1, "train_growth", "a factor of 1 (no growth) or more, e.g. 2"),
        (params.train_sample_max >= params.train_sample, "train_sample_max", "at least train_sample"),
        (0 <= params.large_remainder_share <= 1, "large_remainder_share", "a share of the pool in [0, 1], e.g. 0.05"),
        (params.label_timeout_s > 0, "label_timeout_s", "a positive number of seconds"),
        (params.score_partition >= 1 and params.score_batch >= 1, "score_partition/score_batch", "positive"),
        (params.manifest_partition >= 1, "manifest_partition", "a positive number of rows, e.g. 1000000"),
        (params.calibration_min_new >= 0, "calibration_min_new", "zero or more images"),
        (params.audit_sample >= 0, "audit_sample", "zero or more images per split"),
        (0 <= params.start_share < 1, "start_share", "a share in [0, 1), e.g. 0.5"),
        (params.positive_start_errors >= 0, "positive_start_errors", "zero or more errors, e.g. 1"),
        (params.first_calibration_sample >= 50, "first_calibration_sample", "at least 50 images"),
    ]
    for name, m in models.items():
        checks += _model_checks(m, name)
    _raise_first(checks, params)
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
        (16 <= m.image_size <= 1024, f"{name}.image_size", "between 16 and 1024 pixels"),
        (m.epochs >= 1, f"{name}.epochs", "at least 1"),
        (0 <= m.min_steps <= m.max_steps, f"{name}.min_steps", "zero or more steps, at most max_steps"),
        (not m.freeze_backbone or bool(m.weights), f"{name}.freeze_backbone", "weights too (or freeze_backbone=false)"),
    ]


def choices_of(f: Field, hint: Any) -> tuple[str, ...] | None:
    """A setting's allowed values: its ``Literal`` type's, or those its field declares."""
    if f.metadata.get("choices"):
        return tuple(f.metadata["choices"])
    return get_args(hint) if get_origin(hint) is Literal else None


_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "a whole number"),
    float: ((int, float), "a number"),
    str: ((str,), "text"),
}


def kind_checks(obj: CascadeParams | ModelParams, prefix: str = "") -> list[tuple[bool, str, str]]:
    """(passes, setting, fix) for each setting's type and allowed values, read from the dataclass's fields,
    so a value from a deployments file or the API is checked as the command line's flags are."""
    hints = get_type_hints(type(obj))
    out = []
    for f in fields(obj):
        if f.name in ("model", "model_schedule"):
            continue
        value, hint = getattr(obj, f.name), hints[f.name]
        args = get_args(hint)
        if value is None and type(None) in args:
            continue
        choices = choices_of(f, hint)
        if choices:
            out.append((value in choices, prefix + f.name, "one of " + ", ".join(map(repr, choices))))
            continue
        kind = next((a for a in (hint, *args) if a in _KINDS), None)
        if kind is not None:
            accepted, what = _KINDS[kind]
            ok = isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
            out.append((ok, prefix + f.name, what + (" or None" if type(None) in args else "")))
    return out


def _raise_first(checks: list[tuple[bool, str, str]], params: CascadeParams) -> None:
    for ok, name, fix in checks:
        if not ok:
            raise ConfigError(f"setting {name} = {_value(params, name)!r} cannot work; use {fix}")


def validate_model(m: ModelParams) -> None:
    """Raise ConfigError naming the first model setting that cannot work (``validate`` checks these too)."""
    for checks in (lambda: kind_checks(m, "model."), lambda: _model_checks(m, "model")):  # types first
        for ok, name, fix in checks():
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
