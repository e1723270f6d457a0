"""The example workflows in ComfyUI's real front end (headless Chromium): served as templates, loaded by the editor,
saved back unchanged, and turned by the editor into the same API prompt as the headless runner's converter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from browser import find_chromium, open_page
from comfy_host import PACK_LINK_NAME, REPO_ROOT
from comfy_server import get_json, make_base, post_json, running_server
from template_view import CANVAS_1_27, READABLE_SCALE, WINDOW, contains, fitted_scale, nodes_bounds, restored_view
from workflow_testing import WORKFLOWS, load_example, ui_to_api

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine: install Debian's 'chromium' (.ci/run does it where it can)"
)
#: every Load Image node of the open workflow has loaded its image (the node has taken its in-use size)
IMAGES_SHOWN = (
    "window.app.graph._nodes.filter(n => n.type === 'LoadImage')"
    ".every(n => n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0))"
)
#: top-level keys the editor adds or refreshes on every save
VOLATILE_KEYS = {"id", "revision", "extra"}


@pytest.fixture(scope="module")
def editor_server(tmp_path_factory):
    """ComfyUI with the pack's example images installed as the README says, so that every Load Image node of a
    template shows its image (and takes the size it has in use)."""
    base = make_base(tmp_path_factory.mktemp("editor_base"))
    install = [sys.executable, str(REPO_ROOT / "scripts" / "example_inputs.py"), "install", "--input-dir"]
    subprocess.run([*install, str(base / "input")], check=True, capture_output=True)
    with running_server(base) as url:
        post_json(url + "/settings/Comfy.TutorialCompleted", True)  # no first-run dialog over the canvas
        yield url, base


@pytest.fixture(scope="module")
def editor_results(editor_server, tmp_path_factory):
    """For each workflow: (the editor's save of it, the editor's API prompt), plus /object_info, page errors and the
    front end's version."""
    url, _ = editor_server
    info = get_json(url + "/object_info")
    saved, prompts, errors, frontend = asyncio.run(_load_in_editor(url, tmp_path_factory.mktemp("profile")))
    return saved, prompts, info, errors, frontend


@pytest.fixture(scope="module")
def template_views(editor_server, tmp_path_factory):
    """Each template opened as the template browser opens it, in a 1600x857 window: the view it got (scale, the
    canvas area shown, low detail or not) and the front end's version; a screenshot each in the base folder."""
    url, base = editor_server
    return asyncio.run(_open_templates(url, base, tmp_path_factory.mktemp("profile")))


async def _open_templates(url: str, base, profile) -> tuple[dict, tuple[int, ...]]:
    views = {}
    async with open_page(CHROMIUM, profile) as page:
        metrics = {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False}
        await page.send("Emulation.setDeviceMetricsOverride", metrics)
        frontend = await page.open_comfyui(url, "LoRWeB_ApplyBasis")
        for name in WORKFLOWS:
            await page.open_template(PACK_LINK_NAME, name, as_template_browser=True)
            await asyncio.sleep(2.0)  # the camera is set on the next frames
            views[name] = await page.evaluate(
                "(() => { const c = window.app.canvas; c.ds.computeVisibleArea(c.viewport);"
                " return {scale: c.ds.scale, visible: Array.from(c.visible_area), lowDetail: Boolean(c.low_quality),"
                " canvas: [c.canvas.width, c.canvas.height]}; })()"
            )
            await page.screenshot(base / f"template_{name}.png")
    return views, frontend


