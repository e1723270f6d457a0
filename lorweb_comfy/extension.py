"""The pack's ComfyExtension: the node list."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .analogy_nodes import EncodeAnalogy
from .apply_nodes import ApplyBasis
from .basis_nodes import LoadBasis
from .compose_nodes import ComposeLoRASet, FrequencyProfile, LoraSetAddAnalogy, LoraSetAddLoRA, ScheduledStrength
from .export_nodes import SaveComposedLoRA
from .grid_nodes import AnalogyGrid, CropResult
from .weights_nodes import AdjustMix, ApplyWeights, BlendAnalogies


class LoRWeBExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            LoadBasis,
            EncodeAnalogy,
            ApplyBasis,
            AnalogyGrid,
            CropResult,
            SaveComposedLoRA,
            BlendAnalogies,
            ApplyWeights,
            AdjustMix,
            LoraSetAddLoRA,
            LoraSetAddAnalogy,
            FrequencyProfile,
            ComposeLoRASet,
            ScheduledStrength,
        ]
