"""API-format prompts the host tests share: a tiny Flux patched by the golden basis, sampled and probed."""

from __future__ import annotations

import shutil

import torch
from lorweb_testing import GOLDEN, GOLDEN_CKPT, GOLDEN_FUSED_KEYS, GOLDEN_TENSORS
from safetensors.torch import save_file

import lorweb_ops

GOLDEN_FLUX = dict(hidden=8, mlp_ratio=4.0, heads=1, axes=[2, 2, 4], depth=1, single_depth=1, context=16, vec=8)
STRENGTH = 0.75


def ksampler(model: list, positive: list, steps: int = 3, seed: int = 50) -> dict:
    """A stock KSampler node as Kontext runs it (euler, simple, cfg 1), on the nodes "negative" and "latent"."""
    return {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "seed": seed,
            "steps": steps,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": positive,
            "negative": ["negative", 0],
            "latent_image": ["latent", 0],
            "denoise": 1.0,
        },
    }


def graph(
    flux_path: str,
    analogy: dict,
    basis_name="golden.safetensors",
    config="auto",
    strength=STRENGTH,
    extra: dict | None = None,
) -> dict:
    """API-format prompt: tiny Flux -> Apply (basis, analogy) -> Kontext-style sampling -> weight probe."""
    prompt = {
        "flux": {"class_type": "LoRWeBTest_TinyFluxLoader", "inputs": {"path": flux_path}},
        "basis": {"class_type": "LoRWeB_LoadBasis", "inputs": {"basis_name": basis_name, "config": config}},
        "apply": {
            "class_type": "LoRWeB_ApplyBasis",
            "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "analogy": ["analogy", 0], "strength": strength},
        },
        "text": {
            "class_type": "LoRWeBTest_RandomTextConditioning",
            "inputs": {"tokens": 5, "context_dim": 16, "pooled_dim": 8, "seed": 1},
        },
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "reference": {
            "class_type": "ReferenceLatent",
            "inputs": {"conditioning": ["text", 0], "latent": ["latent", 0]},
        },
        "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["reference", 0], "guidance": 2.5}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "sample": ksampler(["apply", 0], ["guidance", 0]),
        "probe": {"class_type": "LoRWeBTest_ProbeWeights", "inputs": {"model": ["apply", 0], "samples": ["sample", 0]}},
        "analogy": analogy,
    }
    prompt.update(extra or {})
    return prompt


def golden_analogy() -> dict:
    return {
        "class_type": "LoRWeBTest_AnalogyFromQuery",
        "inputs": {"path": str(GOLDEN_TENSORS), "key": "query_square", "query_mode": "cat-aa'b"},
    }


def clip_analogy(a="a.png", a_prime="a_prime.png", b="b.png") -> tuple[dict, dict]:
    extra = {
        "clip": {
            "class_type": "LoRWeBTest_TinyClipVisionLoader",
            "inputs": {"folder": str(GOLDEN / "tiny_clip_vision")},
        },
        "image_a": {"class_type": "LoadImage", "inputs": {"image": a}},
        "image_a_prime": {"class_type": "LoadImage", "inputs": {"image": a_prime}},
        "image_b": {"class_type": "LoadImage", "inputs": {"image": b}},
    }
    node = {
        "class_type": "LoRWeB_EncodeAnalogy",
        "inputs": {
            "clip_vision": ["clip", 0],
            "a": ["image_a", 0],
            "a_prime": ["image_a_prime", 0],
            "b": ["image_b", 0],
            "basis": ["basis", 0],
        },
    }
    return node, extra


def expected_delta(golden, variant: str, key: str) -> torch.Tensor:
    """The golden delta of a BFL weight (fused ones given directly, whole ones as the module's dW)."""
    if key in GOLDEN_FUSED_KEYS:
        return golden[f"{variant}::dW_fused::{key}"]
    basis = lorweb_ops.load_basis(GOLDEN_CKPT)
    module = next(t.module for t in lorweb_ops.module_targets(basis) if t.bfl_layer == key)
    return golden[f"{variant}::dW::{module}"]


def patched_layers() -> list[str]:
    basis = lorweb_ops.load_basis(GOLDEN_CKPT)
    return sorted({t.bfl_layer for t in lorweb_ops.module_targets(basis)})


# ---- composing LoRAs (LoRWeB_ComposeLoRASet, ScheduledStrength) against ComfyUI's own LoRA loader -------------

HIDDEN, MLP = 8, 32
TOLERANCE = 1e-4


def _random(shape, generator, scale=0.5):
    return scale * torch.randn(*shape, generator=generator)


