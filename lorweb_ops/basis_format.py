"""A LoRWeB basis as files: the tensor names, the file metadata, the ai-toolkit ``config.yaml`` beside it, and the
one way the pack writes them (the trainer's basis and the demo's random basis alike). ``basis.py`` reads them back.

Tensors, per diffusers module ``M`` of the Flux transformer: ``transformer.<M>.lora_A [K, in, r]``,
``.lora_B [K, r, out]``, ``.lora_keys [K, keys_dim]`` and ``.att_lora_to_q.weight [keys_dim, query_dim]`` (absent
when ``query_projection_type`` is ``none``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from .files import write_whole
from .settings import BasisSettings

#: what users must be told wherever they meet the released weights (a basis fine-tuned from them inherits it)
WEIGHTS_LICENCE = (
    "The released LoRWeB basis (hilamanor/lorweb) is under NVIDIA's non-commercial licence: "
    "research and non-commercial use only."
)
MODULE_PREFIX = "transformer."
#: the tensor name's suffix -> the field of :class:`lorweb_ops.basis.ModuleBasis`
PARTS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_keys": "lora_keys", "att_lora_to_q.weight": "to_q"}
#: ``software`` in the metadata of a basis the pack's trainer wrote (the loader's messages tell the two apart)
TRAINER_SOFTWARE = "lorweb_train"


def module_tensors(module: str, parts: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """One module's tensors under their file names; ``parts`` maps ModuleBasis fields (lora_A, ..., to_q)."""
    names = {field: f"{MODULE_PREFIX}{module}.{suffix}" for suffix, field in PARTS.items()}
    return {names[field]: tensor.contiguous() for field, tensor in parts.items() if tensor is not None}


def ai_toolkit_config(
    name: str, *, rank: int, num_loras: int, keys_dim: int, settings: BasisSettings, train: Mapping | None = None
) -> dict:
    """The ``config.yaml`` ai-toolkit saves beside a checkpoint; :func:`lorweb_ops.load_basis` reads its network."""
    process = {
        "type": "sd_trainer",
        "network": {
            "type": "attlora",
            "linear": rank,
            "linear_alpha": rank,
            "network_kwargs": {
                "loras_num": num_loras,
                "lora_keys_dim": keys_dim,
                **settings.as_dict(),
                "external_query": True,
                "pooling_type": "avg",
            },
        },
        "train": dict(train or {}),
        "model": {"arch": "flux_kontext"},
    }
    return {
        "job": "extension",
        "config": {"name": name, "process": [process]},
        "meta": {"name": name, "version": "1.0", "software": "LoRWeB for ComfyUI"},
    }


def write_basis_files(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], config: Mapping
) -> None:
    """``path`` (safetensors) and ``config.yaml`` beside it, each written whole (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda temporary: save_file(dict(tensors), str(temporary), metadata=dict(metadata)))
    write_config(path.parent / "config.yaml", config)


def write_config(path: str | os.PathLike, config: Mapping) -> None:
    """An ai-toolkit config (:func:`ai_toolkit_config`) as yaml, written whole."""
    text = yaml.safe_dump(dict(config), sort_keys=False)
    write_whole(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
