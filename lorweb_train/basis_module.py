"""The LoRWeB basis as a trainable torch module, and its saving in the released (ai-toolkit ``attlora``) format.

Per adapted Linear ``m`` (diffusers name): ``lora_A [K, in, r]`` (Kaiming-uniform, a = sqrt 5, on the 3-d tensor as
the reference does), ``lora_B [K, r, out]`` (zeros, so the untrained basis changes nothing), ``lora_keys [K, Dk]``
(standard normal) and ``to_q``, a Linear ``Dq -> Dk`` without bias. The coefficients use
:func:`lorweb_ops.mixing.coefficients_from_projected`, the very function inference uses.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.nn.utils import skip_init

from lorweb_ops.basis import LoraBasis
from lorweb_ops.basis_format import TRAINER_SOFTWARE, module_tensors, write_basis_files
from lorweb_ops.basis_format import ai_toolkit_config as basis_config
from lorweb_ops.errors import LoRWeBError
from lorweb_ops.finite import all_finite
from lorweb_ops.mixing import coefficients_from_projected
from lorweb_ops.settings import BasisSettings

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
        self.settings = network.settings()
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
            layer = self.layer(name)
            parts = {"lora_A": layer.lora_A, "lora_B": layer.lora_B, "lora_keys": layer.lora_keys}
            parts["to_q"] = layer.to_q.weight if layer.to_q is not None else None
            stored = {part: t.detach().to("cpu", dtype) for part, t in parts.items() if t is not None}
            tensors.update(module_tensors(name, stored))
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
    return NetworkConfig(
        num_loras=basis.num_loras,
        rank=basis.rank,
        keys_dim=basis.keys_dim,
        modules=list(basis.modules) if network.modules == "all" else network.modules,
        **basis.settings.as_dict(),
    )


def ai_toolkit_config(name: str, basis: TrainableBasis, extra_train: dict | None = None) -> dict:
    """The ``config.yaml`` beside a trained basis (its size and mixing settings; ``train``: the run's recipe)."""
    return basis_config(
        name,
        rank=basis.rank,
        num_loras=basis.num_loras,
        keys_dim=basis.keys_dim,
        settings=basis.settings,
        train=extra_train,
    )


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
    metadata = {"format": "pt", "name": name, "version": "1.0", "training_info": f'{{"step": {step}}}',
                "software": TRAINER_SOFTWARE}  # fmt: skip
    tensors = basis.released_state_dict(dtype)
    check_finite_tensors(tensors, f"the basis at step {step} (as {str(dtype).removeprefix('torch.')})")
    write_basis_files(path, tensors, metadata, ai_toolkit_config(name, basis, extra_train))
    return path
