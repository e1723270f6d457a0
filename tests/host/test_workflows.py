"""The example workflows in a running ComfyUI server (``main.py --cpu`` on loopback): listed as templates of the
pack, served, and every node, socket, link and widget value valid for that ComfyUI's ``/object_info`` (the nodes
inside subgraphs too). The pack's blueprint (subgraphs/) is listed by /global_subgraphs from ComfyUI 0.8.0 on; 0.3.64
has no such route."""

from __future__ import annotations

import json
import math
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from comfy_host import PACK_LINK_NAME, REPO_ROOT, comfyui_version
from comfy_server import get_json, make_base, post_json, running_server
from workflow_testing import (
    BLUEPRINT,
    COMPOSE_LORA,
    COMPOSE_TWO,
    CONTROL_VALUES,
    FRONTEND_ONLY_TYPES,
    INPUT_IMAGES,
    LORA_FILES,
    MODEL_FILES,
    REVERSE,
    WORKFLOWS,
    all_nodes,
    input_specs,
    subgraph_definitions,
    ui_to_api,
    widget_slots,
)
from workflow_testing import load_example as load

FILE_SUFFIXES = (".safetensors", ".gguf", ".sft", ".ckpt", ".yaml", ".png", ".jpg", ".jpeg", ".webp")
#: the templates, and the blueprint (a workflow of one subgraph node)
GRAPHS = [*WORKFLOWS, "blueprint"]


def _graph(name: str) -> dict:
    return json.loads(BLUEPRINT.read_text(encoding="utf-8")) if name == "blueprint" else load(name)


def _runnable_nodes(workflow: dict) -> list[dict]:
    """The nodes the server runs: those of the graph and of its subgraphs, without the subgraph nodes themselves."""
    subgraphs = subgraph_definitions(workflow)
    return [node for node in all_nodes(workflow) if node["type"] not in subgraphs]


