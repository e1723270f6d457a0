"""Train or fine-tune a LoRWeB basis (plain library: torch, safetensors, PyYAML, Pillow; HF accelerate to run).

Never imports ComfyUI: the base model comes in as a :class:`FluxBackend`, built by the ComfyUI glue
(``lorweb_train/backends/comfyui.py``) from ComfyUI's own loaders, or by any other factory.
Run from the ComfyUI folder: ``python custom_nodes/comfyui-lorweb/scripts/train_basis.py --config my_train.yaml``.
"""

from .backend import FluxBackend, make_backend
from .basis_module import BasisLayer, TrainableBasis, save_basis
from .config import TrainingConfig, config_from_mapping, load_config
from .data import Example, read_dataset, training_grids
from .injection import BasisInjector, flux_module_shapes, mixed_lora_output
from .loss import bell_weights, flow_matching_loss

__all__ = [
    "BasisInjector",
    "BasisLayer",
    "Example",
    "FluxBackend",
    "TrainableBasis",
    "TrainingConfig",
    "bell_weights",
    "config_from_mapping",
    "flow_matching_loss",
    "flux_module_shapes",
    "load_config",
    "make_backend",
    "mixed_lora_output",
    "read_dataset",
    "save_basis",
    "training_grids",
]
