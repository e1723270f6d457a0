"""Host tests: the pack inside a real ComfyUI, given by COMFYUI_ROOT (source tree) and COMFYUI_PYTHON (its Python).

* No COMFYUI_ROOT: every host test is skipped, with the reason printed (``-rs``).
* COMFYUI_ROOT set and this is not ComfyUI's Python: the host tests are handed, as one test, to
  ``$COMFYUI_PYTHON -m pytest tests/host`` (ComfyUI needs its own torch/torchvision), so one command runs all.
* Inside ComfyUI's Python: ComfyUI is started in-process with a temporary ``--base-directory`` whose
  ``custom_nodes/`` links to this checkout (as a user installs it) and to a test-only loader pack.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
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
    inside_comfyui_python,
)


def pytest_collection_modifyitems(config, items):
    host_items = [item for item in items if Path(str(item.fspath)).is_relative_to(HOST_DIR)]
    if not host_items:
        return
    if not COMFYUI_ROOT:
        skip = pytest.mark.skip(
            reason="COMFYUI_ROOT is not set: host tests need a real ComfyUI checkout "
            "(set COMFYUI_ROOT and COMFYUI_PYTHON, see README 'Tests')"
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
    sys.path.insert(0, str(root))
    saved_argv = sys.argv
    sys.argv = ["main.py", "--cpu", "--base-directory", str(base)]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        # Order matters: args are parsed (--cpu) before model_management loads, and utils/ is imported before
        # nodes.py puts comfy/ first on sys.path (where comfy/utils.py would shadow it).
        for module in ("comfy.cli_args", "utils.extra_config", "utils.install_util"):
            importlib.import_module(module)
        server = importlib.import_module("server")
    finally:
        sys.argv = saved_argv
    host = ComfyHost(base)
    server.PromptServer.instance = host.server
    asyncio.run(host.nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    loaded = host.nodes.NODE_CLASS_MAPPINGS
    for node_id in ("LoRWeB_LoadBasis", "LoRWeBTest_TinyFluxLoader"):
        if node_id not in loaded:
            pytest.fail(f"{node_id} did not load into ComfyUI; see the import error in the log above")
    return host
