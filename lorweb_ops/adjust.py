"""Moving through LoRA space: check, blend and reshape the per-layer coefficients of a ``MixWeights``.

Two kinds of mix exist. A *probability* mix (the released softmax settings) has non-negative coefficients that sum
to 1 in every layer; every operation here keeps it that way, so it stays in the domain LoRWeB was trained on. Any
other mix (tanh, or summed heads) is *signed*: it is reshaped the same way but never renormalised.

:func:`adjust_mix` applies, in this order: temperature, overrides, top-k, then renormalisation of probability mixes.

* temperature T: probability mixes become ``softmax(log c / T)`` (= ``c**(1/T)`` renormalised): T < 1 sharpens
  towards the dominant basis LoRAs, T > 1 flattens towards uniform. Signed mixes become ``sign(c) |c|**(1/T)``.
* overrides ``{k: v}``: basis LoRA k (0-based, as the mix chart numbers them) gets weight v in every layer.
* top-k: keep the k largest |c| of each layer, zero the rest.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from types import MappingProxyType

import torch

from .checks import is_number_in, show
from .errors import LoRWeBError
from .mixing import MixWeights

#: a layer counts as a probability mix when its coefficients are >= -TOLERANCE and sum to 1 within it
TOLERANCE = 1e-4
_OVERRIDE_ITEM = re.compile(r"^\s*(\S+?)\s*=\s*(\S+)\s*$")
OVERRIDE_EXAMPLE = "e.g. '7=1.0, 3=0.5'"
MAX_OVERRIDE_CHARS = 4096  # 1024 items of "k=w, "; more is not a hand-written override
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def check_same_basis(first: MixWeights, second: MixWeights) -> None:
    """Two weights can be combined only when they belong to the same basis (same file, modules and K)."""
    name_1, name_2 = os.path.basename(first.basis_path), os.path.basename(second.basis_path)
    if first.basis_path != second.basis_path:
        raise LoRWeBError(
            f"weights_1 belong to the basis {name_1} ({first.basis_path}) but weights_2 to {name_2} "
            f"({second.basis_path}). Only analogies mixed from the same basis can be blended: feed both Apply "
            "nodes from the same Load LoRA Basis."
        )
    if tuple(first.modules) != tuple(second.modules) or any(
        first.coefficients[m].shape != second.coefficients[m].shape for m in first.modules
    ):
        raise LoRWeBError(
            f"weights_1 and weights_2 both name the basis {name_1} but cover different modules "
            f"({len(first.modules)} vs {len(second.modules)}) or LoRA counts; the file changed between the two "
            "runs. Re-run both Apply nodes with the current file."
        )


def is_probability_mix(weights: MixWeights) -> bool:
    """True when every layer's coefficients are non-negative and sum to 1 (softmax mixes)."""
    matrix = weights.as_matrix()
    return bool((matrix >= -TOLERANCE).all() and ((matrix.sum(dim=1) - 1).abs() <= TOLERANCE).all())


def blend_weights(first: MixWeights, second: MixWeights, t: float) -> MixWeights:
    """``(1 - t) * first + t * second`` per layer, strength too; t = 0 and t = 1 give the inputs exactly."""
    t = _check_unit_interval(t)
    check_same_basis(first, second)
    coefficients = {m: (1.0 - t) * first.coefficients[m] + t * second.coefficients[m] for m in first.modules}
    strength = (1.0 - t) * first.strength + t * second.strength
    return MixWeights(first.basis_path, tuple(first.modules), MappingProxyType(coefficients), strength)


def _check_unit_interval(t: float) -> float:
    if not is_number_in(t, 0.0, 1.0):
        raise LoRWeBError(f"t must be a number from 0 (only weights_1) to 1 (only weights_2), got {show(t)}.")
    return float(t)


def parse_overrides(text: str) -> dict[int, float]:
    """``"7=1.0, 3=0.5"`` -> ``{7: 1.0, 3: 0.5}``; empty text -> ``{}``. Items are separated by ',' ';' or lines."""
    if not isinstance(text, str):
        raise LoRWeBError(f"override must be text like {OVERRIDE_EXAMPLE}, got {type(text).__name__}")
    if len(text) > MAX_OVERRIDE_CHARS:
        raise LoRWeBError(
            f"override is {len(text)} characters long; give at most {MAX_OVERRIDE_CHARS} ({OVERRIDE_EXAMPLE})."
        )
    overrides: dict[int, float] = {}
    for item in filter(str.strip, re.split(r"[,;\n]", text)):
        match = _OVERRIDE_ITEM.match(item)
        if not match:
            raise LoRWeBError(f"override item {show(item.strip())} is not 'index=weight' ({OVERRIDE_EXAMPLE}).")
        index, value = _override_index(match.group(1)), _override_value(match.group(1), match.group(2))
        if index in overrides:
            raise LoRWeBError(f"override sets basis LoRA {index} twice; give each index once ({OVERRIDE_EXAMPLE}).")
        overrides[index] = value
    return overrides


