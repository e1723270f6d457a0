"""A ComfyUI started in this process with the pack installed (used by the host tests' fixtures)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HOST_DIR = Path(__file__).resolve().parent
REPO_ROOT = HOST_DIR.parents[1]
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))

import comfy_harness  # noqa: E402  (scripts/: the in-process ComfyUI the runner and the benchmarks use too)
from comfy_harness import ExecutionFailed, PromptRejected  # noqa: E402, F401  (raised by ComfyHost.run)

PACK_LINK_NAME = "comfyui-lorweb"
SUPPORT_LINK_NAME = "lorweb_test_support"
GGUF_PACK_NAME = "ComfyUI-GGUF"  # city96/ComfyUI-GGUF in $COMFYUI_ROOT/custom_nodes
COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON")
DELEGATE_TEST = "test_delegate.py::test_host_suite_in_comfyui_python"
HOST_SUMMARY = pytest.StashKey[list]()


@functools.cache
def _prefix_of(python: str) -> str:
    result = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True)
    return os.path.realpath(result.stdout.strip())


def comfyui_version() -> tuple[int, ...]:
    """The version of the ComfyUI under test (``$COMFYUI_ROOT/comfyui_version.py``), e.g. (0, 33, 0)."""
    text = (Path(COMFYUI_ROOT) / "comfyui_version.py").read_text()
    version = re.search(r'__version__\s*=\s*"([0-9.]+)"', text).group(1)
    return tuple(int(part) for part in version.split(".")[:3])


def inside_comfyui_python() -> bool:
    return not COMFYUI_PYTHON or _prefix_of(COMFYUI_PYTHON) == os.path.realpath(sys.prefix)


class ComfyHost:
    """A ComfyUI started in this process with the pack installed; runs API-format prompts."""

    def __init__(self, base: Path):
        self.base = base
        self.models = base / "models"
        self.input = base / "input"
        self.output = base / "output"
        self.server = comfy_harness.HeadlessServer()
        import execution
        import nodes

        self.nodes, self.execution = nodes, execution

    def support(self):
        """The test-only loader pack module, as ComfyUI imported it."""
        return next(
            module
            for name, module in sys.modules.items()
            if name.replace("\\", "/").endswith("custom_nodes/" + SUPPORT_LINK_NAME)
        )

    def executor(self):
        return comfy_harness.make_executor(self.server)

    def validate(self, prompt: dict):
        return comfy_harness.validate(prompt)

    def run(self, prompt: dict, executor=None):
        """Validate and execute; returns (executor, outputs ui). Raises with ComfyUI's own message on failure."""
        executor = executor or self.executor()
        return executor, comfy_harness.run_prompt(executor, prompt)
