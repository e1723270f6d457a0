"""The README's precision claims, on a Flux of the real width (1 double + 1 single block, random weights):

* fp8 (UNETLoader weight_dtype fp8_e4m3fn): the patched weight is the fp8 weight + strength * dW, within one fp8
  step (ComfyUI patches fp8 by dequantise, add, requantise);
* GGUF Q8_0 and Q4_0 loaded by city96/ComfyUI-GGUF's UnetLoaderGGUF: the layer's forward uses the dequantised
  weight + strength * dW (ComfyUI-GGUF applies LoRA patches on the fly), and sampling runs.

Expected values are computed here independently of ComfyUI: the fp8 weight with torch's own cast, the GGUF
weight with the `gguf` library's numpy dequantiser, and dW with the dense `lorweb_ops.flux_delta`, which the pure
tests pin to the reference implementation's golden numbers (the patch path under test is the low-rank one).
"""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
import torch
from comfy_host import COMFYUI_ROOT, GGUF_PACK_NAME, REPO_ROOT
from gguf_files import write_gguf
from host_graphs import ksampler
from safetensors.torch import load_file, save_file

import lorweb_ops
from lorweb_ops.flux_layout import released_module_names

if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.append(str(REPO_ROOT / "scripts"))

from lorweb_demo import QUERY_DIM, flux_shapes, random_state, write_basis  # noqa: E402

STRENGTH = 4.0
QUANT_TYPES = ("Q8_0", "Q4_0")
#: weights checked (every target is patched; these cover a fused q/k/v slice, a plain layer and a single block)
CHECKED = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "single_blocks.0.linear2")
UNTOUCHED = "final_layer.linear"  # not a basis target


@pytest.fixture(scope="module")
def real_flux(host):
    """A bf16 Flux of the real width, its GGUF conversions, a random basis for its blocks and a query."""
    state = random_state(flux_shapes(depth=1, single_depth=1), torch.bfloat16, seed=3)
    models = host.models / "diffusion_models"
    save_file(state, str(models / "lorweb-test-flux.safetensors"))
    for quant in QUANT_TYPES:
        write_gguf(models / f"lorweb-test-flux-{quant}.gguf", state, quant)
    write_basis(host.models / "lorweb" / "real-width.safetensors", released_module_names(1, 1), num_loras=8)
    query_path = host.base / "real_query.safetensors"
    save_file({"query": torch.randn(1, QUERY_DIM, generator=torch.Generator().manual_seed(9))}, str(query_path))
    basis = lorweb_ops.load_basis(host.models / "lorweb" / "real-width.safetensors")
    coefficients = lorweb_ops.mixing_coefficients(basis, load_file(str(query_path))["query"])
    deltas = {key: STRENGTH * lorweb_ops.flux_delta(basis, coefficients, key) for key in CHECKED}
    kept = {f"{key}.{part}" for key in (*CHECKED, UNTOUCHED) for part in ("weight", "bias")}
    state = {key: value for key, value in state.items() if key in kept}  # the rest is not needed: free it
    yield {"state": state, "query": str(query_path), "deltas": deltas}
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()


def prompt_for(loader: dict, query: str, probe: dict) -> dict:
    return {
        "unet": loader,
        "basis": {
            "class_type": "LoRWeB_LoadBasis",
            "inputs": {"basis_name": "real-width.safetensors", "config": "auto"},
        },
        "analogy": {
            "class_type": "LoRWeBTest_AnalogyFromQuery",
            "inputs": {"path": query, "key": "query", "query_mode": "cat-aa'b"},
        },
        "apply": {
            "class_type": "LoRWeB_ApplyBasis",
            "inputs": {"model": ["unet", 0], "basis": ["basis", 0], "analogy": ["analogy", 0], "strength": STRENGTH},
        },
        "text": {
            "class_type": "LoRWeBTest_RandomTextConditioning",
            "inputs": {"tokens": 4, "context_dim": 4096, "pooled_dim": 768, "seed": 1},
        },
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": 2.5}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "sample": ksampler(["apply", 0], ["guidance", 0], steps=2),
        "probe": probe,
    }


def fp8_step(values: torch.Tensor) -> torch.Tensor:
    """The spacing of float8_e4m3fn around each value (3 mantissa bits; subnormal spacing below 2**-6)."""
    exponent = torch.floor(torch.log2(values.abs().clamp_min(2.0**-6)))
    return 2.0 ** (exponent - 3)


