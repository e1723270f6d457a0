"""Files built to hurt: bases and configs written by someone with bad intentions.

Each case must end in the pack's own message (LoRWeBError, bounded in length), never in a bare Python exception,
an allocation of the declared size, or a message that renders a value of unknown size.
"""

import pytest
import torch
from lorweb_testing import GOLDEN_CKPT, random_basis_tensors, write_ai_toolkit_config, write_safetensors

import lorweb_ops
from lorweb_ops import LoRWeBError
from lorweb_ops.bounded_yaml import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH
from lorweb_ops.flux_layout import released_module_names

MODULES = released_module_names(depth=1, single_depth=1)
MESSAGE_LIMIT = 1000  # characters: a message is read by a person


@pytest.fixture(autouse=True)
def fresh_cache():
    lorweb_ops.clear_basis_cache()
    yield
    lorweb_ops.clear_basis_cache()


def refused(match: str, *args) -> str:
    with pytest.raises(LoRWeBError, match=match) as error:
        lorweb_ops.load_basis(*args)
    message = str(error.value)
    assert len(message) < MESSAGE_LIMIT, message[:300]
    return message


# ---- bases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "part, shape",
    [
        ("lora_A", (0, 8, 2)),  # no basis LoRAs
        ("lora_A", (3, 8, 0)),  # rank 0
        ("lora_A", (3, 0, 2)),  # no inputs
        ("lora_B", (3, 2, 0)),  # no outputs
        ("lora_keys", (3, 0)),  # empty keys
        ("att_lora_to_q.weight", (4, 0)),  # empty query
    ],
)
def test_degenerate_bases_are_refused_at_load(tmp_path, part, shape):
    tensors = random_basis_tensors(MODULES, dtype=torch.float32)
    for name in [key for key in tensors if key.endswith("." + part)]:
        tensors[name] = torch.zeros(shape)
    part_name = "to_q" if part == "att_lora_to_q.weight" else part
    dims = ", ".join(map(str, shape))
    refused(
        rf"b\.safetensors: single_transformer_blocks\.0\.attn\.to_k\.{part_name} has shape \[{dims}\], "
        "with a dimension of size 0; the basis is degenerate",
        write_safetensors(tmp_path / "b.safetensors", tensors),
    )


def test_empty_file_header_is_not_a_basis(tmp_path):
    refused("not a LoRWeB basis", write_safetensors(tmp_path / "b.safetensors", {}))


def test_huge_tensor_names_are_cut_in_the_message(tmp_path):
    tensors = random_basis_tensors(MODULES, dtype=torch.float32)
    tensors["transformer." + "x" * 100_000 + ".lora_A"] = torch.zeros(1)
    message = refused("not part of a LoRWeB basis", write_safetensors(tmp_path / "b.safetensors", tensors))
    assert "xxxx…" in message


def test_metadata_for_the_node_ui_is_bounded(tmp_path):
    metadata = {f"key{i:05d}" + "k" * 500: "v" * 5_000 for i in range(2000)}
    tensors = random_basis_tensors(MODULES, dtype=torch.float32)
    path = tmp_path / "b.safetensors"
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    shown = lorweb_ops.load_basis(path).summary()["metadata"]
    assert 0 < len(shown) <= 32
    assert all(len(key) <= 64 and len(value) <= 200 for key, value in shown.items())


def test_a_declared_size_is_never_allocated_before_it_is_checked(tmp_path):
    """A header may declare a petabyte tensor: the library's validation refuses it before we allocate anything."""
    tensors = random_basis_tensors(MODULES, dtype=torch.float32)
    path = write_safetensors(tmp_path / "b.safetensors", tensors)
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    header = raw[8:header_end].decode()
    first_shape = header.index('"shape":[') + len('"shape":[')
    patched = header[:first_shape] + "99999999999999," + header[first_shape:]
    path.write_bytes(len(patched).to_bytes(8, "little") + patched.encode() + raw[header_end:])
    refused("could not be read as safetensors", path)


# ---- configs ---------------------------------------------------------------------------------------