def compose_lora_files(folder) -> dict[str, str]:
    """Three LoRAs in three formats ComfyUI reads: diffusers (fused q/k/v slices), kohya with alpha, BFL keys."""
    generator = torch.Generator().manual_seed(7)
    rank = 2
    diffusers = {}
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        prefix = f"transformer.transformer_blocks.0.attn.{name}"
        diffusers[f"{prefix}.lora_A.weight"] = _random((rank, HIDDEN), generator)
        diffusers[f"{prefix}.lora_B.weight"] = _random((HIDDEN, rank), generator)
    kohya = {
        "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": _random((rank, HIDDEN), generator),
        "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": _random((MLP, rank), generator),
        "lora_unet_double_blocks_0_img_mlp_0.alpha": torch.tensor(1.0),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": _random((rank, HIDDEN), generator),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": _random((3 * HIDDEN + MLP, rank), generator),
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(4.0),
    }
    bfl = {
        "diffusion_model.single_blocks.0.linear2.lora_A.weight": _random((rank, HIDDEN + MLP), generator),
        "diffusion_model.single_blocks.0.linear2.lora_B.weight": _random((HIDDEN, rank), generator),
        "diffusion_model.double_blocks.0.txt_mlp.2.lora_A.weight": _random((rank, MLP), generator),
        "diffusion_model.double_blocks.0.txt_mlp.2.lora_B.weight": _random((HIDDEN, rank), generator),
    }
    names = {}
    for name, tensors in (("a_diffusers", diffusers), ("b_kohya", kohya), ("c_bfl", bfl)):
        save_file(tensors, str(folder / f"compose_{name}.safetensors"))
        names[name[0]] = f"compose_{name}.safetensors"
    save_file(
        {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)},
        str(folder / "compose_not_flux.safetensors"),
    )
    return names


def compose_files(host) -> dict:
    """A tiny Flux, the golden basis as compose_golden.safetensors and three LoRAs (see compose_lora_files)."""
    flux_path = host.base / "compose_tiny_flux.safetensors"
    original = host.support().write_tiny_flux(str(flux_path), **GOLDEN_FLUX)
    shutil.copy(GOLDEN_CKPT, host.models / "lorweb" / "compose_golden.safetensors")
    return {"flux": str(flux_path), "original": original, "loras": compose_lora_files(host.models / "loras")}


def compose_base_nodes(flux_path: str, cfg: float, steps: int, sampler: str, model_ref: list, seed=50) -> dict:
    return {
        "flux": {"class_type": "LoRWeBTest_TinyFluxLoader", "inputs": {"path": flux_path}},
        "text": {
            "class_type": "LoRWeBTest_RandomTextConditioning",
            "inputs": {"tokens": 5, "context_dim": 16, "pooled_dim": 8, "seed": 1},
        },
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": 2.5}},
        "negative": {
            "class_type": "LoRWeBTest_RandomTextConditioning",
            "inputs": {"tokens": 5, "context_dim": 16, "pooled_dim": 8, "seed": 2},
        },
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": model_ref,
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": sampler,
                "scheduler": "simple",
                "positive": ["guidance", 0],
                "negative": ["negative", 0],
                "latent_image": ["latent", 0],
                "denoise": 1.0,
            },
        },
        "probe": {"class_type": "LoRWeBTest_ProbeWeights", "inputs": {"model": model_ref, "samples": ["sample", 0]}},
    }


def lora_set_nodes(loras: list[tuple[str, float]]) -> tuple[dict, list]:
    nodes, previous = {}, None
    for index, (name, strength) in enumerate(loras):
        inputs = {"lora_name": name, "strength": strength}
        if previous:
            inputs["lora_set"] = previous
        nodes[f"set{index}"] = {"class_type": "LoRWeB_LoraSetAddLoRA", "inputs": inputs}
        previous = [f"set{index}", 0]
    return nodes, previous


def composed(files, loras, method="composite", steps=3, cfg=1.0, sampler="euler", **options) -> dict:
    nodes, lora_set = lora_set_nodes(loras)
    settings = dict(
        tau=5,
        cache="non-uniform",
        cache_interval=3,
        late_fraction=0.55,
        low_frequency_count=-1,
        reference_behaviour=False,
    )
    settings.update(options)
    nodes["compose"] = {
        "class_type": "LoRWeB_ComposeLoRASet",
        "inputs": {"model": ["flux", 0], "lora_set": lora_set, "method": method, **settings},
    }
    return {**compose_base_nodes(files["flux"], cfg, steps, sampler, ["compose", 0]), **nodes}


def stock(files, loras, steps=3, cfg=1.0, sampler="euler") -> dict:
    """The same sampling with LoraLoaderModelOnly chained (no LoRA at all for an empty list)."""
    nodes, model = {}, ["flux", 0]
    for index, (name, strength) in enumerate(loras):
        nodes[f"stock{index}"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": model, "lora_name": name, "strength_model": strength},
        }
        model = [f"stock{index}", 0]
    return {**compose_base_nodes(files["flux"], cfg, steps, sampler, model), **nodes}


def samples(host, prompt) -> torch.Tensor:
    host.run(prompt)
    return host.support().PROBES["samples"]


def close(actual, expected, tolerance=TOLERANCE):
    scale = expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance * max(scale, 1.0), f"max difference {difference:.3e} (scale {scale:.3e})"


def compose_runtime(host):
    """The composition wrapper of the MODEL that was sampled (read through the pack's own module)."""
    import lorweb_comfy.compose_runtime

    found = lorweb_comfy.compose_runtime.runtime_of(host.support().PROBES["model"])
    assert len(found) == 1
    return found[0]
