"""The on-disk basis format, config resolution, and the message of every bad input."""

import json
import os
import struct

import pytest
import torch
from lorweb_testing import GOLDEN_CKPT, golden_tensors, random_basis_tensors, write_ai_toolkit_config, write_safetensors
from safetensors.torch import load_file

import lorweb_ops
from lorweb_ops import LoRWeBError
from lorweb_ops.flux_layout import released_module_names

TWO_BLOCK_MODULES = released_module_names(depth=1, single_depth=1)


@pytest.fixture(autouse=True)
def fresh_cache():
    lorweb_ops.clear_basis_cache()
    yield
    lorweb_ops.clear_basis_cache()


def golden_as(tmp_path, dtype, keep=None, name="basis.safetensors"):
    tensors = {k: v.to(dtype) for k, v in load_file(str(GOLDEN_CKPT)).items() if keep is None or keep(k)}
    return write_safetensors(tmp_path / name, tensors)


def test_golden_basis_shape_and_metadata():
    basis = lorweb_ops.load_basis(GOLDEN_CKPT)
    assert (basis.num_loras, basis.rank, basis.keys_dim, basis.query_dim) == (3, 2, 4, 15)
    # file order: safetensors writes tensors sorted by name
    assert basis.modules[0] == "single_transformer_blocks.0.attn.to_k" and len(basis.modules) == 20
    assert basis.dtype == torch.float16 and basis.weights[basis.modules[0]].lora_A.dtype == torch.float16
    assert basis.settings == lorweb_ops.RELEASED_SETTINGS and basis.settings_source == "released defaults"
    assert basis.metadata["software"].startswith('{"name": "ai-toolkit"')


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_float_dtype_loads_and_stays_in_file_dtype(tmp_path, dtype):
    basis = lorweb_ops.load_basis(golden_as(tmp_path, dtype))
    assert basis.dtype == dtype
    query = golden_tensors()["query_square"]
    reference = lorweb_ops.mixing_coefficients(lorweb_ops.load_basis(GOLDEN_CKPT), query)
    coefficients = lorweb_ops.mixing_coefficients(basis, query)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6  # fp16 -> bf16 rounds the stored weights
    for module in basis.modules:
        torch.testing.assert_close(coefficients[module], reference[module], rtol=0, atol=tolerance)


def test_a_subset_of_modules_is_a_valid_basis(tmp_path):
    path = golden_as(tmp_path, torch.float16, keep=lambda k: ".attn.to_k." in k or "proj_mlp" in k)
    basis = lorweb_ops.load_basis(path)
    assert basis.modules == (
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.proj_mlp",
        "transformer_blocks.0.attn.to_k",
    )
    coefficients = lorweb_ops.mixing_coefficients(basis, golden_tensors()["query_square"])
    fused = lorweb_ops.flux_delta(basis, coefficients, "single_blocks.0.linear1")
    assert fused.shape == (3 * 8 + 32, 8)
    assert fused[:8].abs().max() == 0 and fused[16:24].abs().max() == 0  # q and v rows untouched
    assert fused[8:16].abs().max() > 0 and fused[24:].abs().max() > 0


def test_cache_reuses_a_loaded_file_and_notices_changes(tmp_path):
    path = golden_as(tmp_path, torch.float32)
    first = lorweb_ops.load_basis(path)
    again = lorweb_ops.load_basis(path, {"lora_heads": 2})
    module = "transformer_blocks.0.attn.to_q"
    assert again.weights[module].lora_A is first.weights[module].lora_A
    assert again.settings.lora_heads == 2 and first.settings.lora_heads == 1
    golden_as(tmp_path, torch.float16)  # rewritten on disk: new size and mtime
    reloaded = lorweb_ops.load_basis(path)
    assert reloaded.dtype == torch.float16


