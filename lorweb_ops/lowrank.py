"""One low-rank term on a Linear's activations: ``output[..., rows] += scale * (x @ down.T) @ up.T``.

The base weight is never touched; a term may cover a slice of the output rows (q, k or v of a fused qkv Linear).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankTerm:
    """``output[..., rows] += scale * (x @ down.T) @ up.T`` for one Linear of the model (base weight untouched)."""

    module: str  # module path inside the diffusion model, e.g. ``double_blocks.0.img_attn.qkv``
    up: torch.Tensor  # [rows, r]
    down: torch.Tensor  # [r, in]
    scale: float = 1.0
    row_start: int = 0
    row_count: int | None = None  # None: all output rows


def lowrank_output(term: LowRankTerm, x: torch.Tensor, strength: float) -> torch.Tensor:
    """The term's contribution for input activations ``x [..., in]``, in ``x``'s dtype."""
    down = term.down.to(device=x.device, dtype=x.dtype)
    up = term.up.to(device=x.device, dtype=x.dtype)
    return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up) * (strength * term.scale)


def add_row_slices(output: torch.Tensor, slices: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``output`` plus each delta at its first output row (``[..., start : start + delta.shape[-1]]``).

    The one way the pack adds low-rank outputs to a Linear's output, in training and in composition: several
    modules share a fused Linear (q, k, v of ``qkv``; q, k, v and the MLP input of ``linear1``), and several LoRAs may
    cover the same rows. Out of place, so autograd (training, checkpoint recompute) sees a plain sum.
    """
    width = output.shape[-1]
    total = None
    for start, delta in sorted(slices, key=lambda item: item[0]):
        delta = delta.to(output.dtype)
        if start or delta.shape[-1] != width:
            after = width - start - delta.shape[-1]
            delta = torch.nn.functional.pad(delta, (start, after))
        total = delta if total is None else total + delta
    return output if total is None else output + total


def weight_fits(shape: Sequence[int], in_features: int, row_start: int, row_count: int, *, sliced: bool) -> bool:
    """Whether a Linear weight of ``shape`` ``[out, in]`` takes a low-rank term on rows ``row_start`` to
    ``row_start + row_count`` from ``in_features`` inputs: a slice of a fused weight must lie inside it, a term on a
    whole weight must cover it exactly."""
    if len(shape) != 2 or shape[1] != in_features:
        return False
    end = row_start + row_count
    return end <= shape[0] if sliced else (row_start == 0 and end == shape[0])
