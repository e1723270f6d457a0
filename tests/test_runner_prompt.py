"""The headless runner's prompt building without ComfyUI: every shipped template converts, each option sets the
nodes it means (or names them when it could mean several), and each Save node gets its own output file."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from runner_jobs import output_names  # noqa: E402
from runner_prompt import (  # noqa: E402
    B_PRIME_PREFIX,
    CHART_NODE,
    RunSettings,
    SaveOutput,
    build_prompt,
    image_loaders,
    other_image_loaders,
    parse_set,
    save_outputs,
)

TEMPLATES = sorted((REPO / "example_workflows").glob("*.json"))
MAIN = REPO / "example_workflows" / "lorweb_analogy_flux_kontext.json"
TWO_ANALOGIES = REPO / "example_workflows" / "lorweb_compose_two_analogies_cmlora.json"
ANALOGY_AND_LORA = REPO / "example_workflows" / "lorweb_compose_analogy_and_lora.json"


def _definitions(workflows) -> dict:
    """``/object_info``-shaped definitions made up from the workflows: the inputs the runner sets by their real
    names, other widget values by their position (w0, w1, ...), each linked socket an input of its type."""
    known = {
        "KSampler": ["seed", "control", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        "CLIPTextEncode": ["text"],
        "SaveImage": ["filename_prefix"],
        "LoadImage": ["image", "upload"],
        "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
        "UNETLoader": ["unet_name", "weight_dtype"],
        "VAELoader": ["vae_name"],
        "CLIPVisionLoader": ["clip_name"],
        "LoRWeB_LoadBasis": ["basis_name", "config"],
        "LoRWeB_ApplyBasis": ["strength"],
        "LoRWeB_AnalogyGrid": ["reverse"],
        "LoRWeB_EncodeAnalogy": ["reverse"],
        "LoRWeB_LoraSetAddAnalogy": ["strength", "name"],
        "LoRWeB_LoraSetAddLoRA": ["lora_name", "strength"],
        "LoRWeB_SaveComposedLoRA": ["filename_prefix"],
    }
    definitions = {}
    for workflow in workflows:
        for node in workflow["nodes"]:
            if node["type"] in ("Note", "MarkdownNote") or node["type"] in definitions:
                continue
            names = known.get(node["type"]) or [f"w{i}" for i in range(len(node.get("widgets_values") or []))]
            required = {}
            for name in names:
                if name in ("control", "upload"):  # frontend-only values
                    continue
                options = {"control_after_generate": True} if name == "seed" else {}
                kind = "INT" if name in ("seed", "steps") else "STRING"
                if node["type"] == "LoadImage":  # a combo of file names with the upload button after it
                    kind, options = ["x.png"], {"image_upload": True}
                required[name] = [kind, options]
            sockets = [s["name"] for s in node.get("inputs") or [] if "widget" not in s]
            optional = {name: [next(s["type"] for s in node["inputs"] if s["name"] == name), {}] for name in sockets}
            definitions[node["type"]] = {"input": {"required": required, "optional": optional}, "output": []}
    return definitions


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def definitions():
    return _definitions([_load(path) for path in TEMPLATES])


def _build(path: Path, definitions, **settings) -> dict:
    workflow = _load(path)
    settings.setdefault("outputs", save_outputs(workflow))
    return build_prompt(copy.deepcopy(workflow), definitions, RunSettings(**settings))


def _of(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_every_template_converts_with_the_demo_settings(path, definitions):
    prompt = _build(
        path,
        definitions,
        prompt="Make it blue.",
        steps=4,
        demo_text_encoder="clip_l.safetensors",
        bypass_kontext_scale=True,
    )
    assert (
        not _of(prompt, "PreviewImage")
        and not _of(prompt, "FluxKontextImageScale")
        and not _of(prompt, "DualCLIPLoader")
    )
    assert [node["inputs"]["clip_name"] for node in _of(prompt, "CLIPLoader")] == ["clip_l.safetensors"]
    assert [node["inputs"]["steps"] for node in _of(prompt, "KSampler")] == [4]
    assert [node["inputs"]["text"] for node in _of(prompt, "CLIPTextEncode")] == ["Make it blue."]
    # the one Save node of each template is b′, under the prefix the runner collects
    assert save_outputs(_load(path)) == (SaveOutput("43", "b_prime"),)
    assert prompt["43"]["inputs"]["filename_prefix"] == B_PRIME_PREFIX
    assert prompt["43"]["_meta"] == {"title": "b′ (result)"}
    assert set(image_loaders(prompt)) == {"a", "a_prime", "b"}


def test_the_second_example_pair_is_an_image_the_grid_does_not_take(definitions):
    prompt = _build(TWO_ANALOGIES, definitions)
    assert image_loaders(prompt) == {"a": "10", "a_prime": "11", "b": "12"}
    assert other_image_loaders(prompt) == ["13", "14"]
    assert len(_of(prompt, "LoRWeB_ApplyBasis")) == 2  # no "exactly one Apply" any more


def test_options_that_mean_one_node_set_it_and_reverse_sets_every_encoder(definitions):
    prompt = _build(TWO_ANALOGIES, definitions, seed=7, reverse=True, models={"unet": "mine.safetensors"})
    assert _of(prompt, "KSampler")[0]["inputs"]["seed"] == 7
    assert _of(prompt, "UNETLoader")[0]["inputs"]["unet_name"] == "mine.safetensors"
    assert [
        n["inputs"]["reverse"] for n in _of(prompt, "LoRWeB_EncodeAnalogy") + _of(prompt, "LoRWeB_AnalogyGrid")
    ] == [True] * 3


def test_strength_goes_to_the_node_that_applies_the_analogy(definitions):
    main = _build(MAIN, definitions, strength=0.6)
    assert _of(main, "LoRWeB_ApplyBasis")[0]["inputs"]["strength"] == 0.6
    # compose: the Apply node only computes weights (strength 0); the set entry carries the strength
    lora = _build(ANALOGY_AND_LORA, definitions, strength=0.6)
    assert _of(lora, "LoRWeB_ApplyBasis")[0]["inputs"]["strength"] == 0
    assert _of(lora, "LoRWeB_LoraSetAddAnalogy")[0]["inputs"]["strength"] == 0.6


def test_an_ambiguous_option_names_the_nodes_and_the_way_out(definitions):
    with pytest.raises(SystemExit) as error:
        _build(TWO_ANALOGIES, definitions, strength=0.6)
    message = str(error.value)
    assert message.startswith("--strength is ambiguous: the workflow has 2 nodes it could set")
    assert "LoRWeB_LoraSetAddAnalogy 'Set: analogy 1' (node 50): strength" in message
    assert "LoRWeB_LoraSetAddAnalogy 'Set: analogy 2' (node 51): strength" in message
    assert "--set 50.strength=0.6" in message


def test_set_names_a_node_by_id_or_title_and_wins(definitions):
    sets = [parse_set("Set: analogy 2.strength=0.25"), parse_set("40.sampler_name=dpmpp_2m"), parse_set("50.name=x y")]
    prompt = _build(TWO_ANALOGIES, definitions, sets=sets)
    assert prompt["51"]["inputs"]["strength"] == 0.25
    assert prompt["40"]["inputs"]["sampler_name"] == "dpmpp_2m" and prompt["50"]["inputs"]["name"] == "x y"
    with pytest.raises(SystemExit, match="has no input 'nope'"):
        _build(TWO_ANALOGIES, definitions, sets=[parse_set("40.nope=1")])
    with pytest.raises(SystemExit, match="no node with the id or title 'Nothing'"):
        _build(TWO_ANALOGIES, definitions, sets=[parse_set("Nothing.x=1")])
    with pytest.raises(ValueError, match="is not NODE.INPUT=VALUE"):
        parse_set("40=1")


def test_a_missing_option_target_says_so(definitions):
    workflow = _load(MAIN)
    workflow["nodes"] = [node for node in workflow["nodes"] if node["type"] != "KSampler"]
    with pytest.raises(SystemExit, match="--seed: the workflow has no KSampler or KSamplerAdvanced or RandomNoise"):
        build_prompt(workflow, definitions, RunSettings(seed=1, outputs=()))


def _with_saves(workflow: dict) -> dict:
    """The main template plus a SaveImage on the grid, an untitled SaveImage and a Save Composed LoRA."""
    workflow = copy.deepcopy(workflow)
    link = max(link[0] for link in workflow["links"]) + 1
    decode = next(node for node in workflow["nodes"] if node["type"] == "VAEDecode")
    apply = next(node for node in workflow["nodes"] if node["type"] == "LoRWeB_ApplyBasis")
    basis = next(node for node in workflow["nodes"] if node["type"] == "LoRWeB_LoadBasis")
    new = [
        (90, "SaveImage", "Whole grid", ["x/grid"], [("images", "IMAGE", decode["id"], 0)]),
        (91, "SaveImage", None, ["LoRWeB/chart"], [("images", "IMAGE", apply["id"], 2)]),
        (
            92,
            "LoRWeB_SaveComposedLoRA",
            "Instruction LoRA",
            ["lorweb/analogy"],
            [("basis", "LORWEB_BASIS", basis["id"], 0), ("weights", "LORWEB_WEIGHTS", apply["id"], 1)],
        ),
    ]
    for node_id, node_type, title, values, inputs in new:
        sockets = []
        for slot, (name, kind, origin, origin_slot) in enumerate(inputs):
            workflow["links"].append([link, origin, origin_slot, node_id, slot, kind])
            sockets.append({"name": name, "type": kind, "link": link})
            link += 1
        node = {"id": node_id, "type": node_type, "mode": 0, "inputs": sockets, "widgets_values": values}
        if title:
            node["title"] = title
        workflow["nodes"].append(node)
    return workflow


def test_each_save_node_gets_a_file_named_after_its_title(definitions):
    workflow = _with_saves(_load(MAIN))
    outputs = save_outputs(workflow)
    assert outputs == (
        SaveOutput("43", "b_prime"),
        SaveOutput("90", "whole_grid"),
        SaveOutput("91", "chart_91"),  # untitled: its prefix, which --save-chart's name already has
        SaveOutput("92", "instruction_lora", ".safetensors"),
    )
    settings = RunSettings(outputs=outputs, save_chart=True)
    # b′ last: --skip-existing takes a b with its b′ as finished
    assert output_names(Path("cat.png"), settings) == [
        "cat_chart.png",
        "cat_whole_grid.png",
        "cat_chart_91.png",
        "cat_instruction_lora.safetensors",
        "cat_b_prime.png",
    ]
    definitions = _definitions([workflow])
    prompt = build_prompt(copy.deepcopy(workflow), definitions, settings)
    assert prompt["90"]["inputs"]["filename_prefix"] == "lorweb_whole_grid"
    assert prompt["92"]["inputs"]["filename_prefix"] == "lorweb/analogy"  # a LoRA keeps its name (private folder)
    assert prompt[CHART_NODE]["inputs"]["images"] == [str(_of_id(workflow, "LoRWeB_ApplyBasis")), 2]


def _of_id(workflow: dict, node_type: str) -> int:
    return next(node["id"] for node in workflow["nodes"] if node["type"] == node_type)


def test_save_chart_with_two_apply_nodes_names_them(definitions):
    with pytest.raises(SystemExit) as error:
        _build(TWO_ANALOGIES, definitions, save_chart=True)
    assert "exactly one LoRWeB_ApplyBasis node for --save-chart" in str(error.value)
    assert "'Analogy 2: weights only (strength 0)' (node 27)" in str(error.value)


def test_muted_and_bypassed_save_nodes_write_nothing():
    workflow = _with_saves(_load(MAIN))
    for node in workflow["nodes"]:
        if node["id"] in (90, 92):
            node["mode"] = 2 if node["id"] == 90 else 4
    assert [output.node_id for output in save_outputs(workflow)] == ["43", "91"]


#: the loader inputs of the templates: (node type, widget position) -> the ComfyUI folder of the file it names
LOADER_WIDGETS = {
    ("UNETLoader", 0): "diffusion_models",
    ("DualCLIPLoader", 0): "text_encoders",
    ("DualCLIPLoader", 1): "text_encoders",
    ("VAELoader", 0): "vae",
    ("CLIPVisionLoader", 0): "clip_vision",
    ("LoRWeB_LoadBasis", 0): "lorweb",
    ("LoRWeB_LoraSetAddLoRA", 0): "loras",
}


def test_the_demo_writes_every_file_every_template_loads_under_its_name():
    from lorweb_demo import FILES, IMAGES, TEMPLATE_IMAGES

    demo_files = set(FILES.values())
    loaded, images = set(), set()
    for path in TEMPLATES:
        for node in _load(path)["nodes"]:
            values = node.get("widgets_values") or []
            if node["type"] == "LoadImage":
                images.add(values[0])
            for (node_type, position), folder in LOADER_WIDGETS.items():
                if node["type"] == node_type:
                    loaded.add((folder, values[position]))
            assert node["type"] not in ("CLIPLoader", "LoraLoader", "LoraLoaderModelOnly", "CheckpointLoaderSimple")
    assert loaded == demo_files
    assert images == set(TEMPLATE_IMAGES) and not images & set(IMAGES.values())
