"""Shared test helpers: where the golden data lives, and writers for synthetic bases in the on-disk format."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
GOLDEN_CKPT = GOLDEN / "golden_lorweb_ckpt.safetensors"
GOLDEN_TENSORS = GOLDEN / "golden_tensors.safetensors"
GOLDEN_FUSED_KEYS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1")
#: network_kwargs of the four golden variants
GOLDEN_VARIANTS = {
    "released_like": {},
    "softmax_heads2": {"lora_heads": 2},
    "tanh_heads1": {"lora_softmax": False},
    "softmax_sum": {"mixing_coeffs_type": "sum"},
}


def golden_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN_TENSORS))


def module_shapes(name: str, hidden: int, mlp: int) -> tuple[int, int]:
    """(in, out) of a Flux block Linear for a given hidden and MLP width."""
    from lorweb_ops.flux_layout import module_shape

    return module_shape(name, hidden, mlp)


def random_basis_tensors(
    modules: list[str],
    *,
    hidden: int = 8,
    mlp: int = 32,
    num_loras: int = 3,
    rank: int = 2,
    keys_dim: int = 4,
    query_dim: int = 15,
    dtype=torch.float16,
    seed: int = 0,
    projection: bool = True,
) -> dict[str, torch.Tensor]:
    """Random tensors in the ai-toolkit attlora layout (``transformer.<M>.lora_A [K, in, r]`` ...)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        fan_in, fan_out = module_shapes(name, hidden, mlp)
        prefix = f"transformer.{name}"
        tensors[f"{prefix}.lora_A"] = torch.randn(num_loras, fan_in, rank, generator=generator).to(dtype)
        tensors[f"{prefix}.lora_B"] = (0.1 * torch.randn(num_loras, rank, fan_out, generator=generator)).to(dtype)
        tensors[f"{prefix}.lora_keys"] = torch.randn(num_loras, keys_dim, generator=generator).to(dtype)
        if projection:
            tensors[f"{prefix}.att_lora_to_q.weight"] = (
                torch.randn(keys_dim, query_dim, generator=generator) / query_dim**0.5
            ).to(dtype)
    return tensors


def write_safetensors(path: os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    return Path(path)


def write_ai_toolkit_config(path: os.PathLike, **network_kwargs) -> Path:
    """A minimal ai-toolkit config.yaml with the given ``network_kwargs``."""
    import yaml

    document = {
        "job": "extension",
        "config": {
            "name": "lorweb_model",
            "process": [
                {
                    "type": "sd_trainer",
                    "network": {"type": "attlora", "linear": 4, "linear_alpha": 4, "network_kwargs": network_kwargs},
                }
            ],
        },
    }
    Path(path).write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return Path(path)


#: CLIPImageProcessor's normalisation of openai/clip-vit-large-patch14 (ComfyUI's CLIP vision applies the same)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixel_values(images: list, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """``[N, 3, size, size]`` normalised pixels, as ``CLIPImageProcessor(size=size, crop_size=size)`` makes them
    (the reference's encoder input, to compare the pack's resize and crop with the golden numbers)."""
    from lorweb_ops.images import clip_batch

    batch = clip_batch(images, size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 1, 1, 3)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 1, 1, 3)
    return ((batch - mean_t) / std_t).permute(0, 3, 1, 2).contiguous()
