"""Test-only probe: the output of chosen Linear layers of a loaded MODEL on fixed inputs.

For quantised models (ComfyUI-GGUF) the weights ComfyUI uses exist only inside the layer's forward (dequantised
and patched on the fly), so the forward itself is what a test must look at.
"""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch

#: key -> (input, output) of the last ProbeLinear run
LINEAR_PROBES: dict = {}


class ProbeLinear:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "samples": ("LATENT",),
                "keys": ("STRING", {"default": ""}),
                "seed": ("INT", {"default": 0}),
            }
        }

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "lorweb_tests"

    def probe(self, model, samples, keys, seed):
        comfy.model_management.load_models_gpu([model])
        generator = torch.Generator().manual_seed(seed)
        LINEAR_PROBES.clear()
        for key in filter(None, (k.strip() for k in keys.split(","))):
            layer = comfy.utils.get_attr(model.model, "diffusion_model." + key)
            x = torch.randn(4, layer.in_features, generator=generator)
            with torch.no_grad():
                LINEAR_PROBES[key] = (x, layer(x).float())
        return {"ui": {"probed": [len(LINEAR_PROBES)]}}
