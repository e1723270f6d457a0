"""ComfyUI UI-format (LiteGraph) workflows: widget order and conversion to an API-format prompt.

No ComfyUI import: node definitions come in the shape of ``GET /object_info`` (one dict per node type with
``input``, ``input_order`` and ``output``), from a server or from the node classes of a ComfyUI running in this
process (``node_definition``). The widget rule is the frontend's: a node's ``widgets_values`` hold one value per
input that is not socket-only (required inputs, then optional ones, in ``input_order``), plus one frontend-only
value after an input with ``control_after_generate`` (e.g. KSampler's seed: "randomize") and after a combo with an
``*_upload`` option (LoadImage: "image", the upload button).
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
    return workflow


class _Graph:
    """Index of a UI workflow: nodes by id and links by id (links as [id, from, from_slot, to, to_slot, type])."""

    def __init__(self, workflow: Mapping):
        self.nodes = {int(node["id"]): node for node in workflow["nodes"]}
        self.links = {int(link[0]): link for link in workflow["links"]}

    def source(self, link_id: int | None, seen: frozenset = frozenset()) -> tuple[int, int] | None:
        """The (node, slot) that really feeds a link, looking through reroutes and bypassed nodes."""
        if link_id is None or link_id not in self.links or link_id in seen:
            return None
        _, origin, slot, _, _, link_type = self.links[link_id][:6]
        node = self.nodes.get(int(origin))
        if node is None or node.get("mode", MODE_ALWAYS) == MODE_NEVER:
            return None
        if node["type"] == "Reroute":
            inputs = node.get("inputs") or []
            return self.source(inputs[0].get("link"), seen | {link_id}) if inputs else None
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            return self.source(_bypass_input(node, int(slot), link_type), seen | {link_id})
        return int(origin), int(slot)


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
    for node_id, node in sorted(graph.nodes.items()):
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
    for socket in node.get("inputs") or []:  # links win over widget values (a widget converted to an input)
        source = graph.source(socket.get("link"))
        if source is not None:
            inputs[socket["name"]] = [str(source[0]), source[1]]
    return inputs
