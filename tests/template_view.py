"""How ComfyUI's front end lays out and shows a template, computed from its workflow JSON (shared by the pure layout
test and the browser test that checks this model against the real front end).

Measured on front ends 1.48.7 and 1.58.1 (ComfyUI 0.33) in a 1600x857 window: the template browser opens a template
with ``loadGraphData(..., {openSource: "template"})``, which ignores the file's ``extra.ds`` and fits the view to the
nodes: ``DragAndScale.fitToBounds`` with ``zoom=0.75`` on the nodes' bounds (title bar included) padded by 10, in
the whole canvas. Older front ends (1.27, 1.35) restore ``extra.ds``. Below a scale of 8 px / 14 px (1.35 and newer:
``LiteGraph.Canvas.MinFontSizeForLOD`` 8 over the 14 px node text; 1.27: ``LowQualityRenderingZoomThreshold`` 0.6)
nodes are drawn in low detail: boxes without titles, widgets or text.
"""

from __future__ import annotations

#: the window the templates must open readable in (a laptop browser with its bars), and the canvas in it: the whole
#: window from front end 1.35 on; 1.27 keeps its side bar and menu bar outside the canvas
WINDOW = (1600, 857)
CANVAS_1_27 = (1536, 779)
#: LiteGraph's node title bar above ``pos`` and a group's title bar (its default font size 24 plus padding)
NODE_TITLE = 30
GROUP_TITLE = 34
#: ``fitToBounds``'s default zoom and the padding ``fitView`` puts around the nodes
FIT_ZOOM = 0.75
FIT_PADDING = 10
#: the lowest scale at which front ends 1.35 and newer draw node text, and the one every front end does (1.27's)
READABLE_SCALE = 8 / 14
READABLE_SCALE_ANY = 0.6

#: the least (width, height) the editors give a node once it is in use (measured on front ends 1.27.10, 1.35.9, 1.48.7
#: and 1.58.1, classic canvas): Load Image with its image loaded, and after the first run an Apply node showing its
#: mix chart (the ``minSize`` in web/lorweb_mix.js) and a node showing the image it received. A template saves them at
#: least this large so that nothing overlaps once it is used (tests/host/test_workflows_in_browser.py and
#: test_browser.py check these numbers against the running front ends).
IN_USE_SIZE = {
    "LoadImage": (0, 314),
    "LoRWeB_ApplyBasis": (340, 280),
    "LoRWeB_ApplyWeights": (340, 280),
    "PreviewImage": (0, 246),
    "SaveImage": (0, 270),
}

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1


def node_rect(node: dict) -> Rect:
    x, y = node["pos"]
    width, height = node["size"]
    return (x, y - NODE_TITLE, x + width, y + height)


def group_rect(group: dict) -> Rect:
    x, y, width, height = group["bounding"]
    return (x, y, x + width, y + height)


def nodes_bounds(workflow: dict) -> Rect:
    rects = [node_rect(node) for node in workflow["nodes"]]
    return (min(r[0] for r in rects), min(r[1] for r in rects), max(r[2] for r in rects), max(r[3] for r in rects))


def fitted_scale(workflow: dict, canvas: tuple[int, int] = WINDOW) -> float:
    """The scale front ends 1.48+ give a template they open (see the module's docstring)."""
    x0, y0, x1, y1 = nodes_bounds(workflow)
    width, height = x1 - x0 + 2 * FIT_PADDING, y1 - y0 + 2 * FIT_PADDING
    return FIT_ZOOM * min(canvas[0] / max(width, 300), canvas[1] / max(height, 300))


def restored_view(workflow: dict, canvas: tuple[int, int] = CANVAS_1_27) -> tuple[float, Rect]:
    """Older front ends: the file's ``extra.ds`` scale and the canvas area it shows."""
    ds = workflow.get("extra", {}).get("ds", {"scale": 1.0, "offset": [0, 0]})
    scale, (ox, oy) = ds["scale"], ds["offset"]
    return scale, (-ox, -oy, -ox + canvas[0] / scale, -oy + canvas[1] / scale)


def contains(outer: Rect, inner: Rect) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def home_group(node: dict, groups: list[dict]) -> dict | None:
    """The group a node belongs to as LiteGraph counts it (the group holding the node's centre): the group moves it."""
    x0, y0, x1, y1 = node_rect(node)
    centre = ((x0 + x1) / 2, (y0 + y1) / 2, (x0 + x1) / 2, (y0 + y1) / 2)
    return next((group for group in groups if contains(group_rect(group), centre)), None)


def layout_problems(workflow: dict) -> list[str]:
    """Every node outside its group's area (below the group's title), across another group's edge, or on top of
    another node; one line each, with the node's id, pos and size."""
    problems = []
    groups = workflow.get("groups", [])
    nodes = workflow["nodes"]

    def describe(node: dict) -> str:
        return f"node {node['id']} {node['type']} pos={node['pos']} size={node['size']}"

    for node in nodes:
        rect = node_rect(node)
        home = home_group(node, groups)
        if home is not None:
            x0, y0, x1, y1 = group_rect(home)
            if not contains((x0, y0 + GROUP_TITLE, x1, y1), rect):
                problems.append(f"{describe(node)} crosses the edge of its group {home['title']!r} {home['bounding']}")
        for group in groups:
            if group is not home and overlaps(rect, group_rect(group)):
                problems.append(f"{describe(node)} lies partly in group {group['title']!r} {group['bounding']}")
    for index, node in enumerate(nodes):
        for other in nodes[index + 1 :]:
            if overlaps(node_rect(node), node_rect(other)):
                problems.append(f"{describe(node)} overlaps {describe(other)}")
    return problems
