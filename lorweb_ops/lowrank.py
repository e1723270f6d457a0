"""One low-rank term on a Linear's activations: ``output[..., rows] += scale * (x @ down.T) @ up.T``.

The base weight is never touched; a term may cover a slice of the output rows (q, k or v of a fused qkv Linear).
"""

from __future__ import annotations

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
