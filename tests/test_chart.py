"""The picture of the mix: summary data for the node UI and the IMAGE chart."""

import math

import torch
from lorweb_testing import GOLDEN_CKPT, golden_tensors

import lorweb_ops
from lorweb_ops.chart import block_matrix, dominant_loras, mix_entropy, mix_summary, render_mix_chart
from lorweb_ops.flux_layout import released_module_names


def golden_weights(strength=1.0):
    basis = lorweb_ops.load_basis(GOLDEN_CKPT)
    coefficients = lorweb_ops.mixing_coefficients(basis, golden_tensors()["query_square"])
    return lorweb_ops.MixWeights(basis.path, basis.modules, coefficients, strength)


def test_blocks_are_in_model_order_and_averaged():
    weights = golden_weights()
    labels, matrix = block_matrix(weights)
    assert labels == ["double 0", "single 0"]
    double = torch.stack([c for m, c in weights.coefficients.items() if m.startswith("transformer_blocks")]).mean(0)
    torch.testing.assert_close(matrix[0], double)


def test_entropy_of_uniform_and_one_hot_mixes():
    modules = tuple(released_module_names(1, 1))
    uniform = lorweb_ops.MixWeights("x", modules, {m: torch.full((4,), 0.25) for m in modules})
    one_hot = lorweb_ops.MixWeights("x", modules, {m: torch.tensor([0.0, 1.0, 0.0, 0.0]) for m in modules})
    assert math.isclose(mix_entropy(uniform)[0], math.log(4), rel_tol=1e-6)
    assert math.isclose(mix_entropy(uniform)[1], 1.0, rel_tol=1e-6)
    assert mix_entropy(one_hot)[0] < 1e-6
    assert dominant_loras(one_hot, 1) == [(1, 1.0)]


def test_summary_is_json_ready():
    import json

    summary = mix_summary(golden_weights(0.5))
    decoded = json.loads(json.dumps(summary))
    assert decoded["layers"] == 20 and decoded["num_loras"] == 3 and decoded["strength"] == 0.5
    assert len(decoded["heat"]) == 2 and all(len(row) == 3 and max(row) <= 255 for row in decoded["heat"])
    assert max(max(row) for row in decoded["heat"]) == 255


def test_chart_image():
    image = render_mix_chart(golden_weights())
    assert image.size == (768, 512) and image.mode == "RGB"
    assert len(image.getcolors(maxcolors=100_000)) > 10  # something was drawn
