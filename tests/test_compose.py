"""Composition schedules and the frequency score against re-derivations written here from the reference code's
behaviour (Yqcca/CMLoRA ``pipeline_offline.py``, Zhong et al.'s switch callback, ``fft_analysis.ipynb``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorweb_ops import LoRWeBError
from lorweb_ops.compose import (
    CombineState,
    ComposeSettings,
    caching_active,
    cmlora_weights,
    combine,
    composition_plan,
    dominant_schedule,
    frequency_score,
    grayscale_uint8,
    high_frequency_score,
    late_start,
    nonuniform_steps,
    parse_strengths,
    partition,
    radial_profile,
    refresh_steps,
    render_profiles,
    rotation_steps,
    scheduled_plans,
    step_index,
    strength_schedule,
    switch_schedule,
)

CACHE_OF_INTERVAL = {0: "non-uniform", 1: "off", 2: "uniform", 3: "uniform", 5: "uniform"}


def reference_offline(steps: int, n_high: int, n_low: int, cache_interval: int) -> dict:
    """The offline pipeline's loop, step by step: dominant index, cache entry cleared, whether caching is on."""
    if cache_interval == 0:
        first, second = int(0.375 * steps), int(0.875 * steps)
        interval_seq = list(range(0, first, 2)) + list(range(first, second, 3)) + list(range(second, steps, 2))
    elif cache_interval == 1:
        interval_seq = list(range(steps))
    else:
        interval_seq = list(range(0, steps, cache_interval))
    indicator, dominant, cleared = 0, [], []
    for i in range(steps):
        if i in interval_seq:
            if n_low == 0 or i <= 120:
                cleared.append(i)  # prv_features_list[indicator % n_high] = None
            # else: the entry of a list copy is cleared -> no refresh
            indicator += 1
        if n_low == 0 or i <= 120:
            dominant.append((indicator - 1) % n_high)
        else:
            dominant.append(((indicator - 1) % n_high) + 1)
    return {"rotations": interval_seq, "dominant": dominant, "cleared": cleared, "caching": cache_interval > 1}


def described(steps: int, n_high: int, n_low: int, rotations: list[int], fraction: float = 0.55) -> list[int]:
    """The described method: the late phase starts at round(fraction * T); late, every low-frequency LoRA joins."""
    late, count, dominant = round(fraction * steps), n_high + n_low, []
    for step in range(steps):
        k = sum(1 for r in rotations if r <= step)
        pool = list(range(n_high)) if step < late or n_low == 0 else list(range(1, count))
        dominant.append(pool[(k - 1) % len(pool)])
    return dominant


@pytest.mark.parametrize("steps", [220, 28])
@pytest.mark.parametrize("n_high,n_low", [(2, 0), (3, 0), (2, 1), (3, 1), (1, 1), (2, 2)])
@pytest.mark.parametrize("interval", [0, 1, 2, 3, 5])
def test_reference_behaviour_matches_the_offline_pipeline(steps, n_high, n_low, interval):
    expected = reference_offline(steps, n_high, n_low, interval)
    cache = CACHE_OF_INTERVAL[interval]
    rotations = rotation_steps(steps, cache, interval)
    assert rotations == expected["rotations"]
    late = late_start(steps, 0.55, reference=True)
    count = n_high + n_low
    assert dominant_schedule(steps, count, n_high, rotations, late, reference=True) == expected["dominant"]
    caching = caching_active(cache, interval, reference=True)
    assert caching == expected["caching"]
    refreshed = refresh_steps(steps, rotations, cache, late, reference=True, has_low=n_low > 0)
    assert refreshed == (expected["cleared"] if caching else [])


@pytest.mark.parametrize("steps", [220, 28])
@pytest.mark.parametrize("n_high,n_low", [(2, 0), (3, 0), (2, 1), (3, 1), (1, 1), (2, 2), (1, 3)])
@pytest.mark.parametrize("cache,interval", [("non-uniform", 3), ("uniform", 2), ("uniform", 5), ("off", 3)])
def test_described_method_schedules(steps, n_high, n_low, cache, interval):
    rotations = rotation_steps(steps, cache, interval)
    late = late_start(steps, 0.55)
    dominant = dominant_schedule(steps, n_high + n_low, n_high, rotations, late)
    assert dominant == described(steps, n_high, n_low, rotations)
    # caching follows the schedule in every mode but "off" (the reference turns it off for non-uniform)
    assert caching_active(cache, interval, reference=False) == (cache != "off")
    assert refresh_steps(steps, rotations, cache, late, reference=False) == ([] if cache == "off" else rotations)


