"""Test-only ComfyUI node pack: loaders for models that ComfyUI's stock loaders cannot build at test size.

Everything here builds *real* ComfyUI objects (``model_base.Flux`` through ``model_detection``, a
``clip_vision.ClipVisionModel``); only the sizes are tiny. Loaded beside the LoRWeB pack by the host tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import comfy.clip_vision
import comfy.ldm.flux.model
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", ".."))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import lorweb_ops  # noqa: E402  (the plain library, the same module the pack imports)

from .recording import RecordMix  # noqa: E402

#: what the last ProbeWeights node saw: {"model": patcher, "weights": {key: tensor}}
PROBES: dict = {}
#: the last model TinyFluxLoader built (tests check that failed runs left it untouched)
LOADED: dict = {}


def flux_unet_config(
    hidden: int, mlp_ratio: float, heads: int, axes: list[int], depth: int, single_depth: int, context: int, vec: int
) -> dict:
    config = dict(
        image_model="flux",
        in_channels=16,
        out_channels=16,
        vec_in_dim=vec,
        context_in_dim=context,
        hidden_size=hidden,
        mlp_ratio=mlp_ratio,
        num_heads=heads,
        depth=depth,
        depth_single_blocks=single_depth,
        axes_dim=axes,
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=True,
        txt_ids_dims=[],
    )
    known = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)} | {"image_model"}
    return {k: v for k, v in config.items() if k in known}  # 0.3.64 has no txt_ids_dims


def write_tiny_flux(path: str, seed: int = 0, scale: float = 0.2, **shape) -> dict[str, torch.Tensor]:
    """Random weights for ComfyUI's own Flux class at the given sizes; the unet config rides in the metadata."""
    config = flux_unet_config(**shape)
    params = {k: v for k, v in config.items() if k != "image_model"}
    with torch.device("meta"):
        module = comfy.ldm.flux.model.Flux(**params, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(seed)
    state = {k: scale * torch.randn(v.shape, generator=generator) for k, v in module.state_dict().items()}
    save_file(state, path, metadata={"lorweb_test_unet_config": json.dumps(config)})
    return state


class TinyFluxLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "lorweb_tests"

    def load(self, path):
        with safe_open(path, framework="pt") as handle:
            config = json.loads(handle.metadata()["lorweb_test_unet_config"])
        state = load_file(path)
        model_config = comfy.model_detection.model_config_from_unet_config(config, state)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model(state, "")
        model.load_model_weights(state, "")
        # the class ComfyUI's own loaders use (ModelPatcherDynamic on a 0.33 GPU; tests swap it in, see dynamic.py)
        patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        patcher = patcher_class(
            model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
        )
        LOADED.update(model=patcher, path=path)
        return (patcher,)


class TinyClipVisionLoader:
    """A Hugging Face CLIP vision folder (config.json + model.safetensors) as ComfyUI's ClipVisionModel."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "lorweb_tests"

    def load(self, folder):
        with open(os.path.join(folder, "config.json")) as handle:
            config = json.load(handle)
        state = load_file(os.path.join(folder, "model.safetensors"))
        if config["num_hidden_layers"] < 2:
            # ComfyUI's encode_image also returns the penultimate layer, so it needs two layers. An extra
            # layer whose output projections are zero adds nothing to the residual stream: same embeddings.
            state.update(_identity_clip_layer(state, config["num_hidden_layers"]))
            config["num_hidden_layers"] += 1
        clip_vision = _clip_vision_from_config(config)
        missing, unexpected = clip_vision.load_sd(state)
        assert not missing and not unexpected, (missing, unexpected)
        return (clip_vision,)


def _identity_clip_layer(state: dict, index: int) -> dict:
    """Weights for encoder layer ``index`` that leave the hidden states unchanged (zero residual branches)."""
    prefix, template = f"vision_model.encoder.layers.{index}.", "vision_model.encoder.layers.0."
    layer = {}
    for key, value in state.items():
        if key.startswith(template):
            name = key[len(template) :]
            keep_one = name.startswith(("layer_norm1.weight", "layer_norm2.weight"))
            layer[prefix + name] = torch.ones_like(value) if keep_one else torch.zeros_like(value)
    return layer


def _clip_vision_from_config(config: dict):
    """ClipVisionModel reads its config from a json file once, in its constructor: write it to a folder that is
    removed right after."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.json")
        with open(path, "w") as handle:
            json.dump(config, handle)
        return comfy.clip_vision.ClipVisionModel(path)


class AnalogyFromQuery:
    """An analogy whose query is read from a safetensors file (the golden reference query)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "path": ("STRING", {"default": ""}),
                "key": ("STRING", {"default": "query_square"}),
                "query_mode": ("STRING", {"default": "cat-aa'b"}),
            }
        }

    RETURN_TYPES = ("LORWEB_ANALOGY",)
    FUNCTION = "load"
    CATEGORY = "lorweb_tests"

    def load(self, path, key, query_mode):
        query = load_file(path)[key].reshape(1, -1).float()
        return (lorweb_ops.Analogy(query, query_mode, {}, "golden reference query", query.shape[1] // 3),)


class RandomTextConditioning:
    """Flux text conditioning of the given widths without a text encoder (T5 / CLIP-L stand-in values)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tokens": ("INT", {"default": 5}),
                "context_dim": ("INT", {"default": 16}),
                "pooled_dim": ("INT", {"default": 8}),
                "seed": ("INT", {"default": 0}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "lorweb_tests"

    def make(self, tokens, context_dim, pooled_dim, seed):
        generator = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, context_dim, generator=generator)
        pooled = torch.randn(1, pooled_dim, generator=generator)
        return ([[context, {"pooled_output": pooled}]],)


class ProbeWeights:
    """Loads the MODEL the way a sampler does and records the weights ComfyUI computed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "lorweb_tests"

    def probe(self, model, samples):
        comfy.model_management.load_models_gpu([model])
        state = model.model.diffusion_model.state_dict()
        PROBES.clear()
        PROBES.update(
            model=model, samples=samples["samples"].clone(), weights={k: v.detach().clone() for k, v in state.items()}
        )
        return {"ui": {"probed": [len(state)]}}


from .dynamic import CpuModelPatcherDynamic, dynamic_core_patcher  # noqa: E402,F401  (used by the tests)
from .probes import LINEAR_PROBES, ProbeLinear  # noqa: E402,F401  (LINEAR_PROBES: read by the tests)

NODE_CLASS_MAPPINGS = {
    "LoRWeBTest_TinyFluxLoader": TinyFluxLoader,
    "LoRWeBTest_TinyClipVisionLoader": TinyClipVisionLoader,
    "LoRWeBTest_AnalogyFromQuery": AnalogyFromQuery,
    "LoRWeBTest_RandomTextConditioning": RandomTextConditioning,
    "LoRWeBTest_ProbeWeights": ProbeWeights,
    "LoRWeBTest_ProbeLinear": ProbeLinear,
    "LoRWeBTest_RecordMix": RecordMix,
}
