"""Export of one analogy's composed LoRA as an ordinary LoRA file: keys, exactness, SVD rank reduction, metadata."""

from __future__ import annotations

import os

import pytest
import torch
from lorweb_testing import GOLDEN_CKPT, golden_tensors, random_basis_tensors, write_safetensors
from safetensors import safe_open
from safetensors.torch import load_file

import lorweb_ops
from lorweb_ops import LoRWeBError, MixWeights
from lorweb_ops.export import export_metadata, module_factors, peft_keys, reduce_rank
from lorweb_ops.flux_layout import released_module_names

NUM_LORAS, RANK, HIDDEN = 4, 3, 16  # K*r = 12 < 16, so a reduced rank really loses something


@pytest.fixture(scope="module")
def golden_basis():
    return lorweb_ops.load_basis(GOLDEN_CKPT)


@pytest.fixture(scope="module")
def golden_weights(golden_basis):
    coefficients = lorweb_ops.mixing_coefficients(golden_basis, golden_tensors()["query_square"])
    return MixWeights(golden_basis.path, golden_basis.modules, coefficients, 0.75)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A random basis whose K*r (12) is below the layer widths, and one analogy's weights for it."""
    path = tmp_path_factory.mktemp("wide") / "wide.safetensors"
    modules = released_module_names(depth=1, single_depth=1)
    write_safetensors(
        path,
        random_basis_tensors(
            modules, hidden=HIDDEN, mlp=4 * HIDDEN, num_loras=NUM_LORAS, rank=RANK, dtype=torch.float32, seed=3
        ),
    )
    basis = lorweb_ops.load_basis(path, use_cache=False)
    coefficients = lorweb_ops.mixing_coefficients(basis, torch.randn(basis.query_dim, generator=_seed(5)))
    return basis, MixWeights(basis.path, basis.modules, coefficients, 1.0)


def _seed(value: int) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def explicit_delta(module_basis, coefficients: torch.Tensor) -> torch.Tensor:
    """sum_k c_k (A_k B_k)^T in float64, written out here: independent of the code under test."""
    a, b = module_basis.lora_A.double(), module_basis.lora_B.double()
    return sum(c * (a[k] @ b[k]).T for k, c in enumerate(coefficients.double().tolist()))


def test_full_rank_export_reproduces_the_reference_delta_of_every_module(golden_basis, golden_weights):
    exported = lorweb_ops.export_lora(golden_basis, golden_weights)
    full = golden_basis.num_loras * golden_basis.rank
    golden = golden_tensors()
    for module in golden_basis.modules:
        key_a, key_b, key_alpha = peft_keys(module)
        down, up = exported.tensors[key_a], exported.tensors[key_b]
        expected = golden[f"released_like::dW::{module}"].float()  # the reference implementation's own numbers
        assert down.shape == (full, expected.shape[1]) and up.shape == (expected.shape[0], full)
        assert down.dtype == up.dtype == torch.float32
        torch.testing.assert_close(up @ down, expected, rtol=0, atol=1e-5, msg=module)
        assert exported.tensors[key_alpha].shape == () and exported.tensors[key_alpha].item() == full
        assert exported.ranks[module] == full and exported.energy[module] == 1.0


def test_keys_are_diffusers_peft_flux_names_and_nothing_else(golden_basis, golden_weights):
    exported = lorweb_ops.export_lora(golden_basis, golden_weights)
    expected = {key for module in golden_basis.modules for key in peft_keys(module)}
    assert set(exported.tensors) == expected
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in expected
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in expected
    assert "transformer.transformer_blocks.0.attn.to_out.0.alpha" in expected


def test_strength_is_not_folded_into_the_file(golden_basis, golden_weights):
    unit = MixWeights(golden_weights.basis_path, golden_weights.modules, golden_weights.coefficients, 1.0)
    first = lorweb_ops.export_lora(golden_basis, golden_weights)
    second = lorweb_ops.export_lora(golden_basis, unit)
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    assert first.metadata["lorweb_strength"] == "0.75"


def test_reduce_rank_matches_the_dense_svd_without_building_it(wide):
    basis, weights = wide
    module = "single_transformer_blocks.0.proj_out"  # [16, 80], K*r = 12
    up, down = lorweb_ops.lowrank_factors(basis.weights[module], weights.coefficients[module])
    dense = up.double() @ down.double()
    sigma = torch.linalg.svdvals(dense)
    for rank in (1, 4, 11):
        up_k, down_k, kept = reduce_rank(up, down, rank)
        assert up_k.shape == (16, rank) and down_k.shape == (rank, 80)
        assert kept == pytest.approx(float(sigma[:rank].square().sum() / sigma.square().sum()), abs=1e-12)
        # Eckart-Young: the error of the best rank-k approximation is exactly the energy left out
        error = (dense - up_k @ down_k).square().sum()
        assert float(error) == pytest.approx(float(sigma[rank:].square().sum()), rel=1e-9, abs=1e-18)
    up_n, down_n, kept = reduce_rank(up, down, 12)
    assert kept == pytest.approx(1.0, abs=1e-15)
    torch.testing.assert_close(up_n @ down_n, dense, rtol=0, atol=1e-10)


