"""Embeddings that never change, computed once into a cache folder, so training does not hold the encoders.

Per example (``<cache>/examples/<n>.safetensors``): CLIP embeddings of a, a', b, b' (``embeddings [4, d]``), the VAE
latents of its four grids (``latents [4, C, h, w]``: target_0, control_0, target_1, control_1, see
:func:`lorweb_train.data.training_grids`) and a reference to its text entry. Per distinct instruction
(``<cache>/text/<sha1>.safetensors``): ``context [L, D]`` and ``pooled [Dv]``; the empty instruction (caption
dropout) is always there. ``manifest.json`` records a fingerprint per example; changed sources are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorweb_ops.errors import LoRWeBError
from lorweb_ops.images import clip_batch, from_pil

from .backend import FluxBackend
from .data import ROLES, Example, load_images, training_grids

GRID_ORDER = ("target_0", "control_0", "target_1", "control_1")


@dataclass(frozen=True)
class CachedExample:
    embeddings: torch.Tensor  # [4, d]: a, a', b, b'
    latents: torch.Tensor  # [4, C, h, w] in GRID_ORDER
    context: torch.Tensor  # [L, D]
    pooled: torch.Tensor  # [Dv]
    pair_only: bool


def text_key(instruction: str) -> str:
    return hashlib.sha1(instruction.encode("utf-8")).hexdigest()


def fingerprint(example: Example, resolution: int, backend: FluxBackend) -> str:
    parts = [example.id, example.instruction, str(resolution), backend.description, str(example.pair_only)]
    for role in ROLES:
        source = example.sources[role]
        path = Path(source if isinstance(source, Path) else source[0])
        stat = path.stat()
        parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{source if isinstance(source, tuple) else ''}")
    return hashlib.sha1("|".join(parts).encode("utf-8")).hexdigest()


def build_cache(examples: list[Example], backend: FluxBackend, cache_dir: str, resolution: int,
                progress=None) -> list[str]:  # fmt: skip
    """Fill the cache (only what is missing or changed); returns the example files in data order."""
    root = Path(cache_dir)
    (root / "examples").mkdir(parents=True, exist_ok=True)
    (root / "text").mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    files = []
    for number, example in enumerate(examples):
        key = fingerprint(example, resolution, backend)
        path = root / "examples" / f"{key}.safetensors"
        if manifest.get(str(number)) != key or not path.is_file():
            _write_example(example, backend, path, resolution)
            manifest[str(number)] = key
        files.append(str(path))
        for instruction in ("", example.instruction):
            text_path = root / "text" / f"{text_key(instruction)}.safetensors"
            if not text_path.is_file():
                context, pooled = backend.encode_text([instruction])
                for tensor in (context, pooled):
                    _check_finite(
                        tensor, f"the text encoder (model.t5xxl, model.clip_l) on {instruction!r:.80}", example
                    )
                _save(text_path, {"context": context[0], "pooled": pooled[0]})
        if progress is not None:
            progress(number + 1, len(examples))
    temporary = manifest_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, manifest_path)
    return files


def _write_example(example: Example, backend: FluxBackend, path: Path, resolution: int) -> None:
    images = load_images(example)
    with torch.no_grad():
        embeddings = backend.embed_images(clip_batch([images[r] for r in ROLES], backend.image_size))
        grids = training_grids(images, resolution)
        pixels = torch.cat([from_pil(grids[name]) for name in GRID_ORDER])
        latents = backend.encode_latents(pixels)
    _check_finite(embeddings, "the CLIP vision encoder (model.clip_vision)", example)
    _check_finite(latents, "the VAE (model.vae)", example)
    tensors = {
        "embeddings": embeddings.detach().float().cpu(),
        "latents": latents.detach().float().cpu(),
        "text": torch.tensor(list(bytes.fromhex(text_key(example.instruction))), dtype=torch.uint8),
        "pair_only": torch.tensor([example.pair_only]),
    }
    _save(path, tensors)


def _check_finite(tensor: torch.Tensor, encoder: str, example: Example) -> None:
    """Encodings are cached once and trained on for every step: a NaN here would make every loss NaN."""
    if not torch.isfinite(tensor.detach().float().abs().amax()):
        source = example.sources[ROLES[0]]
        file = source if isinstance(source, Path) else source[0]
        raise LoRWeBError(
            f"{encoder} returned NaN or Inf for example {example.id!r} ({file}). Check that the encoder file is the "
            "right one and loads in ComfyUI (e.g. a real T5-XXL, not CLIP-L in its place), then run again."
        )


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    temporary = str(path) + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, temporary)
    os.replace(temporary, path)


def load_cached(path: str, cache_dir: str) -> CachedExample:
    tensors = load_file(path)
    text = load_file(os.path.join(cache_dir, "text", bytes(tensors["text"].tolist()).hex() + ".safetensors"))
    return CachedExample(
        tensors["embeddings"], tensors["latents"], text["context"], text["pooled"], bool(tensors["pair_only"][0])
    )


def load_empty_text(cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    text = load_file(os.path.join(cache_dir, "text", text_key("") + ".safetensors"))
    return text["context"], text["pooled"]


def cached_shapes(path: str) -> tuple[tuple[int, ...], int]:
    """``(latent grid shape [C, h, w], embedding size)`` of a cached example, read from the header only."""
    with safe_open(path, framework="pt") as handle:
        latents = handle.get_slice("latents").get_shape()
        embeddings = handle.get_slice("embeddings").get_shape()
    return tuple(latents[1:]), embeddings[1]


class CachedExamples(OrderedDict):
    """Cache file -> :class:`CachedExample`, loaded on first use and kept for the most recent ``limit`` files, so a
    large data set is not held in memory (latents of 16 k examples at 512 px would be ~16 GB)."""

    def __init__(self, cache_dir: str, limit: int = 512) -> None:
        super().__init__()
        self.cache_dir, self.limit = cache_dir, limit

    def __missing__(self, path: str) -> CachedExample:
        value = load_cached(path, self.cache_dir)
        self[path] = value
        while len(self) > self.limit:
            self.popitem(last=False)
        return value
