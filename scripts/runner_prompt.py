"""The headless runner's API prompt: the example workflow with the command line's images, prompt and model files.

The workflow is converted with the node definitions of the ComfyUI running in this process. The diffusion model and
the text encoders may come from city96's GGUF loaders (``--custom-nodes``) as well as from ComfyUI's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorweb_workflow import MODE_BYPASS, node_definition, ui_to_api

CHART_NODE, GRID_NODE = "lorweb_chart", "lorweb_grid"
B_PRIME_PREFIX = "lorweb_b_prime"
AUTO_CONFIG = "auto"


@dataclass(frozen=True)
class ModelInput:
    """One model file the graph loads: where it is set, which option sets it, which ComfyUI folder holds it."""

    option: str  # command-line option, e.g. "--unet"
    folder: str  # ComfyUI model folder key
    sockets: tuple[tuple[str, str], ...]  # (node type, input name) pairs that take this file; one must be in the graph


#: settings key -> where the file goes in the graph
MODEL_INPUTS = {
    "unet": ModelInput(
        "--unet",
        "diffusion_models",
        (("UNETLoader", "unet_name"), ("UnetLoaderGGUF", "unet_name"), ("UnetLoaderGGUFAdvanced", "unet_name")),
    ),
    "clip_l": ModelInput(
        "--clip-l", "text_encoders", (("DualCLIPLoader", "clip_name1"), ("DualCLIPLoaderGGUF", "clip_name1"))
    ),
    "t5": ModelInput("--t5", "text_encoders", (("DualCLIPLoader", "clip_name2"), ("DualCLIPLoaderGGUF", "clip_name2"))),
    "vae": ModelInput("--vae", "vae", (("VAELoader", "vae_name"),)),
    "clip_vision": ModelInput("--clip-vision", "clip_vision", (("CLIPVisionLoader", "clip_name"),)),
    "basis": ModelInput("--basis", "lorweb", (("LoRWeB_LoadBasis", "basis_name"),)),
    "basis_config": ModelInput("--basis-config", "lorweb_configs", (("LoRWeB_LoadBasis", "config"),)),
}
DEMO_TEXT_ENCODER = ModelInput("--clip-l", "text_encoders", (("CLIPLoader", "clip_name"),))


@dataclass
class RunSettings:
    """Everything the runner sets in the graph (None: keep the workflow's value)."""

    prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    reverse: bool = False
    models: dict[str, str | None] = field(default_factory=dict)
    demo_text_encoder: str | None = None  # demo: CLIPLoader (sd3) with this CLIP-L instead of the dual loader
    bypass_kontext_scale: bool = False  # demo: keep the small grid (the scale node goes to ~1 megapixel)
    save_grid: bool = False
    save_chart: bool = False


class DefinitionsOf:
    """``/object_info``-shaped node definitions of the ComfyUI running in this process, built on demand."""

    def __init__(self):
        import nodes

        self.classes = nodes.NODE_CLASS_MAPPINGS

    def __contains__(self, node_type: object) -> bool:
        return node_type in self.classes

    def __getitem__(self, node_type: str) -> dict:
        return node_definition(self.classes[node_type])


def unique_node(prompt: dict, *class_types: str) -> str:
    found = [node_id for node_id, node in prompt.items() if node["class_type"] in class_types]
    if len(found) != 1:
        kinds = " or ".join(class_types)
        raise SystemExit(f"the workflow needs exactly one {kinds} node, it has {len(found)}")
    return found[0]


def linked_node(prompt: dict, node_id: str, input_name: str) -> str:
    value = prompt[node_id]["inputs"].get(input_name)
    if not isinstance(value, list):
        raise SystemExit(f"{prompt[node_id]['class_type']}.{input_name} is not connected in the workflow")
    return value[0]


def model_socket(prompt: dict, model: ModelInput) -> tuple[str, str]:
    """(node id, input name) where the graph takes this model file."""
    node_types = [node_type for node_type, _ in model.sockets]
    node_id = unique_node(prompt, *node_types)
    return node_id, dict(model.sockets)[prompt[node_id]["class_type"]]


def image_loaders(prompt: dict) -> dict[str, str]:
    """The LoadImage node of a, a′ and b: the ones feeding the Analogy Grid."""
    grid = unique_node(prompt, "LoRWeB_AnalogyGrid")
    loaders = {role: linked_node(prompt, grid, role) for role in ("a", "a_prime", "b")}
    for role, node_id in loaders.items():
        if prompt[node_id]["class_type"] != "LoadImage":
            raise SystemExit(f"the Analogy Grid's {role} must come from a LoadImage node")
    return loaders


def build_prompt(workflow: dict, definitions, settings: RunSettings) -> dict:
    """The API prompt of the workflow with the settings applied."""
    if settings.bypass_kontext_scale:
        for node in workflow["nodes"]:
            if node["type"] == "FluxKontextImageScale":
                node["mode"] = MODE_BYPASS
    prompt = ui_to_api(workflow, definitions)
    _set_models(prompt, settings)
    _set_values(prompt, settings)
    _set_outputs(prompt, settings)
    return prompt


def _set_models(prompt: dict, settings: RunSettings) -> None:
    for key, model in MODEL_INPUTS.items():
        if (name := settings.models.get(key)) is not None:
            node_id, input_name = model_socket(prompt, model)
            prompt[node_id]["inputs"][input_name] = name
    if settings.demo_text_encoder:
        clip = unique_node(prompt, *(node_type for node_type, _ in MODEL_INPUTS["clip_l"].sockets))
        prompt[clip] = {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": settings.demo_text_encoder, "type": "sd3", "device": "default"},
        }


def _set_values(prompt: dict, settings: RunSettings) -> None:
    targets = {
        ("CLIPTextEncode", "text"): settings.prompt,
        ("KSampler", "seed"): settings.seed,
        ("KSampler", "steps"): settings.steps,
        ("LoRWeB_AnalogyGrid", "reverse"): settings.reverse or None,
        ("LoRWeB_EncodeAnalogy", "reverse"): settings.reverse or None,
    }
    for (class_type, name), value in targets.items():
        if value is not None:
            prompt[unique_node(prompt, class_type)]["inputs"][name] = value


def _set_outputs(prompt: dict, settings: RunSettings) -> None:
    """b′ via the workflow's SaveImage; the chart and the whole generated grid only when asked for."""
    save = unique_node(prompt, "SaveImage")
    prompt[save]["inputs"]["filename_prefix"] = B_PRIME_PREFIX
    apply = unique_node(prompt, "LoRWeB_ApplyBasis")
    for node_id in [n for n, node in prompt.items() if node["class_type"] == "PreviewImage"]:
        del prompt[node_id]  # the workflow's chart preview; re-added below under a known id when wanted
    if settings.save_chart:
        prompt[CHART_NODE] = {
            "class_type": "SaveImage",
            "inputs": {"images": [apply, 2], "filename_prefix": "lorweb_chart"},
        }
    if settings.save_grid:
        decoded = linked_node(prompt, unique_node(prompt, "LoRWeB_CropResult"), "image")
        prompt[GRID_NODE] = {
            "class_type": "SaveImage",
            "inputs": {"images": [decoded, 0], "filename_prefix": "lorweb_grid"},
        }


def missing_model_files(prompt: dict) -> list[str]:
    """One line per model file of the graph that is not in its ComfyUI folder, in command-line terms."""
    import folder_paths

    models = [*MODEL_INPUTS.values()]
    if any(node["class_type"] == "CLIPLoader" for node in prompt.values()):
        models = [m for m in models if m.option not in ("--clip-l", "--t5")] + [DEMO_TEXT_ENCODER]
    problems = []
    for model in models:
        node_id, input_name = model_socket(prompt, model)
        name = prompt[node_id]["inputs"].get(input_name)
        if not isinstance(name, str) or (name == AUTO_CONFIG and model.option == "--basis-config"):
            continue  # linked, or the config found beside the basis
        if folder_paths.get_full_path(model.folder, name) is None:
            problems.append(_missing_line(model, name, folder_paths.get_folder_paths(model.folder)))
    return problems


def _missing_line(model: ModelInput, name: str, folders: list[str]) -> str:
    where = ", ".join(folders) or f"models/{model.folder}"
    other = "another yaml file name, or auto" if model.option == "--basis-config" else "the name of the file you have"
    return (
        f"{model.option} {name!r} is not in ComfyUI's {model.folder} folder ({where}): put the file there, "
        f"or pass {model.option} with {other}"
    )