def _get_bytes(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read(), response.headers.get("Content-Type", "")


def _place_inputs(base: Path) -> None:
    """Placeholder model files (names only: ComfyUI lists them) and the workflows' example images."""
    for file_name, folder in MODEL_FILES.items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / file_name).write_bytes(b"")
    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    for file_name in LORA_FILES:
        (base / "models" / "loras" / file_name).write_bytes(b"")
    for name in INPUT_IMAGES:  # the pack's own example images, as scripts/example_inputs.py install copies them
        shutil.copyfile(REPO_ROOT / "example_inputs" / name, base / "input" / name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``main.py --cpu`` on 127.0.0.1 with the pack linked as custom_nodes/comfyui-lorweb; its URL and /object_info."""
    base = make_base(tmp_path_factory.mktemp("templates_base"))
    _place_inputs(base)
    with running_server(base) as url:
        yield url, get_json(url + "/object_info")


def test_templates_are_listed_and_served_under_the_pack_folder(server):
    url, _ = server
    listed = get_json(url + "/workflow_templates")
    assert sorted(listed.get(PACK_LINK_NAME, [])) == WORKFLOWS, listed
    for name in WORKFLOWS:
        assert get_json(f"{url}/api/workflow_templates/{PACK_LINK_NAME}/{name}.json") == load(name)
        body, content_type = _get_bytes(f"{url}/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg")
        assert body[:3] == b"\xff\xd8\xff" and content_type == "image/jpeg"


@pytest.mark.parametrize("name", GRAPHS)
def test_nodes_and_sockets_match_object_info(server, name):
    _, info = server
    for node in _runnable_nodes(_graph(name)):
        if node["type"] in FRONTEND_ONLY_TYPES:
            continue
        assert node["type"] in info, f"{node['type']} is not a node of this ComfyUI"
        definition = info[node["type"]]
        assert node["properties"]["Node name for S&R"] == node["type"]
        specs = {spec.name: spec for spec in input_specs(definition)}
        inputs = [(slot["name"], slot["type"], "widget" in slot) for slot in node["inputs"]]
        assert inputs == _editor_inputs(definition), node["type"]
        for slot in node["inputs"]:
            assert "widget" not in slot or slot["widget"] == {"name": slot["name"]}
        connected = {slot["name"] for slot in node["inputs"] if slot["link"] is not None}
        sockets = {spec.name for spec in specs.values() if not spec.is_widget and not spec.optional}
        assert sockets <= connected, f"{node['type']} leaves required inputs unconnected: {sockets - connected}"
        expected = list(zip(definition.get("output_name") or definition["output"], definition["output"], strict=True))
        outputs = [(slot["name"], slot["type"]) for slot in node["outputs"]]
        if node["type"] in ("SaveImage", "PreviewImage") and comfyui_version() >= (0, 33, 0):
            # 0.33's SaveImage and PreviewImage pass their images on (an IMAGE output). The templates are saved for
            # every version, with the older output-less nodes; the newer editor adds the output when it opens them.
            assert outputs == [] and expected == [("images", "IMAGE")], (outputs, expected)
        else:
            assert outputs == expected, node["type"]


def _editor_inputs(definition: dict) -> list[tuple[str, str, bool]]:
    """The editor's input list of a node: its sockets in server order, then one entry per widget (the frontend
    saves widgets as inputs too; LoadImage's upload button is the IMAGEUPLOAD widget ``upload``)."""
    specs = input_specs(definition)
    sockets = [(spec.name, spec.type_name, False) for spec in specs if not spec.is_widget]
    types = {spec.name: spec.type_name for spec in specs}
    widgets = [
        ("upload", "IMAGEUPLOAD", True) if slot.role == "upload" else (slot.name, types[slot.name], True)
        for slot in widget_slots(definition)
        if slot.role != "control"
    ]
    return sockets + widgets


@pytest.mark.parametrize("name", GRAPHS)
def test_widget_values_fit_object_info(server, name):
    _, info = server
    for node in _runnable_nodes(_graph(name)):
        if node["type"] in FRONTEND_ONLY_TYPES:
            assert all(isinstance(value, str) for value in node["widgets_values"])
            continue
        definition = info[node["type"]]
        slots, values = widget_slots(definition), node["widgets_values"]
        assert len(values) == len(slots), f"{node['type']}: {values} for {[s.name for s in slots]}"
        specs = {spec.name: spec for spec in input_specs(definition)}
        for slot, value in zip(slots, values, strict=True):
            problem = _invalid(specs[slot.name], slot.role, value)
            assert problem is None, f"{node['type']}.{slot.name}: {problem}"


def _invalid(spec, role: str, value) -> str | None:
    if role == "control":
        return None if value in CONTROL_VALUES else f"control_after_generate value {value!r}"
    if role == "upload":
        return None if value == "image" else f"upload widget value {value!r}"
    kind, options = spec.type_name, spec.options
    if kind == "COMBO":
        if value in spec.combo_options:
            return None
        # model and image file names are valid even where those files are not installed
        is_file = isinstance(value, str) and value.lower().endswith(FILE_SUFFIXES)
        return None if is_file else f"{value!r} is not one of {spec.combo_options[:8]}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{value!r} is not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        return f"{value!r} is not a number"
    low, high = options.get("min", -math.inf), options.get("max", math.inf)
    return None if low <= value <= high else f"{value} is outside {low}..{high}"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_reference_recipe_is_set(server, name):
    _, info = server
    prompt = ui_to_api(load(name), info)
    by_type = {}
    for node in prompt.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    sampler = by_type["KSampler"][0]
    assert (
        sampler["seed"],
        sampler["steps"],
        sampler["cfg"],
        sampler["sampler_name"],
        sampler["scheduler"],
        sampler["denoise"],
    ) == (50, 28, 1, "euler", "simple", 1)
    reference = prompt[sampler["positive"][0]]["inputs"]["conditioning"][0]
    assert prompt[reference]["class_type"] == "ReferenceLatent"
    assert sampler["latent_image"] == prompt[reference]["inputs"]["latent"]  # the encoded grid, as Kontext's template
    assert by_type["FluxGuidance"][0]["guidance"] == 2.5
    assert by_type["DualCLIPLoader"][0]["type"] == "flux"
    assert by_type["UNETLoader"][0]["unet_name"] == "flux1-dev-kontext_fp8_scaled.safetensors"
    reverse = name == REVERSE
    assert by_type["LoRWeB_AnalogyGrid"][0]["reverse"] is reverse
    assert by_type["LoRWeB_EncodeAnalogy"][0]["reverse"] is reverse
    assert isinstance(by_type["LoRWeB_EncodeAnalogy"][0]["basis"], list)
    previews = [inputs["images"] for inputs in by_type.get("PreviewImage", [])]
    if name in (COMPOSE_TWO, COMPOSE_LORA):
        assert not previews  # each Apply node draws its own chart; these templates need the room
    else:
        (chart,) = previews
        assert prompt[chart[0]]["class_type"] == "LoRWeB_ApplyBasis" and chart[1] == 2


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_converted_prompt_passes_the_servers_validation(server, name):
    """With (empty) files of the right names in place, /prompt accepts the graph: nothing else is missing."""
    url, info = server
    status, body = post_json(url + "/prompt", {"prompt": ui_to_api(load(name), info), "client_id": "lorweb-tests"})
    try:
        assert status == 200 and not body.get("node_errors"), body
    finally:
        # the placeholders cannot load; stop the queued run instead of letting it fail slowly
        post_json(url + "/queue", {"clear": True})
        post_json(url + "/interrupt", {})


def test_the_blueprint_is_listed_from_0_8_0_on(server):
    """ComfyUI 0.8.0 and later list ``custom_nodes/<pack>/subgraphs/*.json`` at /global_subgraphs (the node
    library's blueprints) and serve each by its id; 0.3.64 has no subgraph manager: the route is absent."""
    url, _ = server
    if comfyui_version() < (0, 8, 0):
        with pytest.raises(urllib.error.HTTPError) as error:
            get_json(url + "/global_subgraphs")
        assert error.value.code == 404
        return
    listed = get_json(url + "/global_subgraphs")
    ours = {
        key: entry for key, entry in listed.items() if entry["info"]["node_pack"] == f"custom_nodes.{PACK_LINK_NAME}"
    }
    assert len(ours) == 1, listed
    ((entry_id, entry),) = ours.items()
    assert entry == {
        "source": "custom_node",
        "name": BLUEPRINT.stem,
        "info": {"node_pack": f"custom_nodes.{PACK_LINK_NAME}"},
    }
    served = get_json(f"{url}/global_subgraphs/{entry_id}")
    assert served["name"] == BLUEPRINT.stem and "path" not in served
    assert json.loads(served["data"]) == json.loads(BLUEPRINT.read_text(encoding="utf-8"))
