"""Reading .safetensors: every header the safetensors library refuses is refused with the pack's message naming
the file; what it accepts is read exactly, into memory of our own (not a view of the file)."""

import json
import os
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lorweb_ops import LoRWeBError
from lorweb_ops.safetensors_io import MAX_HEADER_BYTES, MAX_TENSORS, read_header, read_lora, read_tensors

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def write_raw(path, header: bytes, data: bytes = b"", length: int | None = None) -> str:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return str(path)


def read_basis_file(path: str) -> tuple[dict, dict]:
    header = read_header(path)
    return read_tensors(path, header), header.metadata


#: the two ways the pack reads a file: as a LoRWeB basis, and as an ordinary LoRA
READERS = {"basis": read_basis_file, "lora": read_lora}


def test_reads_what_the_library_writes_in_storage_order(tmp_path):
    tensors = {
        "b": torch.randn(3, 4),
        "a": torch.randn(2, 5).half(),
        "c": torch.randn(7).bfloat16(),
        "d": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "f": torch.tensor(2.5),
    }
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path, metadata={"name": "x"})
    ours, metadata = read_basis_file(path)
    reference = load_file(path)
    assert metadata == {"name": "x"} and set(ours) == set(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value)
    raw = json.loads(open(path, "rb").read()[8 : 8 + struct.unpack("<Q", open(path, "rb").read(8))[0]])
    raw.pop("__metadata__")
    assert list(ours) == sorted(raw, key=lambda key: raw[key]["data_offsets"][0])


def test_a_lora_is_read_in_every_dtype_loras_come_in_fp8_included(tmp_path):
    tensors = {"up": torch.randn(4, 2).to(torch.float8_e4m3fn), "down": torch.randn(2, 4).to(torch.float8_e5m2)}
    tensors["alpha"] = torch.tensor(2.0)
    path = str(tmp_path / "lora.safetensors")
    save_file(tensors, path)
    ours, reference = read_lora(path), load_file(path)
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(
            ours[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        )
    with pytest.raises(LoRWeBError, match="which a LoRWeB basis never uses"):
        read_basis_file(path)


@pytest.mark.parametrize("reader", READERS)
def test_tensors_do_not_change_when_the_file_is_rewritten(tmp_path, reader):
    """The library's own tensors are views of a shared map; ours must not follow a file rewritten in place."""
    path = str(tmp_path / "x.safetensors")
    save_file({"t": torch.zeros(1000)}, path)
    ours = READERS[reader](path)
    ours = ours[0] if reader == "basis" else ours
    with open(path, "r+b") as handle:  # same inode, same size
        handle.seek(-4000, os.SEEK_END)
        handle.write(torch.ones(1000).numpy().tobytes())
    assert ours["t"].abs().sum() == 0


# Every kind of malformed header the format lets one write; the library refuses each, and so must we.
MALFORMED = {
    "gap before the first tensor": (json.dumps({"t": {**F32_2, "shape": [1], "data_offsets": [4, 8]}}), 8),
    "overlapping tensors": (json.dumps({"t": F32_2, "u": {**F32_2, "shape": [1], "data_offsets": [4, 8]}}), 8),
    "data beyond the last tensor": (json.dumps({"t": F32_2}), 12),
    "data cut short": (json.dumps({"t": F32_2}), 4),
    "shape and bytes disagree": (json.dumps({"t": {**F32_2, "shape": [3]}}), 8),
    "negative dimension": (json.dumps({"t": {**F32_2, "shape": [-2]}}), 8),
    "fractional dimension": (json.dumps({"t": {**F32_2, "shape": [2.0]}}), 8),
    "shape whose size overflows": (json.dumps({"t": {**F32_2, "shape": [2**62, 2**62]}}), 8),
    "unknown dtype": (json.dumps({"t": {**F32_2, "dtype": "Q4"}}), 8),
    "no data_offsets": (json.dumps({"t": {"dtype": "F32", "shape": [2]}}), 8),
    "offsets as text": (json.dumps({"t": {**F32_2, "data_offsets": ["0", "8"]}}), 8),
    "offsets reversed": (json.dumps({"t": {**F32_2, "shape": [0], "data_offsets": [8, 0]}}), 8),
    "metadata value not text": (json.dumps({"__metadata__": {"x": 1}, "t": F32_2}), 8),
    "metadata not a mapping": (json.dumps({"__metadata__": [1], "t": F32_2}), 8),
    "entry not an object": (json.dumps({"t": [1, 2]}), 8),
    "not JSON": ("{abc", 8),
    "JSON array": ("[1, 2]", 8),
    "deeply nested JSON": ("[" * 100_000 + "]" * 100_000, 8),
    "invalid UTF-8": (b'{"\xff": 1}', 8),
    "a name given twice": (
        '{"t": ' + json.dumps(F32_2) + ', "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        8,
    ),
    "empty header": ("", 8),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_headers_are_refused_with_the_file_named(tmp_path, case, reader):
    header, data_bytes = MALFORMED[case]
    raw = header.encode() if isinstance(header, str) else header
    path = write_raw(tmp_path / "broken.safetensors", raw, bytes(data_bytes))
    with pytest.raises(SafetensorError):  # the format's own authority refuses it ...
        with safe_open(path, framework="pt") as handle:
            [handle.get_tensor(key) for key in handle.keys()]
    with pytest.raises(LoRWeBError, match=r"^broken\.safetensors could not be read as safetensors: .*download it"):
        READERS[reader](path)  # ... and so do we, with a message


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "length, size, match",
    [(2**63, 0, "header too large"), (1000, 10, "invalid header length"), (0, 0, "EOF while parsing")],
)
def test_impossible_header_lengths(tmp_path, length, size, match, reader):
    path = write_raw(tmp_path / "x.safetensors", b"{" + b" " * size, length=length)
    with pytest.raises(LoRWeBError, match=match):
        READERS[reader](path)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("content", [b"", b"1234", b"this is not a tensor file at all"])
def test_files_too_small_or_foreign(tmp_path, content, reader):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoRWeBError, match="could not be read as safetensors"):
        READERS[reader](str(path))


def test_a_header_far_larger_than_any_basis_is_refused_before_parsing(tmp_path):
    metadata = json.dumps({"__metadata__": {"x": "y" * (MAX_HEADER_BYTES + 10)}, "t": F32_2})
    path = write_raw(tmp_path / "x.safetensors", metadata.encode(), bytes(8))
    with pytest.raises(LoRWeBError, match=f"its header has {len(metadata)} bytes"):
        read_header(path)


def test_more_tensors_than_any_basis_is_refused(tmp_path):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    path = write_raw(tmp_path / "x.safetensors", json.dumps(header).encode())
    with pytest.raises(LoRWeBError, match=f"holds {MAX_TENSORS + 1} tensors"):
        read_header(path)


def test_a_long_tensor_name_is_cut_in_messages(tmp_path):
    header = {"n" * 50_000: {**F32_2, "dtype": "F8_E4M3", "shape": [8]}}
    path = write_raw(tmp_path / "x.safetensors", json.dumps(header).encode(), bytes(8))
    with pytest.raises(LoRWeBError) as error:
        read_basis_file(path)
    assert "F8_E4M3" in str(error.value) and len(str(error.value)) < 400


@pytest.mark.parametrize("reader", READERS)
def test_a_directory_is_named(tmp_path, reader):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    with pytest.raises(LoRWeBError, match="dir.safetensors"):
        READERS[reader](str(folder))
