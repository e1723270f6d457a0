"""What every node that patches a model with a mix shares: the strength input, the outputs, the patching tail.

Apply Weighted LoRA Basis and Apply LoRA Basis Weights both use these, so neither node module imports the other.
"""

from __future__ import annotations

from comfy_api.latest import io

from lorweb_ops import LoRWeBError, MixWeights, composed_patches
from lorweb_ops.chart import mix_summary, render_mix_chart
from lorweb_ops.checks import STRENGTH_LIMIT, is_number_in, show
from lorweb_ops.images import from_pil

from .patching import check_model_fits, patched_clone
from .types import Weights

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


class StrengthNode(io.ComfyNode):
    """A node with a ``strength`` input (:func:`strength_input`): a bad value is refused before the run."""

    @classmethod
    def validate_inputs(cls, strength: float | None = None) -> bool | str:
        return validate_strength(strength)


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
