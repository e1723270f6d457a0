"""A ComfyUI started in this process with the pack installed (used by the host tests' fixtures)."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HOST_DIR = Path(__file__).resolve().parent
REPO_ROOT = HOST_DIR.parents[1]
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


def inside_comfyui_python() -> bool:
    return not COMFYUI_PYTHON or _prefix_of(COMFYUI_PYTHON) == os.path.realpath(sys.prefix)


class _HeadlessServer:
    """What PromptExecutor and the progress handlers touch of ComfyUI's PromptServer."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class ComfyHost:
    """A ComfyUI started in this process with the pack installed; runs API-format prompts."""

    def __init__(self, base: Path):
        self.base = base
        self.models = base / "models"
        self.input = base / "input"
        self.output = base / "output"
        self.server = _HeadlessServer()
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
        import inspect

        params = inspect.signature(self.execution.PromptExecutor).parameters
        cache = self.execution.CacheType.CLASSIC
        if "cache_args" in params:  # 0.8.0
            return self.execution.PromptExecutor(self.server, cache_type=cache, cache_args={"lru": 0, "ram": 0})
        return self.execution.PromptExecutor(self.server, cache_type=cache)

    def validate(self, prompt: dict):
        return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict, executor=None):
        """Validate and execute; returns (executor, outputs ui). Raises with ComfyUI's own message on failure."""
        valid = self.validate(prompt)
        if not valid[0]:
            raise PromptRejected(valid[1], valid[3])
        executor = executor or self.executor()
        executor.execute(prompt, str(uuid.uuid4()), extra_data={}, execute_outputs=valid[2])
        if not executor.success:
            errors = [data for event, data in executor.status_messages if event == "execution_error"]
            raise ExecutionFailed(errors[0] if errors else executor.status_messages)
        return executor, executor.history_result.get("outputs", {})


class PromptRejected(Exception):
    def __init__(self, error, node_errors):
        super().__init__(f"{error}\n{node_errors}")
        self.error, self.node_errors = error, node_errors


class ExecutionFailed(Exception):
    def __init__(self, error):
        message = error.get("exception_message", error) if isinstance(error, dict) else error
        super().__init__(message)
        self.error = error
