"""Coefficients -> one low-rank patch per module, addressed in the BFL / ComfyUI Flux layout."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .basis import LoraBasis
from .errors import LoRWeBError
from .flux_layout import FluxTarget, flux_target, fused_rows
from .mixing import lowrank_factors


@dataclass(frozen=True)
class ModulePatch:
    """The composed LoRA of one module: ``target rows += strength * up @ down``."""

    target: FluxTarget
    up: torch.Tensor  # [out, K*r], a view of the basis
    down: torch.Tensor  # [K*r, in], float32, coefficients folded in


def module_targets(basis: LoraBasis) -> list[FluxTarget]:
    """Where every module of the basis lands in a Flux model."""
    return [
        flux_target(name, basis.weights[name].in_features, basis.weights[name].out_features) for name in basis.modules
    ]


def composed_patches(basis: LoraBasis, coefficients: Mapping[str, torch.Tensor]) -> list[ModulePatch]:
    """One low-rank patch per module of the basis. Never builds a dense delta."""
    missing = [name for name in basis.modules if name not in coefficients]
    if missing:
        raise LoRWeBError(
            f"the coefficients do not cover {len(missing)} modules of the basis (e.g. {missing[:3]}); "
            "they were computed for another basis."
        )
    patches = []
    for target in module_targets(basis):
        up, down = lowrank_factors(basis.weights[target.module], coefficients[target.module])
        patches.append(ModulePatch(target, up, down))
    return patches


def flux_delta(basis: LoraBasis, coefficients: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """Dense float32 delta of a whole BFL weight (e.g. ``double_blocks.0.img_attn.qkv``).

    Rows that no module of the basis covers are zero. For tests and export only.
    """
    covering = [t for t in module_targets(basis) if t.bfl_layer == key]
    if not covering:
        raise LoRWeBError(f"no module of the basis maps to the Flux weight {key!r}")
    in_features = basis.weights[covering[0].module].in_features
    rows = fused_rows(key, covering, in_features)
    delta = torch.zeros(rows, in_features, dtype=torch.float32)
    for target in covering:
        up, down = lowrank_factors(basis.weights[target.module], coefficients[target.module])
        delta[target.row_start : target.row_start + target.row_count] = up.float() @ down
    return delta
