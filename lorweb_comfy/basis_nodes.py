"""Load LoRA Basis: a LoRWeB basis file from models/lorweb, loaded once and shared."""

from __future__ import annotations

from comfy_api.latest import io

from lorweb_ops import load_basis

from . import model_folders
from .types import CATEGORY, LICENCE_NOTE, Basis


class LoadBasis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_LoadBasis",
            display_name="Load LoRA Basis",
            category=CATEGORY,
            description="Loads a LoRWeB basis: K LoRAs per Flux layer plus the keys that mix them. " + LICENCE_NOTE,
            inputs=[
                io.Combo.Input(
                    "basis_name",
                    options=model_folders.basis_files(),
                    tooltip="LoRWeB basis file (.safetensors) in models/lorweb, e.g. the released "
                    "lorweb_model.safetensors from hilamanor/lorweb. " + LICENCE_NOTE,
                ),
                io.Combo.Input(
                    "config",
                    options=[model_folders.AUTO_CONFIG] + model_folders.config_files(),
                    default=model_folders.AUTO_CONFIG,
                    tooltip="Mixing settings. 'auto': the ai-toolkit config.yaml saved beside the basis file, "
                    "else the released values (cat-aa'b, 1 head, softmax, mean). Or pick a yaml from "
                    "models/lorweb.",
                ),
            ],
            outputs=[Basis.Output(display_name="basis", tooltip="The loaded basis, for Encode and Apply.")],
        )

    @classmethod
    def validate_inputs(cls, basis_name: str | None = None) -> bool | str:
        # Only basis_name: ComfyUI repeats a message once per argument of this method, so one argument keeps each
        # problem to one message. A config name that is not in models/lorweb is refused by ComfyUI's own list check
        # (0.8.0; 0.3.64 does not check V3 combos when queued, so execute names it).
        # A name that arrives through a link is None here; execute checks it.
        if basis_name is not None and model_folders.basis_path(basis_name) is None:
            return model_folders.missing_file_message("basis file", basis_name)
        return True

    @classmethod
    def fingerprint_inputs(cls, basis_name: str | None = None, config: str | None = None) -> tuple:
        # Re-run when a file with the same name is replaced on disk, the config found beside the basis included.
        return tuple(model_folders.file_fingerprint(path) for path in model_folders.files_read(basis_name, config))

    @classmethod
    def execute(cls, basis_name: str, config: str) -> io.NodeOutput:
        path = model_folders.basis_path(basis_name)
        if path is None:
            raise FileNotFoundError(model_folders.missing_file_message("basis file", basis_name))
        config_path = None
        if config != model_folders.AUTO_CONFIG:
            config_path = model_folders.config_path(config)
            if config_path is None:
                raise FileNotFoundError(model_folders.missing_file_message("config", config))
        basis = load_basis(path, config_path)
        return io.NodeOutput(basis, ui={"lorweb_basis": [basis.summary()]})
