"""lorweb_ops against the numbers the LoRWeB reference implementation produced (seed 777), fp32, 1e-5."""

import pytest
import torch
from lorweb_testing import GOLDEN, GOLDEN_CKPT, GOLDEN_FUSED_KEYS, GOLDEN_VARIANTS, golden_tensors

import lorweb_ops

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def golden():
    return golden_tensors()


@pytest.fixture(scope="module", params=list(GOLDEN_VARIANTS))
def variant(request, golden):
    basis = lorweb_ops.load_basis(GOLDEN_CKPT, GOLDEN_VARIANTS[request.param])
    return request.param, basis, lorweb_ops.mixing_coefficients(basis, golden["query_square"])


def test_coefficients_match_reference(variant, golden):
    name, basis, coefficients = variant
    assert len(coefficients) == 20
    for module in basis.modules:
        assert coefficients[module].dtype == torch.float32
        torch.testing.assert_close(coefficients[module], golden[f"{name}::coeffs::{module}"], rtol=0, atol=TOLERANCE)


def test_dense_delta_matches_reference(variant, golden):
    name, basis, coefficients = variant
    for module in basis.modules:
        delta = lorweb_ops.delta_weight(basis, module, coefficients[module])
        torch.testing.assert_close(delta, golden[f"{name}::dW::{module}"], rtol=0, atol=TOLERANCE)


def test_fused_bfl_delta_matches_reference(variant, golden):
    name, basis, coefficients = variant
    for key in GOLDEN_FUSED_KEYS:
        delta = lorweb_ops.flux_delta(basis, coefficients, key)
        torch.testing.assert_close(delta, golden[f"{name}::dW_fused::{key}"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("name", [v for v in GOLDEN_VARIANTS if v != "released_like"])
def test_layer_outputs_match_reference_adapter_forward(name, golden):
    """The static patch reproduces the reference layer outputs for token and modulation inputs.

    The golden outputs include the (unknown) base layer, so compare differences between two variants:
    the base cancels and what is left is x @ (dW_variant - dW_released)^T.
    """
    released = lorweb_ops.load_basis(GOLDEN_CKPT, {})
    other = lorweb_ops.load_basis(GOLDEN_CKPT, GOLDEN_VARIANTS[name])
    released_c = lorweb_ops.mixing_coefficients(released, golden["query_square"])
    other_c = lorweb_ops.mixing_coefficients(other, golden["query_square"])
    checked = 0
    for module in released.modules:
        delta = lorweb_ops.delta_weight(other, module, other_c[module]) - lorweb_ops.delta_weight(
            released, module, released_c[module]
        )
        for x_key, kind in ((f"x3d::{module}", "y3d"), ("x2d_temb", "y2d")):
            y_other = golden.get(f"{name}::{kind}::{module}")
            y_released = golden.get(f"released_like::{kind}::{module}")
            if y_other is not None and golden[x_key].shape[-1] == delta.shape[1]:
                torch.testing.assert_close(golden[x_key] @ delta.T, y_other - y_released, rtol=0, atol=TOLERANCE)
                checked += 1
    assert checked >= len(released.modules)


def test_query_shapes_the_reference_uses_are_accepted(golden):
    basis = lorweb_ops.load_basis(GOLDEN_CKPT, {})
    query = golden["query_square"]  # [1, 3, 5], as the reference hands it to the layers
    expected = lorweb_ops.mixing_coefficients(basis, query)
    for shaped in (query.reshape(-1), query.reshape(1, -1), query.double()):
        got = lorweb_ops.mixing_coefficients(basis, shaped)
        for module in basis.modules:
            torch.testing.assert_close(got[module], expected[module], rtol=0, atol=1e-7)


def test_softmax_coefficients_sum_to_one(golden):
    basis = lorweb_ops.load_basis(GOLDEN_CKPT, {})
    for values in lorweb_ops.mixing_coefficients(basis, golden["query_square"]).values():
        assert abs(values.sum().item() - 1.0) < 1e-6


def test_golden_files_are_the_recorded_ones():
    """tests/data/golden/README.md records each file's SHA-256: the reference numbers cannot change silently."""
    import hashlib
    import re

    recorded = re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", (GOLDEN / "README.md").read_text(), re.M)
    assert len(recorded) == 8
    for name, digest in recorded:
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == digest, name
