"""ComfyUI UI-format (LiteGraph) workflows: widget order and conversion to an API-format prompt.

No ComfyUI import: node definitions come in the shape of ``GET /object_info`` (one dict per node type with
``input``, ``input_order`` and ``output``), from a server or from the node classes of a ComfyUI running in this
process (``node_definition``). The widget rule is the frontend's: a node's ``widgets_values`` hold one value per
input that is not socket-only (required inputs, then optional ones, in ``input_order``), plus one frontend-only
value after an input with ``control_after_generate`` (e.g. KSampler's seed: "randomize") and after a combo with an
``*_upload`` option (LoadImage: "image", the upload button).

Subgraph nodes (a node whose type is the id of one of ``definitions.subgraphs``, as the editor saves a blueprint) are
expanded into their inner nodes first, as the editor does when it queues a prompt: an inner node's id is
``"<subgraph node id>:<inner id>"`` and a value typed into the subgraph node's widget goes to the inner input it feeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
#: node types that exist only in the editor: never sent to the server
FRONTEND_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


@dataclass(frozen=True)
class InputSpec:
    name: str
    kind: Any  # a type name, or the option list of a V1 combo
    options: dict
    optional: bool

    @property
    def type_name(self) -> str:
        return "COMBO" if isinstance(self.kind, (list, tuple)) else str(self.kind)

    @property
    def is_widget(self) -> bool:
        return self.type_name in WIDGET_TYPES and not self.options.get("forceInput")

    @property
    def combo_options(self) -> list:
        return list(self.kind) if isinstance(self.kind, (list, tuple)) else list(self.options.get("options", []))


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of ``widgets_values``: an input's value, or a frontend-only companion value."""

    name: str  # the input it belongs to
    role: str  # "value", "control" (control_after_generate) or "upload"


def input_specs(definition: Mapping) -> list[InputSpec]:
    """Required then optional inputs of a node definition, in the server's order."""
    specs = []
    for section in ("required", "optional"):
        inputs = definition.get("input", {}).get(section) or {}
        order = (definition.get("input_order") or {}).get(section) or list(inputs)
        for name in order:
            spec = inputs[name]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            specs.append(InputSpec(name, spec[0], dict(options), section == "optional"))
    return specs


def widget_slots(definition: Mapping) -> list[WidgetSlot]:
    """What each position of a node's ``widgets_values`` holds, as the frontend lays them out."""
    slots = []
    for spec in input_specs(definition):
        if not spec.is_widget:
            continue
        slots.append(WidgetSlot(spec.name, "value"))
        if spec.options.get("control_after_generate"):
            slots.append(WidgetSlot(spec.name, "control"))
        if spec.type_name == "COMBO" and any(k.endswith("_upload") and v for k, v in spec.options.items()):
            slots.append(WidgetSlot(spec.name, "upload"))
    return slots


def node_definition(node_class: Any) -> dict:
    """The ``/object_info`` entry of a node class of a ComfyUI running in this process (V3 or V1)."""
    if hasattr(node_class, "GET_NODE_INFO_V1"):
        return node_class.GET_NODE_INFO_V1()
    inputs = node_class.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {section: list(values) for section, values in inputs.items()},
        "output": list(node_class.RETURN_TYPES),
    }


def load_workflow(path: str | Path) -> dict:
    workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(workflow, dict) or "nodes" not in workflow or "links" not in workflow:
        raise ValueError(
            f"{path} is not a ComfyUI UI workflow (it needs 'nodes' and 'links'; API-format prompts are not templates)"
        )
    try:
        expand_subgraphs(workflow)  # a subgraph that cannot be expanded is refused here, before ComfyUI starts
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return workflow


def node_order(node_id: object) -> tuple[int, ...]:
    """Sort key of a node id: 7 before 12, and an inner node ``"12:3"`` right after its subgraph node's place."""
    return tuple(int(part) for part in str(node_id).split(":"))


