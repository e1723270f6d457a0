"""Load and validate a LoRWeB basis file (ai-toolkit ``attlora`` checkpoint, safetensors only).

The layout on disk is described, and written, by ``basis_format.py``. Tensors stay in the file's dtype; loaded
files are cached by their identity (real path and stat).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch

from .basis_format import MODULE_PREFIX, PARTS, TRAINER_SOFTWARE
from .checks import show
from .errors import LoRWeBError
from .finite import all_finite
from .flux_layout import is_flux_module
from .safetensors_io import DTYPES, read_header, read_tensors
from .settings import BasisSettings, resolve_settings

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ORDINARY_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass(frozen=True)
class ModuleBasis:
    """The K basis LoRAs of one module, as stored (file dtype)."""

    lora_A: torch.Tensor  # [K, in, r]
    lora_B: torch.Tensor  # [K, r, out]
    lora_keys: torch.Tensor  # [K, keys_dim]
    to_q: torch.Tensor | None  # [keys_dim, query_dim], None without a query projection

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[2]


@dataclass(frozen=True)
class LoraBasis:
    """A loaded LoRWeB basis. Immutable and shared: never modify its tensors."""

    path: str
    modules: tuple[str, ...]  # diffusers names without the "transformer." prefix, file order
    num_loras: int
    rank: int
    keys_dim: int
    query_dim: int
    dtype: torch.dtype
    settings: BasisSettings
    settings_source: str
    metadata: Mapping[str, str] = field(repr=False)
    weights: Mapping[str, ModuleBasis] = field(repr=False)

    def module(self, name: str) -> ModuleBasis:
        try:
            return self.weights[name]
        except KeyError:
            raise LoRWeBError(f"the basis has no module {name!r}") from None

    @property
    def num_parameters(self) -> int:
        return sum(
            t.numel() for m in self.weights.values() for t in (m.lora_A, m.lora_B, m.lora_keys, m.to_q) if t is not None
        )

    def summary(self) -> dict:
        """JSON-ready facts for the node UI. Metadata strings come from the file: show them as text, never HTML."""
        return {
            "file": os.path.basename(self.path),
            "modules": len(self.modules),
            "num_loras": self.num_loras,
            "rank": self.rank,
            "keys_dim": self.keys_dim,
            "query_dim": self.query_dim,
            "dtype": str(self.dtype).replace("torch.", ""),
            "parameters": self.num_parameters,
            "settings": self.settings.as_dict(),
            "settings_source": os.path.basename(self.settings_source),
            "metadata": dict(self.metadata),  # bounded when the file is read
        }

    def with_settings(self, settings: BasisSettings, source: str) -> LoraBasis:
        """The same tensors under other mixing settings (checked against the shapes)."""
        _check_settings_fit(settings, self.keys_dim, self.weights, self.path)
        return replace(self, settings=settings, settings_source=source)


@dataclass(frozen=True)
class _LoadedFile:
    weights: Mapping[str, ModuleBasis]
    metadata: Mapping[str, str]


#: the ``software`` metadata value of a basis written by ``lorweb_train`` (its NaN/Inf advice differs)

_CACHE: OrderedDict[tuple, _LoadedFile] = OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_SIZE = 2  # the released basis is ~1.7 GB; keep the current one and the previous one
#: Bounds on the file metadata kept and shown in the node UI (it is text from the file).
METADATA_ITEMS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 32, 64, 200


def load_basis(path: str | os.PathLike, config: Any = None, *, use_cache: bool = True) -> LoraBasis:
    """Load a LoRWeB basis and resolve its mixing settings.

    ``config``: None (``<stem>.yaml`` or ``config.yaml`` beside the file, else the released values), the path
    of an ai-toolkit yaml, or a mapping of ``network_kwargs``. Raises :class:`LoRWeBError` for any bad input.
    """
    path = os.fspath(path)
    loaded = _load_file_cached(path) if use_cache else _read_basis_file(path)
    settings, source = resolve_settings(config, path)
    first = next(iter(loaded.weights.values()))
    keys_dim = first.lora_keys.shape[1]
    _check_settings_fit(settings, keys_dim, loaded.weights, path)
    return LoraBasis(
        path=os.path.realpath(path),
        modules=tuple(loaded.weights),
        num_loras=first.lora_A.shape[0],
        rank=first.lora_A.shape[2],
        keys_dim=keys_dim,
        query_dim=keys_dim if first.to_q is None else first.to_q.shape[1],
        dtype=first.lora_A.dtype,
        settings=settings,
        settings_source=source,
        metadata=loaded.metadata,
        weights=loaded.weights,
    )


def clear_basis_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def file_identity(path: str) -> tuple:
    """What says "this is still the same file": its real path and every stat field a rewrite changes.

    Size and mtime alone miss a file replaced in place with both kept (``cp -p``, ``touch -r``); a replacement
    by rename changes the inode, and any write changes the ctime, which no user call can set back. A stat costs
    microseconds, where hashing the released 1.7 GB file costs seconds (``benchmarks/load_probe.py``).
    """
    real = os.path.realpath(path)
    try:
        stat = os.stat(real)
    except FileNotFoundError:
        raise LoRWeBError(f"LoRWeB basis file not found: {path}") from None
    return real, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _load_file_cached(path: str) -> _LoadedFile:
    identity = file_identity(path)
    with _CACHE_LOCK:
        if identity in _CACHE:
            _CACHE.move_to_end(identity)
            return _CACHE[identity]
    loaded = _read_basis_file(path)
    with _CACHE_LOCK:
        _CACHE[identity] = loaded
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded


def _read_basis_file(path: str) -> _LoadedFile:
    file_identity(path)
    if os.path.isdir(path):
        raise LoRWeBError(f"{path} is a folder, not a basis file. Give the path of the basis .safetensors file.")
    if not path.lower().endswith(".safetensors"):
        raise LoRWeBError(
            f"{os.path.basename(path)} is not a .safetensors file. Only safetensors bases are loaded "
            "(pickled .pt/.ckpt/.bin files can run code); use the released lorweb .safetensors file."
        )
    header = read_header(path)
    grouped = _group_keys(header.names, path)
    # Every check of form and size runs on the header alone (meta tensors): nothing is allocated for a bad file.
    described = {name: _meta_tensor(entry, name, path) for name, entry in header.entries.items()}
    _check_modules(grouped, described, path)
    tensors = read_tensors(path, header)
    weights = _check_modules(grouped, tensors, path, values=_non_finite_advice(header.metadata))
    return _LoadedFile(MappingProxyType(weights), MappingProxyType(_bounded_metadata(header.metadata)))


def _meta_tensor(entry, name: str, path: str) -> torch.Tensor:
    dtype = DTYPES.get(entry.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise LoRWeBError(
            f"{os.path.basename(path)}: {_clip(name)} is {entry.dtype}; a basis must be float16, bfloat16 or "
            "float32. Use the released LoRWeB basis file."
        )
    return torch.empty(entry.shape, dtype=dtype, device="meta")


def _non_finite_advice(metadata: Mapping[str, str]) -> str:
    """What to do about NaN/Inf values, from who wrote the file: this pack's trainer marks its files."""
    if metadata.get("software") != TRAINER_SOFTWARE:
        return "the basis is corrupted. Download it again."
    step = show(str(metadata.get("training_info", "")), 80)
    return (
        f"it was written by this pack's trainer (training_info {step}), so the training diverged: retrain with a "
        "lower train.lr and check the data (the trainer now stops at the first non-finite loss)."
    )


