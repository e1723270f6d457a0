"""Host tests: the pack inside a real ComfyUI, given by COMFYUI_ROOT (source tree) and COMFYUI_PYTHON (its Python).

* No COMFYUI_ROOT: every host test is skipped, with the reason printed (``-rs``).
* COMFYUI_ROOT set and this is not ComfyUI's Python: the host tests are handed, as one test, to
  ``$COMFYUI_PYTHON -m pytest tests/host`` (ComfyUI needs its own torch/torchvision), so one command runs all.
* Inside ComfyUI's Python: ComfyUI is started in-process with a temporary ``--base-directory`` whose
  ``custom_nodes/`` links to this checkout (as a user installs it) and to a test-only loader pack.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from comfy_host import (
    COMFYUI_ROOT,
    DELEGATE_TEST,
    GGUF_PACK_NAME,
    HOST_DIR,
    HOST_SUMMARY,
    PACK_LINK_NAME,
    REPO_ROOT,
    SUPPORT_LINK_NAME,
    ComfyHost,
    comfy_harness,
    inside_comfyui_python,
)
from host_graphs import GOLDEN_FLUX
from lorweb_testing import GOLDEN, GOLDEN_CKPT, GOLDEN_VARIANTS, golden_tensors, write_ai_toolkit_config
from PIL import Image

import lorweb_ops


def pytest_collection_modifyitems(config, items):
    host_items = [item for item in items if Path(str(item.fspath)).is_relative_to(HOST_DIR)]
    if not host_items:
        return
    if not COMFYUI_ROOT:
        skip = pytest.mark.skip(
            reason="COMFYUI_ROOT is not set: host tests need a real ComfyUI checkout "
            "(set COMFYUI_ROOT and COMFYUI_PYTHON, see docs/developers.md, 'Tests')"
        )
        for item in host_items:
            item.add_marker(skip)
        return
    delegating = not inside_comfyui_python()
    keep = [item for item in host_items if item.nodeid.endswith(DELEGATE_TEST) == delegating]
    dropped = [item for item in host_items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from browser import FRONTEND_VERSIONS  # filled by the browser tests that ran in this process
    from comfy_server import FRONTEND_ROOT

    if FRONTEND_VERSIONS:
        source = f"LORWEB_FRONTEND_ROOT={FRONTEND_ROOT}" if FRONTEND_ROOT else "the ComfyUI's own"
        versions = ", ".join(sorted(FRONTEND_VERSIONS))
        terminalreporter.write_line(f"front end in the browser tests: {versions} ({source})")
    for line in config.stash.get(HOST_SUMMARY, []):
        terminalreporter.write_line(line)


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)


@pytest.fixture(scope="session")
def host(tmp_path_factory) -> ComfyHost:
    root = Path(COMFYUI_ROOT).resolve()
    if not (root / "comfy" / "model_patcher.py").is_file():
        pytest.fail(f"COMFYUI_ROOT={COMFYUI_ROOT} is not a ComfyUI source tree (no comfy/model_patcher.py)")
    base = tmp_path_factory.mktemp("comfy_base")
    _link(REPO_ROOT, base / "custom_nodes" / PACK_LINK_NAME)
    _link(HOST_DIR / "support_pack", base / "custom_nodes" / SUPPORT_LINK_NAME)
    # city96/ComfyUI-GGUF, installed beside the pack the way users install it (the GGUF tests need it)
    gguf_pack = root / "custom_nodes" / GGUF_PACK_NAME
    if gguf_pack.is_dir():
        _link(gguf_pack, base / "custom_nodes" / GGUF_PACK_NAME)
    folders = ("models/lorweb", "models/clip_vision", "models/loras", "models/diffusion_models", "input", "output")
    for folder in (*folders, "temp", "user"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    try:
        comfy_harness.start_comfyui(root, cpu=True, base_directory=base)
        host = ComfyHost(base)
        # the custom_nodes folder of the base holds just the two links: the pack as a user installs it, and support
        comfy_harness.load_nodes(host.server, custom_nodes=True)
    except comfy_harness.HarnessError as error:
        pytest.fail(str(error))
    for node_id in ("LoRWeB_LoadBasis", "LoRWeBTest_TinyFluxLoader"):
        if node_id not in host.nodes.NODE_CLASS_MAPPINGS:
            pytest.fail(f"{node_id} did not load into ComfyUI; see the import error in the log above")
    return host


@pytest.fixture(scope="module")
def golden():
    return golden_tensors()


@pytest.fixture(scope="module")
def files(host):
    """The golden basis with one config yaml per variant, a tiny Flux, and the golden analogy's images."""
    lorweb = host.models / "lorweb"
    shutil.copy(GOLDEN_CKPT, lorweb / "golden.safetensors")
    for name, kwargs in GOLDEN_VARIANTS.items():
        write_ai_toolkit_config(lorweb / f"{name}.yaml", **kwargs)
    flux_path = host.base / "tiny_flux.safetensors"
    original = host.support().write_tiny_flux(str(flux_path), **GOLDEN_FLUX)
    tiles = lorweb_ops.grid_quadrants(Image.open(GOLDEN / "grid_square.png").convert("RGB"))
    for name, tile in tiles.items():
        tile.save(host.input / f"{name}.png")
    Image.new("RGB", (8, 8), "white").save(host.input / "tiny.png")
    return {"flux": str(flux_path), "original": original}
