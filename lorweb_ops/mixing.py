"""Query -> per-module coefficients -> low-rank factors, exactly as the reference adapter computes them.

Per module m (reference ``AttLoraLinearAdapter.forward`` with one external query):
``logits[h, k] = <(W_q q)_h, keys_k,h> / sqrt(head_dim)``; softmax (or tanh) over k;
mean over heads (or sum, clamped). The weight delta is ``sum_k c_k (A_k B_k)^T`` with scale 1:
one LoRA of rank K*r with ``up = [B_1^T ... B_K^T]`` and ``down = [c_1 A_1^T; ...; c_K A_K^T]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .basis import LoraBasis, ModuleBasis
from .errors import LoRWeBError
from .settings import BasisSettings


def as_single_query(query: torch.Tensor, query_dim: int) -> torch.Tensor:
    """Accept ``[Dq]``, ``[1, Dq]`` or the reference's ``[1, n, d]``; return float32 ``[Dq]`` on the CPU."""
    if not isinstance(query, torch.Tensor):
        raise LoRWeBError(f"the query must be a tensor, not {type(query).__name__}")
    if query.ndim > 1 and query.shape[0] != 1:
        raise LoRWeBError(
            f"the query holds a batch of {query.shape[0]} analogies; one analogy is mixed at a time. "
            "Run several analogies one after another (see scripts/run_analogy.py for folders of images)."
        )
    flat = query.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    if flat.numel() != query_dim:
        raise LoRWeBError(
            f"the query has {flat.numel()} values but the basis expects {query_dim}. The image encoder or "
            "query mode does not match the basis (the released basis wants CLIP ViT-L/14, 3 x 768)."
        )
    if not torch.isfinite(flat).all():
        raise LoRWeBError("the query contains NaN or Inf values; check the images and the CLIP vision model.")
    return flat


def module_coefficients(module: ModuleBasis, query: torch.Tensor, settings: BasisSettings) -> torch.Tensor:
    """The K mixing coefficients of one module for a float32 ``[Dq]`` query."""
    projected = query if module.to_q is None else module.to_q.float() @ query  # [Dk]
    return coefficients_from_projected(projected.unsqueeze(0), module.lora_keys.float(), settings)[0]


def coefficients_from_projected(projected: torch.Tensor, keys: torch.Tensor, settings: BasisSettings) -> torch.Tensor:
    """``[B, K]`` coefficients from projected queries ``[B, Dk]`` and keys ``[K, Dk]`` (differentiable).

    One function for inference (B = 1) and training (a batch of different analogies), so both agree.
    """
    heads = settings.lora_heads
    batch, keys_dim = projected.shape
    head_dim = keys_dim // heads
    per_head_keys = keys.view(-1, heads, head_dim).transpose(0, 1)  # [H, K, hd]
    logits = torch.einsum("bhd,hkd->bhk", projected.view(batch, heads, head_dim), per_head_keys) * head_dim**-0.5
    weights = torch.softmax(logits, dim=-1) if settings.lora_softmax else torch.tanh(logits)
    if settings.mixing_coeffs_type == "sum":
        return weights.sum(dim=1).clamp(min=0.0 if settings.lora_softmax else -1.0, max=1.0)
    return weights.mean(dim=1)


def mixing_coefficients(basis: LoraBasis, query: torch.Tensor) -> dict[str, torch.Tensor]:
    """Module name -> its ``[K]`` float32 coefficients for one analogy's query."""
    flat = as_single_query(query, basis.query_dim)
    with torch.no_grad():
        return {name: module_coefficients(basis.weights[name], flat, basis.settings) for name in basis.modules}


def lowrank_factors(module: ModuleBasis, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, K*r], down [K*r, in])`` with ``up @ down == sum_k c_k (A_k B_k)^T``.

    ``up`` is a view of the stored ``lora_B`` (no copy, file dtype); ``down`` is the only new tensor,
    float32 so that the coefficients are folded in without rounding.
    """
    num_loras, rank, out_features = module.lora_B.shape
    coefficients = _check_coefficients(coefficients, num_loras)
    up = module.lora_B.reshape(num_loras * rank, out_features).t()
    # one allocation: multiply the transposed view straight into the float32 result (no upcast copy, no temp)
    down = torch.empty(num_loras * rank, module.in_features, dtype=torch.float32)
    torch.mul(module.lora_A.transpose(1, 2), coefficients.view(-1, 1, 1), out=down.view(num_loras, rank, -1))
    return up, down


def delta_weight(basis: LoraBasis, module: str, coefficients: torch.Tensor) -> torch.Tensor:
    """The dense float32 ``[out, in]`` delta of one module (strength not included). For tests and export."""
    up, down = lowrank_factors(basis.module(module), coefficients)
    return up.float() @ down


def _check_coefficients(coefficients: torch.Tensor, num_loras: int) -> torch.Tensor:
    coefficients = torch.as_tensor(coefficients, dtype=torch.float32).reshape(-1)
    if coefficients.numel() != num_loras:
        raise LoRWeBError(f"expected {num_loras} coefficients (one per basis LoRA), got {coefficients.numel()}")
    return coefficients


@dataclass(frozen=True)
class MixWeights:
    """The coefficients an Apply used, with the basis they belong to (for charts, export and blending)."""

    basis_path: str
    modules: tuple[str, ...]
    coefficients: Mapping[str, torch.Tensor]  # module -> [K] float32
    strength: float = 1.0

    def as_matrix(self) -> torch.Tensor:
        """``[modules, K]`` in module order."""
        return torch.stack([self.coefficients[name] for name in self.modules])


def check_weights_fit(basis: LoraBasis, weights: MixWeights) -> None:
    """Refuse weights that were computed for another basis or another set of modules, saying which."""
    basis_file, weights_file = os.path.basename(basis.path), os.path.basename(weights.basis_path)
    if tuple(weights.modules) != tuple(basis.modules):
        missing = [m for m in basis.modules if m not in set(weights.modules)]
        extra = [m for m in weights.modules if m not in set(basis.modules)]
        detail = (
            "; ".join(
                [f"{len(missing)} of the basis' modules are missing (e.g. {missing[:2]})"] * bool(missing)
                + [f"{len(extra)} are not in the basis (e.g. {extra[:2]})"] * bool(extra)
            )
            or "they are in another order"
        )
        raise LoRWeBError(
            f"these weights cover {len(weights.modules)} modules of {weights_file} but the basis {basis_file} has "
            f"{len(basis.modules)}: {detail}. Weights only fit the basis they were made with: connect the same "
            "Load LoRA Basis that fed the Apply node which produced them."
        )
    if weights.basis_path != basis.path:
        raise LoRWeBError(
            f"these weights were made for the basis {weights_file} ({weights.basis_path}), not for {basis_file} "
            f"({basis.path}). Weights only fit the basis they were made with: connect that basis."
        )
    sizes = {int(weights.coefficients[m].numel()) for m in basis.modules}
    if sizes != {basis.num_loras}:
        raise LoRWeBError(
            f"these weights have {sorted(sizes)} coefficients per layer but the basis {basis_file} has "
            f"{basis.num_loras} LoRAs; they were made for another version of the file. Re-run the Apply node."
        )
