"""Queries, coefficients and the low-rank patch factors the nodes hand to ComfyUI."""

import pytest
import torch
from lorweb_testing import GOLDEN_CKPT, golden_tensors

import lorweb_ops
from lorweb_ops import LoRWeBError
from lorweb_ops.analogy import Analogy


@pytest.fixture(scope="module")
def basis():
    return lorweb_ops.load_basis(GOLDEN_CKPT)


@pytest.fixture(scope="module")
def coefficients(basis):
    return lorweb_ops.mixing_coefficients(basis, golden_tensors()["query_square"])


def test_a_batch_of_queries_is_refused(basis):
    with pytest.raises(ValueError, match="batch of 2 analogies.*one after another"):
        lorweb_ops.mixing_coefficients(basis, torch.randn(2, 15))


def test_a_query_of_the_wrong_size_is_refused(basis):
    with pytest.raises(LoRWeBError, match="has 12 values but the basis expects 15"):
        lorweb_ops.mixing_coefficients(basis, torch.randn(1, 12))


def test_a_non_finite_query_is_refused(basis):
    query = torch.randn(15)
    query[3] = float("nan")
    with pytest.raises(LoRWeBError, match="NaN or Inf"):
        lorweb_ops.mixing_coefficients(basis, query)


def test_up_factor_is_a_view_of_the_basis_and_down_is_the_only_new_tensor(basis, coefficients):
    module = "single_transformer_blocks.0.proj_out"
    up, down = lorweb_ops.lowrank_factors(basis.weights[module], coefficients[module])
    stored = basis.weights[module].lora_B
    assert up.shape == (8, 6) and down.shape == (6, 40)
    assert up.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()
    assert down.dtype == torch.float32
    assert down.numel() == basis.num_loras * basis.rank * 40


def test_factors_equal_the_sum_of_weighted_basis_products(basis, coefficients):
    for module in basis.modules:
        weights = basis.weights[module]
        expected = sum(
            c * (weights.lora_A[k].float() @ weights.lora_B[k].float()).T
            for k, c in enumerate(coefficients[module].tolist())
        )
        torch.testing.assert_close(
            lorweb_ops.delta_weight(basis, module, coefficients[module]), expected, rtol=0, atol=1e-6
        )


def test_composed_patches_cover_every_module_with_row_slices(basis, coefficients):
    patches = lorweb_ops.composed_patches(basis, coefficients)
    assert len(patches) == len(basis.modules)
    targets = {p.target.module: p.target for p in patches}
    qkv_k = targets["transformer_blocks.0.attn.add_k_proj"]
    assert (qkv_k.model_key, qkv_k.row_start, qkv_k.row_count, qkv_k.fused) == (
        "diffusion_model.double_blocks.0.txt_attn.qkv.weight",
        8,
        8,
        True,
    )
    mlp = targets["single_transformer_blocks.0.proj_mlp"]
    assert (mlp.bfl_layer, mlp.row_start, mlp.row_count) == ("single_blocks.0.linear1", 24, 32)
    mod = targets["transformer_blocks.0.norm1_context.linear"]
    assert (mod.bfl_layer, mod.fused, mod.row_count) == ("double_blocks.0.txt_mod.lin", False, 48)


def test_patches_need_coefficients_for_every_module(basis, coefficients):
    partial = dict(list(coefficients.items())[:5])
    with pytest.raises(LoRWeBError, match="do not cover 15 modules"):
        lorweb_ops.composed_patches(basis, partial)


def test_analogy_must_fit_the_basis(basis):
    analogy = Analogy(torch.zeros(1, 15), "ca'-ca", {}, "CLIP", 15)
    with pytest.raises(LoRWeBError, match='query mode "ca\'-ca" but the basis uses "cat-aa\'b"'):
        lorweb_ops.check_analogy_fits(analogy, basis.settings, basis.query_dim)
    vit_h = Analogy(torch.zeros(1, 3 * 1024), "cat-aa'b", {}, "ViT-H", 1024)
    with pytest.raises(LoRWeBError, match="3072 values.*1024 per image.*expects 15 \\(5 per image\\)"):
        lorweb_ops.check_analogy_fits(vit_h, basis.settings, basis.query_dim)


def test_mix_weights_matrix(basis, coefficients):
    weights = lorweb_ops.MixWeights(basis.path, basis.modules, coefficients, 0.5)
    assert weights.as_matrix().shape == (20, 3)
