"""Save Composed LoRA: one analogy's mix of the basis as an ordinary LoRA file in models/loras."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from lorweb_ops import LoRWeBError, MixWeights, export_lora, write_new_file
from lorweb_ops.checks import show
from lorweb_ops.export import EXPORT_DTYPES

from .types import CATEGORY, LICENCE_NOTE, weights_basis_input, weights_input

LORA_FOLDER = "loras"
EXTENSION = ".safetensors"
MAX_NAME_ATTEMPTS = 1000
MAX_PREFIX_CHARS = 200


def check_prefix(prefix: str) -> str | None:
    """Why ``prefix`` cannot name a file inside the loras folder, or None when it can."""
    if not isinstance(prefix, str) or not prefix.strip():
        return "filename_prefix is empty; give a name such as 'lorweb/analogy'."
    if len(prefix) > MAX_PREFIX_CHARS:
        return f"filename_prefix is {len(prefix)} characters long; give at most {MAX_PREFIX_CHARS}."
    if "\0" in prefix or os.path.isabs(prefix) or os.path.splitdrive(prefix)[0]:
        return f"filename_prefix {show(prefix)} must be a relative name inside models/loras, e.g. 'lorweb/analogy'."
    parts = os.path.normpath(prefix).replace("\\", "/").split("/")
    if ".." in parts or parts[-1] in ("", "."):
        return f"filename_prefix {show(prefix)} may not leave models/loras ('..') and must end in a file name."
    return None


def lora_folder() -> str:
    """The first loras folder, as ComfyUI's LoRA loaders list it."""
    paths = folder_paths.get_folder_paths(LORA_FOLDER)
    if not paths:
        raise LoRWeBError("ComfyUI has no 'loras' model folder configured; check extra_model_paths.yaml.")
    return os.path.abspath(paths[0])


def save_new(folder: str, prefix: str, exported) -> str:
    """Write under the next free ``<prefix>_NNNNN_.safetensors`` name (ComfyUI's saver naming); never overwrite."""
    directory, name, counter, _, _ = folder_paths.get_save_image_path(prefix, folder)
    for attempt in range(MAX_NAME_ATTEMPTS):
        path = os.path.join(directory, f"{name}_{counter + attempt:05}_{EXTENSION}")
        try:
            write_new_file(path, exported)
            return path
        except FileExistsError:
            continue  # another save took this name meanwhile: take the next number
    raise LoRWeBError(f"found no free file name for {show(prefix)} in {directory}; choose another filename_prefix.")


def summary(path: str, folder: str, exported, full_rank: int) -> dict:
    name = os.path.relpath(path, folder).replace(os.sep, "/")
    return {
        "lora_name": name,
        "rank": exported.max_rank,
        "full_rank": full_rank,
        "exact": exported.metadata["lorweb_exact"] == "true",
        "dtype": exported.metadata["lorweb_dtype"],
        "energy_min": round(exported.energy_min, 6),
        "energy_mean": round(exported.energy_mean, 6),
        "layers": len(exported.ranks),
    }


def describe(info: dict) -> str:
    kept = (
        "exact"
        if info["exact"]
        else f"energy kept min {100 * info['energy_min']:.2f}% / mean {100 * info['energy_mean']:.2f}%, {info['dtype']}"
    )
    return f"saved {info['lora_name']}: {info['layers']} layers, rank {info['rank']} of {info['full_rank']}, {kept}"


class SaveComposedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRWeB_SaveComposedLoRA",
            display_name="Save Composed LoRA",
            category=CATEGORY,
            is_output_node=True,
            description="Writes the analogy's per-layer mix of the basis as an ordinary Flux LoRA into models/loras "
            "(diffusers/PEFT keys), for ComfyUI's LoraLoaderModelOnly or any LoRA loader. It equals "
            "the pack's patch only for the analogy (a, a′, b) it came from. " + LICENCE_NOTE,
            inputs=[
                weights_basis_input(),
                weights_input(),
                io.String.Input(
                    "filename_prefix",
                    default="lorweb/analogy",
                    tooltip="Name inside models/loras; '_00001_.safetensors' and so on is appended, an "
                    "existing file is never overwritten. Subfolders are allowed.",
                ),
                io.Int.Input(
                    "rank",
                    default=0,
                    min=0,
                    max=4096,
                    optional=True,
                    tooltip="0 = the full K·r per layer (exact; 128 for the released basis). A smaller "
                    "rank keeps each layer's best approximation of that rank (truncated SVD) and "
                    "reports the energy kept.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(EXPORT_DTYPES),
                    default="float32",
                    optional=True,
                    tooltip="float32 reproduces the pack exactly; bfloat16 / float16 halve the file and "
                    "round the factors.",
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="lora_name",
                    tooltip="The saved file's name as LoRA loaders list it (relative to models/loras).",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str | None) -> bool | str:
        # None: the prefix comes through a link and is checked when the node runs
        return True if filename_prefix is None else check_prefix(filename_prefix) or True

    @classmethod
    def execute(
        cls, basis, weights: MixWeights, filename_prefix: str, rank: int = 0, dtype: str = "float32"
    ) -> io.NodeOutput:
        problem = check_prefix(filename_prefix)
        if problem:
            raise LoRWeBError(problem)
        exported = export_lora(basis, weights, int(rank), dtype)  # checks that the weights fit the basis
        folder = lora_folder()
        path = save_new(folder, filename_prefix, exported)
        info = summary(path, folder, exported, basis.num_loras * basis.rank)
        return io.NodeOutput(info["lora_name"], ui={"lorweb_saved": [info], "text": [describe(info)]})
