"""Read a .safetensors file straight into tensors, one read per tensor, without memory-mapping it.

Why not ``safetensors.safe_open``: it maps the file and copies each tensor out, so while a 1.7 GB basis loads
the process holds the touched file pages *and* the copies (close to twice the file size). Reading each tensor
into its own buffer keeps the peak at about the file size. The format is simple and safe to parse by hand:
8 bytes of little-endian header length, a JSON header, then raw little-endian tensor data. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from .errors import LoRWeBError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


def tensor_names(path: str) -> list[str]:
    """The tensor names of a file in storage order, reading only its header."""
    name = os.path.basename(path)
    with open(path, "rb") as handle:
        header, _ = _read_header(handle, os.path.getsize(path), name)
    header.pop("__metadata__", None)
    return [key for key, _ in sorted(header.items(), key=lambda item: _offsets(item, name)[0])]


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors in storage order, and the header metadata. Raises LoRWeBError on anything malformed."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        header, data_start = _read_header(handle, size, name)
        metadata = header.pop("__metadata__", None) or {}
        entries = sorted(header.items(), key=lambda item: _offsets(item, name)[0])
        tensors = {}
        for key, entry in entries:
            begin, end = _offsets((key, entry), name)
            if data_start + end > size:
                raise _damaged(name, f"tensor {key} ends at byte {data_start + end} but the file has {size} bytes")
            tensors[key] = _read_tensor(handle, data_start + begin, end - begin, key, entry, name)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _damaged(name, "its __metadata__ is not a mapping of strings")
    return tensors, metadata


def _read_header(handle, size: int, name: str) -> tuple[dict, int]:
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise _damaged(name, f"it has only {size} bytes")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise _damaged(name, "its header size is impossible (this is not a safetensors file, or it is cut short)")
    try:
        header = json.loads(handle.read(length))
    except (UnicodeDecodeError, ValueError):
        raise _damaged(name, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(name, "its header is not a JSON object")
    return header, 8 + length


def _offsets(item: tuple[str, dict], name: str) -> tuple[int, int]:
    key, entry = item
    try:
        begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise _damaged(name, f"tensor {key} has no valid data_offsets") from None
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise _damaged(name, f"tensor {key} has invalid data_offsets {entry['data_offsets']}")
    return begin, end


def _read_tensor(handle, start: int, nbytes: int, key: str, entry: dict, name: str) -> torch.Tensor:
    dtype = DTYPES.get(entry.get("dtype"))
    shape = entry.get("shape")
    if dtype is None:
        raise LoRWeBError(f"{name}: tensor {key} has dtype {entry.get('dtype')!r}, which a LoRWeB basis never uses.")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _damaged(name, f"tensor {key} has an invalid shape {shape!r}")
    tensor = torch.empty(shape, dtype=dtype)
    if tensor.numel() * tensor.element_size() != nbytes:
        raise _damaged(name, f"tensor {key} declares {list(shape)} {entry['dtype']} but holds {nbytes} bytes")
    if nbytes:
        handle.seek(start)
        # the file is little-endian, like every platform torch runs on
        if handle.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != nbytes:
            raise _damaged(name, f"tensor {key} is cut short")
    return tensor


def _damaged(name: str, why: str) -> LoRWeBError:
    return LoRWeBError(
        f"{name} could not be read as safetensors: {why}. The file is damaged or incomplete: download it again."
    )
