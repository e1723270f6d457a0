"""ComfyUI started inside this Python process: no server, no browser, ComfyUI's own executor.

One start-up for everything that runs the pack outside ComfyUI's ``main.py``: the headless runner
(``run_analogy.py``), the benchmarks and the host tests. Use it with the Python that runs ComfyUI::

    server = start_comfyui(root, cpu=True)
    stand_in = HeadlessServer()
    load_nodes(stand_in, packs={PACK_DIR: "LoRWeB_LoadBasis"})
    outputs = run_prompt(make_executor(stand_in), prompt)

Works with ComfyUI 0.3.64, 0.8.0 and 0.33. Nothing here imports the pack; ComfyUI is imported only by the functions.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import itertools
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

PACK_DIR = Path(__file__).absolute().parents[1]
PACK_NODE = "LoRWeB_LoadBasis"  # a node every version of the pack registers


class HarnessError(RuntimeError):
    """ComfyUI could not be started or a node pack did not load; the message says what to do."""


def wants_cpu(requested: bool) -> bool:
    """True when asked for, or when torch sees no GPU (CUDA, ROCm, MPS, XPU)."""
    if requested:
        return True
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    has_gpu = torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())
    return not has_gpu


def start_comfyui(
    root: Path, *, cpu: bool, extra_args: Sequence[str] = (), base_directory: Path | None = None
) -> ModuleType:
    """Import ComfyUI from ``root`` with its command line parsed as ``main.py`` would; returns its ``server`` module.

    ``extra_args`` are ComfyUI options (``--lowvram``, ``--extra-model-paths-config``); ``base_directory`` is
    ``--base-directory`` (models, custom_nodes, input and output under it).
    """
    root = Path(root)
    if not (root / "main.py").is_file() or not (root / "comfy" / "model_patcher.py").is_file():
        raise HarnessError(f"{root} is not a ComfyUI folder (no main.py / comfy/model_patcher.py)")
    sys.path.insert(0, str(root))  # first, as main.py runs: ComfyUI's own modules win every name
    argv = ["main.py", *(["--cpu"] if cpu else []), *extra_args]
    if base_directory is not None:
        argv += ["--base-directory", str(base_directory)]
    saved_argv = sys.argv
    sys.argv = argv
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        # Order matters: the arguments (--cpu) are parsed before comfy.model_management loads, and utils/ is imported
        # before nodes.py puts comfy/ first on sys.path (where comfy/utils.py would shadow the utils package).
        for module in ("comfy.cli_args", "utils.extra_config", "utils.install_util"):
            importlib.import_module(module)
        return importlib.import_module("server")
    finally:
        sys.argv = saved_argv


def apply_model_paths(root: Path) -> None:
    """extra_model_paths.yaml beside main.py and --extra-model-paths-config, as main.py applies them."""
    import utils.extra_config
    from comfy.cli_args import args

    configs = [root / "extra_model_paths.yaml"] if (root / "extra_model_paths.yaml").is_file() else []
    configs += [Path(p) for p in itertools.chain(*(args.extra_model_paths_config or []))]
    for config in configs:
        utils.extra_config.load_extra_path_config(str(config))


def use_private_folders(work: Path) -> None:
    """LoadImage reads, SaveImage / PreviewImage write under ``work``: ComfyUI's own folders stay untouched."""
    import folder_paths

    for name, setter in (
        ("input", folder_paths.set_input_directory),
        ("output", folder_paths.set_output_directory),
        ("temp", folder_paths.set_temp_directory),
    ):
        (work / name).mkdir(parents=True, exist_ok=True)
        setter(str(work / name))


class HeadlessServer:
    """What the executor and the progress hooks touch of ComfyUI's PromptServer; keeps the messages it is sent.

    Subclasses override ``send_sync`` (executor events) and ``step`` (sampler steps) to show progress.
    """

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.sockets_metadata = {}
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def step(self, value, total, preview_image=None, prompt_id=None, node_id=None) -> None:
        """ComfyUI's global progress hook (set by ``hook_progress``); nothing to show here."""

    def queue_updated(self) -> None:
        pass


def hook_progress(stand_in: HeadlessServer) -> None:
    """Sampler steps go to ``stand_in.step`` instead of ComfyUI's own console bar."""
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    comfy.utils.set_progress_bar_global_hook(stand_in.step)


