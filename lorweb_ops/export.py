"""One analogy's composed LoRA as an ordinary LoRA file (diffusers / PEFT Flux keys), optionally rank-reduced.

Per module the mix is exactly one LoRA of rank K*r (``up @ down``, see ``mixing.lowrank_factors``). It is written as
``transformer.<module>.lora_A.weight [R, in]`` (down), ``.lora_B.weight [out, R]`` (up) and ``.alpha`` = R, so
ComfyUI's scale alpha/R is 1 and its own key map puts q/k/v/mlp onto the fused BFL weights. Loaded at strength s,
the file changes the model exactly as the pack's patch at strength s does.

Rank reduction never forms the dense ``[out, in]`` delta: with ``up = Q1 R1`` and ``down^T = Q2 R2`` (thin QR),
``up @ down = Q1 (R1 R2^T) Q2^T``, so the SVD of the small ``[K*r, K*r]`` core gives the SVD of the whole delta.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from safetensors.torch import save_file

from .basis import LoraBasis
from .basis_format import WEIGHTS_LICENCE
from .checks import is_number_in, show
from .errors import LoRWeBError
from .mixing import MixWeights, check_weights_fit, lowrank_factors

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LICENCE = (
    f"{WEIGHTS_LICENCE} A LoRA composed from it is a derivative of it and carries the same licence. "
    "FLUX.1 Kontext [dev] has its own non-commercial licence."
)


@dataclass(frozen=True)
class ExportedLora:
    """A composed LoRA ready for ``safetensors.torch.save_file``, and how much of each layer it keeps."""

    tensors: Mapping[str, torch.Tensor]
    metadata: Mapping[str, str]
    ranks: Mapping[str, int]  # module -> rank written
    energy: Mapping[str, float]  # module -> kept sum(sigma^2) / total sum(sigma^2); 1.0 when exact

    @property
    def energy_min(self) -> float:
        return min(self.energy.values())

    @property
    def energy_mean(self) -> float:
        return sum(self.energy.values()) / len(self.energy)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())


def peft_keys(module: str) -> tuple[str, str, str]:
    """``(lora_A, lora_B, alpha)`` key names of a module (diffusers name without ``transformer.``)."""
    prefix = f"transformer.{module}"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight", f"{prefix}.alpha"


def reduce_rank(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``up @ down`` (truncated SVD) and the fraction of energy kept.

    Works on the thin QR factors of ``up`` and ``down^T`` (float64), never on the dense delta. Returns float64
    ``(up_k [out, k], down_k [k, in], kept)`` with ``k <= rank``; the singular values are split evenly between
    the factors so that neither gets very large or very small numbers (kinder to half-precision files).
    """
    if rank < 1:
        raise LoRWeBError(f"the rank to keep must be at least 1, got {rank}")
    q_up, r_up = torch.linalg.qr(up.double())  # [out, m], [m, n]
    q_down, r_down = torch.linalg.qr(down.double().t())  # [in, p], [p, n]
    u, sigma, vh = torch.linalg.svd(r_up @ r_down.t(), full_matrices=False)
    keep = min(rank, sigma.numel())
    energy = sigma.square()
    total = float(energy.sum())
    kept = float(energy[:keep].sum()) / total if total > 0 else 1.0  # a zero delta loses nothing
    root = sigma[:keep].sqrt()
    up_k = (q_up @ u[:, :keep]) * root
    down_k = root[:, None] * (vh[:keep] @ q_down.t())
    return up_k, down_k, kept