async def _load_in_editor(url: str, profile) -> tuple[dict, dict, list[str], tuple[int, ...]]:
    saved, prompts = {}, {}
    async with open_page(CHROMIUM, profile) as page:
        frontend = await page.open_comfyui(url, "LoRWeB_ApplyBasis")
        for name in WORKFLOWS:
            # fetched from the template route, as the template browser does
            await page.open_template(PACK_LINK_NAME, name)
            await page.wait_for(IMAGES_SHOWN, timeout=30)
            saved[name] = json.loads(await page.evaluate("JSON.stringify(window.app.graph.serialize())"))
            prompts[name] = json.loads(
                await page.evaluate("window.app.graphToPrompt().then(p => JSON.stringify(p.output))")
            )
        return saved, prompts, list(page.errors), frontend


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_editor_saves_the_workflow_unchanged(editor_results, name):
    """Saved after every Load Image node shows its image: a node saved smaller than the editor draws it in use would
    come back grown."""
    saved, _, info, _, frontend = editor_results
    original = load_example(name)
    if frontend >= (1, 48):
        _expect_newer_editor_changes(saved[name], original)
    if frontend > (1, 48, 7):
        _expect_current_editor_changes(saved[name], original, info)
    if "definitions" in original:
        # A template with a subgraph (the one-node analogy) is saved as front end 1.35 writes it. Other editors keep
        # its graph but rewrite their own bookkeeping inside it (1.48.7 moves the subgraph node's proxyWidgets into
        # proxyWidgetErrorQuarantine and adds previewExposures; 1.27 writes positions as {"0": x, "1": y}); the graph
        # itself, outside and inside the subgraph, must come back the same (the prompt test checks what it runs).
        after, before = graph_content(saved[name]), graph_content(original)
        for part in ("nodes", "links"):
            differing = {key: (after[part].get(key), value) for key, value in before[part].items()}
            differing = {key: pair for key, pair in differing.items() if pair[0] != pair[1]}
            assert not differing and after[part].keys() == before[part].keys(), (part, differing)
        assert after["subgraphs"] == before["subgraphs"]
        return
    assert set(saved[name]) - VOLATILE_KEYS == set(original) - VOLATILE_KEYS
    for key in set(original) - VOLATILE_KEYS:
        assert saved[name][key] == original[key], key


def graph_content(workflow: dict) -> dict:
    """What a workflow computes, outside and inside its subgraphs: nodes (id, type, mode, widget values, sockets and
    their links), links and the subgraphs' own inputs and outputs; no positions, sizes or editor bookkeeping."""

    def widgets(node: dict) -> list:
        return node.get("widgets_values") or list((node.get("widgets_values_named") or {}).values())

    def nodes(items: list[dict]) -> dict:
        return {
            node["id"]: (
                node["type"],
                node.get("mode", 0),
                widgets(node),
                [(slot["name"], slot["type"], slot.get("link")) for slot in node.get("inputs", [])],
                [(slot["name"], slot["type"], sorted(slot.get("links") or [])) for slot in node.get("outputs", [])],
            )
            for node in items
        }

    def links(items: list) -> dict:
        rows = [tuple(link[:6]) if isinstance(link, list) else tuple(link[key] for key in LINK_KEYS) for link in items]
        return {row[0]: row[1:] for row in rows}

    subgraphs = {
        graph["id"]: (
            graph["name"],
            [(slot["name"], slot["type"], sorted(slot.get("linkIds", []))) for slot in graph.get("inputs", [])],
            [(slot["name"], slot["type"], sorted(slot.get("linkIds", []))) for slot in graph.get("outputs", [])],
            nodes(graph["nodes"]),
            links(graph.get("links", [])),
        )
        for graph in workflow.get("definitions", {}).get("subgraphs", [])
    }
    return {"nodes": nodes(workflow["nodes"]), "links": links(workflow["links"]), "subgraphs": subgraphs}


#: a link saved as an object (inside subgraphs) in the order of the list form [id, origin, slot, target, slot, type]
LINK_KEYS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


def _expect_newer_editor_changes(saved: dict, original: dict) -> None:
    """What the editor of front end 1.48 (ComfyUI 0.33's) and newer changes in a template saved for every version,
    asserted exactly; then the rest is compared as saved. Its SaveImage and PreviewImage have an IMAGE output, which
    it adds to the templates' output-less nodes; it leaves out a group's font size when it is the default, 24."""
    for group, before in zip(saved["groups"], original["groups"], strict=True):
        assert before.get("font_size") == 24 and "font_size" not in group, (group, before)
        group["font_size"] = 24
    originals = {node["id"]: node for node in original["nodes"]}
    for node in saved["nodes"]:
        if node["type"] in ("SaveImage", "PreviewImage"):
            assert originals[node["id"]]["outputs"] == [], node
            added = [{"localized_name": "images", "name": "images", "type": "IMAGE", "links": None}]
            assert node["outputs"] == added, node
            node["outputs"] = []


