"""LoRWeB as a plain library: basis file -> analogy query -> per-module coefficients -> low-rank patches.

No ComfyUI import anywhere in this package; the nodes in ``lorweb_comfy/`` adapt ComfyUI types to these functions.
"""

from .adjust import adjust_mix, blend_weights, is_probability_mix, parse_overrides
from .analogy import (
    Analogy,
    check_analogy_fits,
    combine_embeddings,
    encode_analogy,
    encode_analogy_pairs,
    encoder_images,
)
from .basis import LoraBasis, ModuleBasis, clear_basis_cache, load_basis
from .errors import LoRWeBError
from .export import ExportedLora, export_lora, reduce_rank, write_new_file
from .flux_layout import FluxTarget, flux_target, released_module_names
from .images import build_grid, crop_result, grid_quadrants, reference_quadrants
from .mixing import MixWeights, check_weights_fit, delta_weight, lowrank_factors, mixing_coefficients
from .patches import ModulePatch, composed_patches, flux_delta, module_targets
from .settings import RELEASED_SETTINGS, BasisSettings, resolve_settings

__all__ = [
    "Analogy",
    "BasisSettings",
    "FluxTarget",
    "LoRWeBError",
    "LoraBasis",
    "MixWeights",
    "ModuleBasis",
    "ModulePatch",
    "RELEASED_SETTINGS",
    "build_grid",
    "check_analogy_fits",
    "clear_basis_cache",
    "combine_embeddings",
    "composed_patches",
    "crop_result",
    "delta_weight",
    "encode_analogy",
    "encode_analogy_pairs",
    "encoder_images",
    "flux_delta",
    "flux_target",
    "grid_quadrants",
    "load_basis",
    "lowrank_factors",
    "mixing_coefficients",
    "module_targets",
    "reference_quadrants",
    "released_module_names",
    "resolve_settings",
    "ExportedLora",
    "adjust_mix",
    "blend_weights",
    "check_weights_fit",
    "export_lora",
    "is_probability_mix",
    "parse_overrides",
    "reduce_rank",
    "write_new_file",
]