def _override_index(text: str) -> int:
    if not text.isdigit() or len(text) > 6:
        raise LoRWeBError(
            f"override index {show(text)} is not a whole number >= 0; basis LoRAs are numbered from 0 as in the mix "
            f"chart ({OVERRIDE_EXAMPLE})."
        )
    return int(text)


def _override_value(index: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoRWeBError(
            f"override weight {show(text)} for basis LoRA {index} is not a number ({OVERRIDE_EXAMPLE})."
        ) from None
    if not math.isfinite(value):
        raise LoRWeBError(f"override weight for basis LoRA {index} must be a finite number, got {show(text)}.")
    return value


def adjust_mix(
    weights: MixWeights, temperature: float = 1.0, top_k: int = 0, overrides: Mapping[int, float] | None = None
) -> MixWeights:
    """Temperature, overrides and top-k on every layer (see the module docstring); defaults change nothing."""
    overrides = dict(overrides or {})
    _check_adjustments(weights, temperature, top_k, overrides)
    if top_k >= int(weights.coefficients[weights.modules[0]].numel()):
        top_k = 0  # keeping every basis LoRA is no top-k at all (and must not renormalise)
    if temperature == 1.0 and top_k == 0 and not overrides:
        return weights
    probability = is_probability_mix(weights)
    if probability and any(v < 0 for v in overrides.values()):
        raise LoRWeBError(
            "this mix is a softmax mix (non-negative weights summing to 1 per layer); negative override weights "
            "would leave the domain LoRWeB was trained on and cannot be renormalised. Use weights >= 0."
        )
    coefficients = {
        m: _adjust_layer(m, weights.coefficients[m], temperature, top_k, overrides, probability)
        for m in weights.modules
    }
    return MixWeights(weights.basis_path, tuple(weights.modules), MappingProxyType(coefficients), weights.strength)


def _check_adjustments(weights: MixWeights, temperature: float, top_k: int, overrides: dict[int, float]) -> None:
    if not is_number_in(temperature, MIN_TEMPERATURE, MAX_TEMPERATURE):
        raise LoRWeBError(
            f"temperature must be a number from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g} (1 = unchanged), "
            f"got {show(temperature)}."
        )
    if not is_number_in(top_k, 0, math.inf, whole=True):
        raise LoRWeBError(f"top_k must be 0 (keep all) or a positive whole number, got {show(top_k)}.")
    num_loras = int(weights.coefficients[weights.modules[0]].numel())
    outside = sorted(k for k in overrides if k >= num_loras)
    if outside:
        raise LoRWeBError(
            f"override names basis LoRA {outside[0]} but the basis has {num_loras} LoRAs, numbered 0 to "
            f"{num_loras - 1}."
        )


def _adjust_layer(
    module: str, c: torch.Tensor, temperature: float, top_k: int, overrides: dict[int, float], probability: bool
) -> torch.Tensor:
    c = c.to(torch.float32)
    if temperature != 1.0:
        # softmax(log c / T): zero weights stay zero (log 0 = -inf)
        c = (
            torch.softmax(c.clamp_min(0).log() / temperature, dim=0)
            if probability
            else c.sign() * c.abs().pow(1.0 / temperature)
        )
    if overrides:
        c = c.clone()
        for index, value in overrides.items():
            c[index] = value
    if 0 < top_k < c.numel():
        keep = torch.topk(c.abs(), top_k).indices
        kept = torch.zeros_like(c)
        kept[keep] = c[keep]
        c = kept
    if probability:
        total = c.sum()
        if not total > 0:
            raise LoRWeBError(
                f"after the adjustments every weight of layer {module} is 0, so the mix cannot be renormalised. "
                "Keep more basis LoRAs (top_k) or give an override a weight > 0."
            )
        c = c / total
    return c