def module_factors(
    basis: LoraBasis, module: str, coefficients: torch.Tensor, rank: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, kept energy)`` of one module: the exact K*r factors (rank 0 or >= K*r), else the SVD ones."""
    up, down = lowrank_factors(basis.module(module), coefficients)
    if rank <= 0 or rank >= down.shape[0]:
        return up.float(), down, 1.0
    return reduce_rank(up, down, rank)


def export_lora(basis: LoraBasis, weights: MixWeights, rank: int = 0, dtype: str = "float32") -> ExportedLora:
    """The composed LoRA of ``weights`` as an ordinary diffusers/PEFT LoRA state dict with metadata.

    ``rank`` 0 keeps the full K*r per layer (exact); a smaller rank keeps each layer's best rank-``rank``
    approximation. ``dtype``: "float32" (exact), "bfloat16" or "float16" (half the size, rounded factors).
    Strength is not folded in: load the file at the strength the pack would use.
    """
    check_weights_fit(basis, weights)
    if dtype not in EXPORT_DTYPES:
        raise LoRWeBError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {show(dtype)}.")
    if not is_number_in(rank, 0, math.inf, whole=True):
        raise LoRWeBError(f"rank must be 0 (full K*r) or a positive whole number, got {show(rank)}.")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    energy: dict[str, float] = {}
    with torch.no_grad():
        for module in basis.modules:
            up, down, kept = module_factors(basis, module, weights.coefficients[module], rank)
            key_a, key_b, key_alpha = peft_keys(module)
            tensors[key_a] = down.to(EXPORT_DTYPES[dtype]).contiguous()
            tensors[key_b] = up.to(EXPORT_DTYPES[dtype]).contiguous()
            # alpha == rank: ComfyUI scales by alpha / rank, so the factors apply at scale 1 as the pack's patch does
            tensors[key_alpha] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
            ranks[module], energy[module] = down.shape[0], kept
    metadata = export_metadata(basis, weights, ranks, energy, dtype)
    return ExportedLora(
        MappingProxyType(tensors), MappingProxyType(metadata), MappingProxyType(ranks), MappingProxyType(energy)
    )


def export_metadata(
    basis: LoraBasis, weights: MixWeights, ranks: Mapping[str, int], energy: Mapping[str, float], dtype: str
) -> dict[str, str]:
    """What the file is, where it came from, and when it is exact (safetensors metadata: str -> str)."""
    full_rank = basis.num_loras * basis.rank
    exact = all(r == full_rank for r in ranks.values())
    kept = list(energy.values())
    return {
        "format": "pt",
        "lorweb_kind": "LoRWeB composed analogy LoRA",
        "lorweb_description": (
            "One analogy's per-layer mix of a LoRWeB LoRA basis, written as an ordinary Flux LoRA (diffusers/PEFT "
            "keys) for FLUX.1 Kontext [dev]. It reproduces the LoRWeB patch only for the analogy (a, a', b) whose "
            "images produced the mix: on other images it is an approximation. Use it in the LoRWeB grid workflow "
            "([a | a'] / [b | b]) with the same a and a'."
        ),
        "lorweb_basis": os.path.basename(weights.basis_path),
        "lorweb_basis_loras": str(basis.num_loras),
        "lorweb_basis_rank": str(basis.rank),
        "lorweb_modules": str(len(basis.modules)),
        "lorweb_rank": str(max(ranks.values())),
        "lorweb_exact": "true" if exact and dtype == "float32" else "false",
        "lorweb_energy_min": f"{min(kept):.6f}",
        "lorweb_energy_mean": f"{sum(kept) / len(kept):.6f}",
        "lorweb_dtype": dtype,
        "lorweb_strength": f"{weights.strength:g}",
        "lorweb_strength_note": "Strength is not folded in: load at the strength the analogy was applied with.",
        "license": LICENCE,
    }


def write_new_file(path: str | os.PathLike, exported: ExportedLora) -> None:
    """Write ``exported`` to ``path``, which must not exist yet (never overwrites; raises FileExistsError).

    The name is claimed first (exclusive create), the data goes to a hidden temporary file in the same folder and
    then replaces the claimed empty file, so a half-written LoRA is never left under the final name.
    """
    path = os.fspath(path)
    with open(path, "xb"):
        pass
    folder, name = os.path.split(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder or ".")
    os.close(handle)
    try:
        save_file(dict(exported.tensors), temporary, metadata=dict(exported.metadata))
        os.replace(temporary, path)
    except BaseException:
        for leftover in (temporary, path):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
