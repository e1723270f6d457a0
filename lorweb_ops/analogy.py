"""Images a, a', b -> the query vector of one analogy, for every external-encoder query mode.

The encoder is any callable that maps a batch of already resized and centre-cropped images
(ComfyUI IMAGE ``[N, S, S, 3]``) to pooled embeddings ``[N, d]``; in ComfyUI that is the CLIP vision
model's ``image_embeds``. Keeping the encoder outside makes this module testable without ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from PIL import Image

from .errors import LoRWeBError
from .images import build_grid, clip_batch, match_size
from .settings import QUERY_MODE_EMBEDDINGS, BasisSettings, check_query_mode

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Analogy:
    """What the images say: one query for one (a, a', b), and how it was made."""

    query: torch.Tensor  # [1, query_dim], float32
    query_mode: str
    embeddings: Mapping[str, torch.Tensor] = field(repr=False)  # encoded image name -> [d]
    encoder: str = "unknown"
    embed_dim: int = 0
    pairs: int = 1  # example pairs (a, a') averaged into this query; see encode_analogy_pairs

    @property
    def query_dim(self) -> int:
        return self.query.shape[-1]


def encoder_images(a: Image.Image, a_prime: Image.Image, b: Image.Image, mode: str) -> dict[str, Image.Image]:
    """The images the encoder sees for ``mode``; a' and b are first resized to a's size, as in the grid."""
    a_prime, b = match_size(a_prime, a.size), match_size(b, a.size)
    if mode in ("cat-aa'b", "ca'-ca+cb"):
        return {"a": a, "a_prime": a_prime, "b": b}
    if mode == "ca'-ca":
        return {"a": a, "a_prime": a_prime}
    grid = build_grid(a, a_prime, b)
    width, height = a.size
    if mode in ("aa'bb'", "caa'bb'"):
        return {"grid": grid}
    if mode == "caa'b":
        grid.paste((0, 0, 0), (width, height, 2 * width, 2 * height))
        return {"grid_without_target": grid}
    if mode == "caa'":
        return {"top_half": grid.crop((0, 0, 2 * width, height))}
    raise LoRWeBError(f"query mode {mode!r} is not supported")


def combine_embeddings(mode: str, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The reference's query for ``mode`` from per-image embeddings ``[d]``; returns ``[1, query_dim]``."""
    if mode == "cat-aa'b":
        query = torch.cat([embeddings["a"], embeddings["a_prime"], embeddings["b"]])
    elif mode == "ca'-ca":
        query = embeddings["a_prime"] - embeddings["a"]
    elif mode == "ca'-ca+cb":
        query = embeddings["a_prime"] - embeddings["a"] + embeddings["b"]
    else:
        (query,) = embeddings.values()
    return query.reshape(1, -1)


def encode_analogy(
    a: Image.Image,
    a_prime: Image.Image,
    b: Image.Image,
    embed: EmbedFn,
    *,
    query_mode: str = "cat-aa'b",
    image_size: int = 224,
    encoder: str = "unknown",
) -> Analogy:
    """Encode one analogy: resize/crop each encoder image with PIL, embed them in one batch, combine."""
    check_query_mode(query_mode, "query_mode")
    images = encoder_images(a, a_prime, b, query_mode)
    with torch.no_grad():
        pooled = embed(clip_batch(list(images.values()), image_size))
    if pooled.ndim != 2 or pooled.shape[0] != len(images):
        raise LoRWeBError(
            f"the image encoder returned embeddings of shape {list(pooled.shape)}, expected one pooled vector per "
            "image. Use a CLIP vision model (the released basis wants openai CLIP ViT-L/14)."
        )
    pooled = pooled.detach().to(device="cpu", dtype=torch.float32)
    embeddings = MappingProxyType(dict(zip(images, pooled, strict=True)))
    query = combine_embeddings(query_mode, embeddings)
    return Analogy(query, query_mode, embeddings, encoder, pooled.shape[1])


def encode_analogy_pairs(
    pairs: Sequence[tuple[Image.Image, Image.Image]], b: Image.Image, embed: EmbedFn, **options: Any
) -> Analogy:
    """One analogy from several example pairs (a_i, a'_i) of the same edit and one b: the mean of their queries.

    This goes beyond the paper, which takes exactly one pair. Each pair is encoded on its own, exactly as
    ``encode_analogy`` does (b with each pair), and the queries are averaged. Every layer projects the query
    linearly before its softmax, so the mean query gives the mean of the per-pair logits: the mix keeps the basis
    LoRAs the pairs agree on (with softmax mixing and one head: the normalised geometric mean of the per-pair
    mixes, not their arithmetic mean).
    Identical pairs give exactly the one-pair query. ``options``: those of ``encode_analogy`` (query_mode, ...).
    """
    if not pairs:
        raise LoRWeBError("an analogy needs at least one example pair (a, a')")
    single = [encode_analogy(a, a_prime, b, embed, **options) for a, a_prime in pairs]
    if len(single) == 1:
        return single[0]
    first = single[0]
    embeddings = {name: _exact_mean([one.embeddings[name] for one in single]) for name in first.embeddings}
    return replace(
        first,
        query=_exact_mean([one.query for one in single]),
        embeddings=MappingProxyType(embeddings),
        pairs=len(single),
    )


def _exact_mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The mean as first + mean of the differences to it: bitwise the first tensor when all are equal."""
    first = tensors[0]
    return first + torch.stack([t - first for t in tensors]).mean(dim=0)


def check_analogy_fits(analogy: Analogy, settings: BasisSettings, query_dim: int) -> None:
    """Refuse an analogy built for another query mode or encoder size than the basis was trained with."""
    if analogy.query_mode != settings.query_mode:
        raise LoRWeBError(
            f"the analogy was encoded with query mode {analogy.query_mode!r} but the basis uses "
            f"{settings.query_mode!r}. Connect the basis to Encode Analogy Pair's 'basis' input so it encodes "
            "the way the basis expects."
        )
    if analogy.query_dim != query_dim:
        per_image = query_dim // QUERY_MODE_EMBEDDINGS[settings.query_mode]
        raise LoRWeBError(
            f"the analogy's query has {analogy.query_dim} values ({analogy.encoder}, {analogy.embed_dim} per image) "
            f"but the basis expects {query_dim} ({per_image} per image). Load the image encoder the basis was "
            f"trained with: {settings.external_query_model}."
        )
