"""Every fact about Flux's Linear layout: where each LoRWeB module (diffusers Flux name) lives in a ComfyUI / BFL
Flux model, the widths of each Linear, and how the blocks are ordered. Nothing else in the pack spells block names.

diffusers keeps q, k, v (and the single blocks' MLP input) as separate Linears; BFL and ComfyUI fuse
them along the output rows. Input columns never need permuting, so a module maps to a row range of
one BFL weight. Row starts are multiples of the hidden size, which is every module's input width.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import LoRWeBError

# diffusers module suffix -> (BFL layer inside the block, row slot in a fused weight or None for the whole weight)
DOUBLE_BLOCK_LAYERS: dict[str, tuple[str, int | None]] = {
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
SINGLE_BLOCK_LAYERS: dict[str, tuple[str, int | None]] = {
    "norm.linear": ("modulation.lin", None),
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),  # rows [3H, 3H + MLP): after q, k, v
    "proj_out": ("linear2", None),
}
_BLOCKS = {
    "transformer_blocks": ("double_blocks", DOUBLE_BLOCK_LAYERS),
    "single_transformer_blocks": ("single_blocks", SINGLE_BLOCK_LAYERS),
}
#: where ComfyUI's model keeps the diffusion model's weights in its state dict
MODEL_PREFIX = "diffusion_model."
#: the BFL model's lists of blocks (``model.double_blocks``, ``model.single_blocks``)
BFL_BLOCK_LISTS = tuple(bfl_block for bfl_block, _ in _BLOCKS.values())
_MODULE_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")

#: The released model adapts every Linear of the 19 double and 38 single Flux blocks.
FLUX_DEPTH, FLUX_SINGLE_DEPTH = 19, 38


@dataclass(frozen=True)
class FluxTarget:
    """One module's place in the BFL model: weight name (no prefix/suffix) and the rows it covers."""

    module: str
    bfl_layer: str  # e.g. "double_blocks.0.img_attn.qkv"
    row_start: int
    row_count: int
    fused: bool  # True when the layer holds other modules' rows too

    @property
    def model_key(self) -> str:
        """The ComfyUI state-dict key of the weight."""
        return f"{MODEL_PREFIX}{self.bfl_layer}.weight"


def is_flux_module(name: str) -> bool:
    match = _MODULE_NAME.match(name)
    return bool(match) and match.group(3) in _BLOCKS[match.group(1)][1]


def flux_target(module: str, in_features: int, out_features: int) -> FluxTarget:
    """Map a diffusers module name and its shape to its BFL weight and row range."""
    match = _MODULE_NAME.match(module)
    if not match or match.group(3) not in _BLOCKS[match.group(1)][1]:
        raise LoRWeBError(
            f"{module!r} is not a Linear inside a Flux transformer block; a LoRWeB basis for FLUX.1 Kontext "
            "adapts only transformer_blocks.N.* and single_transformer_blocks.N.* Linears."
        )
    block_kind, index, layer = match.groups()
    bfl_block, layers = _BLOCKS[block_kind]
    bfl_layer, slot = layers[layer]
    row_start = 0 if slot is None else slot * in_features
    return FluxTarget(module, f"{bfl_block}.{index}.{bfl_layer}", row_start, out_features, slot is not None)


def block_of(module: str) -> tuple[int, int]:
    """Sort key and group of a module (diffusers name): double blocks first, then single blocks, by index."""
    match = _MODULE_NAME.match(module)
    if not match:
        return (2, 0)
    return (0 if match.group(1) == "transformer_blocks" else 1, int(match.group(2)))


def module_shapes_in(linears: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Diffusers module name -> ``(in, out)`` of every block Linear a basis can adapt, in block order, from a BFL
    model's Linears (``double_blocks.0.img_attn.qkv`` -> ``(in, out)``); a fused weight gives each module its rows."""
    shapes: dict[str, tuple[int, int]] = {}
    for diffusers_block, (bfl_block, layers) in _BLOCKS.items():
        index = 0
        while any(name.startswith(f"{bfl_block}.{index}.") for name in linears):
            for suffix, (bfl_layer, slot) in layers.items():
                size = linears.get(f"{bfl_block}.{index}.{bfl_layer}")
                if size is not None:
                    in_features, out_features = size
                    if slot is None:
                        out = out_features
                    elif suffix == "proj_mlp":
                        out = out_features - 3 * in_features  # linear1's rows after q, k, v
                    else:
                        out = in_features
                    shapes[f"{diffusers_block}.{index}.{suffix}"] = (in_features, out)
            index += 1
    return shapes


def fused_rows(bfl_layer: str, covering: Sequence[FluxTarget], hidden: int) -> int:
    """Row count of a whole BFL weight, from the modules of a basis that cover it."""
    if bfl_layer.endswith(".qkv"):
        return 3 * hidden
    if bfl_layer.endswith(".linear1"):
        mlp = next((t.row_count for t in covering if t.module.endswith("proj_mlp")), 4 * hidden)
        return 3 * hidden + mlp
    return max(t.row_start + t.row_count for t in covering)


def module_shape(module: str, hidden: int = 3072, mlp: int = 4 * 3072) -> tuple[int, int]:
    """``(in, out)`` of a Flux block Linear (diffusers name) for a hidden and MLP width (FLUX.1 by default)."""
    layer = _MODULE_NAME.match(module).group(3) if _MODULE_NAME.match(module) else module
    if layer in ("norm1.linear", "norm1_context.linear"):
        return hidden, 6 * hidden
    if layer == "norm.linear":
        return hidden, 3 * hidden
    if layer in ("ff.net.0.proj", "ff_context.net.0.proj", "proj_mlp"):
        return hidden, mlp
    if layer in ("ff.net.2", "ff_context.net.2"):
        return mlp, hidden
    if layer == "proj_out":
        return hidden + mlp, hidden
    return hidden, hidden


def released_module_names(depth: int = FLUX_DEPTH, single_depth: int = FLUX_SINGLE_DEPTH) -> list[str]:
    """The 494 module names of the released basis, in block order."""
    names = [f"transformer_blocks.{i}.{layer}" for i in range(depth) for layer in DOUBLE_BLOCK_LAYERS]
    names += [f"single_transformer_blocks.{i}.{layer}" for i in range(single_depth) for layer in SINGLE_BLOCK_LAYERS]
    return names