def test_non_uniform_schedule_sizes():
    assert nonuniform_steps(28) == [0, 2, 4, 6, 8, 10, 13, 16, 19, 22, 24, 26]
    full = nonuniform_steps(220)
    assert len(full) == 92
    assert len([s for s in full if s < 82]) == 41 and len([s for s in full if 82 <= s < 192]) == 37


def test_low_frequency_lora_dominates_at_28_steps_only_in_the_described_method():
    """The reference's literal step 121 never comes at 28 steps: its low-frequency LoRA (index 2) never leads."""
    rotations = nonuniform_steps(28)
    reference = dominant_schedule(28, 3, 2, rotations, late_start(28, 0.55, reference=True), reference=True)
    ours = dominant_schedule(28, 3, 2, rotations, late_start(28, 0.55))
    assert 2 not in reference and 2 in ours
    assert late_start(28, 0.55) == 15 and late_start(220, 0.55) == 121


def test_only_the_first_low_frequency_lora_dominates_in_the_reference():
    rotations = nonuniform_steps(220)
    reference = dominant_schedule(220, 4, 2, rotations, 121, reference=True)
    ours = dominant_schedule(220, 4, 2, rotations, 121)
    assert 3 not in reference and {2, 3} <= set(ours[121:])


def reference_switch(steps: int, count: int, tau: int) -> list[int]:
    """Zhong et al.'s callback: after step i with i > 0 and i % tau == 0 the next adapter is set."""
    active, used = 0, []
    for i in range(steps):
        used.append(active)
        if i > 0 and i % tau == 0:
            active = (active + 1) % count
    return used