def _check_modules(grouped: dict, tensors: dict, path: str, values: bool | str = False) -> dict[str, ModuleBasis]:
    weights = {module: _module_basis(module, parts, tensors, path, values=values) for module, parts in grouped.items()}
    _check_consistent(weights, path)
    return weights


def _bounded_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Header metadata kept for display: at most METADATA_ITEMS entries, keys and values cut to a bounded length."""
    items = list(metadata.items())[:METADATA_ITEMS]
    return {_clip(key, METADATA_KEY_CHARS): _clip(value, METADATA_VALUE_CHARS) for key, value in items}


def _clip(text: str, limit: int = 120) -> str:
    """Text from a file, bounded for a message or the UI."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _group_keys(names: list[str], path: str) -> dict[str, dict[str, str]]:
    """Group tensor names by module: ``{module: {part: tensor name}}``, refusing anything else."""
    file = os.path.basename(path)
    if any(name.endswith(_ORDINARY_LORA_SUFFIXES) for name in names):
        raise LoRWeBError(
            f"{file} is an ordinary LoRA (it has lora_A.weight / lora_down.weight / alpha keys), not a LoRWeB "
            "basis. Load it with ComfyUI's LoraLoaderModelOnly; this node needs the LoRWeB basis file."
        )
    grouped: dict[str, dict[str, str]] = {}
    unknown = []
    for name in names:
        stripped = name[len(MODULE_PREFIX) :] if name.startswith(MODULE_PREFIX) else name
        part = next((p for p in PARTS if stripped.endswith("." + p)), None)
        module = stripped[: -len(part) - 1] if part else None
        if part is None or not is_flux_module(module):
            unknown.append(name)
            continue
        grouped.setdefault(module, {})[PARTS[part]] = name
    if not grouped:
        raise LoRWeBError(
            f"{file} is not a LoRWeB basis: it has no transformer.<module>.lora_A / lora_B / lora_keys tensors "
            f"for Flux blocks ({len(names)} tensors, e.g. {_examples(names)}). Use the released LoRWeB basis file."
        )
    if unknown:
        raise LoRWeBError(
            f"{file} has {len(unknown)} tensors that are not part of a LoRWeB basis for Flux blocks, "
            f"e.g. {_examples(unknown)}. Use an unmodified LoRWeB checkpoint."
        )
    return grouped


