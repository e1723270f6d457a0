"""Socket types that travel between the pack's nodes (immutable objects; ComfyUI caches and shares them)."""

from comfy_api.latest import io

#: a loaded ``lorweb_ops.LoraBasis``
Basis = io.Custom("LORWEB_BASIS")
#: a ``lorweb_ops.Analogy``: one query for one (a, a', b)
Analogy = io.Custom("LORWEB_ANALOGY")
#: a ``lorweb_ops.MixWeights``: the per-module coefficients an Apply used
Weights = io.Custom("LORWEB_WEIGHTS")

CATEGORY = "LoRWeB"
LICENCE_NOTE = (
    "The released LoRWeB basis (hilamanor/lorweb) is under NVIDIA's non-commercial licence: "
    "research and non-commercial use only."
)
