"""The front-end extension in a real browser: after a prompt runs, the Apply node shows the mix chart."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from browser import find_chromium, open_page
from comfy_host import HOST_DIR, SUPPORT_LINK_NAME
from comfy_server import make_base, post_json, running_server
from host_graphs import GOLDEN_FLUX
from lorweb_testing import GOLDEN_CKPT, GOLDEN_TENSORS, write_safetensors
from safetensors.torch import load_file

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine: install Debian's 'chromium' (.ci/run does it where it can)"
)


@pytest.fixture(scope="module")
def server_with_tiny_flux(host, tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("browser_base"), {SUPPORT_LINK_NAME: HOST_DIR / "support_pack"})
    shutil.copy(GOLDEN_CKPT, base / "models" / "lorweb" / "golden.safetensors")
    write_safetensors(
        base / "models" / "lorweb" / "hostile.safetensors", load_file(str(GOLDEN_CKPT)), metadata=HOSTILE_METADATA
    )
    flux = base / "tiny_flux.safetensors"
    host.support().write_tiny_flux(str(flux), **GOLDEN_FLUX)
    with running_server(base) as url:
        # a returning user: no first-run template browser over the canvas
        post_json(url + "/settings/Comfy.TutorialCompleted", True)
        yield url, base, flux


# metadata a stranger's file could carry: it must show as text, never run
HOSTILE_METADATA = {
    "name": '<img src=x onerror="window.__lorwebInjected=1">',
    "software": "<script>window.__lorwebInjected=2</script><b>bold</b>",
}


def mix_prompt(flux_path: str, basis_name: str = "golden.safetensors") -> dict:
    return {
        "1": {"class_type": "LoRWeBTest_TinyFluxLoader", "inputs": {"path": flux_path}},
        "2": {"class_type": "LoRWeB_LoadBasis", "inputs": {"basis_name": basis_name, "config": "auto"}},
        "3": {
            "class_type": "LoRWeBTest_AnalogyFromQuery",
            "inputs": {"path": str(GOLDEN_TENSORS), "key": "query_square", "query_mode": "cat-aa'b"},
        },
        "4": {
            "class_type": "LoRWeB_ApplyBasis",
            "inputs": {"model": ["1", 0], "basis": ["2", 0], "analogy": ["3", 0], "strength": 1.0},
        },
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 2]}},
    }


async def run_in_browser(url: str, prompt: dict, profile, screenshot) -> tuple[str, list[str]]:
    """Load the prompt into the editor, queue it, wait for the chart; return its caption and every page error.

    Errors are attributed by their text: ComfyUI's own front-end logs 404s for optional user files on a fresh
    profile, fails to reach its update server offline, and (frontend 1.27) throws once while loading settings.
    Those are not this pack's; errors naming the pack's extension or LoRWeB are."""
    async with open_page(CHROMIUM, profile) as page:
        await page.send("Page.navigate", {"url": url})
        await page.wait_for(
            "window.app && window.app.graph && window.LiteGraph"
            " && window.LiteGraph.registered_node_types['LoRWeB_ApplyBasis']",
            timeout=90,
        )
        await page.evaluate(f"window.app.loadApiJson({json.dumps(prompt)}, 'lorweb-mix-test')")
        await page.evaluate("window.app.queuePrompt(0, 1)")
        await page.wait_for(
            "document.querySelector('.lorweb-mix-caption')"
            " && document.querySelector('.lorweb-mix-caption').textContent.includes('entropy')",
            timeout=120,
        )
        # for the screenshot: close the welcome dialog and bring the Apply node into view
        await page.evaluate(
            "document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());"
            "const node = window.app.graph.getNodeById(4);"
            "if (node && window.app.canvas.centerOnNode) window.app.canvas.centerOnNode(node);"
            "window.app.canvas.setDirty(true, true)"
        )
        await asyncio.sleep(1.0)
        await page.screenshot(screenshot)
        caption = await page.evaluate("document.querySelector('.lorweb-mix-caption').textContent")
        basis_info = await page.evaluate(
            "({text: document.querySelector('.lorweb-basis-info')?.textContent,"
            "  elements: document.querySelectorAll('.lorweb-basis-info *').length,"
            "  injected: window.__lorwebInjected === undefined ? null : window.__lorwebInjected})"
        )
        return caption, basis_info, list(page.errors)


def test_mix_chart_appears_after_running_a_prompt(server_with_tiny_flux, tmp_path):
    url, base, flux = server_with_tiny_flux
    caption, _, errors = asyncio.run(
        run_in_browser(url, mix_prompt(str(flux)), tmp_path / "profile", base / "mix_chart.png")
    )
    assert "20 layers × 3 LoRAs" in caption and "entropy" in caption and "dominant #" in caption
    ours = [error for error in errors if "lorweb" in error.lower()]
    assert not ours, ours


def test_file_metadata_is_shown_as_text(server_with_tiny_flux, tmp_path):
    url, base, flux = server_with_tiny_flux
    _, info, errors = asyncio.run(
        run_in_browser(url, mix_prompt(str(flux), "hostile.safetensors"), tmp_path / "profile", base / "basis_info.png")
    )
    assert HOSTILE_METADATA["name"] in info["text"] and HOSTILE_METADATA["software"] in info["text"]
    assert info["elements"] == 0 and info["injected"] is None
    assert "hostile.safetensors: 20 layers, K=3, rank 2, float16" in info["text"]
    assert not [error for error in errors if "lorweb" in error.lower()]


def test_front_end_loaded_the_extension_once(server_with_tiny_flux, tmp_path):
    url, _, _ = server_with_tiny_flux
    names = asyncio.run(_extension_names(url, tmp_path / "profile"))
    assert names.count("lorweb.mixChart") == 1 and names.count("lorweb.basisInfo") == 1


async def _extension_names(url, profile) -> list[str]:
    async with open_page(CHROMIUM, profile) as page:
        await page.send("Page.navigate", {"url": url})
        await page.wait_for("window.app && window.app.extensions && window.app.extensions.length", timeout=90)
        return await page.evaluate("window.app.extensions.map(e => e.name)")