@pytest.mark.parametrize("steps", [220, 28])
@pytest.mark.parametrize("count,tau", [(2, 5), (3, 5), (4, 1), (3, 7), (2, 300)])
def test_switch_schedules(steps, count, tau):
    assert switch_schedule(steps, count, tau, reference_offset=True) == reference_switch(steps, count, tau)
    assert switch_schedule(steps, count, tau) == [(s // tau) % count for s in range(steps)]
    first = switch_schedule(steps, count, tau)
    assert first[:tau] == [0] * min(tau, steps)


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_cmlora_weights_are_the_reference_mean_of_weighted_predictions(count):
    coefficient = count - 0.5  # dom_lora_coeff
    non_dominant = count / (coefficient + count - 1)
    dominant = non_dominant * coefficient
    heavy, light = cmlora_weights(count)
    assert heavy == pytest.approx(dominant / count, abs=1e-12) and light == pytest.approx(non_dominant / count)
    assert heavy + (count - 1) * light == pytest.approx(1.0)
    assert round(heavy, 3) == {2: 0.6, 3: 0.556, 4: 0.538, 5: 0.529}[count]


class LinearModel:
    """A model whose prediction is linear in the LoRA scales: ``base + sum_j scales[j] * effect[j]``; counts its
    forward passes. Linear is what makes a cached contribution exact, so the combined prediction has a closed form."""

    def __init__(self, count: int, size: int = 5, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.base = torch.randn(size, generator=generator, dtype=torch.float64)
        self.effects = torch.randn(count, size, generator=generator, dtype=torch.float64)
        self.forwards = 0

    def __call__(self, scales: list[float]) -> torch.Tensor:
        self.forwards += 1
        return self.base + torch.tensor(scales, dtype=torch.float64) @ self.effects

    def mix(self, weights, strengths) -> torch.Tensor:
        """sum_j w_j * (prediction with LoRA j alone at its strength), written out."""
        return sum(w * (self.base + s * e) for w, s, e in zip(weights, strengths, self.effects, strict=True))


def run_plans(plans, strengths):
    model, state = LinearModel(len(strengths)), CombineState()
    outputs, forwards = [], []
    for step, plan in enumerate(plans):
        before = model.forwards
        outputs.append(combine(model, plan, step, strengths, state, cache_key="cond"))
        forwards.append(model.forwards - before)
    return model, outputs, forwards


def test_cmlora_with_cached_contributions_costs_what_the_method_says_and_gives_the_full_mix():
    strengths = [0.8, 1.0, -0.5]
    plans = composition_plan(ComposeSettings("cmlora", cache="non-uniform"), 28, 3, 2)
    model, outputs, forwards = run_plans(plans, strengths)
    refresh = set(nonuniform_steps(28))
    # step 0 fills every cache (one base pass + 3); a refresh step re-runs the dominant and the base
    assert forwards == [4 if s == 0 else 2 if s in refresh else 1 for s in range(28)]
    assert all(math.isclose(sum(p.weights), 1.0) for p in plans)
    for plan, output in zip(plans, outputs, strict=True):
        torch.testing.assert_close(output, model.mix(plan.weights, strengths), rtol=0, atol=1e-12)


def test_composite_and_reference_cmlora_run_every_lora_every_step():
    strengths = [1.0, 0.7, 0.4]
    for plans in (
        composition_plan(ComposeSettings("composite"), 28, 3, 3),
        composition_plan(ComposeSettings("cmlora", cache="non-uniform", reference=True), 28, 3, 2),
    ):
        model, outputs, forwards = run_plans(plans, strengths)
        assert forwards == [3] * 28
        for plan, output in zip(plans, outputs, strict=True):
            torch.testing.assert_close(output, model.mix(plan.weights, strengths), rtol=0, atol=1e-12)


def test_switch_runs_the_one_active_lora_at_its_strength():
    strengths = [1.0, 0.7, 0.4]
    plans = composition_plan(ComposeSettings("switch", tau=5), 28, 3, 3)
    model, outputs, forwards = run_plans(plans, strengths)
    assert [p.fresh[0] for p in plans] == [(s // 5) % 3 for s in range(28)] and forwards == [1] * 28
    for step, output in enumerate(outputs):
        active = (step // 5) % 3
        torch.testing.assert_close(output, model.base + strengths[active] * model.effects[active])


def test_scheduled_strength_is_one_pass_with_every_lora_scaled_by_the_step_multiplier():
    strengths = [1.0, 0.5]
    plans = scheduled_plans(5, 2, start=1.0, end=0.0)
    model, outputs, forwards = run_plans(plans, strengths)
    assert forwards == [1] * 5 and all(plan.together for plan in plans)
    for step, output in enumerate(outputs):
        multiplier = 1.0 - step / 4
        expected = model.base + multiplier * (strengths[0] * model.effects[0] + strengths[1] * model.effects[1])
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)


def test_bad_settings_are_refused():
    with pytest.raises(LoRWeBError, match="method"):
        composition_plan(ComposeSettings("average"), 4, 2, 2)
    with pytest.raises(LoRWeBError, match="tau"):
        composition_plan(ComposeSettings("switch", tau=0), 4, 2, 2)
    with pytest.raises(LoRWeBError, match="late_fraction"):
        composition_plan(ComposeSettings("cmlora", late_fraction=1.5), 4, 2, 2)
    with pytest.raises(LoRWeBError, match="numbers separated"):
        parse_strengths("1.0, loud")


def test_step_index_from_sigmas():
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [step_index(sigmas, s) for s in (1.0, 0.75, 0.5, 0.25)] == [0, 1, 2, 3]
    assert step_index(sigmas, math.sqrt(1.0 * 0.75)) == 0  # DPM-2's midpoint stays in its step
    assert step_index(sigmas, 0.5 * (1 + 1e-6)) == 2  # float noise on the sigma
    assert step_index(sigmas, 0.0) == 3  # never past the last step


def test_strength_schedules():
    assert strength_schedule(5, 1.0, 0.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert strength_schedule(3, 9.0, 9.0, [0.5]) == [0.5, 0.5, 0.5]
    assert strength_schedule(5, 0, 0, [1.0, 0.0, 1.0]) == pytest.approx([1.0, 0.5, 0.0, 0.5, 1.0])
    assert parse_strengths(" 1, 0.5;0.25 ") == [1.0, 0.5, 0.25] and parse_strengths("") == []


# -------------------------------------------------------------------------------------------------- the score


def reference_score(rgb_uint8: np.ndarray) -> tuple[np.ndarray, float]:
    """The notebook's statistic in float64, one ring at a time."""
    gray = rgb_uint8.astype(np.float64).mean(axis=2).astype(np.uint8).astype(np.float64)
    log_amplitude = np.log(np.abs(np.fft.fftshift(np.fft.fft2(gray))) + 1e-8)
    rows, cols = gray.shape
    y, x = np.ogrid[:rows, :cols]
    radius = np.sqrt((y - rows // 2) ** 2 + (x - cols // 2) ** 2)
    rings = int(radius.max()) + 1
    profile = np.zeros(rings, dtype=np.float32)
    for i in range(rings):
        profile[i] = np.mean(log_amplitude[(radius >= i) & (radius < i + 1)])
    profile = profile / profile.max()
    start = int(0.2 * (rings - 1))
    return profile, float(np.mean(profile[start:].astype(np.float64)))


def noise_image(size: tuple[int, int], blur: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.random((*size, 3))
    if blur:
        kernel = np.ones(blur) / blur
        for axis in (0, 1):
            image = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, image)
    return (255 * image).astype(np.uint8)


@pytest.mark.parametrize("size", [(64, 64), (96, 80), (512, 512)])
def test_score_equals_the_reference_computation(size):
    for blur in (0, 5):
        image = noise_image(size, blur, seed=size[0] + blur)
        profile, score = reference_score(image)
        ours = radial_profile(grayscale_uint8(image))
        np.testing.assert_allclose(ours, profile, rtol=1e-6, atol=1e-7)
        assert high_frequency_score(ours) == pytest.approx(score, rel=1e-6)
        if size == (512, 512):
            assert int(0.2 * (len(ours) - 1)) == 72  # the reference's literal for 512²


@pytest.mark.parametrize("size", [(64, 64), (256, 256)])
def test_white_noise_scores_above_blurred_noise(size):
    white = frequency_score(noise_image(size, 0, seed=1).astype(np.float32) / 255.0)
    blurred = frequency_score(noise_image(size, 7, seed=1).astype(np.float32) / 255.0)
    assert white > blurred


def test_float_images_are_truncated_like_saved_images():
    image = np.full((4, 4, 3), 0.5, dtype=np.float32)
    assert (grayscale_uint8(image) == 127).all()  # 127.5 truncated, as np.clip(255 x).astype(uint8) does


def test_partition_and_plot():
    order, highs = partition([0.01, -0.02, 0.03], threshold=0.0)
    assert order == [2, 0, 1] and highs == 2
    profiles = {"no LoRA": np.linspace(1, 0.5, 40), "style": np.linspace(1, 0.7, 40)}
    image = render_profiles(profiles)
    assert image.size == (640, 400) and len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 3


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: strength_schedule(28, 10**400, 0.0), "strengths must be numbers from -10 to 10, got an integer of"),
        (lambda: strength_schedule(28, 1.0, float("nan")), "strengths must be numbers from -10 to 10, got nan"),
        (lambda: parse_strengths("1," * 60_000), "the strength list is 120000 characters long"),
        (lambda: parse_strengths("1, x" + "y" * 10_000), "got '1, xyyyy"),
        (lambda: composition_plan(ComposeSettings("cmlora"), 10**9, 3, 2), "steps must be a whole number from 1 to"),
        (lambda: composition_plan(ComposeSettings("switch", tau=-(10**400)), 28, 3, 3), "tau must be a whole number"),
        (lambda: composition_plan(ComposeSettings("cmlora", late_fraction=10**400), 28, 3, 2), "late_fraction"),
        (lambda: composition_plan(ComposeSettings("x" * 10_000), 28, 3, 2), "method must be one of"),
    ],
)
def test_client_values_of_any_size_get_a_bounded_message(call, message):
    with pytest.raises(LoRWeBError, match=message) as error:
        call()
    assert len(str(error.value)) < 400