def test_kept_energy_grows_with_rank_and_is_one_from_k_times_r(wide):
    basis, weights = wide
    full = NUM_LORAS * RANK
    means, minimums = [], []
    for rank in range(1, full):
        exported = lorweb_ops.export_lora(basis, weights, rank=rank)
        assert set(exported.ranks.values()) == {rank}
        assert all(0.0 < e <= 1.0 for e in exported.energy.values())
        means.append(exported.energy_mean)
        minimums.append(exported.energy_min)
        assert exported.metadata["lorweb_exact"] == "false"
        assert exported.tensors[peft_keys(basis.modules[0])[2]].item() == rank
    assert means == sorted(means) and minimums == sorted(minimums) and means[-1] < 1.0
    exact = lorweb_ops.export_lora(basis, weights, rank=0)
    for rank in (full, full + 5, 4096):
        same = lorweb_ops.export_lora(basis, weights, rank=rank)
        assert same.energy_min == 1.0 and same.max_rank == full
        assert all(torch.equal(same.tensors[k], exact.tensors[k]) for k in exact.tensors)


def test_reduced_factors_keep_each_layers_best_approximation(wide):
    basis, weights = wide
    exported = lorweb_ops.export_lora(basis, weights, rank=5)
    for module in basis.modules:
        key_a, key_b, _ = peft_keys(module)
        dense = explicit_delta(basis.weights[module], weights.coefficients[module])
        sigma = torch.linalg.svdvals(dense)
        error = (dense - exported.tensors[key_b].double() @ exported.tensors[key_a].double()).square().sum()
        assert float(error) == pytest.approx(float(sigma[5:].square().sum()), rel=1e-5, abs=1e-12), module
        assert exported.energy[module] == pytest.approx(float(sigma[:5].square().sum() / sigma.square().sum()))


def test_a_zero_mix_loses_nothing_and_makes_no_nan(wide):
    basis, _ = wide
    zeros = {m: torch.zeros(NUM_LORAS) for m in basis.modules}
    exported = lorweb_ops.export_lora(basis, MixWeights(basis.path, basis.modules, zeros), rank=2)
    assert exported.energy_min == 1.0
    assert all(torch.isfinite(t).all() and not t.any() for k, t in exported.tensors.items() if "alpha" not in k)


def test_half_precision_export(golden_basis, golden_weights):
    exported = lorweb_ops.export_lora(golden_basis, golden_weights, dtype="bfloat16")
    assert {t.dtype for k, t in exported.tensors.items() if not k.endswith("alpha")} == {torch.bfloat16}
    assert exported.metadata["lorweb_exact"] == "false" and exported.metadata["lorweb_dtype"] == "bfloat16"


def test_metadata_says_what_it_is_where_it_came_from_and_the_licence(golden_basis, golden_weights):
    metadata = lorweb_ops.export_lora(golden_basis, golden_weights).metadata
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert metadata["lorweb_kind"] == "LoRWeB composed analogy LoRA"
    assert metadata["lorweb_basis"] == os.path.basename(GOLDEN_CKPT)
    assert "(a, a', b)" in metadata["lorweb_description"] and "approximation" in metadata["lorweb_description"]
    assert "NVIDIA" in metadata["license"] and "non-commercial" in metadata["license"]
    assert metadata["lorweb_exact"] == "true" and metadata["lorweb_rank"] == "6"
    assert metadata["lorweb_modules"] == "20" and metadata["lorweb_energy_min"] == "1.000000"


def test_written_file_is_plain_safetensors_and_never_overwritten(tmp_path, golden_basis, golden_weights):
    exported = lorweb_ops.export_lora(golden_basis, golden_weights)
    path = tmp_path / "analogy_00001_.safetensors"
    lorweb_ops.write_new_file(path, exported)
    loaded = load_file(str(path))
    assert set(loaded) == set(exported.tensors)
    assert all(torch.equal(loaded[k], exported.tensors[k]) for k in loaded)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == dict(exported.metadata)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        lorweb_ops.write_new_file(path, lorweb_ops.export_lora(golden_basis, golden_weights, rank=1))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


def test_weights_of_another_basis_are_refused(golden_basis, golden_weights, wide):
    basis, weights = wide
    with pytest.raises(LoRWeBError, match="made for the basis wide.safetensors.*connect that basis"):
        lorweb_ops.export_lora(
            golden_basis, MixWeights(weights.basis_path, golden_basis.modules, golden_weights.coefficients)
        )
    fewer = golden_basis.modules[:5]
    with pytest.raises(LoRWeBError, match="cover 5 modules .* has 20: 15 of the basis' modules are missing"):
        lorweb_ops.export_lora(golden_basis, MixWeights(golden_basis.path, fewer, golden_weights.coefficients))


def test_bad_rank_and_dtype_are_refused(golden_basis, golden_weights):
    with pytest.raises(LoRWeBError, match="rank must be 0"):
        lorweb_ops.export_lora(golden_basis, golden_weights, rank=-1)
    with pytest.raises(LoRWeBError, match="dtype must be one of float32, bfloat16, float16"):
        lorweb_ops.export_lora(golden_basis, golden_weights, dtype="int8")
    with pytest.raises(LoRWeBError, match="at least 1"):
        reduce_rank(torch.ones(4, 2), torch.ones(2, 4), 0)


def test_module_factors_at_full_rank_are_the_patch_factors(golden_basis, golden_weights):
    module = "transformer_blocks.0.attn.to_q"
    up, down, kept = module_factors(golden_basis, module, golden_weights.coefficients[module])
    patch_up, patch_down = lorweb_ops.lowrank_factors(golden_basis.weights[module], golden_weights.coefficients[module])
    assert torch.equal(up, patch_up.float()) and torch.equal(down, patch_down) and kept == 1.0
    assert export_metadata(golden_basis, golden_weights, {module: 6}, {module: 1.0}, "float32")["lorweb_rank"] == "6"