def _expect_current_editor_changes(saved: dict, original: dict, info: dict) -> None:
    """What front end 1.58.1 (seen there; not in 1.48.7) changes besides, asserted exactly: it adds
    ``widgets_values_named`` (the same values as ``widgets_values``, by widget name), leaves out an empty
    ``widgets_values``, and writes each input's display name from /object_info as its ``localized_name``."""
    originals = {node["id"]: node for node in original["nodes"]}
    for node in saved["nodes"]:
        before = originals[node["id"]]
        named = node.pop("widgets_values_named", None)
        if before["widgets_values"]:
            assert named is not None and list(named.values()) == before["widgets_values"], (node, before)
        else:
            assert not named and "widgets_values" not in node, node
            node["widgets_values"] = []
        specs = _input_specs(info.get(node["type"], {}))
        for slot, old in zip(node.get("inputs", []), before.get("inputs", []), strict=True):
            if slot.get("localized_name") != old.get("localized_name"):
                assert slot["localized_name"] == specs[slot["name"]].get("display_name"), (node["type"], slot)
                slot["localized_name"] = old["localized_name"]


def _input_specs(definition: dict) -> dict[str, dict]:
    """Input name -> its options in /object_info (display_name, tooltip...)."""
    inputs = definition.get("input", {})
    return {
        name: (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        for group in ("required", "optional")
        for name, spec in inputs.get(group, {}).items()
    }


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_editor_and_the_runner_make_the_same_prompt(editor_results, name):
    _, prompts, info, _, _ = editor_results
    editor = {
        node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompts[name].items()
    }  # without the editor's "_meta" titles
    assert editor == ui_to_api(load_example(name), info)


def test_no_page_error_concerns_the_pack(editor_results):
    """ComfyUI's own front end logs 404s for optional user files, its update check and the download sizes of the
    Missing Models dialog offline; none may name a LoRWeB node or a missing node type."""
    _, _, _, errors, _ = editor_results
    # the Missing Models dialog asks huggingface.co for each download's size: offline that fails by name resolution
    offline = "net::ERR_NAME_NOT_RESOLVED https://huggingface.co/"
    ours = [
        error for error in errors if "lorweb" in error.lower() and "/api/view?" not in error and offline not in error
    ]
    assert not ours, ours


@pytest.mark.parametrize("name", WORKFLOWS)
def test_templates_open_at_the_view_template_view_predicts(template_views, name):
    """The model of the view a template opens at (tests/template_view.py, which the pure layout test applies to the
    files) is the front end's: 1.48 and newer fit the nodes (and draw low detail below 8/14), older ones restore the
    file's view (whether that shows the whole graph, and readable, is tests/test_template_layout.py's question).
    A screenshot of each is left in the base folder."""
    views, frontend = template_views
    view, workflow = views[name], load_example(name)
    canvas = tuple(view["canvas"])
    assert canvas == (WINDOW if frontend >= (1, 35) else CANVAS_1_27), view
    x, y, width, height = view["visible"]
    visible = (x, y, x + width, y + height)
    if frontend >= (1, 48):
        assert view["scale"] == pytest.approx(fitted_scale(workflow, canvas), rel=1e-3), view
        assert contains(visible, nodes_bounds(workflow)), (view, nodes_bounds(workflow))
        assert view["lowDetail"] is (view["scale"] < READABLE_SCALE), view
    else:
        scale, predicted = restored_view(workflow, canvas)
        assert view["scale"] == pytest.approx(scale, rel=1e-3), view
        assert visible == pytest.approx(predicted, abs=0.5), view
