"""The headless runner's API prompt: a UI workflow with the command line's images, prompt and model files.

Any workflow made of ComfyUI's nodes and the pack's runs: a command-line option sets every node it unambiguously
means and names the nodes when it could mean several (``--set NODE.INPUT=VALUE`` then says which). Every Save
node (SaveImage, the pack's Save Composed LoRA) gives one file per b image, named after the node's title. The
workflow is converted with the node definitions of the ComfyUI running in this process. The diffusion model and
the text encoders may come from city96's GGUF loaders (``--custom-nodes``) as well as from ComfyUI's own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorweb_workflow import (
    FRONTEND_ONLY_TYPES,
    MODE_ALWAYS,
    MODE_BYPASS,
    MODE_NEVER,
    _Graph,
    expand_subgraphs,
    input_specs,
    node_order,
    ui_to_api,
)

CHART_NODE, GRID_NODE = "lorweb_chart", "lorweb_grid"
B_PRIME_PREFIX = "lorweb_b_prime"
B_PRIME = "b_prime"
AUTO_CONFIG = "auto"
SAVE_IMAGE, SAVE_LORA = "SaveImage", "LoRWeB_SaveComposedLoRA"


@dataclass(frozen=True)
class ModelInput:
    """One model file the graph loads: where it is set, which option sets it, which ComfyUI folder holds it."""

    option: str | None  # command-line option, e.g. "--unet" (None: only --set sets it)
    folder: str  # ComfyUI model folder key
    sockets: tuple[tuple[str, str], ...]  # (node type, input name) pairs that take this file


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
#: model files no option sets (checked before the run all the same)
OTHER_MODEL_INPUTS = (
    ModelInput(None, "loras", (("LoraLoader", "lora_name"), ("LoraLoaderModelOnly", "lora_name"))),
    ModelInput(None, "loras", (("LoRWeB_LoraSetAddLoRA", "lora_name"),)),
)
#: option -> the (node type, input) it sets; several matching nodes make it ambiguous
SEED_SOCKETS = (("KSampler", "seed"), ("KSamplerAdvanced", "noise_seed"), ("RandomNoise", "noise_seed"))
STEPS_SOCKETS = (("KSampler", "steps"), ("KSamplerAdvanced", "steps"), ("BasicScheduler", "steps"))
PROMPT_SOCKETS = (("CLIPTextEncode", "text"),)
#: the analogy's strength: an Apply node that applies (strength 0 only computes weights for a LoRA set), or the
#: analogy's entry in a LoRA set
STRENGTH_SOCKETS = (
    ("LoRWeB_ApplyBasis", "strength"),
    ("LoRWeB_ApplyWeights", "strength"),
    ("LoRWeB_LoraSetAddAnalogy", "strength"),
)
WEIGHTS_ONLY = ("LoRWeB_ApplyBasis", "LoRWeB_ApplyWeights")
REVERSE_SOCKETS = (("LoRWeB_AnalogyGrid", "reverse"), ("LoRWeB_EncodeAnalogy", "reverse"))


@dataclass(frozen=True)
class SaveOutput:
    """One Save node of the workflow and the file it gives per b image: ``<b name>_<suffix><ext>``."""

    node_id: str
    suffix: str
    ext: str = ".png"

    @property
    def is_lora(self) -> bool:
        return self.ext == ".safetensors"


#: what a workflow without Save nodes information is taken to write (the example workflow's b′)
DEFAULT_OUTPUTS = (SaveOutput("", B_PRIME),)


@dataclass
class RunSettings:
    """Everything the runner sets in the graph (None: keep the workflow's value)."""

    prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    strength: float | None = None
    reverse: bool = False
    models: dict[str, str | None] = field(default_factory=dict)
    sets: list[tuple[str, str, Any]] = field(default_factory=list)  # --set: (node id or title, input, value)
    demo_text_encoder: str | None = None  # demo: CLIPLoader (sd3) with this CLIP-L instead of the dual loader
    bypass_kontext_scale: bool = False  # demo: keep the small grid (the scale node goes to ~1 megapixel)
    save_grid: bool = False
    save_chart: bool = False
    outputs: tuple[SaveOutput, ...] = DEFAULT_OUTPUTS  # the workflow's Save nodes (save_outputs)


class DefinitionsOf:
    """``/object_info``-shaped node definitions of the ComfyUI running in this process, built on demand."""

    def __init__(self):
        import nodes

        self.classes = nodes.NODE_CLASS_MAPPINGS

    def __contains__(self, node_type: object) -> bool:
        return node_type in self.classes

    def __getitem__(self, node_type: str) -> dict:
        from lorweb_workflow import node_definition

        return node_definition(self.classes[node_type])


# ------------------------------------------------------------------------------------------------ nodes


def describe(prompt: Mapping, node_id: str) -> str:
    """``LoRWeB_ApplyBasis 'Analogy 1 weights' (node 24)``: how messages name a node."""
    node = prompt[node_id]
    title = node.get("_meta", {}).get("title")
    named = f" {title!r}" if title and title != node["class_type"] else ""
    return f"{node['class_type']}{named} (node {node_id})"


def nodes_of(prompt: Mapping, sockets: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(node id, input name) of every node of the prompt that one of the (node type, input) pairs names."""
    by_type = dict(sockets)
    return [(node_id, by_type[node["class_type"]]) for node_id, node in prompt.items() if node["class_type"] in by_type]


def unique_node(prompt: Mapping, *class_types: str, what: str | None = None) -> str:
    found = [node_id for node_id, node in prompt.items() if node["class_type"] in class_types]
    if len(found) != 1:
        kinds = " or ".join(class_types)
        listed = ": " + ", ".join(describe(prompt, n) for n in found) if found else ""
        purpose = f" for {what}" if what else ""
        raise SystemExit(f"the runner needs exactly one {kinds} node{purpose}; the workflow has {len(found)}{listed}")
    return found[0]


def find_node(prompt: Mapping, reference: str, option: str) -> str:
    """The node a ``--set`` / ``--image`` reference means: its id, or its title (which must be unique)."""
    if reference in prompt:
        return reference
    titled = [node_id for node_id, node in prompt.items() if node.get("_meta", {}).get("title") == reference]
    if len(titled) == 1:
        return titled[0]
    if titled:
        raise SystemExit(
            f"{option}: {len(titled)} nodes are titled {reference!r} ("
            + ", ".join(describe(prompt, n) for n in titled)
            + "): name the one you mean by its id"
        )
    raise SystemExit(f"{option}: the workflow has no node with the id or title {reference!r}")


def linked_node(prompt: Mapping, node_id: str, input_name: str) -> str:
    value = prompt[node_id]["inputs"].get(input_name)
    if not isinstance(value, list):
        raise SystemExit(f"{describe(prompt, node_id)}: {input_name} is not connected in the workflow")
    return value[0]


def reaches(prompt: Mapping, node_id: str, input_name: str) -> bool:
    """Whether the output of ``node_id`` flows, through any chain of nodes, into an input called ``input_name``."""
    consumers: dict[str, list[tuple[str, str]]] = {}
    for target, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2:
                consumers.setdefault(str(value[0]), []).append((target, name))
    seen, todo = set(), [node_id]
    while todo:
        current = todo.pop()
        for target, name in consumers.get(current, []):
            if name == input_name:
                return True
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return False


def set_option(prompt: dict, option: str, sockets: Iterable[tuple[str, str]], value: Any, found=None) -> None:
    """Set ``value`` on the one node the option means; name the nodes when there are none or several."""
    found = nodes_of(prompt, sockets) if found is None else found
    if len(found) == 1:
        node_id, input_name = found[0]
        prompt[node_id]["inputs"][input_name] = value
        return
    kinds = " or ".join(sorted({node_type for node_type, _ in sockets}))
    if not found:
        raise SystemExit(f"{option}: the workflow has no {kinds} node for it to set; leave {option} out")
    listed = "\n  ".join(f"{describe(prompt, node_id)}: {name}" for node_id, name in found)
    node_id, name = found[0]
    raise SystemExit(
        f"{option} is ambiguous: the workflow has {len(found)} nodes it could set:\n  {listed}\n"
        f"leave {option} out and set the one you mean with --set NODE.INPUT=VALUE (NODE: its id or title), "
        f"e.g. --set {node_id}.{name}={json.dumps(value)}"
    )


# ------------------------------------------------------------------------------------------------ building


def titles(workflow: Mapping) -> dict[str, str]:
    return {str(node["id"]): node["title"] for node in workflow["nodes"] if node.get("title")}


def build_prompt(workflow: dict, definitions, settings: RunSettings) -> dict:
    """The API prompt of the workflow with the settings applied (each node's title in ``_meta``, as the editor
    sends it). Subgraph nodes are expanded first: the options reach the nodes inside them."""
    workflow = dict(expand_subgraphs(workflow))
    if settings.bypass_kontext_scale:
        for node in workflow["nodes"]:
            if node["type"] == "FluxKontextImageScale":
                node["mode"] = MODE_BYPASS
    prompt = ui_to_api(workflow, definitions)
    named = titles(workflow)
    for node_id, node in prompt.items():
        node["_meta"] = {"title": named.get(node_id, node["class_type"])}
    _set_models(prompt, settings)
    _set_values(prompt, settings)
    _set_outputs(prompt, settings)
    _set_inputs(prompt, definitions, settings.sets)
    return prompt


def _set_models(prompt: dict, settings: RunSettings) -> None:
    for key, model in MODEL_INPUTS.items():
        if (name := settings.models.get(key)) is not None:
            set_option(prompt, model.option, model.sockets, name)
    if settings.demo_text_encoder:
        for clip in [node_id for node_id, _ in nodes_of(prompt, MODEL_INPUTS["clip_l"].sockets)]:
            prompt[clip] = {
                "class_type": "CLIPLoader",
                "inputs": {"clip_name": settings.demo_text_encoder, "type": "sd3", "device": "default"},
                "_meta": prompt[clip]["_meta"],
            }


def _set_values(prompt: dict, settings: RunSettings) -> None:
    if settings.prompt is not None:
        found = nodes_of(prompt, PROMPT_SOCKETS)
        if len(found) > 1:  # a negative prompt too: the instruction is the text that reaches a positive input
            found = [(node_id, name) for node_id, name in found if reaches(prompt, node_id, "positive")] or found
        set_option(prompt, "--prompt", PROMPT_SOCKETS, settings.prompt, found)
    if settings.seed is not None:
        set_option(prompt, "--seed", SEED_SOCKETS, settings.seed)
    if settings.steps is not None:
        set_option(prompt, "--steps", STEPS_SOCKETS, settings.steps)
    if settings.strength is not None:
        found = [
            (node_id, name)
            for node_id, name in nodes_of(prompt, STRENGTH_SOCKETS)
            if not (prompt[node_id]["class_type"] in WEIGHTS_ONLY and prompt[node_id]["inputs"].get(name) == 0)
        ]
        set_option(prompt, "--strength", STRENGTH_SOCKETS, settings.strength, found)
    if settings.reverse:  # every example edit is read backwards: every grid and every encoder
        found = nodes_of(prompt, REVERSE_SOCKETS)
        if not found:
            raise SystemExit("--reverse: the workflow has no LoRWeB_AnalogyGrid or LoRWeB_EncodeAnalogy node")
        for node_id, name in found:
            prompt[node_id]["inputs"][name] = True


def _set_outputs(prompt: dict, settings: RunSettings) -> None:
    """One file per Save node; the chart and the whole generated grid only when asked for."""
    for node_id in [n for n, node in prompt.items() if node["class_type"] == "PreviewImage"]:
        del prompt[node_id]  # previews are for the editor
    for output in settings.outputs:
        if output.node_id in prompt and not output.is_lora:
            prefix = B_PRIME_PREFIX if output.suffix == B_PRIME else f"lorweb_{output.suffix}"
            prompt[output.node_id]["inputs"]["filename_prefix"] = prefix
    if settings.save_chart:
        apply = unique_node(prompt, "LoRWeB_ApplyBasis", what="--save-chart (its chart output)")
        prompt[CHART_NODE] = {
            "class_type": SAVE_IMAGE,
            "inputs": {"images": [apply, 2], "filename_prefix": "lorweb_chart"},
        }
    if settings.save_grid:
        crop = unique_node(prompt, "LoRWeB_CropResult", what="--save-grid (the image it crops)")
        decoded = linked_node(prompt, crop, "image")
        prompt[GRID_NODE] = {
            "class_type": SAVE_IMAGE,
            "inputs": {"images": [decoded, 0], "filename_prefix": "lorweb_grid"},
        }


def parse_set(text: str) -> tuple[str, str, Any]:
    """``NODE.INPUT=VALUE`` (NODE: an id or a title; VALUE: JSON, else text) -> (NODE, INPUT, value)."""
    target, equals, value = text.partition("=")
    reference, dot, input_name = target.rpartition(".")
    if not equals or not dot or not reference or not input_name:
        raise ValueError(f"{text!r} is not NODE.INPUT=VALUE (e.g. 40.cfg=1.5 or 'b′ (result).filename_prefix=x')")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return reference, input_name, parsed


def _set_inputs(prompt: dict, definitions, sets: Iterable[tuple[str, str, Any]]) -> None:
    for reference, input_name, value in sets:
        node_id = find_node(prompt, reference, "--set")
        node = prompt[node_id]
        known = (
            [spec.name for spec in input_specs(definitions[node["class_type"]])]
            if node["class_type"] in definitions
            else []
        )
        if input_name not in known and input_name not in node["inputs"]:
            raise SystemExit(
                f"--set {reference}.{input_name}: {describe(prompt, node_id)} has no input {input_name!r} "
                f"(it has {', '.join(known or node['inputs'])})"
            )
        node["inputs"][input_name] = value


# ------------------------------------------------------------------------------------------------ outputs


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def save_outputs(workflow: Mapping) -> tuple[SaveOutput, ...]:
    """The Save nodes that run (SaveImage, Save Composed LoRA) and the file each gives per b image.

    The SaveImage fed by Crop Analogy Result is b′ (``_b_prime.png``, as the example workflow writes it);
    every other one is named after its title, or its filename_prefix (``_<title>.png`` / ``.safetensors``).
    Read from the UI workflow, so it is known before ComfyUI starts.
    """
    graph = _Graph(workflow)
    saves = [
        node
        for node_id, node in sorted(graph.nodes.items(), key=lambda item: node_order(item[0]))
        if node["type"] in (SAVE_IMAGE, SAVE_LORA)
        and node.get("mode", MODE_ALWAYS) not in (MODE_NEVER, MODE_BYPASS)
        and node["type"] not in FRONTEND_ONLY_TYPES
    ]

    def fed_by_crop(node) -> bool:
        link = next((i.get("link") for i in node.get("inputs") or [] if i.get("name") == "images"), None)
        source = graph.source(link)
        return source is not None and graph.nodes[source[0]]["type"] == "LoRWeB_CropResult"

    b_primes = [node for node in saves if node["type"] == SAVE_IMAGE and fed_by_crop(node)]
    taken = {B_PRIME, "grid", "chart"} if len(b_primes) == 1 else {"grid", "chart"}
    outputs = []
    for node in saves:
        if len(b_primes) == 1 and node is b_primes[0]:
            outputs.append(SaveOutput(str(node["id"]), B_PRIME))
            continue
        values = node.get("widgets_values") or []
        prefix = values[0] if values and isinstance(values[0], str) else ""
        suffix = _slug(node.get("title") or "") or _slug(prefix.rsplit("/", 1)[-1]) or f"save_{node['id']}"
        if suffix in taken:
            suffix = f"{suffix}_{node['id']}"
        taken.add(suffix)
        outputs.append(SaveOutput(str(node["id"]), suffix, ".safetensors" if node["type"] == SAVE_LORA else ".png"))
    return tuple(outputs)


# ------------------------------------------------------------------------------------------------ checks


def image_loaders(prompt: Mapping) -> dict[str, str]:
    """The LoadImage node of a, a′ and b: the ones feeding the Analogy Grid."""
    grid = unique_node(prompt, "LoRWeB_AnalogyGrid", what="--a, --a-prime and --b (the images it arranges)")
    loaders = {role: linked_node(prompt, grid, role) for role in ("a", "a_prime", "b")}
    for role, node_id in loaders.items():
        if prompt[node_id]["class_type"] != "LoadImage":
            raise SystemExit(f"the Analogy Grid's {role} must come from a LoadImage node")
    return loaders


def other_image_loaders(prompt: Mapping) -> list[str]:
    """The LoadImage nodes the command line's --a, --a-prime and --b do not set (e.g. a second example pair)."""
    grid_loaders = set(image_loaders(prompt).values())
    return [n for n, node in prompt.items() if node["class_type"] == "LoadImage" and n not in grid_loaders]


def missing_model_files(prompt: Mapping) -> list[str]:
    """One line per model file of the graph that is not in its ComfyUI folder, in command-line terms."""
    import folder_paths

    models = [*MODEL_INPUTS.values(), *OTHER_MODEL_INPUTS]
    if any(node["class_type"] == "CLIPLoader" for node in prompt.values()):
        models.append(DEMO_TEXT_ENCODER)
    problems = []
    for model in models:
        found = nodes_of(prompt, model.sockets)
        for node_id, input_name in found:
            name = prompt[node_id]["inputs"].get(input_name)
            if not isinstance(name, str) or (name == AUTO_CONFIG and model.option == "--basis-config"):
                continue  # linked, or the config found beside the basis
            if folder_paths.get_full_path(model.folder, name) is None:
                folders = folder_paths.get_folder_paths(model.folder)
                option = model.option if len(found) == 1 else None
                problems.append(_missing_line(model, option, name, folders, prompt, node_id, input_name))
    return problems


def _missing_line(model, option, name, folders, prompt, node_id, input_name) -> str:
    where = ", ".join(folders) or f"models/{model.folder}"
    if option is None:
        return (
            f"{describe(prompt, node_id)}: {input_name} {name!r} is not in ComfyUI's {model.folder} folder ({where}): "
            f"put the file there, or pass --set {node_id}.{input_name}=<the name of the file you have>"
        )
    other = "another yaml file name, or auto" if option == "--basis-config" else "the name of the file you have"
    return (
        f"{option} {name!r} is not in ComfyUI's {model.folder} folder ({where}): put the file there, "
        f"or pass {option} with {other}"
    )
