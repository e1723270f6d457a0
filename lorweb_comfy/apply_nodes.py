"""Apply Weighted LoRA Basis: the analogy's per-layer mix of the basis as low-rank patches on a cloned MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from lorweb_ops import MixWeights, check_analogy_fits, mixing_coefficients

from .mix_output import StrengthNode, apply_mix, mix_outputs, strength_input
from .types import CATEGORY, Analogy, Basis, kontext_model_input


class ApplyBasis(StrengthNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_ApplyBasis",
            display_name="Apply Weighted LoRA Basis",
            category=CATEGORY,
            description="Mixes the basis LoRAs per layer with the weights the analogy asks for and patches a copy "
            "of the Flux Kontext MODEL (low-rank, through ComfyUI's own LoRA patching).",
            inputs=[
                kontext_model_input(),
                Basis.Input("basis", tooltip="From Load LoRA Basis."),
                Analogy.Input("analogy", tooltip="From Encode Analogy Pair."),
                strength_input(
                    "Scale of the composed LoRA. 1.0 is what LoRWeB was trained with; 0 returns the model unchanged."
                ),
            ],
            outputs=mix_outputs("The per-layer coefficients that were applied (for charts, export, blends)."),
        )

    @classmethod
    def execute(cls, model, basis, analogy, strength: float) -> io.NodeOutput:
        check_analogy_fits(analogy, basis.settings, basis.query_dim)
        coefficients = mixing_coefficients(basis, analogy.query)
        return apply_mix(model, basis, MixWeights(basis.path, basis.modules, coefficients, float(strength)))
