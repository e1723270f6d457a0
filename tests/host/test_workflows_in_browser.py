"""The example workflows in ComfyUI's real front end (headless Chromium): served as templates, loaded by the editor,
saved back unchanged, and turned by the editor into the same API prompt as the headless runner's converter."""

from __future__ import annotations

import asyncio
import json

import pytest
from browser import find_chromium, open_page
from comfy_host import PACK_LINK_NAME, comfyui_version
from comfy_server import get_json, make_base, post_json, running_server
from workflow_testing import WORKFLOWS, load_example, ui_to_api

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine: install Debian's 'chromium' (.ci/run does it where it can)"
)
#: top-level keys the editor adds or refreshes on every save
VOLATILE_KEYS = {"id", "revision", "extra"}


@pytest.fixture(scope="module")
def editor_results(tmp_path_factory):
    """For each workflow: (the editor's save of it, the editor's API prompt), plus /object_info and page errors."""
    base = make_base(tmp_path_factory.mktemp("editor_base"))
    with running_server(base) as url:
        post_json(url + "/settings/Comfy.TutorialCompleted", True)  # no first-run dialog over the canvas
        info = get_json(url + "/object_info")
        saved, prompts, errors = asyncio.run(_load_in_editor(url, tmp_path_factory.mktemp("profile")))
    return saved, prompts, info, errors


async def _load_in_editor(url: str, profile) -> tuple[dict, dict, list[str]]:
    saved, prompts = {}, {}
    async with open_page(CHROMIUM, profile) as page:
        await page.send("Page.navigate", {"url": url})
        await page.wait_for(
            "window.app && window.app.graph && window.LiteGraph"
            " && window.LiteGraph.registered_node_types['LoRWeB_ApplyBasis']",
            timeout=90,
        )
        for name in WORKFLOWS:
            # fetched from the template route, as the template browser does
            template = f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json"
            await page.evaluate(
                f"fetch({json.dumps(template)}).then(r => r.json())"
                f".then(w => window.app.loadGraphData(w, true, true, {json.dumps(name)}))"
            )
            saved[name] = json.loads(await page.evaluate("JSON.stringify(window.app.graph.serialize())"))
            prompts[name] = json.loads(
                await page.evaluate("window.app.graphToPrompt().then(p => JSON.stringify(p.output))")
            )
        return saved, prompts, list(page.errors)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_editor_saves_the_workflow_unchanged(editor_results, name):
    saved, _, _, _ = editor_results
    original = load_example(name)
    if comfyui_version() >= (0, 33, 0):
        _expect_newer_editor_changes(saved[name], original)
    assert set(saved[name]) - VOLATILE_KEYS == set(original) - VOLATILE_KEYS
    for key in set(original) - VOLATILE_KEYS:
        assert saved[name][key] == original[key], key


def _expect_newer_editor_changes(saved: dict, original: dict) -> None:
    """What 0.33's editor (front end 1.48) changes in a template saved for every version, asserted exactly; then the
    rest is compared as saved. Its SaveImage and PreviewImage have an IMAGE output, which it adds to the templates'
    output-less nodes; it leaves out a group's font size when it is the default, 24."""
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


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_editor_and_the_runner_make_the_same_prompt(editor_results, name):
    _, prompts, info, _ = editor_results
    editor = {
        node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompts[name].items()
    }  # without the editor's "_meta" titles
    assert editor == ui_to_api(load_example(name), info)


def test_no_page_error_concerns_the_pack(editor_results):
    """ComfyUI's own front end logs 404s for optional user files, its update check and the download sizes of the
    Missing Models dialog offline; none may name a LoRWeB node or a missing node type."""
    _, _, _, errors = editor_results
    # the Missing Models dialog asks huggingface.co for each download's size: offline that fails by name resolution
    offline = "net::ERR_NAME_NOT_RESOLVED https://huggingface.co/"
    ours = [
        error for error in errors if "lorweb" in error.lower() and "/api/view?" not in error and offline not in error
    ]
    assert not ours, ours
