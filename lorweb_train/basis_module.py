"""The LoRWeB basis as a trainable torch module, and its saving in the released (ai-toolkit ``attlora``) format.

Per adapted Linear ``m`` (diffusers name): ``lora_A [K, in, r]`` (Kaiming-uniform, a = sqrt 5, on the 3-d tensor as
the reference does), ``lora_B [K, r, out]`` (zeros, so the untrained basis changes nothing), ``lora_keys [K, Dk]``
(standard normal) and ``to_q``, a Linear ``Dq -> Dk`` without bias. The coefficients use
:func:`lorweb_ops.mixing.coefficients_from_projected`, the very function inference uses.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable

import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import skip_init

from lorweb_ops.basis import TRAINER_SOFTWARE, LoraBasis
from lorweb_ops.config import BasisSettings
from lorweb_ops.errors import LoRWeBError
from lorweb_ops.finite import all_finite
from lorweb_ops.mixing import coefficients_from_projected

from .config import NetworkConfig

_SEPARATOR = "$$"  # ModuleDict keys may not contain dots (ai-toolkit uses the same trick)


class BasisLayer(nn.Module):
    """The K LoRAs, keys and query projection of one module."""

    def __init__(self, in_features: int, out_features: int, num_loras: int, rank: int, keys_dim: int, query_dim: int,
                 projection: bool = True, generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(num_loras, in_features, rank))
        self.lora_B = nn.Parameter(torch.zeros(num_loras, rank, out_features))
        self.lora_keys = nn.Parameter(torch.randn(num_loras, keys_dim, generator=generator))
        # skip_init: nn.Linear's own init would draw from torch's global RNG; the seeded draw below replaces it
        self.to_q = skip_init(nn.Linear, query_dim, keys_dim, bias=False) if projection else None
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        if self.to_q is not None:  # nn.Linear's default init (Kaiming-uniform, a = sqrt 5), drawn from the seed
            nn.init.kaiming_uniform_(self.to_q.weight, a=math.sqrt(5), generator=generator)

    def coefficients(self, queries: torch.Tensor, settings: BasisSettings) -> torch.Tensor:
        """``[B, K]`` for queries ``[B, Dq]``."""
        projected = queries if self.to_q is None else self.to_q(queries.to(self.to_q.weight.dtype))
        return coefficients_from_projected(projected, self.lora_keys.to(projected.dtype), settings)


class TrainableBasis(nn.Module):
    """All modules' basis layers. ``forward(queries)`` returns every module's ``[B, K]`` coefficients.

    ``generator`` makes the initialisation a function of its seed alone (layers drawn in module order), so a config
    trains the same basis on every rerun and with any number of processes; None draws from torch's global RNG.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], network: NetworkConfig, query_dim: int,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        self.module_names = tuple(shapes)
        self.query_dim = query_dim
        self.settings = BasisSettings(
            query_mode=network.query_mode,
            lora_heads=network.lora_heads,
            lora_softmax=network.lora_softmax,
            mixing_coeffs_type=network.mixing_coeffs_type,
            query_projection_type=network.query_projection_type,
            external_query_model=network.external_query_model,
        )
        self.num_loras, self.rank, self.keys_dim = network.num_loras, network.rank, network.keys_dim
        projection = network.query_projection_type == "linear"
        if not projection and network.keys_dim != query_dim:
            raise LoRWeBError(
                f"query_projection_type none needs keys_dim = query size ({query_dim}); set network.keys_dim."
            )
        self.layers = nn.ModuleDict(
            {
                name.replace(".", _SEPARATOR): BasisLayer(
                    inp, out, network.num_loras, network.rank, network.keys_dim, query_dim, projection, generator
                )
                for name, (inp, out) in shapes.items()
            }
        )

    def layer(self, module: str) -> BasisLayer:
        return self.layers[module.replace(".", _SEPARATOR)]

    def forward(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: self.layer(name).coefficients(queries, self.settings) for name in self.module_names}

    def released_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """Tensors under the released names: ``transformer.<M>.lora_A`` ... ``.att_lora_to_q.weight``."""
        tensors = {}
        for name in self.module_names:
            layer, prefix = self.layer(name), f"transformer.{name}"
            tensors[f"{prefix}.lora_A"] = layer.lora_A.detach().to("cpu", dtype).contiguous()
            tensors[f"{prefix}.lora_B"] = layer.lora_B.detach().to("cpu", dtype).contiguous()
            tensors[f"{prefix}.lora_keys"] = layer.lora_keys.detach().to("cpu", dtype).contiguous()
            if layer.to_q is not None:
                tensors[f"{prefix}.att_lora_to_q.weight"] = layer.to_q.weight.detach().to("cpu", dtype).contiguous()
        return tensors

    @torch.no_grad()
    def load_from_basis(self, basis: LoraBasis) -> None:
        """Copy an existing basis (``--init``) into this module; shapes must agree (checked by the caller)."""
        for name in self.module_names:
            stored, layer = basis.module(name), self.layer(name)
            layer.lora_A.copy_(stored.lora_A.float())
            layer.lora_B.copy_(stored.lora_B.float())
            layer.lora_keys.copy_(stored.lora_keys.float())
            if layer.to_q is not None:
                layer.to_q.weight.copy_(stored.to_q.float())