class _Graph:
    """Index of a flat UI workflow: nodes by id (``"12"``, or ``"12:3"`` inside a subgraph) and links by id (links
    as [id, from, from_slot, to, to_slot, type])."""

    def __init__(self, workflow: Mapping):
        workflow = expand_subgraphs(workflow)
        self.nodes = {str(node["id"]): node for node in workflow["nodes"]}
        self.links = {int(link[0]): link for link in workflow["links"]}

    def source(self, link_id: int | None, seen: frozenset = frozenset()) -> tuple[str, int] | None:
        """The (node, slot) that really feeds a link, looking through reroutes and bypassed nodes."""
        if link_id is None or link_id not in self.links or link_id in seen:
            return None
        _, origin, slot, _, _, link_type = self.links[link_id][:6]
        node = self.nodes.get(str(origin))
        if node is None or node.get("mode", MODE_ALWAYS) == MODE_NEVER:
            return None
        if node["type"] == "Reroute":
            inputs = node.get("inputs") or []
            return self.source(inputs[0].get("link"), seen | {link_id}) if inputs else None
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            return self.source(_bypass_input(node, int(slot), link_type), seen | {link_id})
        return str(origin), int(slot)


def _bypass_input(node: Mapping, slot: int, link_type: str) -> int | None:
    """A bypassed node passes an input of the output's type through: the same slot first, else the first match."""
    inputs = node.get("inputs") or []
    candidates = ([inputs[slot]] if slot < len(inputs) else []) + list(inputs)
    for candidate in candidates:
        if candidate.get("type") == link_type and candidate.get("link") is not None:
            return candidate["link"]
    return None


def ui_to_api(workflow: Mapping, definitions: Mapping[str, Mapping]) -> dict[str, dict]:
    """An API-format prompt ``{id: {"class_type", "inputs"}}`` from a UI workflow and the node definitions."""
    graph = _Graph(workflow)
    prompt = {}
    for node_id, node in sorted(graph.nodes.items(), key=lambda item: node_order(item[0])):
        if node["type"] in FRONTEND_ONLY_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        if node["type"] not in definitions:
            raise KeyError(
                f"node {node_id} has type {node['type']!r}, which this ComfyUI does not know "
                "(a missing custom node pack?)"
            )
        prompt[str(node_id)] = {
            "class_type": node["type"],
            "inputs": _api_inputs(node, definitions[node["type"]], graph),
        }
    return prompt


def _api_inputs(node: Mapping, definition: Mapping, graph: _Graph) -> dict[str, Any]:
    values = list(node.get("widgets_values") or [])
    slots = widget_slots(definition)
    if isinstance(node.get("widgets_values"), Mapping) or len(values) != len(slots):
        raise ValueError(
            f"node {node['id']} ({node['type']}) has {len(values)} widget values, this ComfyUI's "
            f"definition needs {len(slots)} ({[s.name for s in slots]})"
        )
    inputs = {slot.name: value for slot, value in zip(slots, values, strict=True) if slot.role == "value"}
    inputs.update(node.get(SUBGRAPH_VALUES) or {})  # typed into the subgraph node that holds this node
    for socket in node.get("inputs") or []:  # links win over widget values (a widget converted to an input)
        source = graph.source(socket.get("link"))
        if source is not None:
            inputs[socket["name"]] = [str(source[0]), source[1]]
    return inputs


# ------------------------------------------------------------------------------------------------ subgraphs

SUBGRAPH_INPUT_NODE, SUBGRAPH_OUTPUT_NODE = -10, -20
#: key of an expanded inner node: the values its inputs take from the subgraph node's widgets
SUBGRAPH_VALUES = "subgraph_values"
#: a proxyWidgets entry whose node is "-1" is a widget of the subgraph node's own input of that name
OWN_INPUT = "-1"
#: far more nodes than any real workflow expands to; subgraphs nested in each other multiply, so a file built to hurt
#: could otherwise ask for billions
MAX_EXPANDED_NODES = 100_000
#: subgraphs inside subgraphs: the editor nests a few levels; far deeper would exhaust Python's stack
MAX_SUBGRAPH_DEPTH = 32


def subgraph_definitions(workflow: Mapping) -> dict[str, Mapping]:
    """The subgraphs a workflow defines (``definitions.subgraphs``), by id: the type of the nodes that use them."""
    return {sg["id"]: sg for sg in ((workflow.get("definitions") or {}).get("subgraphs") or [])}