def test_fp8_flux_is_patched_within_one_fp8_step(host, real_flux):
    loader = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "lorweb-test-flux.safetensors", "weight_dtype": "fp8_e4m3fn"},
    }
    # the fp8 weights as ComfyUI stores them, unpatched (its cast from bf16 may round either way)
    unpatched = {
        "unet": loader,
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "probe": {"class_type": "LoRWeBTest_ProbeWeights", "inputs": {"model": ["unet", 0], "samples": ["latent", 0]}},
    }
    host.run(unpatched)
    kept = {key + ".weight" for key in (*CHECKED, UNTOUCHED)}
    stored_weights = {key: value.float() for key, value in host.support().PROBES["weights"].items() if key in kept}
    probe = {"class_type": "LoRWeBTest_ProbeWeights", "inputs": {"model": ["apply", 0], "samples": ["sample", 0]}}
    host.run(prompt_for(loader, real_flux["query"], probe))
    probed = host.support().PROBES
    assert torch.isfinite(probed["samples"]).all()
    weights = probed["weights"]
    for key, delta in real_flux["deltas"].items():
        patched, stored = weights[key + ".weight"], stored_weights[key + ".weight"]
        assert patched.dtype == torch.float8_e4m3fn, key
        original = real_flux["state"][key + ".weight"].float()
        assert ((stored - original).abs() <= fp8_step(original)).all(), key  # the stored weight is the file's
        expected = stored + delta
        steps = (patched.float() - expected).abs() / fp8_step(expected)
        # ComfyUI's stochastic rounding works in fp16, whose log2 can put a value just below a power of two into
        # the upper binade: then it may land one step of that binade (two of the lower one) away. Rare by design.
        assert float(steps.max()) <= 2.001, key
        assert float((steps > 1.001).float().mean()) < 1e-4, key
        # the patch is really there: the change from the stored weight follows dW (slope 1 within rounding noise)
        change = patched.float() - stored
        slope = float((change * delta).sum() / (delta * delta).sum())
        assert 0.9 < slope < 1.1, (key, slope)
    untouched = UNTOUCHED + ".weight"
    assert torch.equal(weights[untouched].float(), stored_weights[untouched])


@pytest.mark.parametrize("quant", QUANT_TYPES)
def test_gguf_flux_forward_uses_the_patched_weight(host, real_flux, quant):
    import gguf

    if "UnetLoaderGGUF" not in host.nodes.NODE_CLASS_MAPPINGS:
        pytest.fail(
            f"city96/ComfyUI-GGUF is not installed in {COMFYUI_ROOT}/custom_nodes/{GGUF_PACK_NAME} (or failed to "
            "import): install it there with its requirements (gguf) to run the GGUF tests."
        )
    keys = list(CHECKED)
    loader = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": f"lorweb-test-flux-{quant}.gguf"}}
    probe = {
        "class_type": "LoRWeBTest_ProbeLinear",
        "inputs": {"model": ["apply", 0], "samples": ["sample", 0], "keys": ",".join(keys), "seed": 4},
    }
    host.run(prompt_for(loader, real_flux["query"], probe))
    probes = host.support().LINEAR_PROBES
    qtype = gguf.GGMLQuantizationType[quant]
    for key in keys:
        x, y = probes[key]
        original = real_flux["state"][key + ".weight"].float().numpy()
        dequantised = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(original, qtype), qtype))
        bias = real_flux["state"][key + ".bias"].float()
        patched = dequantised + real_flux["deltas"][key]
        expected = x @ patched.T + bias
        lora_part = x @ real_flux["deltas"][key].T
        # ComfyUI-GGUF may dequantise and patch in fp16: each weight within 2**-11 relative, so each output within
        # 2**-11 * sum |x| |W| (bounded here with 2**-10)
        bound = 2.0**-10 * (x.abs() @ patched.abs().T) + 1e-5
        assert bool(((y - expected).abs() <= bound).all()), key
        # and the check tells patched from unpatched: the error is a small fraction of the LoRA's own part
        assert float((y - expected).pow(2).mean().sqrt()) < 0.05 * float(lora_part.pow(2).mean().sqrt()), key
        assert np.isfinite(y.numpy()).all()
