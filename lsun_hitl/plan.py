"""A plan before people are paid: what the first iteration asks of people, and whether it can decide anything.

The first iteration sends ``train_sample`` + ``first_calibration_sample`` images to people (each capped at
``max_sample_fraction`` of the pool). Its thresholds can certify a side only if the calibration sample holds
enough images of the other class beyond the threshold with no error: ``zero_error_size(target, confidence)``
of them (e.g. 367 negatives for a 1% false-omission bound at 97.5%, 72 positives for 95% precision). A model
puts roughly half of a class beyond a threshold it can certify, so as a rule of thumb a side needs twice that
many calibration images of its class: negatives need ``n_cal x (1 - base rate) >= 2 x 367``, positives a base
rate of at least ``2 x 72 / n_cal``. On a small pool the caps bind, the first sample is a large share of the
pool, and the cascade cannot save labels: ``check`` refuses such a run and names the settings that fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .calibration import zero_error_size
from .config import CascadeParams, ConfigError, validate

# a first sample above this share of the pool leaves too little for the model to save people anything
SMALL_POOL_SHARE = 0.3
# the share of a class a model puts beyond a threshold it can certify (the rule of thumb above)
BEYOND_THRESHOLD = 0.5


@dataclass(frozen=True)
class Plan:
    """What the first iteration of a new cascade asks of people and what it can be expected to decide."""

    category: str
    pool: int
    train: int
    calibration: int
    base_rate: float | None  # the expected share of positives (a hint or the gold's), None when unknown
    base_rate_source: str
    need_negatives: int  # calibration negatives beyond the threshold, with no error, the first bound needs
    need_positives: int
    min_base_rate: float  # below it the first iteration certifies no positives

    @property
    def first_ask(self) -> int:
        return self.train + self.calibration

    @property
    def share(self) -> float:
        return self.first_ask / max(1, self.pool)

    @property
    def negatives_expected(self) -> bool:
        b = 0.1 if self.base_rate is None else self.base_rate
        return self.calibration * (1 - b) * BEYOND_THRESHOLD >= self.need_negatives

    @property
    def positives_expected(self) -> bool | None:
        return None if self.base_rate is None else self.base_rate >= self.min_base_rate

    @property
    def small(self) -> bool:
        """True when the cascade cannot be expected to save labels on this pool with these settings."""
        return self.share > SMALL_POOL_SHARE or not (self.negatives_expected or self.positives_expected)

    def __str__(self) -> str:
        rate = "unknown" if self.base_rate is None else f"{self.base_rate:.1%}, {self.base_rate_source}"
        pos = {True: "can", False: "cannot", None: "can"}[self.positives_expected]
        lines = [
            f"plan for {self.category!r}: a pool of {self.pool:,} images; iteration 1 asks people to label "
            f"{self.first_ask:,} ({self.share:.1%}): {self.train:,} to train on and {self.calibration:,} to calibrate",
            f"  negatives: {'can' if self.negatives_expected else 'cannot'} be decided at iteration 1 (the bound "
            f"needs >= {self.need_negatives} calibration negatives beyond the threshold with no error)",
            f"  positives: {pos} be decided at iteration 1"
            + (" if the category is" if self.positives_expected is None else ": that needs the category to be")
            + f" >= {self.min_base_rate:.1%} of the pool (base rate: {rate})",
        ]
        return "\n".join(lines)


def plan(
    category: str, pool: int, params: CascadeParams, base_rate: float | None = None, source: str = "your estimate"
) -> Plan:
    """The first iteration's plan for a new cascade over ``pool`` images (pure: no storage).

    ``base_rate``: the expected share of positives, if known; ``source`` says where it comes from."""
    cap = int(params.max_sample_fraction * pool)
    calibration = min(params.first_calibration_sample, cap)
    train = min(params.train_sample, cap)
    if params.human_budget is not None:
        calibration = min(calibration, params.human_budget)
        train = min(train, max(params.human_budget - calibration, 0))
    conf = params.threshold_confidence(1)
    need_pos = zero_error_size(1 - params.target_precision, conf)
    return Plan(
        category=category,
        pool=pool,
        train=train,
        calibration=calibration,
        base_rate=base_rate,
        base_rate_source=source if base_rate is not None else "",
        need_negatives=zero_error_size(params.target_false_omission, conf),
        need_positives=need_pos,
        min_base_rate=need_pos / BEYOND_THRESHOLD / max(1, calibration),
    )


def check(p: Plan, params: CascadeParams, allow_small_pool: bool = False) -> None:
    """Raise ConfigError, naming the fix, when the cascade cannot be expected to save labels on the pool."""
    if not p.small or allow_small_pool:
        return
    why = (
        f"iteration 1 would ask people to label {p.first_ask:,} of its {p.pool:,} images ({p.share:.1%})"
        if p.share > SMALL_POOL_SHARE
        else f"iteration 1's {p.calibration:,} calibration images cannot certify either side"
    )
    fix = _smaller_samples(p, params)
    hint = (
        f"Pass {fix} (smaller samples, the same guarantees)"
        if fix
        else "Label it by hand (at this size no sample certifies anything without asking for most of the pool)"
    )
    raise ConfigError(
        f"the pool for {p.category!r} is too small for these settings to save labels: {why}. {hint}, "
        "or pass --allow-small-pool to run anyway"
    )


def _smaller_samples(p: Plan, params: CascadeParams) -> str | None:
    """CLI flags for samples that fit the pool and still pass ``validate``, or None when none do."""
    b = 0.1 if p.base_rate is None else p.base_rate
    first = math.ceil(p.need_negatives / BEYOND_THRESHOLD / (1 - b))
    train = max(200, min(params.train_sample, p.pool // 20))
    if (first + train) / p.pool > SMALL_POOL_SHARE:
        return None
    # as many iterations as later calibration samples no larger than the first one can serve (each iteration's
    # bound needs more: the run's confidence is spent over them)
    for iterations in range(params.max_iterations, 1, -1):
        later = max(first // 2, zero_error_size(params.target_false_omission, params.threshold_confidence(iterations)))
        if later > first:
            continue
        candidate = replace(
            params,
            train_sample=train,
            first_calibration_sample=first,
            calibration_sample=later,
            max_iterations=iterations,
        )
        try:
            validate(p.category, candidate)
        except ConfigError:
            continue
        flags = f"--train-sample {train} --first-calibration-sample {first} --calibration-sample {later}"
        return flags + (f" --max-iterations {iterations}" if iterations != params.max_iterations else "")
    return None


# a forecast above this share of the pool labeled by people comes with a warning and the fix
FORECAST_WARN_SHARE = 0.5


@dataclass(frozen=True)
class Forecast:
    """What people are expected to label in all, once a model exists: the honest update of the plan."""

    human: int  # images people will have labeled when the run ends, the remainder included
    pool: int
    decided_share: float  # share of its scored images the last model decided: the rate the projection assumes
    iterations: int  # iterations still to come in the projection

    @property
    def share(self) -> float:
        return self.human / max(1, self.pool)

    @property
    def warning(self) -> str | None:
        return forecast_warning(self.share)

    def __str__(self) -> str:
        return forecast_line(self.human, self.share, self.decided_share)


def forecast_line(human: int, share: float, decided_share: float | None = None) -> str:
    """The forecast as the run's log prints it, with ``forecast_warning``'s line when there is one."""
    rate = "" if decided_share is None else f" if each later model decides {decided_share:.0%} of what it scores"
    line = f"forecast: people will label ~{human:,} images in all ({share:.1%} of the pool){rate}"
    warning = forecast_warning(share)
    return line if warning is None else f"{line}\nWARNING: {warning}"


def forecast_warning(share: float) -> str | None:
    """The warning with its fix when people are expected to label over ``FORECAST_WARN_SHARE`` of the pool."""
    if share <= FORECAST_WARN_SHARE:
        return None
    return (
        f"at this rate people will label ~{share:.0%} of the pool: give the model known positives (lsun-hitl"
        " seed-positives, for a new run) or a pretrained backbone (--weights), or accept the cost"
    )


def forecast(
    *,
    pool: int,
    human: int,
    open_: int,
    scored: int,
    decided: int,
    iteration: int,
    next_sample: int,
    params: CascadeParams,
) -> Forecast:
    """Project the run to its end at the last model's rate (pure: no storage).

    Parameters
    ----------
    pool, human, open_
        The pool's size, the images people labeled so far, and those still open after ``iteration``.
    scored, decided
        What the last model scored and how many of those it decided: each later iteration is assumed to decide
        the same share of the images it scores.
    next_sample
        Images each later iteration sends to people (capped at ``params.max_sample_fraction`` of what is open).

    Each projected iteration sends its sample to people and decides ``decided / scored`` of the rest, until the
    loop's stop rules hold (few images left, fewer than another sample, the iteration limit); people then label
    what is left when ``params.remainder`` is "people". A stalled model (rate 0) forecasts that people label
    everything still open.
    """
    rate = decided / scored if scored else 0.0
    human_f, open_f, more = float(human), float(open_), 0
    for it in range(iteration + 1, params.max_iterations + 1):
        if open_f <= max(params.stop_unlabeled, params.stop_unlabeled_fraction * pool):
            break
        ask = min(next_sample, int(params.max_sample_fraction * open_f), open_f)
        if params.stop_when_cheaper and open_f <= ask:
            break
        if params.human_budget is not None and human_f + ask > params.human_budget:
            break
        human_f += ask
        open_f = (open_f - ask) * (1 - rate)
        more = it - iteration
    if params.remainder == "people" and (params.human_budget is None or human_f + open_f <= params.human_budget):
        human_f += open_f
    return Forecast(human=int(round(human_f)), pool=pool, decided_share=rate, iterations=more)
