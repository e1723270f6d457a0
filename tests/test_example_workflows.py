"""The example workflows as files (format, links, notes, thumbnails) and the UI -> API converter, without ComfyUI.

Against a real ComfyUI's ``/object_info`` they are checked in tests/host/test_workflows.py.
"""

from __future__ import annotations

import pytest
from PIL import Image
from workflow_testing import (
    COMPOSE_LORA,
    COMPOSE_TWO,
    FORWARD,
    FRONTEND_ONLY_TYPES,
    MODEL_FILES,
    ONE_NODE,
    REVERSE,
    WORKFLOWS,
    WORKFLOWS_DIR,
    all_nodes,
    load_example,
    subgraph_definitions,
    ui_to_api,
    widget_slots,
)

TOP_LEVEL_KEYS = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}
NODE_KEYS = {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties", "widgets_values"}

# /object_info-shaped definitions, as ComfyUI reports them (trimmed to what the converter reads)
KSAMPLER = {
    "input": {
        "required": {
            "model": ["MODEL", {}],
            "seed": ["INT", {"min": 0, "control_after_generate": True}],
            "steps": ["INT", {}],
            "sampler_name": [["euler", "heun"]],
            "positive": ["CONDITIONING"],
            "denoise": ["FLOAT", {"max": 1.0}],
        }
    },
    "input_order": {"required": ["model", "seed", "steps", "sampler_name", "positive", "denoise"]},
    "output": ["LATENT"],
}
LOAD_IMAGE = {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}}, "output": ["IMAGE", "MASK"]}
GRID = {
    "input": {
        "required": {"a": ["IMAGE", {}]},
        "optional": {"reverse": ["BOOLEAN", {"default": False}], "basis": ["LORWEB_BASIS", {}]},
    },
    "input_order": {"required": ["a"], "optional": ["reverse", "basis"]},
    "output": ["IMAGE"],
}
SCALE = {"input": {"required": {"image": ["IMAGE", {}]}}, "output": ["IMAGE"]}
TEXT = {"input": {"required": {"text": ["STRING", {"forceInput": True}], "clip": ["CLIP"]}}, "output": ["COND"]}
DEFINITIONS = {"KSampler": KSAMPLER, "LoadImage": LOAD_IMAGE, "Grid": GRID, "Scale": SCALE, "Text": TEXT}


def test_every_workflow_has_a_jpg_thumbnail():
    assert set(WORKFLOWS) == {FORWARD, REVERSE, COMPOSE_TWO, COMPOSE_LORA, ONE_NODE}
    for name in WORKFLOWS:
        path = WORKFLOWS_DIR / f"{name}.jpg"
        thumbnail = Image.open(path)
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 128 and path.stat().st_size < 200_000


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_format_and_links_are_consistent(name):
    workflow = load_example(name)
    assert TOP_LEVEL_KEYS <= set(workflow) and workflow["version"] == 0.4
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    assert len(nodes) == len(workflow["nodes"]) and len(links) == len(workflow["links"])
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= max(links)
    subgraphs = subgraph_definitions(workflow)
    for node in all_nodes(workflow):
        assert NODE_KEYS <= set(node), node["id"]
        if node["type"] in subgraphs:  # a subgraph node, as the editor saves one: no S&R name
            assert {"cnr_id", "ver", "proxyWidgets"} <= set(node["properties"]), node["id"]
        elif node["type"] not in FRONTEND_ONLY_TYPES:
            assert {"Node name for S&R", "cnr_id", "ver"} <= set(node["properties"]), node["type"]
    for link_id, source, source_slot, target, target_slot, link_type in links.values():
        assert link_id in (nodes[source]["outputs"][source_slot]["links"] or [])
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[source]["outputs"][source_slot]["type"] == link_type
        assert nodes[target]["inputs"][target_slot]["type"] == link_type
    for node in workflow["nodes"]:
        for slot in node["inputs"]:
            assert slot["link"] is None or links[slot["link"]][3] == node["id"]
        for index, slot in enumerate(node["outputs"]):
            for link_id in slot["links"] or []:
                assert links[link_id][1] == node["id"] and links[link_id][2] == index


@pytest.mark.parametrize("name", WORKFLOWS)
def test_notes_name_every_model_file_its_folder_its_source_and_the_licence(name):
    notes = " ".join(
        node["widgets_values"][0] for node in load_example(name)["nodes"] if node["type"] in FRONTEND_ONLY_TYPES
    )
    for file_name, folder in MODEL_FILES.items():
        assert file_name in notes and f"models/{folder}/" in notes, file_name
    for source in (
        "hilamanor/lorweb",
        "openai/clip-vit-large-patch14",
        "comfyanonymous/flux_text_encoders",
        "black-forest-labs/FLUX.1-Kontext-dev",
        "Comfy-Org/flux1-kontext-dev_ComfyUI",
        "Comfy-Org/Lumina_Image_2.0_Repackaged",
    ):
        assert source in notes
    assert "NVIDIA" in notes and "non-commercial" in notes


