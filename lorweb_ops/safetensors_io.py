"""Read a .safetensors file: the safetensors library validates it, plain reads copy its bytes out.

Why both: the library is the authority on the format (offsets, sizes, dtypes, coverage of the file, header
limits), so every header it refuses is refused here with its own reason. But its tensors are views of a shared
memory map: a file rewritten in place changes the loaded basis under us without a word, and a file cut short
while mapped kills the process (SIGBUS). Copying through the map instead holds the mapped pages and the copies
at once (about twice the file). So, after the library accepted the header, each tensor is read with one plain
read into its own buffer at the offsets the library validated: memory about the file size, and the tensors
belong to us. ``benchmarks/load_probe.py`` measures the three ways side by side.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

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


@dataclass(frozen=True)
class FileKind:
    """What a file is read as: named in messages, and the dtypes its tensors may have."""

    what: str
    dtypes: Mapping[str, torch.dtype]


BASIS = FileKind("a LoRWeB basis", DTYPES)
#: LoRA files come in fp8 too (ComfyUI's loaders read them); the basis never does
LORA = FileKind("a LoRA", {**DTYPES, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})
#: A LoRWeB basis header is ~0.3 MB (494 modules x 4 tensors), a LoRA's similar; refuse far larger before parsing.
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: A basis holds at most 494 Flux modules x 4 tensors and a Flux LoRA a few thousand; far more is neither.
MAX_TENSORS = 16384


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


@dataclass(frozen=True)
class Header:
    """What a file holds, as validated by the safetensors library: tensors in storage order, and metadata."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    kind: FileKind

    @property
    def names(self) -> list[str]:
        return list(self.entries)


def read_header(path: str, kind: FileKind = BASIS) -> Header:
    """Validate the file with the safetensors library and return its header; reads no tensor data."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as handle:
            names = handle.offset_keys()
            if len(names) > MAX_TENSORS:
                raise _damaged(name, f"it holds {len(names)} tensors; the pack reads files of at most {MAX_TENSORS}")
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in names}
            metadata = dict(handle.metadata() or {})
    except SafetensorError as error:
        raise _damaged(name, f"the safetensors library refuses it ({_short(error)})") from None
    except OSError as error:
        raise LoRWeBError(f"{name} could not be opened ({error.strerror or type(error).__name__}).") from None
    raw, data_start = _header_bytes(path, name, kind)
    entries = _entries(raw, names, shapes, name)
    return Header(entries, metadata, data_start, kind)


def read_tensors(path: str, header: Header, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (default all), in storage order, each read into memory of its own."""
    name = os.path.basename(path)
    wanted = header.names if names is None else [key for key in header.names if key in set(names)]
    tensors = {}
    with open(path, "rb") as handle:
        for key in wanted:
            entry = header.entries[key]
            tensors[key] = _read_tensor(handle, header.data_start + entry.begin, entry, key, name, header.kind)
    return tensors


def read_lora(path: str) -> dict[str, torch.Tensor]:
    """An ordinary LoRA file: validated by the safetensors library, read as a basis is (tensors of our own), with
    the fp8 dtypes LoRAs use and messages about a LoRA. Raises LoRWeBError on anything malformed."""
    header = read_header(path, LORA)
    return read_tensors(path, header)


def _header_bytes(path: str, name: str, kind: FileKind) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
            if len(start) < 8:
                raise _damaged(name, "it is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", start)
            if length > MAX_HEADER_BYTES:
                raise _damaged(
                    name, f"its header has {length} bytes; {kind.what} header has well under {MAX_HEADER_BYTES}"
                )
            return handle.read(length), 8 + length
    except OSError as error:
        raise LoRWeBError(f"{name} could not be opened ({error.strerror or type(error).__name__}).") from None


def _entries(raw: bytes, names: list[str], shapes: dict, name: str) -> dict[str, TensorEntry]:
    """The offsets of each tensor, cross-checked against what the library validated (a second parse must agree)."""
    document = json.loads(raw)
    document.pop("__metadata__", None)
    entries = {}
    for key in names:
        item = document.get(key)
        begin, end = item["data_offsets"]
        entry = TensorEntry(item["dtype"], tuple(item["shape"]), begin, end)
        if entry.shape != shapes[key]:
            raise _damaged(name, f"tensor {_short(key)} is described twice, differently")
        entries[key] = entry
    if len(document) != len(names):
        raise _damaged(name, "its header names some tensors twice")
    return entries


def _read_tensor(handle, start: int, entry: TensorEntry, key: str, name: str, kind: FileKind) -> torch.Tensor:
    dtype = kind.dtypes.get(entry.dtype)
    if dtype is None:
        raise LoRWeBError(f"{name}: tensor {_short(key)} has dtype {entry.dtype}, which {kind.what} never uses.")
    tensor = torch.empty(entry.shape, dtype=dtype)
    nbytes = entry.end - entry.begin
    if nbytes:
        handle.seek(start)
        # the file is little-endian, like every platform torch runs on
        if handle.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != nbytes:
            raise _damaged(name, f"tensor {_short(key)} is cut short (the file changed while it was read)")
    return tensor


def _short(value: object, limit: int = 160) -> str:
    """A bounded rendering of text that came from a file (names, library messages)."""
    text = str(value) if isinstance(value, (str, SafetensorError)) else type(value).__name__
    text = text.removeprefix("Error while deserializing header: ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _damaged(name: str, why: str) -> LoRWeBError:
    return LoRWeBError(
        f"{name} could not be read as safetensors: {why}. The file is damaged or incomplete: download it again."
    )
