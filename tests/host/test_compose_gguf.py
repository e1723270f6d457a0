"""Composition on a GGUF (Q8_0) tiny Flux loaded through city96/ComfyUI-GGUF's own loader, ops and patcher.

ComfyUI's hook keyframes do not work on GGUF models (ComfyUI-GGUF issue 193); the compose nodes add the LoRAs on
the activations, so the quantised weights stay as they are. The reference here is GGUF's own LoRA path (ordinary
patches, which GGUF dequantises and adds at every forward): both add the same low-rank delta to the same dequantised
weight, in a different order of float32 operations, hence the 1e-4 relative tolerance.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from gguf_files import write_gguf
from safetensors.torch import save_file

GGUF_FLUX = dict(hidden=32, mlp_ratio=4.0, heads=1, axes=[8, 12, 12], depth=1, single_depth=1, context=32, vec=32)
HIDDEN, MLP = 32, 128
TOLERANCE = 1e-4


def _gguf_pack():
    """city96/ComfyUI-GGUF as installed beside ComfyUI (imported from its folder, not copied)."""
    folder = Path(os.environ["COMFYUI_ROOT"]) / "custom_nodes" / "ComfyUI-GGUF"
    if not (folder / "__init__.py").is_file():
        pytest.fail(f"ComfyUI-GGUF is not installed at {folder}; install city96/ComfyUI-GGUF there")
    name = "lorweb_test_comfyui_gguf"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return {part: importlib.import_module(f"{name}.{part}") for part in ("loader", "ops", "nodes")}


def load_gguf_flux(host, path: Path):
    import comfy.model_detection
    import comfy.model_management

    pack = _gguf_pack()
    state = pack["loader"].gguf_sd_loader(str(path))
    assert any(pack["ops"].is_quantized(t) for t in state.values())
    config = host.support().flux_unet_config(**GGUF_FLUX)
    model_config = comfy.model_detection.model_config_from_unet_config(config, state)
    model_config.set_inference_dtype(torch.float32, None)
    ops = pack["ops"].GGMLOps()
    ops.Linear.dequant_dtype = None
    ops.Linear.patch_dtype = None
    model_config.custom_operations = ops
    model = model_config.get_model(state, "")
    model.load_model_weights(state, "")
    return pack["nodes"].GGUFModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    )


def _lora(folder: Path, name: str, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    rank = 4
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(rank, HIDDEN, generator=generator),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": 0.3
        * torch.randn(3 * HIDDEN, rank, generator=generator),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(rank, HIDDEN, generator=generator),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": 0.3
        * torch.randn(3 * HIDDEN + MLP, rank, generator=generator),
        "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(
            rank, HIDDEN, generator=generator
        ),
        "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight": 0.3
        * torch.randn(HIDDEN, rank, generator=generator),
    }
    save_file(tensors, str(folder / name))
    return name


@pytest.fixture(scope="module")
def gguf_files(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    state = host.support().write_tiny_flux(str(folder / "flux.safetensors"), **GGUF_FLUX)
    write_gguf(folder / "flux.gguf", state, quantize=lambda key: True)  # every 2-D weight in Q8_0
    loras = [_lora(host.models / "loras", f"compose_gguf_{i}.safetensors", seed=10 + i) for i in range(2)]
    return {"gguf": folder / "flux.gguf", "loras": loras}


def _node(host, node_id):
    return host.nodes.NODE_CLASS_MAPPINGS[node_id]


def lora_set(host, names):
    result = None
    for name in names:
        result = _node(host, "LoRWeB_LoraSetAddLoRA").execute(name, 1.0, result).result[0]
    return result


def compose(host, model, names, method, cache="non-uniform"):
    settings = dict(tau=5, cache=cache, cache_interval=3, late_fraction=0.55, low_frequency_count=-1)
    node = _node(host, "LoRWeB_ComposeLoRASet")
    return node.execute(model, lora_set(host, names), method, reference_behaviour=False, **settings).result[0]


def sample(model, steps=3) -> torch.Tensor:
    import comfy.sample

    generator = torch.Generator().manual_seed(5)
    positive = [
        [
            torch.randn(1, 5, 32, generator=generator),
            {"pooled_output": torch.randn(1, 32, generator=generator), "guidance": 2.5},
        ]
    ]
    latent = torch.zeros(1, 16, 4, 4)
    noise = torch.randn(latent.shape, generator=generator)
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent, seed=0)


def raw_weights(model) -> dict[str, torch.Tensor]:
    """The stored (quantised) data of every parameter (GGUF layers report their weights on meta in state_dict)."""
    parameters = model.model.diffusion_model.named_parameters()
    return {k: v.detach().as_subclass(torch.Tensor).clone() for k, v in parameters if not v.is_meta}


def test_compose_on_gguf_equals_ggufs_own_lora_path_and_leaves_the_weights(host, gguf_files):
    import comfy.model_management

    model = load_gguf_flux(host, gguf_files["gguf"])
    before = raw_weights(model)
    a, b = gguf_files["loras"]
    merged = sample(compose(host, model, [a], "merge"))
    comfy.model_management.unload_all_models()
    # copies of one LoRA equal that LoRA for every method that computes each LoRA fresh (cmlora without caching)
    for method in ("composite", "switch", "cmlora"):
        composed = sample(compose(host, model, [a, a], method, cache="off"))
        scale = merged.abs().max().item()
        assert (composed - merged).abs().max().item() <= TOLERANCE * max(scale, 1.0), method
    mixed = sample(compose(host, model, [a, b], "cmlora"))
    assert torch.isfinite(mixed).all() and not torch.allclose(mixed, merged)
    comfy.model_management.unload_all_models()
    after = raw_weights(model)
    assert len(before) > 20 and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(module._forward_hooks for module in model.model.diffusion_model.modules())
    quantized = [k for k, v in model.model.diffusion_model.named_parameters() if getattr(v, "tensor_type", None)]
    assert any("qkv" in k for k in quantized)


def test_unsupported_patch_kinds_are_refused_with_a_message(host, gguf_files):
    """A LoRA with a full-weight diff cannot be added on the activations: refused, pointing to merge."""
    name = "compose_gguf_diff.safetensors"
    save_file(
        {"diffusion_model.single_blocks.0.linear2.diff": torch.zeros(HIDDEN, HIDDEN + MLP)},
        str(host.models / "loras" / name),
    )
    model = load_gguf_flux(host, gguf_files["gguf"])
    with pytest.raises(ValueError, match="Use method 'merge'"):
        compose(host, model, [name], "cmlora")
    assert json.dumps(sorted(compose(host, model, [name], "merge").patches))  # merge takes it
