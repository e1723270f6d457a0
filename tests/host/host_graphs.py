"""API-format prompts the host tests share: a tiny Flux patched by the golden basis, sampled and probed."""

from __future__ import annotations

import torch
from lorweb_testing import GOLDEN, GOLDEN_CKPT, GOLDEN_FUSED_KEYS, GOLDEN_TENSORS

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