def test_cache_notices_a_file_replaced_in_place_with_size_and_mtime_kept(tmp_path):
    path = golden_as(tmp_path, torch.float32)
    module = "transformer_blocks.0.attn.to_q"
    before = lorweb_ops.load_basis(path).weights[module].lora_B.clone()
    stat = os.stat(path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + length])[f"transformer.{module}.lora_B"]["data_offsets"]
    changed = (before + 1).numpy().tobytes()
    assert len(changed) == end - begin
    with open(path, "r+b") as handle:  # same inode, same size, same mtime afterwards: only the content differs
        handle.seek(8 + length + begin)
        handle.write(changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    reloaded = lorweb_ops.load_basis(path).weights[module].lora_B
    torch.testing.assert_close(reloaded, before + 1, rtol=0, atol=0)


# ---- config resolution ---------------------------------------------------------------------------


def test_config_beside_the_file_is_used(tmp_path):
    path = golden_as(tmp_path, torch.float16, name="lorweb_model.safetensors")
    config = write_ai_toolkit_config(tmp_path / "config.yaml", lora_heads=2, lora_softmax="false")
    basis = lorweb_ops.load_basis(path)
    assert basis.settings.lora_heads == 2 and basis.settings.lora_softmax is False
    assert basis.settings_source == str(config)
    assert basis.settings.query_mode == "cat-aa'b"  # left out -> released value, not the reference's "aa'bb'"


def test_stem_yaml_wins_over_config_yaml(tmp_path):
    path = golden_as(tmp_path, torch.float16, name="lorweb_model.safetensors")
    write_ai_toolkit_config(tmp_path / "config.yaml", lora_heads=2)
    write_ai_toolkit_config(tmp_path / "lorweb_model.yaml", mixing_coeffs_type="sum")
    settings = lorweb_ops.load_basis(path).settings
    assert settings.mixing_coeffs_type == "sum" and settings.lora_heads == 1


def test_given_config_beats_the_file_beside(tmp_path):
    path = golden_as(tmp_path, torch.float16)
    write_ai_toolkit_config(tmp_path / "config.yaml", lora_heads=2)
    other = write_ai_toolkit_config(tmp_path / "other.yaml", lora_softmax=False)
    assert lorweb_ops.load_basis(path, str(other)).settings.lora_heads == 1
    assert lorweb_ops.load_basis(path, str(other)).settings.lora_softmax is False
    assert lorweb_ops.load_basis(path, {"query_mode": "ca'-ca"}).settings.lora_heads == 1


def test_mapping_keys_left_out_take_released_values():
    settings = lorweb_ops.load_basis(GOLDEN_CKPT, {"lora_heads": 2}).settings
    assert settings.as_dict() == {**lorweb_ops.RELEASED_SETTINGS.as_dict(), "lora_heads": 2}


# ---- bad inputs: each message says what was wrong and what to do ---------------------------------


def expect_error(match, *args, **kwargs):
    with pytest.raises(LoRWeBError, match=match):
        lorweb_ops.load_basis(*args, **kwargs)


def test_missing_file(tmp_path):
    expect_error("basis file not found", tmp_path / "nope.safetensors")


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "basis.pt"
    torch.save({"x": torch.zeros(1)}, path)
    expect_error(r"not a \.safetensors file.*pickled", path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "basis.safetensors"
    path.write_bytes(b"this is not a tensor file at all")
    expect_error("could not be read as safetensors: the safetensors library refuses it .*download it again", path)


def test_truncated_file(tmp_path):
    path = golden_as(tmp_path, torch.float16)
    path.write_bytes(path.read_bytes()[:-100])
    expect_error("could not be read as safetensors: .*file not fully covered.*damaged or incomplete", path)


def test_ordinary_lora_is_refused_with_a_pointer_to_the_stock_loader(tmp_path):
    path = write_safetensors(
        tmp_path / "lora.safetensors",
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
        },
    )
    expect_error("ordinary LoRA.*LoraLoaderModelOnly", path)


def test_unrelated_file_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "model.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)})
    expect_error("not a LoRWeB basis", path)


def test_foreign_tensors_are_refused(tmp_path):
    tensors = random_basis_tensors(TWO_BLOCK_MODULES)
    tensors["transformer.x_embedder.lora_A"] = torch.zeros(3, 8, 2, dtype=torch.float16)
    expect_error("not part of a LoRWeB basis", write_safetensors(tmp_path / "b.safetensors", tensors))


def test_incomplete_module(tmp_path):
    tensors = random_basis_tensors(TWO_BLOCK_MODULES)
    del tensors["transformer.transformer_blocks.0.attn.to_v.lora_keys"]
    expect_error("attn.to_v lacks lora_keys", write_safetensors(tmp_path / "b.safetensors", tensors))


@pytest.mark.parametrize(
    "field, kwargs, match",
    [
        ("K", {"num_loras": 4}, r"\(K, rank, keys size, query size\) = \(4, 2, 4, 15\)"),
        ("rank", {"rank": 3}, r"= \(3, 3, 4, 15\)|inconsistent shapes"),
        ("query", {"query_dim": 12}, r"= \(3, 2, 4, 12\)"),
    ],
)
def test_modules_disagreeing_on_sizes(tmp_path, field, kwargs, match):
    tensors = random_basis_tensors(TWO_BLOCK_MODULES[:1])
    tensors.update(random_basis_tensors(TWO_BLOCK_MODULES[1:2], **kwargs))
    expect_error(match, write_safetensors(tmp_path / f"{field}.safetensors", tensors))


def test_module_whose_tensors_disagree(tmp_path):
    tensors = random_basis_tensors(TWO_BLOCK_MODULES)
    tensors["transformer.transformer_blocks.0.attn.to_q.lora_B"] = torch.zeros(3, 5, 8, dtype=torch.float16)
    expect_error("attn.to_q has inconsistent shapes", write_safetensors(tmp_path / "b.safetensors", tensors))


def test_projection_and_keys_disagree(tmp_path):
    tensors = random_basis_tensors(TWO_BLOCK_MODULES)
    tensors["transformer.transformer_blocks.0.attn.to_q.att_lora_to_q.weight"] = torch.zeros(6, 15, dtype=torch.float16)
    path = write_safetensors(tmp_path / "b.safetensors", tensors)
    expect_error("projects the query to 6 values but its keys have 4", path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_basis(tmp_path, bad):
    tensors = random_basis_tensors(TWO_BLOCK_MODULES)
    tensors["transformer.single_transformer_blocks.0.proj_out.lora_B"][0, 0, 0] = bad
    expect_error("proj_out.lora_B contains NaN or Inf", write_safetensors(tmp_path / "b.safetensors", tensors))


def test_integer_tensors_are_refused(tmp_path):
    tensors = random_basis_tensors(TWO_BLOCK_MODULES, dtype=torch.float32)
    tensors["transformer.transformer_blocks.0.attn.to_q.lora_keys"] = torch.zeros(3, 4, dtype=torch.int32)
    expect_error("must be float16, bfloat16 or float32", write_safetensors(tmp_path / "b.safetensors", tensors))


def test_basis_without_projection_needs_matching_config(tmp_path):
    path = write_safetensors(tmp_path / "b.safetensors", random_basis_tensors(TWO_BLOCK_MODULES, projection=False))
    expect_error("query_projection_type 'linear' but the file has no att_lora_to_q", path)
    basis = lorweb_ops.load_basis(path, {"query_projection_type": "none"})
    assert basis.query_dim == basis.keys_dim == 4
    assert len(lorweb_ops.mixing_coefficients(basis, torch.randn(4))) == len(TWO_BLOCK_MODULES)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"query_mode": "cat-paa'b"}, "uses encoder token features"),
        ({"query_mode": "paa'b3"}, "uses encoder token features"),
        ({"query_mode": "banana"}, "unknown query_mode 'banana'.*Supported modes: cat-aa'b"),
        ({"lora_heads": 3}, "lora_heads 3 does not divide the key size 4"),
        ({"lora_heads": 0}, "lora_heads must be a whole number from 1 to 1024, found 0"),
        ({"lora_softmax": "maybe"}, "lora_softmax must be true or false"),
        ({"mixing_coeffs_type": "max"}, "mixing_coeffs_type must be one of mean, sum"),
        ({"external_query": False}, "external_query is false"),
    ],
)
def test_bad_config_values(config, match):
    expect_error(match, GOLDEN_CKPT, config)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("config: [unclosed\n  : :", encoding="utf-8")
    expect_error("not readable YAML", GOLDEN_CKPT, str(path))


def test_yaml_that_is_not_an_ai_toolkit_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: flux\nsteps: 28\n", encoding="utf-8")
    expect_error(r"no config.process\[0\].network section", GOLDEN_CKPT, str(path))


def test_yaml_for_another_network_type(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("config:\n  process:\n    - network:\n        type: lora\n", encoding="utf-8")
    expect_error("network of type 'lora', not a LoRWeB basis", GOLDEN_CKPT, str(path))


def test_missing_config_file(tmp_path):
    expect_error("config file not found", GOLDEN_CKPT, str(tmp_path / "missing.yaml"))