def test_widget_slots_follow_the_frontend():
    slots = [(slot.name, slot.role) for slot in widget_slots(KSAMPLER)]
    assert slots == [
        ("seed", "value"),
        ("seed", "control"),
        ("steps", "value"),
        ("sampler_name", "value"),
        ("denoise", "value"),
    ]
    assert [(s.name, s.role) for s in widget_slots(LOAD_IMAGE)] == [("image", "value"), ("image", "upload")]
    assert [s.name for s in widget_slots(GRID)] == ["reverse"]  # optional widgets follow the required ones
    assert widget_slots(TEXT) == []  # forceInput: a socket, not a widget


def _node(node_id, node_type, widgets=(), inputs=(), outputs=(), mode=0):
    return {
        "id": node_id,
        "type": node_type,
        "mode": mode,
        "widgets_values": list(widgets),
        "inputs": [dict(name=n, type=t, link=link) for n, t, link in inputs],
        "outputs": [dict(name=t, type=t, links=links) for t, links in outputs],
    }


def test_ui_to_api_maps_widgets_links_bypass_reroute_and_notes():
    workflow = {
        "nodes": [
            _node(1, "LoadImage", ["a.png", "image"], outputs=[("IMAGE", [1])]),
            _node(2, "Scale", inputs=[("image", "IMAGE", 1)], outputs=[("IMAGE", [2])], mode=4),  # bypassed
            _node(3, "Reroute", inputs=[("", "*", 2)], outputs=[("IMAGE", [3])]),
            _node(4, "Grid", [True], inputs=[("a", "IMAGE", 3), ("basis", "LORWEB_BASIS", None)]),
            _node(5, "KSampler", [7, "fixed", 4, "euler", 0.5], inputs=[("seed", "INT", 4)]),
            _node(6, "Note", ["models: ..."]),
            _node(7, "Grid", [False], inputs=[("a", "IMAGE", None)], mode=2),  # muted
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"], [4, 1, 0, 5, 1, "INT"]],
    }
    prompt = ui_to_api(workflow, DEFINITIONS)
    assert prompt == {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "4": {"class_type": "Grid", "inputs": {"reverse": True, "a": ["1", 0]}},
        "5": {
            "class_type": "KSampler",
            "inputs": {"seed": ["1", 0], "steps": 4, "sampler_name": "euler", "denoise": 0.5},
        },
    }


def test_ui_to_api_refuses_a_widget_count_that_does_not_fit():
    workflow = {"nodes": [_node(1, "KSampler", [7, 4, "euler", 0.5])], "links": []}
    with pytest.raises(ValueError, match="4 widget values.*needs 5"):
        ui_to_api(workflow, DEFINITIONS)
    with pytest.raises(KeyError, match="does not know"):
        ui_to_api({"nodes": [_node(1, "Unknown")], "links": []}, DEFINITIONS)


def _inside(rect, bounding) -> bool:
    x, y, width, height = bounding
    return x <= rect[0] and rect[2] <= x + width and y <= rect[1] and rect[3] <= y + height


def _groups_and_nodes(workflow: dict):
    yield "", workflow.get("groups") or [], workflow["nodes"]
    for subgraph in subgraph_definitions(workflow).values():
        yield f"{subgraph['name']}: ", subgraph.get("groups") or [], subgraph.get("nodes") or []


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_node_lies_inside_the_group_that_holds_its_centre(name):
    """A node whose centre is in a group lies wholly inside it (the smallest such group): the editor moves a
    group's nodes with it, and a node over a group's edge looks as if it belonged to the group beside it."""
    for where, groups, nodes in _groups_and_nodes(load_example(name)):
        for node in nodes:
            (x, y), (width, height) = node["pos"], node["size"]
            rect = (x, y, x + width, y + height)
            centre = (x + width / 2, y + height / 2, x + width / 2, y + height / 2)
            holding = [group for group in groups if _inside(centre, group["bounding"])]
            if holding:
                group = min(holding, key=lambda g: g["bounding"][2] * g["bounding"][3])
                assert _inside(rect, group["bounding"]), f"{where}node {node['id']} ({node['type']}) {rect} " + (
                    f"crosses the edge of group {group['title']!r} {group['bounding']}"
                )
