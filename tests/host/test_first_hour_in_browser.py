"""A new user's first hour in a fresh ComfyUI (``main.py --cpu`` and its own front end in headless Chromium):
``models/lorweb`` exists after the first start, the pack's example images go into the input folder only when asked,
the template queues with no error but "model file missing", the Missing Models dialog offers all six model files,
and with the files in place the template is accepted as it is.

The screenshots (template graph, Missing Models dialog) are left in the test's base folder for the README.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from browser import find_chromium, open_page
from comfy_host import PACK_LINK_NAME, REPO_ROOT, comfyui_version
from comfy_server import get_json, post_json, running_server
from template_view import GROUP_TITLE, nodes_bounds
from workflow_testing import FORWARD, INPUT_IMAGES, LORA_FILES, MODEL_FILES, WORKFLOWS, load_example, ui_to_api

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine: install Debian's 'chromium' (.ci/run does it where it can)"
)
#: the node types whose widget names a model file, and the ComfyUI error a missing file gives there
MODEL_LOADERS = {"UNETLoader", "DualCLIPLoader", "VAELoader", "CLIPVisionLoader", "LoRWeB_LoadBasis"}
#: the compose template with an ordinary LoRA also names a model file of the user's own (a placeholder LoRA)
LORA_LOADER = "LoRWeB_LoraSetAddLoRA"


def model_loaders(workflow: str) -> set[str]:
    """The nodes a queue-time check names for missing model files. 0.3.64 does not check the values of V3 combo
    inputs when a prompt is queued (the LoRA Set node's file list is one), so there it names the LoRA at run time."""
    checks_v3_combos = comfyui_version() >= (0, 8, 0)
    return MODEL_LOADERS | ({LORA_LOADER} if "and_lora" in workflow and checks_v3_combos else set())


def fresh_base(base: Path) -> Path:
    """A ComfyUI base folder as a user has it after ``git clone`` into custom_nodes: no models/lorweb yet."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    for folder in ("input", "output", "temp", "user"):
        (base / folder).mkdir()
    return base


def install_example_images(input_dir: Path) -> str:
    script = REPO_ROOT / "scripts" / "example_inputs.py"
    command = [sys.executable, str(script), "install", "--input-dir", str(input_dir)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def queue(url: str, name: str, info: dict) -> tuple[int, dict]:
    status, body = post_json(url + "/prompt", {"prompt": ui_to_api(load_example(name), info), "client_id": "lorweb"})
    post_json(url + "/queue", {"clear": True})
    post_json(url + "/interrupt", {})
    return status, body or {}


@pytest.fixture(scope="module")
def first_hour(tmp_path_factory):
    base = fresh_base(tmp_path_factory.mktemp("first_hour"))
    results = {"lorweb_before": (base / "models" / "lorweb").exists()}
    with running_server(base) as url:
        results["lorweb_after"] = (base / "models" / "lorweb").is_dir()
        post_json(url + "/settings/Comfy.TutorialCompleted", True)  # no first-run template browser over the canvas
        info = get_json(url + "/object_info")
        results["inputs_before"] = sorted(path.name for path in (base / "input").iterdir())
        results["install_report"] = install_example_images(base / "input")
        results["without_models"] = {name: queue(url, name, info) for name in WORKFLOWS}
        results["dialog"], results["errors"], results["frontend"] = asyncio.run(_missing_models_dialog(url, base))
        for file_name, folder in MODEL_FILES.items():
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (base / "models" / folder / file_name).write_bytes(b"")  # names only: validation lists them
        for file_name in LORA_FILES:
            (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
            (base / "models" / "loras" / file_name).write_bytes(b"")
        results["with_models"] = {name: queue(url, name, info) for name in WORKFLOWS}
        results["dialog_with_models"], _, _ = asyncio.run(_missing_models_dialog(url, base, screenshots=False))
    results["base"] = base
    return results


async def _missing_models_dialog(url: str, base: Path, screenshots: bool = True):
    """Open the forward template as the template browser does; (the offer's UI and text or None, the page errors,
    the front end's version)."""
    async with open_page(CHROMIUM, base / f"profile_{screenshots}") as page:
        frontend = await page.open_comfyui(url, "LoRWeB_EncodeAnalogy")
        await page.open_template(PACK_LINK_NAME, FORWARD, as_template_browser=True)
        found = await _missing_models_text(page)
        if found is None:
            return None, list(page.errors), frontend
        if screenshots:
            await page.screenshot(base / "missing_models_dialog.png")
            await page.evaluate("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())")
            await _show_whole_graph(page)
            await page.screenshot(base / "template_graph.png")
        return found, list(page.errors), frontend


#: the front end's ways of offering missing model files: the Missing Models dialog (front end 1.35 and older,
#: ComfyUI 0.8.0 / 0.3.64), and the error overlay's "View details" into the Errors tab's Missing Models list
#: (front end 1.48, ComfyUI 0.33; in 1.58.1 the overlay says "N issues found" and the list is in the right-hand
#: Workflow Overview panel's Issues tab)
_OLD_DIALOG = "document.querySelector('.comfy-missing-models')"
_VIEW_DETAILS = "Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() === 'View details')"


async def _missing_models_text(page) -> tuple[str, str] | None:
    """(which UI, its text) of the missing-model offer the front end shows, or None when it shows none in 15 s."""
    try:
        await page.wait_for(f"Boolean({_OLD_DIALOG} || {_VIEW_DETAILS})", timeout=15)
    except TimeoutError:
        return None
    await asyncio.sleep(1.0)
    if await page.evaluate(f"Boolean({_OLD_DIALOG})"):
        return "dialog", await page.evaluate(f"{_OLD_DIALOG}.innerText")
    await page.evaluate(f"(() => {{ {_VIEW_DETAILS}.click(); return true; }})()")
    await asyncio.sleep(2.0)
    text = await page.evaluate("document.body.innerText")
    if "Missing Models" not in text:
        return None  # other errors only
    return "errors tab", text[text.index("Missing Models") :]


async def _show_whole_graph(page) -> None:
    """A viewport and zoom at which the whole template, its groups' titles included, is drawn with its text (not the
    low-detail mode), centred."""
    width, height, scale = 1900, 1150, 0.74
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    await page.send("Emulation.setDeviceMetricsOverride", metrics)
    await asyncio.sleep(1.0)
    x0, y0, x1, y1 = nodes_bounds(load_example(FORWARD))
    y0 -= GROUP_TITLE + 10  # the groups' title bars above the nodes
    offset = [width / scale / 2 - (x0 + x1) / 2, height / scale / 2 - (y0 + y1) / 2]
    await page.evaluate(
        f"(() => {{ const ds = window.app.canvas.ds; ds.scale = {scale}; ds.offset = {json.dumps(offset)};"
        " window.app.canvas.setDirty(true, true); })()"
    )
    await asyncio.sleep(1.5)


def test_models_lorweb_exists_after_the_first_start(first_hour):
    assert not first_hour["lorweb_before"] and first_hour["lorweb_after"]


def test_example_images_reach_the_input_folder_only_when_asked(first_hour):
    assert not set(first_hour["inputs_before"]) & set(INPUT_IMAGES)  # ComfyUI itself makes input/3d
    report = first_hour["install_report"]
    for name in INPUT_IMAGES:
        assert f"copied {name}" in report
        assert (first_hour["base"] / "input" / name).read_bytes() == (REPO_ROOT / "example_inputs" / name).read_bytes()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_before_the_model_files_only_model_files_are_missing(first_hour, name):
    status, body = first_hour["without_models"][name]
    assert status == 400
    errors = body["node_errors"]
    assert errors, body
    text = json.dumps(body)
    assert "Invalid image file" not in text and "LoadImage" not in {e["class_type"] for e in errors.values()}
    assert {error["class_type"] for error in errors.values()} == model_loaders(name)
    for error in errors.values():
        kinds = {entry["type"] for entry in error["errors"]}
        if error["class_type"] == "LoRWeB_LoadBasis":
            # each problem once: one message for the missing basis, not one per input of the node
            assert len(error["errors"]) == 1 and kinds == {"custom_validation_failed"}, error
            assert "lorweb_model.safetensors' was not found in the lorweb model folder" in error["errors"][0]["details"]
        else:
            assert kinds == {"value_not_in_list"}, error


@pytest.mark.parametrize("name", WORKFLOWS)
def test_with_the_model_files_in_place_the_template_is_accepted(first_hour, name):
    status, body = first_hour["with_models"][name]
    assert status == 200 and not body.get("node_errors"), body


def test_the_missing_models_dialog_offers_all_six_files(first_hour):
    """Front ends 1.35 and older (ComfyUI 0.8.0 / 0.3.64): the Missing Models dialog lists "folder / file" with
    Download. 1.48 (ComfyUI 0.33) and 1.58: the error overlay's View details opens the errors list (Errors tab; in
    1.58 the Issues tab), whose Missing Models list has each file, its folder and a Download button."""
    found, frontend = first_hour["dialog"], first_hour["frontend"]
    assert found is not None, f"no missing-model offer; page errors: {first_hour['errors']}"
    ui, text = found
    assert ui == ("errors tab" if frontend >= (1, 48) else "dialog"), (frontend, ui, text)
    for file_name, folder in MODEL_FILES.items():
        if ui == "dialog":
            assert f"{folder} / {file_name}" in text, (file_name, text)
        else:
            assert f"{file_name}\n{folder}\nDownload" in text, (file_name, text)
    for refusal in ("Invalid directory", "Download not allowed", "Only allowed suffixes"):
        assert refusal not in text, text
    assert (first_hour["base"] / "template_graph.png").stat().st_size > 10_000


def test_no_dialog_once_the_files_are_there(first_hour):
    assert first_hour["dialog_with_models"] is None
