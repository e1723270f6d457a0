"""Socket types that travel between the pack's nodes (immutable objects; ComfyUI caches and shares them)."""

from __future__ import annotations

from comfy_api.latest import io

from lorweb_ops.basis_format import WEIGHTS_LICENCE

#: a loaded ``lorweb_ops.LoraBasis``
Basis = io.Custom("LORWEB_BASIS")
#: a ``lorweb_ops.Analogy``: one query for one (a, a', b)
Analogy = io.Custom("LORWEB_ANALOGY")
#: a ``lorweb_ops.MixWeights``: the per-module coefficients an Apply used
Weights = io.Custom("LORWEB_WEIGHTS")

CATEGORY = "LoRWeB"
LICENCE_NOTE = WEIGHTS_LICENCE


def kontext_model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="The FLUX.1 Kontext [dev] model (UNETLoader, any precision).")


def weights_basis_input() -> io.Custom.Input:
    """The basis beside a weights input: the one the weights were made with."""
    return Basis.Input("basis", tooltip="From Load LoRA Basis: the basis the weights were made with.")


def weights_input() -> io.Custom.Input:
    return Weights.Input("weights", tooltip="From an Apply node, Blend Analogies or Adjust Mix.")
