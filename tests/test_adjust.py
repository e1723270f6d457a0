"""Moving through LoRA space: blending analogies, temperature / top-k / overrides, and the reverse analogy."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from lorweb_testing import GOLDEN_CKPT, golden_tensors
from PIL import Image
from tolerances import reordered_sum_tolerance

import lorweb_ops
from lorweb_ops import LoRWeBError, MixWeights
from lorweb_ops.adjust import check_same_basis


@pytest.fixture(scope="module")
def basis():
    return lorweb_ops.load_basis(GOLDEN_CKPT)


def weights_for(basis, query, strength=1.0) -> MixWeights:
    return MixWeights(basis.path, basis.modules, lorweb_ops.mixing_coefficients(basis, query), strength)


@pytest.fixture(scope="module")
def first(basis):
    return weights_for(basis, golden_tensors()["query_square"], 0.5)


@pytest.fixture(scope="module")
def second(basis):
    return weights_for(basis, torch.randn(basis.query_dim, generator=torch.Generator().manual_seed(9)) * 4, 1.5)


@pytest.fixture(scope="module")
def signed(basis):
    """A tanh mix: signed coefficients that do not sum to 1."""
    tanh = lorweb_ops.load_basis(GOLDEN_CKPT, {"lora_softmax": False})
    return weights_for(tanh, golden_tensors()["query_square"])


# ---- blend -------------------------------------------------------------------------------------------


def test_blend_endpoints_are_the_inputs_exactly(first, second):
    for t, expected in ((0.0, first), (1.0, second)):
        blended = lorweb_ops.blend_weights(first, second, t)
        assert all(torch.equal(blended.coefficients[m], expected.coefficients[m]) for m in first.modules)
        assert blended.strength == expected.strength


def test_blend_is_linear_in_coefficients_strength_and_delta(basis, first, second):
    blended = lorweb_ops.blend_weights(first, second, 0.25)
    assert blended.strength == pytest.approx(0.75 * 0.5 + 0.25 * 1.5)
    assert blended.modules == first.modules and blended.basis_path == first.basis_path
    for module in basis.modules:
        expected = 0.75 * first.coefficients[module] + 0.25 * second.coefficients[module]
        torch.testing.assert_close(blended.coefficients[module], expected, rtol=0, atol=0)
        delta = lorweb_ops.delta_weight(basis, module, blended.coefficients[module])
        mixed = 0.75 * lorweb_ops.delta_weight(
            basis, module, first.coefficients[module]
        ) + 0.25 * lorweb_ops.delta_weight(basis, module, second.coefficients[module])
        torch.testing.assert_close(delta, mixed, rtol=0, atol=1e-6)
    assert lorweb_ops.is_probability_mix(blended)  # softmax mixes stay on the simplex


def test_blend_refuses_weights_of_two_bases(first, second):
    other = replace(second, basis_path="/models/lorweb/other.safetensors")
    with pytest.raises(
        LoRWeBError,
        match="weights_1 belong to the basis golden_lorweb_ckpt.safetensors .* but "
        "weights_2 to other.safetensors.*same Load LoRA Basis",
    ):
        lorweb_ops.blend_weights(first, other, 0.5)
    fewer = replace(second, modules=second.modules[:3])
    with pytest.raises(LoRWeBError, match="cover different modules \\(20 vs 3\\)"):
        check_same_basis(first, fewer)


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan"), "0.5", 10**400, -(10**4000), True])
def test_blend_refuses_t_outside_0_1(first, second, t):
    with pytest.raises(LoRWeBError, match="t must be a number from 0"):
        lorweb_ops.blend_weights(first, second, t)


# ---- adjust: temperature ------------------------------------------------------------------------------


def test_defaults_change_nothing(first):
    assert lorweb_ops.adjust_mix(first) is first
    assert lorweb_ops.adjust_mix(first, 1.0, 0, {}) is first


def entropy(c: torch.Tensor) -> float:
    p = c[c > 0]
    return float(-(p * p.log()).sum())


def test_temperature_sharpens_and_flattens_softmax_mixes(first):
    cold = lorweb_ops.adjust_mix(first, temperature=0.5)
    hot = lorweb_ops.adjust_mix(first, temperature=3.0)
    for module in first.modules:
        c = first.coefficients[module]
        expected = c.pow(2) / c.pow(2).sum()  # softmax(log c / 0.5) = c^2 renormalised
        torch.testing.assert_close(cold.coefficients[module], expected, rtol=0, atol=1e-6)
        assert entropy(cold.coefficients[module]) < entropy(c) < entropy(hot.coefficients[module])
        assert torch.argmax(cold.coefficients[module]) == torch.argmax(c)
        assert float(hot.coefficients[module].sum()) == pytest.approx(1.0, abs=1e-6)
    assert cold.strength == first.strength


def test_temperature_keeps_zero_weights_zero(first):
    sparse = lorweb_ops.adjust_mix(first, top_k=2)
    sharper = lorweb_ops.adjust_mix(sparse, temperature=0.3)
    for module in first.modules:
        zero = sparse.coefficients[module] == 0
        assert zero.sum() == 1 and (sharper.coefficients[module][zero] == 0).all()
        assert torch.isfinite(sharper.coefficients[module]).all()


def test_temperature_on_a_signed_mix_is_a_signed_power_without_renormalising(signed):
    assert not lorweb_ops.is_probability_mix(signed)
    adjusted = lorweb_ops.adjust_mix(signed, temperature=0.5)
    for module in signed.modules:
        c = signed.coefficients[module]
        torch.testing.assert_close(adjusted.coefficients[module], c.sign() * c.abs().pow(2.0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan"), 10**400, 100.5, "1"])
def test_bad_temperature_is_refused(first, temperature):
    with pytest.raises(LoRWeBError, match="temperature must be a number from 0.01 to 100"):
        lorweb_ops.adjust_mix(first, temperature=temperature)


# ---- adjust: top-k and overrides ----------------------------------------------------------------------


def test_top_k_keeps_the_largest_and_renormalises(first):
    kept = lorweb_ops.adjust_mix(first, top_k=1)
    two = lorweb_ops.adjust_mix(first, top_k=2)
    for module in first.modules:
        c = first.coefficients[module]
        one_hot = torch.zeros_like(c)
        one_hot[torch.argmax(c)] = 1.0
        assert torch.equal(kept.coefficients[module], one_hot)
        smallest = torch.argmin(c)
        expected = c.clone()
        expected[smallest] = 0
        # the renormalising sum may add in another order: weights <= 1, the reordering bound of K terms
        bound = reordered_sum_tolerance(c.numel(), 1.0)
        torch.testing.assert_close(two.coefficients[module], expected / expected.sum(), rtol=0, atol=bound)
    assert lorweb_ops.adjust_mix(first, top_k=3) is first  # keeping all K is no change at all


def test_top_k_on_a_signed_mix_uses_magnitudes_and_does_not_renormalise(signed):
    kept = lorweb_ops.adjust_mix(signed, top_k=1)
    for module in signed.modules:
        c = signed.coefficients[module]
        index = torch.argmax(c.abs())
        assert kept.coefficients[module][index] == c[index]
        assert int((kept.coefficients[module] != 0).sum()) == 1


def test_override_sets_a_weight_before_normalisation(first):
    adjusted = lorweb_ops.adjust_mix(first, overrides={0: 1.0})
    for module in first.modules:
        c = first.coefficients[module].clone()
        c[0] = 1.0
        bound = reordered_sum_tolerance(c.numel(), 1.0)  # the sum may add in another order; weights <= 1
        torch.testing.assert_close(adjusted.coefficients[module], c / c.sum(), rtol=0, atol=bound)
    only_two = lorweb_ops.adjust_mix(first, overrides={0: 0.0, 1: 0.0})
    for module in first.modules:
        assert only_two.coefficients[module].tolist() == [0.0, 0.0, 1.0]


def test_order_is_temperature_then_override_then_top_k(first):
    adjusted = lorweb_ops.adjust_mix(first, temperature=0.5, top_k=1, overrides={2: 5.0})
    for module in first.modules:
        assert adjusted.coefficients[module].tolist() == [0.0, 0.0, 1.0]


def test_signed_override_is_kept_as_given(signed):
    adjusted = lorweb_ops.adjust_mix(signed, overrides={1: -0.25})
    assert all(float(adjusted.coefficients[m][1]) == -0.25 for m in signed.modules)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", {}),
        ("   ", {}),
        ("7=1.0, 3=0.5", {7: 1.0, 3: 0.5}),
        ("0 = 0.25;2=1e-1\n1=-3", {0: 0.25, 2: 0.1, 1: -3.0}),
        ("4=1,", {4: 1.0}),
    ],
)
def test_override_text_is_parsed(text, expected):
    assert lorweb_ops.parse_overrides(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("7", "override item '7' is not 'index=weight'"),
        ("=1", "override item '=1' is not 'index=weight'"),
        ("x=1", "override index 'x' is not a whole number >= 0"),
        ("-1=0.5", "override index '-1' is not a whole number >= 0"),
        ("3=abc", "override weight 'abc' for basis LoRA 3 is not a number"),
        ("3=nan", "must be a finite number"),
        ("3=1, 3=2", "sets basis LoRA 3 twice"),
        ("9" * 4000 + "=1", "override index '9999"),
        ("1=" + "9" * 4000, "must be a finite number, got '9999"),
        ("1=1, " * 1000, "override is 5000 characters long; give at most 4096"),
    ],
)
def test_bad_override_text_says_what_is_wrong(text, message):
    with pytest.raises(LoRWeBError, match=message.replace("(", r"\(")) as error:
        lorweb_ops.parse_overrides(text)
    assert ("e.g. '7=1.0, 3=0.5'" in str(error.value)) == ("finite" not in message)


def test_override_outside_the_basis_and_negative_softmax_weights_are_refused(first):
    with pytest.raises(LoRWeBError, match="names basis LoRA 5 but the basis has 3 LoRAs, numbered 0 to 2"):
        lorweb_ops.adjust_mix(first, overrides={5: 1.0})
    with pytest.raises(LoRWeBError, match="softmax mix .* negative override weights"):
        lorweb_ops.adjust_mix(first, overrides={1: -0.5})
    with pytest.raises(LoRWeBError, match="every weight of layer .* is 0"):
        lorweb_ops.adjust_mix(first, top_k=1, overrides={0: 0.0, 1: 0.0, 2: 0.0})
    for top_k in (-2, -(10**400), 1.5, "3", None):
        with pytest.raises(LoRWeBError, match="top_k must be 0"):
            lorweb_ops.adjust_mix(first, top_k=top_k)
    assert lorweb_ops.adjust_mix(first, top_k=10**400).coefficients == first.coefficients  # keeps all


# ---- weights against a basis ----------------------------------------------------------------------------


def test_weights_fit_only_their_own_basis(basis, first):
    lorweb_ops.check_weights_fit(basis, first)
    with pytest.raises(
        LoRWeBError, match="made for the basis elsewhere.safetensors .*not for golden_lorweb_ckpt.safetensors"
    ):
        lorweb_ops.check_weights_fit(basis, replace(first, basis_path="/x/elsewhere.safetensors"))
    with pytest.raises(LoRWeBError, match="cover 19 modules .* has 20: 1 of the basis' modules are missing"):
        lorweb_ops.check_weights_fit(basis, replace(first, modules=first.modules[1:]))
    wider = replace(first, coefficients={m: torch.ones(4) / 4 for m in first.modules})
    with pytest.raises(LoRWeBError, match="have \\[4\\] coefficients per layer but the basis .* has 3 LoRAs"):
        lorweb_ops.check_weights_fit(basis, wider)


def test_probability_mix_detection(first, signed):
    assert lorweb_ops.is_probability_mix(first) and not lorweb_ops.is_probability_mix(signed)
    assert math.isclose(float(first.as_matrix().sum(dim=1).mean()), 1.0, abs_tol=1e-6)


# ---- reverse analogy ------------------------------------------------------------------------------------


def test_reverse_swaps_a_and_a_prime_in_the_query():
    """The reverse switch encodes (a′, a, b): the a and a′ parts of the query trade places, b stays."""
    colours = {"a": (200, 10, 10), "a_prime": (10, 200, 10), "b": (10, 10, 200)}
    images = {name: Image.new("RGB", (32, 32), colour) for name, colour in colours.items()}

    def embed(batch: torch.Tensor) -> torch.Tensor:  # mean colour per image: tells the images apart
        return batch.mean(dim=(1, 2))

    forward = lorweb_ops.encode_analogy(images["a"], images["a_prime"], images["b"], embed)
    reverse = lorweb_ops.encode_analogy(images["a_prime"], images["a"], images["b"], embed)
    a, a_prime, b = forward.query.reshape(3, -1)
    assert torch.equal(reverse.query.reshape(3, -1), torch.stack([a_prime, a, b]))
    assert not torch.equal(a, a_prime)
    difference = lorweb_ops.encode_analogy(images["a_prime"], images["a"], images["b"], embed, query_mode="ca'-ca")
    assert torch.equal(difference.query, (a - a_prime).reshape(1, -1))
