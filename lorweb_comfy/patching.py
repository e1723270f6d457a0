"""Composed low-rank patches -> ComfyUI ``LoRAAdapter`` patches on a cloned ModelPatcher."""

from __future__ import annotations

import os
import re

import comfy.utils
from comfy.weight_adapter import LoRAAdapter

from lorweb_ops import LoRWeBError, ModulePatch
from lorweb_ops.flux_layout import BFL_BLOCK_LISTS
from lorweb_ops.lowrank import weight_fits


def _weight_shapes(model, keys: set[str]) -> dict[str, tuple[int, ...]]:
    """The logical shape of each target weight, read from the module itself.

    Not from ``model_state_dict()``: ComfyUI-GGUF puts placeholders with the packed byte shape there; its
    parameters keep the logical shape in ``tensor_shape`` (and fp8 parameters have their plain shape).
    """
    shapes = {}
    for key in keys:
        try:
            tensor = comfy.utils.get_attr(model.model, key)
        except AttributeError:
            continue
        shapes[key] = tuple(getattr(tensor, "tensor_shape", tensor.shape))
    return shapes


def _is_flux(model) -> bool:
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    return all(hasattr(diffusion_model, blocks) for blocks in BFL_BLOCK_LISTS)


def check_model_fits(model, patches: list[ModulePatch], basis_path: str) -> None:
    """Every target weight must exist with room for its rows; say exactly what does not fit, touch nothing."""
    basis = os.path.basename(basis_path)
    if not _is_flux(model):
        kind = type(getattr(model, "model", model)).__name__
        raise LoRWeBError(
            f"The MODEL ({kind}) is not a Flux model: it has no double_blocks. The LoRWeB basis {basis} was "
            "trained for FLUX.1 Kontext [dev]; load that with UNETLoader and connect it here."
        )
    shapes = _weight_shapes(model, {patch.target.model_key for patch in patches})
    misfits = [(patch.target.bfl_layer, problem) for patch in patches if (problem := _misfit(patch, shapes))]
    if misfits:
        # one entry per model weight, in model order: several modules share a fused weight
        by_layer = dict(misfits)
        problems = [by_layer[layer] for layer in sorted(by_layer, key=_natural_order)]
        raise LoRWeBError(
            f"The basis {basis} does not fit this Flux model ({len(misfits)} of {len(patches)} basis modules): "
            + "; ".join(problems[:4])
            + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            + ". Use the FLUX.1 Kontext [dev] model the basis was trained for (19 double and 38 single blocks, "
            "hidden size 3072)."
        )


def _natural_order(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _misfit(patch: ModulePatch, shapes: dict[str, tuple[int, ...]]) -> str | None:
    target = patch.target
    shape = shapes.get(target.model_key)
    if shape is None:
        return f"{target.bfl_layer} is missing from the model"
    expected_rows = target.row_start + target.row_count
    if not weight_fits(shape, patch.down.shape[1], target.row_start, target.row_count, sliced=target.fused):
        return (
            f"{target.bfl_layer} is {list(shape)} but {target.module} needs rows "
            f"{target.row_start}..{expected_rows} x {patch.down.shape[1]} columns"
        )
    return None


def comfy_patches(patches: list[ModulePatch]) -> dict:
    """``add_patches`` input: one rank-K*r ``LoRAAdapter`` per module; fused layers get a row slice."""
    result = {}
    for patch in patches:
        target = patch.target
        key = (target.model_key, (0, target.row_start, target.row_count)) if target.fused else target.model_key
        # alpha None -> scale 1: the coefficients are already folded into ``down``.
        result[key] = LoRAAdapter(set(), (patch.up, patch.down, None, None, None, None))
    return result


def patched_clone(model, patches: list[ModulePatch], strength: float):
    """A clone of ``model`` carrying the composed patches; the input model is left as it was."""
    clone = model.clone()
    wanted = comfy_patches(patches)
    added = clone.add_patches(wanted, strength_patch=strength)
    if len(added) != len(wanted):
        missing = [k for k in wanted if k not in set(added)]
        raise LoRWeBError(
            f"ComfyUI accepted {len(added)} of {len(wanted)} LoRWeB patches; not matched: {missing[:3]}. "
            "The model does not have the layers the basis targets."
        )
    return clone
