"""Encode Analogy Pair: CLIP-vision embeddings of a, a' and b -> the query of one analogy."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from lorweb_ops import RELEASED_SETTINGS, LoRWeBError, check_analogy_fits, encode_analogy_pairs
from lorweb_ops.images import single_image, to_pil

from .types import CATEGORY, Analogy, Basis


def _embed_with(clip_vision):
    """ComfyUI's CLIP vision model as an encoder of already resized/cropped images: pooled image_embeds."""

    def embed(batch: torch.Tensor) -> torch.Tensor:
        # The batch is exactly image_size x image_size, so ComfyUI's own preprocessing only normalises it.
        return clip_vision.encode_image(batch, crop=False)["image_embeds"]

    return embed


#: example pairs beyond the first one (a, a'): optional inputs a_2/a_prime_2 ... a_4/a_prime_4
EXTRA_PAIRS = (2, 3, 4)


def _extra_pair_inputs() -> list:
    inputs = []
    for number in EXTRA_PAIRS:
        inputs += [
            io.Image.Input(
                f"a_{number}",
                display_name=f"a (pair {number})",
                optional=True,
                tooltip=f"Optional example pair {number}, before the edit: another example of the same edit. "
                "The queries of all pairs are averaged (beyond the paper, which takes one pair).",
            ),
            io.Image.Input(
                f"a_prime_{number}",
                display_name=f"a′ (pair {number})",
                optional=True,
                tooltip=f"Optional example pair {number}, after the edit. Connect it together with a (pair {number}).",
            ),
        ]
    return inputs


def _example_pairs(a, a_prime, extra: dict) -> list[tuple]:
    """(a, a') of every connected pair, in order; half a pair is an error."""
    pairs = [(a, a_prime, "a", "a′")]
    for number in EXTRA_PAIRS:
        before, after = extra.get(f"a_{number}"), extra.get(f"a_prime_{number}")
        if before is None and after is None:
            continue
        if before is None or after is None:
            missing = f"a (pair {number})" if before is None else f"a′ (pair {number})"
            raise LoRWeBError(
                f"example pair {number} is only half connected: connect {missing} too, or disconnect the other one."
            )
        pairs.append((before, after, f"a (pair {number})", f"a′ (pair {number})"))
    return pairs


def _encoder_name(clip_vision) -> str:
    model = getattr(clip_vision, "model", None)
    return f"{type(model).__name__} ({clip_vision.image_size}px)" if model is not None else "CLIP vision"


class EncodeAnalogy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_EncodeAnalogy",
            display_name="Encode Analogy Pair",
            category=CATEGORY,
            description="Encodes an example edit a -> a' and a new image b with a CLIP vision model into the query "
            "that mixes the LoRWeB basis. a' and b are resized to a's size first, as in the grid. Optional extra "
            "pairs of the same edit are averaged into one query. A list of b images (e.g. from a folder loader) "
            "gives one analogy per b.",
            inputs=[
                io.ClipVision.Input(
                    "clip_vision",
                    tooltip="From CLIPVisionLoader. The released basis wants openai CLIP ViT-L/14 "
                    "(clip-vit-large-patch14, 768-d image embeds) in models/clip_vision.",
                ),
                io.Image.Input("a", tooltip="The example before the edit (one image)."),
                io.Image.Input(
                    "a_prime", display_name="a′", tooltip="The example after the edit (one image); resized to a's size."
                ),
                io.Image.Input("b", tooltip="The new image to edit the same way (one image); resized to a's size."),
                Basis.Input(
                    "basis",
                    optional=True,
                    tooltip="Optional: the basis, so the images are encoded in its query mode. "
                    f"Without it the released mode {RELEASED_SETTINGS.query_mode!r} is used.",
                ),
                io.Boolean.Input(
                    "reverse",
                    default=False,
                    optional=True,
                    tooltip="Reverse the example edit (a′ → a): swaps a and a′ in the query. Set the "
                    "same switch on Analogy Grid.",
                ),
                *_extra_pair_inputs(),
            ],
            outputs=[Analogy.Output(display_name="analogy", tooltip="The query of this analogy, for Apply.")],
        )

    @classmethod
    def execute(cls, clip_vision, a, a_prime, b, basis=None, reverse: bool = False, **extra) -> io.NodeOutput:
        settings = basis.settings if basis is not None else RELEASED_SETTINGS
        pairs = []
        for before, after, before_name, after_name in _example_pairs(a, a_prime, extra):
            pair = (to_pil(single_image(before, before_name)), to_pil(single_image(after, after_name)))
            pairs.append(pair[::-1] if reverse else pair)
        analogy = encode_analogy_pairs(
            pairs,
            to_pil(single_image(b, "b")),
            _embed_with(clip_vision),
            query_mode=settings.query_mode,
            image_size=clip_vision.image_size,
            encoder=_encoder_name(clip_vision),
        )
        if basis is not None:
            check_analogy_fits(analogy, basis.settings, basis.query_dim)
        return io.NodeOutput(analogy)
