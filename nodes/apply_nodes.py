"""Apply Weighted LoRA Basis: the analogy's per-layer mix of the basis as low-rank patches on a cloned MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from ..lorweb_ops import LoRWeBError, MixWeights, check_analogy_fits, composed_patches, mixing_coefficients
from ..lorweb_ops.chart import mix_summary, render_mix_chart
from ..lorweb_ops.checks import is_number_in, show
from ..lorweb_ops.images import from_pil
from .patching import check_model_fits, patched_clone
from .types import CATEGORY, Analogy, Basis, Weights

STRENGTH_LIMIT = 10.0
CHART_TOOLTIP = (
    "The mix as a picture: blocks x basis LoRAs heat map, mean weight per basis LoRA, entropy. Save or "
    "preview it with the stock image nodes."
)


def strength_input(tooltip: str) -> io.Float.Input:
    return io.Float.Input("strength", default=1.0, min=-STRENGTH_LIMIT, max=STRENGTH_LIMIT, step=0.01, tooltip=tooltip)


def mix_outputs(weights_tooltip: str) -> list:
    """The outputs of every node that patches a model with a mix: MODEL, LORWEB_WEIGHTS, chart IMAGE."""
    return [
        io.Model.Output(display_name="model", tooltip="A patched copy; the input model is untouched."),
        Weights.Output(display_name="weights", tooltip=weights_tooltip),
        io.Image.Output(display_name="chart", tooltip=CHART_TOOLTIP),
    ]


def strength_problem(strength) -> str | None:
    """None when ``strength`` is usable, else the message for the user."""
    if not is_number_in(strength, -STRENGTH_LIMIT, STRENGTH_LIMIT):
        return f"strength must be a number between -{STRENGTH_LIMIT:g} and {STRENGTH_LIMIT:g}, got {show(strength)}."
    return None


def validate_strength(strength) -> bool | str:
    # None: the value comes through a link and is checked when the node runs
    return True if strength is None else strength_problem(strength) or True


class ApplyBasis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_ApplyBasis",
            display_name="Apply Weighted LoRA Basis",
            category=CATEGORY,
            description="Mixes the basis LoRAs per layer with the weights the analogy asks for and patches a copy "
            "of the Flux Kontext MODEL (low-rank, through ComfyUI's own LoRA patching).",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.1 Kontext [dev] model (UNETLoader, any precision)."),
                Basis.Input("basis", tooltip="From Load LoRA Basis."),
                Analogy.Input("analogy", tooltip="From Encode Analogy Pair."),
                strength_input(
                    "Scale of the composed LoRA. 1.0 is what LoRWeB was trained with; 0 returns the model unchanged."
                ),
            ],
            outputs=mix_outputs("The per-layer coefficients that were applied (for charts, export, blends)."),
        )

    @classmethod
    def validate_inputs(cls, strength: float | None = None) -> bool | str:
        return validate_strength(strength)

    @classmethod
    def execute(cls, model, basis, analogy, strength: float) -> io.NodeOutput:
        check_analogy_fits(analogy, basis.settings, basis.query_dim)
        coefficients = mixing_coefficients(basis, analogy.query)
        return apply_mix(model, basis, MixWeights(basis.path, basis.modules, coefficients, float(strength)))


def apply_mix(model, basis, weights: MixWeights) -> io.NodeOutput:
    """Patch a clone of ``model`` with ``weights`` at their strength; everything is checked before the clone."""
    if (problem := strength_problem(weights.strength)) is not None:
        raise LoRWeBError(problem)
    if weights.strength == 0:
        return mix_output(model, weights)
    patches = composed_patches(basis, weights.coefficients)
    check_model_fits(model, patches, basis.path)
    return mix_output(patched_clone(model, patches, weights.strength), weights)


def mix_output(model, weights: MixWeights) -> io.NodeOutput:
    """MODEL, the weights, their chart as an IMAGE, and the chart data for the node UI (web/lorweb_mix.js)."""
    chart = from_pil(render_mix_chart(weights))
    return io.NodeOutput(model, weights, chart, ui={"lorweb_mix": [mix_summary(weights)]})