def expand_subgraphs(workflow: Mapping) -> Mapping:
    """The workflow with every subgraph node replaced by its inner nodes (nested ones too), as one flat graph.

    Inner node ids are ``"<subgraph node id>:<inner id>"`` (the editor's ids in the prompt it queues); links are
    renumbered. An inner input fed by a subgraph input takes what feeds that input of the subgraph node: its link,
    else the value of its widget (recorded under ``SUBGRAPH_VALUES``), else the inner node's own widget value. A
    muted or bypassed subgraph node mutes or bypasses its inner nodes. A workflow without subgraph nodes comes back
    as it is.
    """
    definitions = subgraph_definitions(workflow)
    if not any(node["type"] in definitions for node in workflow["nodes"]):
        return workflow
    flat = _Flattener(definitions)
    flat.level(_Level(workflow["nodes"], [_link_fields(link) for link in workflow["links"]], "", {}, None))
    outputs = {(str(node["id"]), slot): output for node in flat.nodes for slot, output in enumerate(node["outputs"])}
    for link in flat.links:
        if (output := outputs.get((str(link[1]), link[2]))) is not None:
            output["links"].append(link[0])
    return {**workflow, "nodes": flat.nodes, "links": flat.links, "definitions": {}}


def _link_fields(link) -> tuple:
    """(id, origin, origin slot, target, target slot, type) of a link saved as a list or as an object."""
    if isinstance(link, Mapping):
        return tuple(link[key] for key in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"))
    return tuple(link[:6])


@dataclass
class _Level:
    """One graph being flattened: the top level, or the inside of one subgraph node."""

    nodes: list
    links: list
    prefix: str  # "" at the top, "12:" inside subgraph node 12
    inputs: dict  # subgraph input slot -> ("link", (node, slot)) or ("value", value); absent: nothing feeds it
    mode: int | None  # the subgraph node's mode when it is muted or bypassed
    input_node: int = SUBGRAPH_INPUT_NODE  # the ids of a subgraph's input and output nodes
    output_node: int = SUBGRAPH_OUTPUT_NODE


class _Flattener:
    def __init__(self, definitions: Mapping[str, Mapping]):
        self.definitions = definitions
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.open: list[str] = []  # the subgraphs being expanded, outermost first

    def level(self, level: _Level) -> dict[int, tuple]:
        """Flatten one graph; what feeds each of its subgraph outputs (by slot)."""
        links = {int(link[0]): link for link in level.links}
        expanded: dict[Any, dict[int, tuple]] = {}  # subgraph node id -> its outputs' feeds
        by_id = {node["id"]: node for node in level.nodes}

        def feed(link_id) -> tuple | None:
            """What feeds a link of this level: ("link", (flat node id, slot)) or ("value", value) or None."""
            if link_id is None or int(link_id) not in links:
                return None
            _, origin, slot, _, _, _ = links[int(link_id)]
            if level.prefix and origin == level.input_node:
                return level.inputs.get(int(slot))
            node = by_id.get(origin)
            if node is None:
                return None
            if node["type"] in self.definitions:
                if origin not in expanded:
                    expanded[origin] = self.subgraph_node(node, level, feed)
                return expanded[origin].get(int(slot))
            return "link", (f"{level.prefix}{origin}", int(slot))

        for node in level.nodes:
            if node["type"] in self.definitions:
                if node["id"] not in expanded:
                    expanded[node["id"]] = self.subgraph_node(node, level, feed)
                continue
            self.plain_node(node, level, feed)
        outputs = {}
        for link in level.links:
            if level.prefix and link[3] == level.output_node and (fed := feed(link[0])) is not None:
                outputs[int(link[4])] = fed
        return outputs

    def plain_node(self, node: Mapping, level: _Level, feed) -> None:
        if len(self.nodes) >= MAX_EXPANDED_NODES:
            raise ValueError(
                f"its subgraphs expand to more than {MAX_EXPANDED_NODES} nodes (subgraphs nested in each other "
                "multiply); no real workflow is that large"
            )
        flat = {**node, "id": f"{level.prefix}{node['id']}" if level.prefix else node["id"]}
        if level.mode not in (None, MODE_ALWAYS) and flat.get("mode", MODE_ALWAYS) == MODE_ALWAYS:
            flat["mode"] = level.mode
        values = dict(node.get(SUBGRAPH_VALUES) or {})
        flat_inputs = []
        for slot, socket in enumerate(node.get("inputs") or []):
            socket = dict(socket)
            fed = feed(socket.get("link"))
            socket["link"] = None
            if fed is not None and fed[0] == "link":
                socket["link"] = self.link(fed[1], flat["id"], slot, socket.get("type"))
            elif fed is not None:
                values[socket["name"]] = fed[1]
            flat_inputs.append(socket)
        flat["inputs"] = flat_inputs
        flat["outputs"] = [{**output, "links": []} for output in node.get("outputs") or []]
        if values:
            flat[SUBGRAPH_VALUES] = values
        self.nodes.append(flat)

    def subgraph_node(self, node: Mapping, level: _Level, feed) -> dict[int, tuple]:
        definition = self.definitions[node["type"]]
        if node["type"] in self.open:
            names = " -> ".join(str(self.definitions[i].get("name", i)) for i in [*self.open, node["type"]])
            raise ValueError(f"its subgraph {names} contains itself, so it never ends; the workflow cannot run")
        if len(self.open) >= MAX_SUBGRAPH_DEPTH:
            raise ValueError(f"its subgraphs are nested more than {MAX_SUBGRAPH_DEPTH} deep; no real workflow is")
        widget_values = _subgraph_widget_values(node)
        inputs = {}
        for slot, spec in enumerate(definition.get("inputs") or []):
            socket = next((s for s in node.get("inputs") or [] if s.get("name") == spec.get("name")), None)
            fed = feed(socket.get("link")) if socket is not None else None
            if fed is None and spec.get("name") in widget_values:
                fed = "value", widget_values[spec["name"]]
            if fed is not None:
                inputs[slot] = fed
        mode = node.get("mode", MODE_ALWAYS)
        inner = _Level(
            definition.get("nodes") or [],
            [_link_fields(link) for link in definition.get("links") or []],
            f"{level.prefix}{node['id']}:",
            inputs,
            mode if mode != MODE_ALWAYS else level.mode,
            (definition.get("inputNode") or {}).get("id", SUBGRAPH_INPUT_NODE),
            (definition.get("outputNode") or {}).get("id", SUBGRAPH_OUTPUT_NODE),
        )
        self.open.append(node["type"])
        try:
            return self.level(inner)
        finally:
            self.open.pop()

    def link(self, origin: tuple[str, int], target, target_slot: int, link_type) -> int:
        link_id = len(self.links) + 1
        self.links.append([link_id, origin[0], origin[1], target, target_slot, link_type])
        return link_id


def _subgraph_widget_values(node: Mapping) -> dict[str, Any]:
    """The values typed into a subgraph node's own widgets, by input name.

    Editors that save ``properties.proxyWidgets`` pair ``widgets_values`` with its entries (``["-1", name]``: the
    widget of the node's input ``name``; other entries show an inner node's widget, whose value stays inside);
    older ones save one value per input that has a widget, in input order."""
    values = node.get("widgets_values")
    if not isinstance(values, list) or not values:
        return {}
    proxies = (node.get("properties") or {}).get("proxyWidgets")
    if isinstance(proxies, str):
        try:
            proxies = json.loads(proxies)
        except json.JSONDecodeError:
            raise ValueError(f"subgraph node {node.get('id')}: its properties.proxyWidgets is not JSON") from None
    if isinstance(proxies, list):
        pairs = [
            (entry[1], value)
            for entry, value in zip(proxies, values, strict=False)
            if isinstance(entry, list) and len(entry) >= 2 and str(entry[0]) == OWN_INPUT
        ]
    else:
        widgets = [s["name"] for s in node.get("inputs") or [] if "widget" in s]
        pairs = list(zip(widgets, values, strict=False))
    return {name: value for name, value in pairs if value is not None}
