"""When each LoRA acts over the denoising steps: LoRA Switch, LoRA Composite, CMLoRA and scheduled strength.

Everything here is a function of the step index ``s`` in ``0..T-1`` and the number of LoRAs: the plan says, for
each step, which LoRAs get a forward pass and how their predictions are weighted (``combine.py`` carries it out).

References: LoRA Switch / Composite (Zhong et al. 2024), CMLoRA (Zou et al., ICLR 2025, code ``Yqcca/CMLoRA``).
Where the reference code differs from the described method, both are offered; ``docs/compose.md`` lists each case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..checks import STRENGTH_LIMIT, is_number_in, show
from ..errors import LoRWeBError

#: bounds on what a client may ask for: steps, LoRAs, tau, intervals; strengths; a typed strength list
MAX_COUNT = 100_000
MAX_STRENGTH_LIST_CHARS = 100_000

METHODS = ("merge", "switch", "composite", "cmlora")
CACHE_MODES = ("non-uniform", "uniform", "off")
#: the reference's late threshold: ``i <= 120`` is early, so step 121 is the first late step (whatever T is)
REFERENCE_LATE_STEP = 121
#: 121 / 220, the reference's threshold as a fraction of its 220 steps
DEFAULT_LATE_FRACTION = 0.55


def switch_schedule(steps: int, count: int, tau: int, reference_offset: bool = False) -> list[int]:
    """The one active LoRA per step of LoRA Switch: rotate every ``tau`` steps, starting with the first.

    ``reference_offset`` reproduces Zhong et al.'s callback, which switches after step ``i > 0, i % tau == 0``,
    so the first LoRA gets ``tau + 1`` steps: ``0`` at step 0, ``((s - 1) // tau) % count`` after.
    """
    _check_positive(steps=steps, count=count, tau=tau)
    if reference_offset:
        return [0 if s == 0 else ((s - 1) // tau) % count for s in range(steps)]
    return [(s // tau) % count for s in range(steps)]


def nonuniform_steps(steps: int, c1: int = 2, c2: int = 3, bound1: float = 0.375, bound2: float = 0.875) -> list[int]:
    """CMLoRA's refresh steps: every ``c1`` in ``[0, b1 T)``, every ``c2`` in ``[b1 T, b2 T)``, every ``c1`` after.

    The bounds are truncated to integers as the reference does (``int(0.375 * T)``).
    """
    _check_positive(steps=steps, c1=c1, c2=c2)
    first, second = int(bound1 * steps), int(bound2 * steps)
    return list(range(0, first, c1)) + list(range(first, second, c2)) + list(range(second, steps, c1))


def uniform_steps(steps: int, interval: int) -> list[int]:
    """Refresh every ``interval`` steps from step 0 (``interval`` 1 = every step)."""
    _check_positive(steps=steps, interval=interval)
    return list(range(0, steps, interval))


def rotation_steps(steps: int, cache: str, interval: int) -> list[int]:
    """The steps at which the dominant LoRA advances (and, with caching, has its contribution refreshed)."""
    if cache == "non-uniform":
        return nonuniform_steps(steps)
    if cache == "uniform":
        return uniform_steps(steps, interval)
    if cache == "off":
        return uniform_steps(steps, 1)
    raise LoRWeBError(f"cache must be one of {', '.join(CACHE_MODES)}, got {show(cache)}.")


def late_start(steps: int, fraction: float, reference: bool = False) -> int:
    """First step of the late phase, in which low-frequency LoRAs may dominate.

    The reference hard-codes step 121 (``i <= 120`` is early) whatever ``T`` is: at 28 steps a low-frequency LoRA
    never dominates. The described method uses a fraction of ``T`` (default 0.55 = 121/220).
    """
    if reference:
        return REFERENCE_LATE_STEP
    if not is_number_in(fraction, 0.0, 1.0):
        raise LoRWeBError(f"late_fraction must be between 0 and 1, got {show(fraction)}.")
    return round(fraction * steps)


def dominance_pool(count: int, high_count: int, late: bool, reference: bool = False) -> list[int]:
    """Which LoRAs (indices into the set, high-frequency ones first) take turns dominating.

    Early: the high-frequency LoRAs. Late, if there are low-frequency LoRAs: the window shifts by one, dropping the
    first high-frequency LoRA. The reference shifts a window of the same length (indices ``1..n_high``), so only the
    first low-frequency LoRA is ever admitted; the described method admits all of them (``1..N-1``). With one
    low-frequency LoRA both are the same.
    """
    if not 0 <= high_count <= count:
        raise LoRWeBError(f"the high-frequency count {high_count} must be between 0 and the number of LoRAs {count}")
    if high_count == 0 or high_count == count:
        # no partition: every LoRA takes its turn throughout (the reference needs at least one high-frequency LoRA)
        return list(range(count))
    if not late:
        return list(range(high_count))
    return list(range(1, high_count + 1)) if reference else list(range(1, count))


def dominant_schedule(
    steps: int, count: int, high_count: int, rotations: Sequence[int], late_step: int, reference: bool = False
) -> list[int]:
    """The dominant LoRA of every step.

    A counter ``k`` counts the rotation steps reached so far (the reference's ``indicator``, also counted after the
    late threshold); the dominant is ``pool[(k - 1) % len(pool)]``, with the pool re-read at every step (so at the
    threshold the dominant moves even off-schedule, as in the reference).
    """
    rotation_set, counter, dominant = set(rotations), 0, []
    for step in range(steps):
        counter += step in rotation_set
        pool = dominance_pool(count, high_count, step >= late_step, reference)
        dominant.append(pool[(max(counter, 1) - 1) % len(pool)])
    return dominant


def cmlora_weights(count: int) -> tuple[float, float]:
    """(dominant, each non-dominant) convex weights: ``(N - 0.5) / (2N - 1.5)`` and ``1 / (2N - 1.5)``."""
    _check_positive(count=count)
    if count == 1:
        return 1.0, 0.0
    return (count - 0.5) / (2 * count - 1.5), 1.0 / (2 * count - 1.5)


def refresh_steps(
    steps: int, rotations: Sequence[int], cache: str, late_step: int, reference: bool, has_low: bool = True
) -> list[int]:
    """Steps at which the dominant LoRA's cached contribution is recomputed (caching modes only).

    The reference caches only with a uniform interval >= 2 (non-uniform turns caching off) and, after the late
    threshold and only when there are low-frequency LoRAs, clears an entry of a list copy, so nothing is refreshed
    any more. The described method refreshes on every rotation step.
    """
    if cache == "off" or (reference and cache == "non-uniform"):
        return []
    if reference and has_low:
        return [s for s in rotations if s < late_step]
    return list(rotations)


def caching_active(cache: str, interval: int, reference: bool) -> bool:
    """Whether cached contributions replace fresh passes at all."""
    if cache == "off" or (cache == "uniform" and interval <= 1):
        return False
    return not (reference and cache == "non-uniform")


@dataclass(frozen=True)
class StepPlan:
    """What one step runs. ``weights[j]`` is LoRA j's share of the prediction (they sum to 1).

    ``fresh``: LoRAs that get their own forward pass this step (with ``together``: one pass, every LoRA scaled by
    its weight, which need not sum to 1). ``cached``: True when the LoRAs not in ``fresh``
    use their cached contribution (prediction with the LoRA minus the base prediction) instead; ``refresh``: the LoRA
    whose cached contribution is recomputed this step (needs one extra base-model pass), or None.
    """

    weights: tuple[float, ...]
    fresh: tuple[int, ...]
    cached: bool = False
    refresh: int | None = None
    together: bool = False  # one pass with every LoRA at weights[j] (Scheduled Strength), not a mix of passes


@dataclass(frozen=True)
class ComposeSettings:
    method: str = "cmlora"
    tau: int = 5
    cache: str = "non-uniform"
    cache_interval: int = 3
    late_fraction: float = DEFAULT_LATE_FRACTION
    reference: bool = False

    def check(self) -> None:
        if self.method not in METHODS:
            raise LoRWeBError(f"method must be one of {', '.join(METHODS)}, got {show(self.method)}.")
        if self.cache not in CACHE_MODES:
            raise LoRWeBError(f"cache must be one of {', '.join(CACHE_MODES)}, got {show(self.cache)}.")
        _check_positive(tau=self.tau, cache_interval=self.cache_interval)
        late_start(1, self.late_fraction)


def composition_plan(settings: ComposeSettings, steps: int, count: int, high_count: int) -> list[StepPlan]:
    """The per-step plan of ``switch``, ``composite`` or ``cmlora`` for ``count`` LoRAs over ``steps`` steps."""
    settings.check()
    _check_positive(steps=steps, count=count)
    if settings.method == "switch":
        active = switch_schedule(steps, count, settings.tau, settings.reference)
        return [StepPlan(_one_hot(count, j), (j,)) for j in active]
    if settings.method == "composite":
        return [StepPlan(tuple([1.0 / count] * count), tuple(range(count)))] * steps
    if settings.method != "cmlora":
        raise LoRWeBError(f"method {settings.method!r} has no per-step plan (merge patches the weights once)")
    rotations = rotation_steps(steps, settings.cache, settings.cache_interval)
    late_step = late_start(steps, settings.late_fraction, settings.reference)
    dominant = dominant_schedule(steps, count, high_count, rotations, late_step, settings.reference)
    heavy, light = cmlora_weights(count)
    cached = caching_active(settings.cache, settings.cache_interval, settings.reference) and count > 1
    has_low = 0 < high_count < count
    refresh = set(refresh_steps(steps, rotations, settings.cache, late_step, settings.reference, has_low))
    plans = []
    for step, dom in enumerate(dominant):
        weights = tuple(heavy if j == dom else light for j in range(count))
        if not cached:
            plans.append(StepPlan(weights, tuple(range(count))))
        else:
            plans.append(StepPlan(weights, (dom,), True, dom if step in refresh else None))
    return plans


def strength_schedule(steps: int, start: float, end: float, values: Sequence[float] = ()) -> list[float]:
    """Strength per step: ``values`` spread evenly over the steps (linear in between), else start -> end linearly."""
    _check_positive(steps=steps)
    points = list(values) if values else [start, end]
    if not all(is_number_in(v, -STRENGTH_LIMIT, STRENGTH_LIMIT) for v in points):
        bad = next(v for v in points if not is_number_in(v, -STRENGTH_LIMIT, STRENGTH_LIMIT))
        raise LoRWeBError(f"strengths must be numbers from -{STRENGTH_LIMIT:g} to {STRENGTH_LIMIT:g}, got {show(bad)}.")
    points = [float(v) for v in points]
    if len(points) == 1 or steps == 1:
        return [points[0]] * steps
    positions = np.linspace(0.0, steps - 1, len(points))
    return [float(v) for v in np.interp(np.arange(steps), positions, points)]


def scheduled_plans(steps: int, count: int, start: float, end: float, values: Sequence[float] = ()) -> list[StepPlan]:
    """Scheduled Strength: every step one pass with all ``count`` LoRAs, each scaled by the step's multiplier."""
    multipliers = strength_schedule(steps, start, end, values)
    return [StepPlan(tuple([m] * count), tuple(range(count)), together=True) for m in multipliers]


def parse_strengths(text: str) -> list[float]:
    """``"1.0, 0.8, 0.5"`` -> floats; empty text -> []."""
    if len(text) > MAX_STRENGTH_LIST_CHARS:
        raise LoRWeBError(f"the strength list is {len(text)} characters long; give at most {MAX_STRENGTH_LIST_CHARS}.")
    parts = [p for p in text.replace(";", ",").replace("\n", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        message = f"the strength list must be numbers separated by commas (e.g. 1.0, 0.8, 0.5), got {show(text)}"
        raise LoRWeBError(message) from None
    if not all(math.isfinite(v) for v in values):
        raise LoRWeBError(f"the strength list must contain finite numbers, got {show(text)}")
    return values


def step_index(sigmas: Sequence[float], sigma: float, rtol: float = 1e-4) -> int:
    """The sampler step a model call at ``sigma`` belongs to, from the sampler's sigma list (``T + 1`` values).

    A call at ``sigmas[i]`` is step ``i``; a call between ``sigmas[i]`` and ``sigmas[i + 1]`` (DPM-2's midpoint)
    stays in step ``i``. The step is a function of the noise level, so a sampler that calls the model twice per step
    never advances a counter twice.
    """
    if len(sigmas) < 2:
        raise LoRWeBError("the sampler's sigma list has fewer than 2 values; there is no step to compose over")
    reached = sum(1 for s in sigmas[1:] if s >= sigma or math.isclose(s, sigma, rel_tol=rtol, abs_tol=1e-9))
    return min(reached, len(sigmas) - 2)


def _one_hot(count: int, index: int) -> tuple[float, ...]:
    return tuple(1.0 if j == index else 0.0 for j in range(count))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not is_number_in(value, 1, MAX_COUNT, whole=True):
            raise LoRWeBError(f"{name} must be a whole number from 1 to {MAX_COUNT}, got {show(value)}.")