def init_generator(seed: int) -> torch.Generator:
    """The basis initialisation's own stream: derived from the config's seed, apart from the data-order streams."""
    digest = hashlib.sha256(f"lorweb-basis-init:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def network_from_basis(basis: LoraBasis, network: NetworkConfig) -> NetworkConfig:
    """The network settings of an ``--init`` basis: K, rank, key size and query settings come from the file."""
    settings = basis.settings
    return NetworkConfig(
        num_loras=basis.num_loras,
        rank=basis.rank,
        keys_dim=basis.keys_dim,
        lora_heads=settings.lora_heads,
        lora_softmax=settings.lora_softmax,
        mixing_coeffs_type=settings.mixing_coeffs_type,
        query_mode=settings.query_mode,
        query_projection_type=settings.query_projection_type,
        external_query_model=settings.external_query_model,
        modules=list(basis.modules) if network.modules == "all" else network.modules,
    )


def ai_toolkit_config(name: str, basis: TrainableBasis, extra_train: dict | None = None) -> dict:
    """The ``config.yaml`` ai-toolkit saves beside a checkpoint; ``lorweb_ops.load_basis`` reads its network part."""
    settings = basis.settings
    return {
        "job": "extension",
        "config": {
            "name": name,
            "process": [
                {
                    "type": "sd_trainer",
                    "network": {
                        "type": "attlora",
                        "linear": basis.rank,
                        "linear_alpha": basis.rank,
                        "network_kwargs": {
                            "loras_num": basis.num_loras,
                            "lora_keys_dim": basis.keys_dim,
                            "lora_heads": settings.lora_heads,
                            "lora_softmax": settings.lora_softmax,
                            "mixing_coeffs_type": settings.mixing_coeffs_type,
                            "query_mode": settings.query_mode,
                            "external_query": True,
                            "pooling_type": "avg",
                            "query_projection_type": settings.query_projection_type,
                            "external_query_model": settings.external_query_model,
                        },
                    },
                    "train": extra_train or {},
                    "model": {"arch": "flux_kontext"},
                }
            ],
        },
        "meta": {"name": name, "version": "1.0", "software": "LoRWeB for ComfyUI trainer (lorweb_train)"},
    }


def check_finite_tensors(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write NaN/Inf: a broken basis must never reach a file (checked as it will be stored)."""
    bad = [name for name, tensor in tensors.items() if not all_finite(tensor)]
    if bad:
        raise LoRWeBError(
            f"{what} holds NaN or Inf values ({len(bad)} tensors, e.g. {bad[0]}), so it was not saved; the last "
            "saved basis and checkpoint are kept. The training diverged: lower train.lr, check the data, or use "
            "train.save_dtype float32 or bfloat16 if the values only overflow float16."
        )


def save_basis(basis: TrainableBasis, path: str, name: str, *, dtype: torch.dtype = torch.float16, step: int = 0,
               extra_train: dict | None = None) -> str:  # fmt: skip
    """Write ``path`` (safetensors) and ``config.yaml`` beside it, each through a temporary file (no torn files)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    metadata = {"format": "pt", "name": name, "version": "1.0", "training_info": f'{{"step": {step}}}',
                "software": TRAINER_SOFTWARE}  # fmt: skip
    tensors = basis.released_state_dict(dtype)
    check_finite_tensors(tensors, f"the basis at step {step} (as {str(dtype).removeprefix('torch.')})")
    temporary = path + ".tmp"
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):  # a failed write (full disk) leaves no half file behind
            os.remove(temporary)
    config_path = os.path.join(folder, "config.yaml")
    with open(config_path + ".tmp", "w", encoding="utf-8") as handle:
        yaml.safe_dump(ai_toolkit_config(name, basis, extra_train), handle, sort_keys=False)
    os.replace(config_path + ".tmp", config_path)
    return path


def module_names_for(model_modules: Iterable[str], requested) -> list[str]:
    """The diffusers module names to adapt: all found in the model, or the requested subset (checked)."""
    available = list(model_modules)
    if requested in ("all", None, ""):
        return available
    if isinstance(requested, str):
        requested = [requested]
    missing = [name for name in requested if name not in available]
    if missing:
        raise LoRWeBError(
            f"network.modules names {missing[:3]} that the model does not have; use diffusers names such as "
            f"{available[:2]} or 'all'."
        )
    return list(requested)