def config_file(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def network_kwargs(body: str) -> str:
    return "config:\n  process:\n    - network:\n        type: attlora\n        network_kwargs:\n" + body


def laughs(levels: int, width: int = 10) -> str:
    """A 'billion laughs' document: each level is ``width`` references to the one before."""
    lines = ['l0: &l0 ["lol"]']
    for level in range(1, levels + 1):
        refs = ", ".join([f"*l{level - 1}"] * width)
        lines.append(f"l{level}: &l{level} [{refs}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_in_a_value_is_not_expanded(tmp_path):
    # 10^7 references in a few hundred bytes: rendering the value would take hundreds of MB
    text = laughs(7) + network_kwargs("          lora_heads: *l7\n")
    refused("lora_heads must be a single value, found a list", GOLDEN_CKPT, config_file(tmp_path, text))


def test_billion_laughs_beside_the_config_costs_nothing(tmp_path):
    text = laughs(9) + network_kwargs("          lora_heads: 1\n")
    assert lorweb_ops.load_basis(GOLDEN_CKPT, config_file(tmp_path, text)).settings.lora_heads == 1


@pytest.mark.parametrize("opener, closer", [("[", "]"), ("{a: ", "}")])
def test_deep_nesting(tmp_path, opener, closer):
    text = "config: " + opener * 50_000 + "1" + closer * 50_000 + "\n"
    refused(f"nests deeper than {MAX_CONFIG_DEPTH} levels", GOLDEN_CKPT, config_file(tmp_path, text))


def test_deep_block_nesting(tmp_path):
    text = "".join(" " * level + f"k{level}:\n" for level in range(200)) + " " * 200 + "v\n"
    refused(f"nests deeper than {MAX_CONFIG_DEPTH} levels", GOLDEN_CKPT, config_file(tmp_path, text))


def test_a_config_file_far_larger_than_any_config(tmp_path):
    text = network_kwargs("          lora_heads: 1\n") + "# padding\n" * (MAX_CONFIG_BYTES // 10)
    refused("larger than 256 kB", GOLDEN_CKPT, config_file(tmp_path, text))


def test_very_many_small_values(tmp_path):
    text = "x: [" + ", ".join(["1"] * 30_000) + "]\n"
    refused("more than 20000 values", GOLDEN_CKPT, config_file(tmp_path, text))


@pytest.mark.parametrize(
    "body, match",
    [
        ("          lora_heads: " + "9" * 5000 + "\n", "lora_heads has a value YAML cannot read: '9999"),
        ("          lora_heads: '" + "9" * 5000 + "'\n", "lora_heads must be a whole number from 1 to 1024"),
        ("          lora_heads: 1e400\n", "lora_heads must be a whole number"),
        ("          lora_heads: .nan\n", "lora_heads must be a whole number"),
        ("          query_mode: '" + "q" * 100_000 + "'\n", "unknown query_mode 'qqqq"),
        ("          query_mode: 7\n", "query_mode must be text, found 7"),
        ("          query_mode: {a: 1}\n", "query_mode must be a single value, found a mapping"),
        ("          lora_softmax: [true]\n", "lora_softmax must be a single value, found a list"),
        ("          mixing_coeffs_type: !!binary aGVsbG8=\n", "mixing_coeffs_type must be one of mean, sum"),
        ("          lora_heads: !!python/name:os.system ''\n", "has a value YAML cannot read"),
        ("          lora_heads: !!python/object/apply:os.system ['true']\n", "must be a single value, found a list"),
        ("          <<: {lora_heads: 2}\n", r"merge key \(<<\)"),
        ("          lora_heads: 2001-01-01\n", "lora_heads must be a whole number"),
    ],
)
def test_hostile_values(tmp_path, body, match):
    refused(match, GOLDEN_CKPT, config_file(tmp_path, network_kwargs(body)))


@pytest.mark.parametrize(
    "text, match",
    [
        ("a: 1\n---\nb: 2\n", "not readable YAML"),
        ("config: !!python/name:os.system\n", "no config.process"),
        ("config:\n  process: *undefined\n", "not readable YAML"),
        ("\tconfig: 1\n", "not readable YAML"),
    ],
)
def test_hostile_documents(tmp_path, text, match):
    refused(match, GOLDEN_CKPT, config_file(tmp_path, text))


def test_not_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"config: \xff\xfe\n")
    refused("not UTF-8 text", GOLDEN_CKPT, str(path))


def test_mappings_from_python_callers_are_bounded_too():
    refused(
        "lora_heads must be a whole number from 1 to 1024, found an integer of", GOLDEN_CKPT, {"lora_heads": 10**5000}
    )
    refused("query_mode must be text, found a list", GOLDEN_CKPT, {"query_mode": ["x"] * 10**6})


def test_a_real_config_still_reads(tmp_path):
    path = tmp_path / "config.yaml"
    write_ai_toolkit_config(path, lora_heads=2, lora_softmax=False)
    settings = lorweb_ops.load_basis(GOLDEN_CKPT, str(path)).settings
    assert (settings.lora_heads, settings.lora_softmax) == (2, False)
