"""Analogy Grid and Crop Analogy Result: the Kontext input [a | a'] / [b | b] and its b' quadrant."""

from __future__ import annotations

from comfy_api.latest import io

from lorweb_ops import build_grid, crop_result
from lorweb_ops.images import from_pil, single_image, to_pil

from .types import CATEGORY


class AnalogyGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_AnalogyGrid",
            display_name="Analogy Grid",
            category=CATEGORY,
            description="Builds the 2x2 Kontext reference image [a | a′] / [b | b] at a's size (a′ and b resized "
            "with bicubic), as the LoRWeB reference does. Scale it with FluxKontextImageScale.",
            inputs=[
                io.Image.Input("a", tooltip="The example before the edit (one image); sets the tile size."),
                io.Image.Input("a_prime", display_name="a′", tooltip="The example after the edit (one image)."),
                io.Image.Input("b", tooltip="The new image to edit (one image); fills both bottom tiles."),
                io.Boolean.Input(
                    "reverse",
                    default=False,
                    optional=True,
                    tooltip="Reverse the example edit (a′ → a): a′ goes top-left and sets the tile size. "
                    "Set the same switch on Encode Analogy Pair.",
                ),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="[a | a′] / [b | b], twice a's width and height.")],
        )

    @classmethod
    def execute(cls, a, a_prime, b, reverse: bool = False) -> io.NodeOutput:
        tiles = [to_pil(single_image(image, name)) for image, name in ((a, "a"), (a_prime, "a′"), (b, "b"))]
        if reverse:
            tiles[0], tiles[1] = tiles[1], tiles[0]
        return io.NodeOutput(from_pil(build_grid(*tiles)))


class CropResult(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_CropResult",
            display_name="Crop Analogy Result",
            category=CATEGORY,
            description="Cuts the bottom-right quadrant (b′) out of the generated 2x2 grid.",
            inputs=[io.Image.Input("image", tooltip="The decoded Kontext output (any batch size).")],
            outputs=[io.Image.Output(display_name="b_prime", tooltip="The bottom-right quadrant: b, edited.")],
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        return io.NodeOutput(crop_result(image))
