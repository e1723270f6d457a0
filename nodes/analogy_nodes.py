"""Encode Analogy Pair: CLIP-vision embeddings of a, a' and b -> the query of one analogy."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..lorweb_ops import RELEASED_SETTINGS, check_analogy_fits, encode_analogy
from ..lorweb_ops.images import single_image, to_pil
from .types import CATEGORY, Analogy, Basis


def _embed_with(clip_vision):
    """ComfyUI's CLIP vision model as an encoder of already resized/cropped images: pooled image_embeds."""

    def embed(batch: torch.Tensor) -> torch.Tensor:
        # The batch is exactly image_size x image_size, so ComfyUI's own preprocessing only normalises it.
        return clip_vision.encode_image(batch, crop=False)["image_embeds"]

    return embed


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
            "that mixes the LoRWeB basis. a' and b are resized to a's size first, as in the grid.",
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
            ],
            outputs=[Analogy.Output(display_name="analogy", tooltip="The query of this analogy, for Apply.")],
        )

    @classmethod
    def execute(cls, clip_vision, a, a_prime, b, basis=None, reverse: bool = False) -> io.NodeOutput:
        settings = basis.settings if basis is not None else RELEASED_SETTINGS
        images = [to_pil(single_image(image, name)) for image, name in ((a, "a"), (a_prime, "a′"), (b, "b"))]
        if reverse:
            images[0], images[1] = images[1], images[0]
        analogy = encode_analogy(
            *images,
            _embed_with(clip_vision),
            query_mode=settings.query_mode,
            image_size=clip_vision.image_size,
            encoder=_encoder_name(clip_vision),
        )
        if basis is not None:
            check_analogy_fits(analogy, basis.settings, basis.query_dim)
        return io.NodeOutput(analogy)
