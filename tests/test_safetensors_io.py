"""The pack's own safetensors reader agrees with the safetensors library and names what is broken."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorweb_ops import LoRWeBError
from lorweb_ops.safetensors_io import read_safetensors, tensor_names


def test_reads_what_the_library_writes(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(2, 5).half(),
        "c": torch.randn(7).bfloat16(),
        "d": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "e": torch.zeros(0, 3),
        "f": torch.tensor(2.5),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"name": "x"})
    ours, metadata = read_safetensors(str(path))
    reference = load_file(str(path))
    assert metadata == {"name": "x"} and set(ours) == set(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value)
    assert tensor_names(str(path)) == list(ours)


def write_raw(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.parametrize(
    "header, data, match",
    [
        (b"{not json", b"", "header is not valid JSON"),
        (b"[1, 2]", b"", "header is not a JSON object"),
        (
            json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(),
            b"1234",
            "tensor t ends at byte",
        ),
        (
            json.dumps({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(),
            b"12345678",
            r"declares \[3\] F32 but holds 8 bytes",
        ),
        (
            json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode(),
            b"12345678",
            "invalid data_offsets",
        ),
        (
            json.dumps({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}).encode(),
            b"12345678",
            "invalid shape",
        ),
        (json.dumps({"__metadata__": {"a": 1}}).encode(), b"", "__metadata__ is not a mapping of strings"),
    ],
)
def test_broken_files_are_named(tmp_path, header, data, match):
    with pytest.raises(LoRWeBError, match=match):
        read_safetensors(write_raw(tmp_path / "x.safetensors", header, data))


def test_impossible_header_size(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(LoRWeBError, match="header size is impossible"):
        read_safetensors(str(path))


def test_unknown_dtype(tmp_path):
    header = json.dumps({"t": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    with pytest.raises(LoRWeBError, match="dtype 'F8_E4M3'"):
        read_safetensors(write_raw(tmp_path / "x.safetensors", header, b"12"))