def load_nodes(
    stand_in: HeadlessServer, *, custom_nodes: bool = False, packs: Mapping[Path, str] | None = None
) -> ModuleType:
    """ComfyUI's built-in nodes, the packs in its custom_nodes folders when ``custom_nodes``, then each pack of
    ``packs`` (folder -> a node id it registers) whose node is not loaded yet. Returns ComfyUI's ``nodes``."""
    import nodes
    import server

    server.PromptServer.instance = stand_in
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
    for folder, node_id in (packs or {}).items():
        if node_id not in nodes.NODE_CLASS_MAPPINGS:
            asyncio.run(nodes.load_custom_node(str(folder)))
        if node_id not in nodes.NODE_CLASS_MAPPINGS:
            raise HarnessError(f"the node pack in {folder} did not load into ComfyUI (see the messages above)")
    return nodes


class ClassicCacheLimits(dict):
    """The cache limits ``main.py --cache-classic`` hands the executor: 0 for every one (no LRU size, no RAM
    headroom). A mapping, not a list of keys, so a ComfyUI that reads one more limit gets main.py's 0 for it too
    (0.8.0 reads "lru" and "ram"; 0.33 also "ram_inactive")."""

    def __missing__(self, key: str) -> int:
        return 0


def make_executor(stand_in: HeadlessServer):
    """ComfyUI's PromptExecutor as ``main.py --cache-classic`` builds it (models stay loaded between prompts).

    ComfyUI 0.8.0 and newer take ``cache_args``; 0.3.64 took ``cache_size`` (main.py passes ``--cache-lru``, 0).
    """
    import execution

    cache = execution.CacheType.CLASSIC
    try:
        return execution.PromptExecutor(stand_in, cache_type=cache, cache_args=ClassicCacheLimits())
    except TypeError as error:
        if "cache_args" not in str(error):
            raise
        return execution.PromptExecutor(stand_in, cache_type=cache, cache_size=0)  # 0.3.64


class PromptRejected(Exception):
    """ComfyUI's validation refused the prompt (what the queue would answer with HTTP 400)."""

    def __init__(self, error, node_errors):
        super().__init__(f"{error}\n{node_errors}")
        self.error, self.node_errors = error, node_errors

    def describe(self, prompt: Mapping) -> str:
        """ComfyUI's messages, one line per problem, naming the node types."""
        error = self.error
        lines = [error.get("message", str(error)) if isinstance(error, dict) else str(error)]
        for node_id, problem in (self.node_errors or {}).items():
            node_type = prompt.get(node_id, {}).get("class_type", node_id)
            for item in problem.get("errors", []):
                lines.append(f"  {node_type}: {item.get('message')}: {item.get('details')}")
        return "\n".join(lines)


class ExecutionFailed(Exception):
    """A node raised while the prompt ran; ``error`` is ComfyUI's execution_error message."""

    def __init__(self, error):
        message = error.get("exception_message", error) if isinstance(error, dict) else error
        super().__init__(message)
        self.error = error

    @property
    def node_type(self) -> str:
        return self.error.get("node_type", "a node") if isinstance(self.error, dict) else "a node"


def validate(prompt: dict) -> tuple:
    """ComfyUI's ``validate_prompt``: (valid, error, outputs to execute, node errors)."""
    import execution

    return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))


def run_prompt(executor, prompt: dict, extra_data: dict | None = None) -> dict:
    """Validate and execute one API prompt; returns the outputs' UI data.

    Raises PromptRejected or ExecutionFailed with ComfyUI's own messages. The executor runs a copy, as the server
    runs the prompt it decoded from each request: ComfyUI stores its re-run fingerprints (``is_changed``) in the
    prompt it is given, and a reused dict would carry the first run's fingerprints into every later run.
    """
    prompt = copy.deepcopy(prompt)
    valid, error, outputs, node_errors = validate(prompt)
    if not valid:
        raise PromptRejected(error, node_errors)
    executor.execute(prompt, str(uuid.uuid4()), extra_data=extra_data or {}, execute_outputs=outputs)
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        raise ExecutionFailed(errors[0] if errors else executor.status_messages)
    return executor.history_result.get("outputs", {})
