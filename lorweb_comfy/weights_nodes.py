"""Moving through LoRA space: blend two analogies' weights, reshape a mix, and apply weights to a model."""

from __future__ import annotations

from comfy_api.latest import io

from lorweb_ops import MixWeights, check_weights_fit
from lorweb_ops.adjust import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    OVERRIDE_EXAMPLE,
    adjust_mix,
    blend_weights,
    parse_overrides,
)
from lorweb_ops.checks import is_number_in, show

from .mix_output import StrengthNode, apply_mix, mix_outputs, strength_input
from .types import CATEGORY, Weights, kontext_model_input, weights_basis_input, weights_input


class BlendAnalogies(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_BlendAnalogies",
            display_name="Blend Analogies",
            category=CATEGORY,
            description="Interpolates two analogies' per-layer weights: (1 − t)·weights_1 + t·weights_2 in every "
            "layer (strength too). Softmax mixes stay non-negative and sum to 1, so the blend stays in "
            "the domain LoRWeB was trained on.",
            inputs=[
                Weights.Input("weights_1", tooltip="Weights of the first analogy (an Apply node's weights output)."),
                Weights.Input("weights_2", tooltip="Weights of the second analogy; must come from the same basis."),
                io.Float.Input(
                    "t",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="0 = only weights_1, 1 = only weights_2, 0.5 = half of each.",
                ),
            ],
            outputs=[
                Weights.Output(
                    display_name="weights",
                    tooltip="The blended weights, for Apply LoRA Basis Weights, Adjust Mix or Save Composed LoRA.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, t: float | None) -> bool | str:
        # None: the value comes through a link and is checked when the node runs (blend_weights)
        if t is not None and not is_number_in(t, 0.0, 1.0):
            return f"t must be a number from 0 (only weights_1) to 1 (only weights_2), got {show(t)}."
        return True

    @classmethod
    def execute(cls, weights_1: MixWeights, weights_2: MixWeights, t: float) -> io.NodeOutput:
        return io.NodeOutput(blend_weights(weights_1, weights_2, t))


class AdjustMix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_AdjustMix",
            display_name="Adjust Mix",
            category=CATEGORY,
            description="Reshapes a mix in every layer, in this order: temperature, overrides, top-k; softmax mixes "
            "are then renormalised to sum 1. The defaults change nothing.",
            inputs=[
                Weights.Input("weights", tooltip="Weights from an Apply node, Blend Analogies or another Adjust Mix."),
                io.Float.Input(
                    "temperature",
                    default=1.0,
                    min=MIN_TEMPERATURE,
                    max=MAX_TEMPERATURE,
                    step=0.01,
                    tooltip="1 = unchanged. Softmax mixes become softmax(log c / T): below 1 sharpens "
                    "towards the dominant basis LoRAs, above 1 flattens towards uniform. Signed "
                    "(tanh) mixes become sign(c)·|c|^(1/T).",
                ),
                io.Int.Input(
                    "top_k",
                    default=0,
                    min=0,
                    max=1024,
                    tooltip="0 = keep all. Otherwise keep the k largest |weights| of each layer and zero "
                    "the rest (softmax mixes are renormalised to sum 1).",
                ),
                io.String.Input(
                    "override",
                    default="",
                    multiline=False,
                    placeholder="7=1.0, 3=0.5",
                    tooltip="Set basis LoRA k's weight in every layer before normalisation, "
                    f"{OVERRIDE_EXAMPLE}. LoRAs are numbered from 0, as in the mix chart. "
                    "Empty = none.",
                ),
            ],
            outputs=[Weights.Output(display_name="weights", tooltip="The adjusted weights (same basis).")],
        )

    @classmethod
    def validate_inputs(cls, override: str | None) -> bool | str:
        # only the text needs checking here: the number widgets are bounded by ComfyUI itself.
        # None: the text comes through a link and is parsed when the node runs.
        if override is None:
            return True
        try:
            parse_overrides(override)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, weights: MixWeights, temperature: float, top_k: int, override: str) -> io.NodeOutput:
        return io.NodeOutput(adjust_mix(weights, temperature, top_k, parse_overrides(override)))


class ApplyWeights(StrengthNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_ApplyWeights",
            display_name="Apply LoRA Basis Weights",
            category=CATEGORY,
            description="Patches a copy of the Flux Kontext MODEL with the basis mixed by given weights (blended, "
            "adjusted or from another Apply) instead of an analogy. Same patching as Apply Weighted "
            "LoRA Basis.",
            inputs=[
                kontext_model_input(),
                weights_basis_input(),
                weights_input(),
                strength_input(
                    "Scale of the composed LoRA; it replaces the strength stored in the weights. "
                    "1.0 is what LoRWeB was trained with; 0 returns the model unchanged."
                ),
            ],
            outputs=mix_outputs("The weights that were applied, with this strength (for charts, export)."),
        )

    @classmethod
    def execute(cls, model, basis, weights: MixWeights, strength: float) -> io.NodeOutput:
        check_weights_fit(basis, weights)  # before anything is computed or patched
        return apply_mix(model, basis, MixWeights(basis.path, basis.modules, weights.coefficients, float(strength)))
