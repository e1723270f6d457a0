"""Carrying out one step's plan: which forward passes to run and how their predictions make the step's prediction.

Pure maths over a ``run(scales)`` callable, which returns the model's prediction with LoRA ``j`` applied at
``scales[j]`` (the host applies the low-rank terms on the activations). A mix of passes is
``sum_j w_j * prediction_j``; CMLoRA's cached mode replaces the passes of the non-dominant LoRAs by their cached
contribution (``prediction_j - base prediction``), refreshed on the plan's steps.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from .schedule import StepPlan

Run = Callable[[list[float]], torch.Tensor]


@dataclass
class CombineState:
    """One sampling run's memory: cached contributions per cache key (cond/uncond batch and shape)."""

    deltas: dict = field(default_factory=dict)  # cache key -> {lora index: prediction with it - base prediction}
    refreshed: dict = field(default_factory=dict)  # cache key -> last step at which the dominant was refreshed
    calls: list[tuple[int, int]] = field(default_factory=list)  # (step, forwards) per model call (benchmarks, tests)
    cache_bytes: int = 0  # the most the cached contributions held in this run (benchmarks)


def combine(
    run: Run, plan: StepPlan, step: int, strengths: Sequence[float], state: CombineState, cache_key: Hashable
) -> torch.Tensor:
    """The step's prediction under ``plan``; LoRA ``j`` always runs at ``strengths[j]`` times its plan weight."""
    count = len(strengths)
    if plan.together:
        state.calls.append((step, 1))
        return run([strengths[j] * plan.weights[j] for j in range(count)])
    if not plan.cached:
        state.calls.append((step, len(plan.fresh)))
        return weighted_sum([(plan.weights[j], run(_alone(strengths, j))) for j in plan.fresh])
    return _cached(run, plan, step, strengths, state, cache_key)


def weighted_sum(outputs: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    if len(outputs) == 1 and outputs[0][0] == 1.0:
        return outputs[0][1]
    total = outputs[0][1] * outputs[0][0]
    for weight, output in outputs[1:]:
        total += weight * output
    return total


def _alone(strengths: Sequence[float], index: int) -> list[float]:
    return [strength if j == index else 0.0 for j, strength in enumerate(strengths)]


def _cached(run: Run, plan: StepPlan, step: int, strengths, state: CombineState, key: Hashable) -> torch.Tensor:
    """CMLoRA with cached contributions: the dominant LoRA fresh, the others as (their prediction - base)."""
    dominant, count = plan.fresh[0], len(strengths)
    deltas = state.deltas.setdefault(key, {})
    refresh = plan.refresh is not None and state.refreshed.get(key) != step
    stale = [j for j in range(count) if j not in deltas or (refresh and j == dominant)]
    fresh = {dominant: run(_alone(strengths, dominant))}
    forwards = 1
    if stale:
        base = run([0.0] * count)
        forwards += 1
        for j in stale:
            if j not in fresh:
                fresh[j] = run(_alone(strengths, j))
                forwards += 1
            deltas[j] = fresh[j] - base
        if refresh:
            state.refreshed[key] = step
        held = sum(d.numel() * d.element_size() for cache in state.deltas.values() for d in cache.values())
        state.cache_bytes = max(state.cache_bytes, held)
    state.calls.append((step, forwards))
    # sum_j w_j y_j = y_dom + sum_{j != dom} w_j (delta_j - delta_dom)   (weights sum to 1)
    output = fresh[dominant].clone()
    for j, weight in enumerate(plan.weights):
        if j != dominant and weight:
            output += weight * (deltas[j] - deltas[dominant])
    return output
