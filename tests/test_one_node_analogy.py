"""The one-node analogy: the blueprint (subgraphs/), the template that uses it, and the converter's subgraph
expansion, without ComfyUI. The template must give, node for node, the reference graph's API prompt.

ComfyUI itself lists the blueprint (/global_subgraphs) and runs the template in tests/host/test_blueprints.py and
tests/host/test_runner_demo.py.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
from workflow_testing import (
    BLUEPRINT,
    BLUEPRINTS_DIR,
    FORWARD,
    FRONTEND_ONLY_TYPES,
    ONE_NODE,
    ROOT,
    expand_subgraphs,
    load_example,
    subgraph_definitions,
    ui_to_api,
)

sys.path.insert(0, str(ROOT / "scripts"))
from lorweb_workflow import load_workflow  # noqa: E402
from runner_prompt import RunSettings, SaveOutput, build_prompt, image_loaders, save_outputs  # noqa: E402

#: the blueprint's inputs and outputs: (name, type)
INPUTS = [
    ("a", "IMAGE"),
    ("a_prime", "IMAGE"),
    ("b", "IMAGE"),
    ("model", "MODEL"),
    ("clip", "CLIP"),
    ("vae", "VAE"),
    ("instruction", "STRING"),
    ("strength", "FLOAT"),
    ("seed", "INT"),
]
OUTPUTS = [("b_prime", "IMAGE"), ("chart", "IMAGE")]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _definitions(workflow: dict) -> dict:
    """``/object_info``-shaped definitions read off the editor's saved inputs: sockets, then one widget per input
    with a widget (LoadImage's upload button and KSampler's control value being the frontend's extras)."""
    definitions = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES:
            continue
        required, order = {}, []
        for socket in node["inputs"]:
            if socket["type"] == "IMAGEUPLOAD":
                continue
            options = {"control_after_generate": True} if socket["name"] == "seed" else {}
            if socket["type"] == "COMBO":
                kind = ["x.png"] if node["type"] == "LoadImage" else ["any"]
                options = {"image_upload": True} if node["type"] == "LoadImage" else {}
            else:
                kind = socket["type"]
            if "widget" not in socket and kind in WIDGET_TYPES:
                options["forceInput"] = True
            required[socket["name"]] = [kind, options]
            order.append(socket["name"])
        definitions[node["type"]] = {"input": {"required": required}, "input_order": {"required": order}}
    return definitions


@pytest.fixture(scope="module")
def definitions() -> dict:
    return _definitions(load_example(FORWARD))


def _without_prefix(prompt: dict) -> dict:
    """The prompt with each inner node's id ``"50:40"`` written as its id inside the subgraph, ``"40"``."""

    def plain(node_id: str) -> str:
        return node_id.rsplit(":", 1)[-1]

    renamed = {}
    for node_id, node in prompt.items():
        inputs = {
            name: [plain(value[0]), value[1]] if isinstance(value, list) else value
            for name, value in node["inputs"].items()
        }
        renamed[plain(node_id)] = {**node, "inputs": inputs}
    assert len(renamed) == len(prompt), "two nodes with one id"
    return renamed


def test_the_template_is_the_reference_graph_node_for_node(definitions):
    one_node = ui_to_api(load_example(ONE_NODE), definitions)
    reference = ui_to_api(load_example(FORWARD), definitions)
    inner = sorted(node_id for node_id in one_node if ":" in node_id)
    assert inner and all(node_id.startswith("50:") for node_id in inner)  # the editor's ids: subgraph node 50
    assert _without_prefix(one_node) == reference


def test_the_subgraph_nodes_widgets_reach_the_nodes_inside(definitions):
    workflow = load_example(ONE_NODE)
    node = next(n for n in workflow["nodes"] if n["id"] == 50)
    node["widgets_values"] = ["Make it a watercolour.", 0.75, 123]
    prompt = ui_to_api(workflow, definitions)
    assert prompt["50:35"]["inputs"]["text"] == "Make it a watercolour."
    assert prompt["50:24"]["inputs"]["strength"] == 0.75
    assert prompt["50:40"]["inputs"]["seed"] == 123


def test_the_blueprint_file_is_one_subgraph_node_of_the_templates_subgraph():
    assert sorted(path.name for path in BLUEPRINTS_DIR.glob("*.json")) == [BLUEPRINT.name]
    blueprint = json.loads(BLUEPRINT.read_text(encoding="utf-8"))
    (subgraph,) = blueprint["definitions"]["subgraphs"]
    (node,) = blueprint["nodes"]
    assert node["type"] == subgraph["id"] and blueprint["links"] == [] and blueprint["version"] == 0.4
    assert subgraph["name"] == BLUEPRINT.stem == node["title"] and subgraph["description"]
    assert [(slot["name"], slot["type"]) for slot in subgraph["inputs"]] == INPUTS
    assert [(slot["name"], slot["type"]) for slot in subgraph["outputs"]] == OUTPUTS
    assert [(slot["name"], slot["type"]) for slot in node["inputs"]] == INPUTS
    assert [(slot["name"], slot["type"]) for slot in node["outputs"]] == OUTPUTS
    assert node["properties"]["proxyWidgets"] == [["-1", "instruction"], ["-1", "strength"], ["-1", "seed"]]
    # the template carries the same subgraph: a blueprint dropped on the canvas and the template run the same graph
    # (the node library's category and description are the blueprint's; the editor leaves them out of a workflow)
    assert subgraph["category"] == "LoRWeB"
    in_template = {key: value for key, value in subgraph.items() if key not in ("category", "description")}
    assert subgraph_definitions(load_example(ONE_NODE)) == {subgraph["id"]: in_template}
    template_node = next(n for n in load_example(ONE_NODE)["nodes"] if n["type"] == subgraph["id"])
    assert template_node["widgets_values"] == node["widgets_values"]


def test_every_subgraph_link_is_where_both_its_ends_say():
    for workflow in (load_example(ONE_NODE), json.loads(BLUEPRINT.read_text(encoding="utf-8"))):
        for subgraph in subgraph_definitions(workflow).values():
            nodes = {node["id"]: node for node in subgraph["nodes"]}
            links = {link["id"]: link for link in subgraph["links"]}
            assert len(links) == len(subgraph["links"])
            ends = {-10: subgraph["inputs"], -20: subgraph["outputs"]}
            for link in links.values():
                if link["origin_id"] == -10:
                    assert link["id"] in ends[-10][link["origin_slot"]]["linkIds"]
                else:
                    assert link["id"] in nodes[link["origin_id"]]["outputs"][link["origin_slot"]]["links"]
                if link["target_id"] == -20:
                    assert link["id"] in ends[-20][link["target_slot"]]["linkIds"]
                else:
                    assert nodes[link["target_id"]]["inputs"][link["target_slot"]]["link"] == link["id"]
            for slot in subgraph["inputs"] + subgraph["outputs"]:
                assert slot["linkIds"] and all(link_id in links for link_id in slot["linkIds"])
            top = {node["id"] for node in workflow["nodes"]}
            assert not top & set(nodes), "node ids are unique across the graph and its subgraphs"


def test_the_runner_reaches_the_nodes_inside(definitions):
    workflow = load_example(ONE_NODE)
    assert save_outputs(workflow) == (SaveOutput("43", "b_prime"),)
    settings = RunSettings(prompt="Make it blue.", seed=7, steps=4, strength=0.5, outputs=save_outputs(workflow))
    prompt = build_prompt(copy.deepcopy(workflow), definitions, settings)
    assert prompt["50:35"]["inputs"]["text"] == "Make it blue." and prompt["50:40"]["inputs"]["seed"] == 7
    assert prompt["50:40"]["inputs"]["steps"] == 4 and prompt["50:24"]["inputs"]["strength"] == 0.5
    assert prompt["43"]["inputs"]["images"] == ["50:42", 0] and prompt["50:42"]["_meta"] == {
        "title": "LoRWeB_CropResult"
    }
    assert image_loaders(prompt) == {"a": "10", "a_prime": "11", "b": "12"}


# ------------------------------------------------------------------------------------------------ expansion rules


def _node(node_id, node_type, widgets=(), inputs=(), outputs=(), mode=0, **extra):
    return {
        "id": node_id,
        "type": node_type,
        "mode": mode,
        "widgets_values": list(widgets),
        "inputs": [
            dict(name=n, type=t, link=link, **({"widget": {"name": n}} if w else {})) for n, t, link, w in inputs
        ],
        "outputs": [dict(name=t, type=t, links=links) for t, links in outputs],
        **extra,
    }


LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


def _subgraph(subgraph_id, inputs, outputs, nodes, links):
    return {
        "id": subgraph_id,
        "name": subgraph_id,
        "inputs": [{"name": n, "type": t, "linkIds": ids} for n, t, ids in inputs],
        "outputs": [{"name": n, "type": t, "linkIds": ids} for n, t, ids in outputs],
        "nodes": nodes,
        "links": [dict(zip(LINK_FIELDS, link, strict=True)) for link in links],
    }


SCALE = {"input": {"required": {"image": ["IMAGE", {}], "factor": ["FLOAT", {}]}}, "output": ["IMAGE"]}
LOAD = {"input": {"required": {"name": [["x.png"], {}]}}, "output": ["IMAGE"]}
DEFINITIONS = {"Scale": SCALE, "Load": LOAD}


def _nested(outer_node: dict) -> dict:
    """Load -> [outer: image, factor -> [inner: Scale(image, factor)] -> Scale] -> out, plus a passed-through input."""
    inner = _subgraph(
        "inner",
        [("image", "IMAGE", [1]), ("factor", "FLOAT", [2])],
        [("IMAGE", "IMAGE", [3])],
        [_node(5, "Scale", [1.0], [("image", "IMAGE", 1, False), ("factor", "FLOAT", 2, True)], [("IMAGE", [3])])],
        [(1, -10, 0, 5, 0, "IMAGE"), (2, -10, 1, 5, 1, "FLOAT"), (3, 5, 0, -20, 0, "IMAGE")],
    )
    outer = _subgraph(
        "outer",
        [("image", "IMAGE", [11, 14]), ("factor", "FLOAT", [12])],
        [("IMAGE", "IMAGE", [13]), ("same", "IMAGE", [14])],
        [
            _node(
                6,
                "inner",
                [2.0],
                [("image", "IMAGE", 11, False), ("factor", "FLOAT", 12, True)],
                [("IMAGE", [13])],
                properties={"proxyWidgets": [["-1", "factor"]]},
            )
        ],
        [
            (11, -10, 0, 6, 0, "IMAGE"),
            (12, -10, 1, 6, 1, "FLOAT"),
            (13, 6, 0, -20, 0, "IMAGE"),
            (14, -10, 0, -20, 1, "IMAGE"),  # the image passed straight out
        ],
    )
    return {
        "nodes": [
            _node(1, "Load", ["a.png"], outputs=[("IMAGE", [21])]),
            outer_node,
            _node(3, "Scale", [0.5], [("image", "IMAGE", 22, False), ("factor", "FLOAT", None, True)]),
            _node(4, "Scale", [0.25], [("image", "IMAGE", 23, False), ("factor", "FLOAT", None, True)]),
        ],
        "links": [[21, 1, 0, 2, 0, "IMAGE"], [22, 2, 0, 3, 0, "IMAGE"], [23, 2, 1, 4, 0, "IMAGE"]],
        "definitions": {"subgraphs": [outer, inner]},
    }


def _outer(widgets, mode=0, proxies=True):
    properties = {"proxyWidgets": [["-1", "factor"]]} if proxies else {}
    return _node(
        2,
        "outer",
        widgets,
        [("image", "IMAGE", 21, False), ("factor", "FLOAT", None, True)],
        [("IMAGE", [22]), ("same", [23])],
        mode=mode,
        properties=properties,
    )


def test_nested_subgraphs_expand_with_the_outermost_widget_value_and_pass_through_inputs():
    prompt = ui_to_api(_nested(_outer([3.0])), DEFINITIONS)
    assert prompt == {
        "1": {"class_type": "Load", "inputs": {"name": "a.png"}},
        "2:6:5": {"class_type": "Scale", "inputs": {"factor": 3.0, "image": ["1", 0]}},
        "3": {"class_type": "Scale", "inputs": {"factor": 0.5, "image": ["2:6:5", 0]}},
        "4": {"class_type": "Scale", "inputs": {"factor": 0.25, "image": ["1", 0]}},  # an input passed straight out
    }


def test_without_a_value_of_its_own_the_inner_widget_keeps_its_value():
    # an editor that saves no values on the subgraph node: the nested node's 2.0, then the inner node's own 1.0
    assert ui_to_api(_nested(_outer([])), DEFINITIONS)["2:6:5"]["inputs"]["factor"] == 2.0
    workflow = _nested(_outer([]))
    workflow["definitions"]["subgraphs"][0]["nodes"][0]["widgets_values"] = []
    assert ui_to_api(workflow, DEFINITIONS)["2:6:5"]["inputs"]["factor"] == 1.0


def test_older_editors_widget_values_follow_the_inputs_with_widgets():
    assert ui_to_api(_nested(_outer([4.0], proxies=False)), DEFINITIONS)["2:6:5"]["inputs"]["factor"] == 4.0


def test_a_muted_subgraph_node_mutes_the_nodes_inside():
    prompt = ui_to_api(_nested(_outer([3.0], mode=2)), DEFINITIONS)
    assert "2:6:5" not in prompt and "image" not in prompt["3"]["inputs"]


def test_a_workflow_without_subgraph_nodes_is_left_as_it_is():
    workflow = load_example(FORWARD)
    assert expand_subgraphs(workflow) is workflow


def _nesting(levels: int, per_level: int, last_type: str = "Note") -> dict:
    """A workflow whose subgraph L0 holds ``per_level`` nodes of subgraph L1, and so on ``levels`` deep."""
    subgraphs = [
        {
            "id": f"L{level}",
            "name": f"level {level}",
            "nodes": [
                {"id": j, "type": f"L{level + 1}" if level + 1 < levels else last_type, "inputs": [], "outputs": []}
                for j in range(per_level)
            ],
            "links": [],
            "inputs": [],
            "outputs": [],
        }
        for level in range(levels)
    ]
    node = {"id": 1, "type": "L0", "inputs": [], "outputs": []}
    return {"nodes": [node], "links": [], "definitions": {"subgraphs": subgraphs}}


@pytest.mark.parametrize(
    "workflow, message",
    [
        (_nesting(1, 1, last_type="L0"), r"subgraph level 0 -> level 0 contains itself"),
        (_nesting(2, 1, last_type="L0"), r"subgraph level 0 -> level 1 -> level 0 contains itself"),
        (_nesting(10, 10), r"subgraphs expand to more than 100000 nodes"),  # 10^10 nodes if expanded
        (_nesting(2000, 1), r"subgraphs are nested more than 32 deep"),  # past Python's stack if followed
    ],
    ids=["contains itself", "contains itself through another", "nested fan-out", "nested too deep"],
)
def test_hostile_subgraphs_are_refused_with_a_message_in_bounded_time(tmp_path, workflow, message):
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(workflow), encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{path}: its {message}"):
        load_workflow(path)


def test_a_subgraph_nodes_proxy_widgets_that_are_not_json_are_refused(tmp_path):
    workflow = _nesting(1, 0)
    workflow["nodes"][0].update(widgets_values=[1.0], properties={"proxyWidgets": "[not json"})
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(workflow), encoding="utf-8")
    with pytest.raises(ValueError, match=r"subgraph node 1: its properties.proxyWidgets is not JSON"):
        load_workflow(path)