def _examples(names: list[str]) -> str:
    return ", ".join(repr(_clip(name, 80)) for name in names[:3]) or "none"


def _module_basis(module: str, parts: dict[str, str], tensors: dict, path: str, values: bool | str) -> ModuleBasis:
    missing = [p for p in ("lora_A", "lora_B", "lora_keys") if p not in parts]
    if missing:
        raise LoRWeBError(
            f"{os.path.basename(path)}: module {module} lacks {', '.join(missing)}; the basis is incomplete. "
            "Download the LoRWeB basis again."
        )
    found = {part: tensors[name] for part, name in parts.items()}
    for part, tensor in found.items():
        _check_tensor(module, part, tensor, path, check_values=values)
    return ModuleBasis(found["lora_A"], found["lora_B"], found["lora_keys"], found.get("to_q"))


def _check_tensor(module: str, part: str, tensor: torch.Tensor, path: str, check_values: bool | str) -> None:
    """``check_values``: False (form only), or the advice for NaN/Inf values (True: a download's advice)."""
    file = os.path.basename(path)
    expected_ndim = 3 if part in ("lora_A", "lora_B") else 2
    if tensor.ndim != expected_ndim:
        raise LoRWeBError(
            f"{file}: {module}.{part} has shape {list(tensor.shape)}, expected {expected_ndim} dimensions. "
            "This is not a LoRWeB basis in the ai-toolkit attlora layout."
        )
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise LoRWeBError(f"{file}: {module}.{part} is {tensor.dtype}; a basis must be float16, bfloat16 or float32.")
    if 0 in tensor.shape:
        raise LoRWeBError(
            f"{file}: {module}.{part} has shape {list(tensor.shape)}, with a dimension of size 0; the basis is "
            "degenerate (no LoRAs, rank 0 or empty layers). Use the released LoRWeB basis file."
        )
    # every value, on its bit patterns and off torch's thread pool (finite.py says why): the load's cost is the read
    if check_values and not all_finite(tensor):
        advice = check_values if isinstance(check_values, str) else "the basis is corrupted. Download it again."
        raise LoRWeBError(f"{file}: {module}.{part} contains NaN or Inf values; {advice}")


def _check_consistent(weights: Mapping[str, ModuleBasis], path: str) -> None:
    """Every module must share K, rank, keys size and query size, and its tensors must agree."""
    file = os.path.basename(path)
    first_name, first = next(iter(weights.items()))
    expected = _signature(first)
    for module, basis in weights.items():
        a, b, keys, to_q = basis.lora_A, basis.lora_B, basis.lora_keys, basis.to_q
        if not (a.shape[0] == b.shape[0] == keys.shape[0]) or a.shape[2] != b.shape[1]:
            raise LoRWeBError(
                f"{file}: {module} has inconsistent shapes (lora_A {list(a.shape)}, lora_B {list(b.shape)}, "
                f"lora_keys {list(keys.shape)}); expected lora_A [K, in, r], lora_B [K, r, out], lora_keys [K, d]."
            )
        if to_q is not None and to_q.shape[0] != keys.shape[1]:
            raise LoRWeBError(
                f"{file}: {module} projects the query to {to_q.shape[0]} values but its keys have "
                f"{keys.shape[1]}; the basis is inconsistent."
            )
        if _signature(basis) != expected:
            raise LoRWeBError(
                f"{file}: {module} has (K, rank, keys size, query size) = {_signature(basis)} but {first_name} has "
                f"{expected}; every module of a basis must agree."
            )
        if len({t.dtype for t in (a, b, keys, to_q) if t is not None}) != 1 or a.dtype != first.lora_A.dtype:
            raise LoRWeBError(f"{file}: {module} mixes dtypes; every tensor of a basis must share one dtype.")


def _signature(basis: ModuleBasis) -> tuple:
    query = None if basis.to_q is None else basis.to_q.shape[1]
    return basis.lora_A.shape[0], basis.lora_A.shape[2], basis.lora_keys.shape[1], query


def _check_settings_fit(settings: BasisSettings, keys_dim: int, weights: Mapping[str, ModuleBasis], path: str) -> None:
    file = os.path.basename(path)
    has_projection = next(iter(weights.values())).to_q is not None
    if keys_dim % settings.lora_heads:
        raise LoRWeBError(
            f"{file}: lora_heads {settings.lora_heads} does not divide the key size {keys_dim}. "
            "Check the config: the released model uses lora_heads 1."
        )
    if has_projection != (settings.query_projection_type == "linear"):
        raise LoRWeBError(
            f"{file}: the config says query_projection_type {settings.query_projection_type!r} but the file "
            f"{'has' if has_projection else 'has no'} att_lora_to_q projections. Use the config saved with this basis."
        )
