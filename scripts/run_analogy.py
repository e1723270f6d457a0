#!/usr/bin/env python
"""Run a LoRWeB visual analogy (a : a′ :: b : b′) headless, through ComfyUI's own executor, in this process.

Run it with the Python that runs ComfyUI. It loads the pack's example workflow (UI format), converts it to an
API prompt with the node definitions of that ComfyUI, sets the images, prompt and model files, and executes it.
b may be one image or a folder (every image in it is edited; models stay loaded between images).

    python custom_nodes/comfyui-lorweb/scripts/run_analogy.py --a a.png --a-prime a2.png --b photos/ \\
        --prompt "Turn the photo into a pencil sketch." --out results/

    python custom_nodes/comfyui-lorweb/scripts/run_analogy.py --demo --out /tmp/lorweb-demo

``--demo`` writes small random weights of every kind the graph needs (no downloads) to a cache folder and runs the
same kind of graph on the CPU at 128x128 in 4 steps: a check that the install works, not a picture.
ComfyUI's own input, output and model folders are never written: images go through a private temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).absolute().parent
PACK_DIR = SCRIPTS.parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from lorweb_workflow import MODE_BYPASS, load_workflow, node_definition, ui_to_api  # noqa: E402

WORKFLOW = PACK_DIR / "example_workflows" / "lorweb_analogy_flux_kontext.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHART_NODE, GRID_NODE = "lorweb_chart", "lorweb_grid"
DEMO_PROMPT = "Make it blue."
DEMO_STEPS = 4


# ----------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--comfyui",
        type=Path,
        help="ComfyUI folder (default: the ComfyUI this pack is installed in, i.e. two levels above the pack)",
    )
    parser.add_argument("--a", type=Path, help="the example before the edit")
    parser.add_argument("--a-prime", type=Path, help="the example after the edit")
    parser.add_argument("--b", type=Path, help="the image to edit, or a folder: every image in it")
    parser.add_argument("--prompt", help="the edit instruction (what turns a into a′)")
    parser.add_argument(
        "--out", type=Path, default=Path("lorweb_output"), help="where b′ is written (default: ./lorweb_output)"
    )
    parser.add_argument("--reverse", action="store_true", help="reverse analogy: apply a′ → a to b")
    parser.add_argument("--seed", type=int, help="sampler seed (workflow: 50)")
    parser.add_argument("--steps", type=int, help="sampling steps (workflow: 28; demo: 4)")
    parser.add_argument("--save-grid", action="store_true", help="also write the generated 2x2 grid")
    parser.add_argument("--save-chart", action="store_true", help="also write the basis mix chart")
    models = parser.add_argument_group("model files (names inside ComfyUI's model folders; default: the workflow's)")
    models.add_argument("--unet", help="models/diffusion_models, e.g. flux1-dev-kontext_fp8_scaled.safetensors")
    models.add_argument("--clip-l", help="models/text_encoders, e.g. clip_l.safetensors")
    models.add_argument("--t5", help="models/text_encoders, e.g. t5xxl_fp8_e4m3fn_scaled.safetensors")
    models.add_argument("--vae", help="models/vae, e.g. ae.safetensors")
    models.add_argument("--clip-vision", help="models/clip_vision, e.g. clip-vit-large-patch14.safetensors")
    models.add_argument("--basis", help="models/lorweb, e.g. lorweb_model.safetensors")
    models.add_argument("--basis-config", help="models/lorweb yaml, or 'auto' (the config.yaml beside the basis)")
    parser.add_argument(
        "--workflow",
        type=Path,
        default=WORKFLOW,
        help="UI workflow to run (default: the pack's example); it must have the same node kinds",
    )
    parser.add_argument("--demo", action="store_true", help="random small weights, CPU, 128x128, 4 steps")
    parser.add_argument("--demo-cache", type=Path, help="folder for the demo weights (default ~/.cache/lorweb-demo)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (automatic without a GPU and in --demo)")
    parser.add_argument("--comfy-args", default="", help="more ComfyUI command-line options, e.g. '--lowvram'")
    args = parser.parse_args(argv)
    if not args.demo:
        missing = [name for name in ("a", "a_prime", "b", "prompt") if getattr(args, name) is None]
        if missing:
            parser.error("needs " + ", ".join("--" + name.replace("_", "-") for name in missing) + " (or --demo)")
    # fail before the slow ComfyUI start-up
    for name in ("a", "a_prime"):
        if getattr(args, name) is not None and not getattr(args, name).is_file():
            parser.error(f"--{name.replace('_', '-')}: {getattr(args, name)} is not a file")
    if args.b is not None and not args.b.exists():
        parser.error(f"--b: {args.b} does not exist")
    if not args.workflow.is_file():
        parser.error(f"--workflow: {args.workflow} is not a file")
    return args


def default_comfyui() -> Path | None:
    """ComfyUI/custom_nodes/<pack>/scripts/run_analogy.py -> ComfyUI (the path as installed, links kept)."""
    custom_nodes = PACK_DIR.parent
    if custom_nodes.name == "custom_nodes" and (custom_nodes.parent / "main.py").is_file():
        return custom_nodes.parent
    return None


def b_images(b: Path) -> list[Path]:
    if b.is_dir():
        images = sorted(p for p in b.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise SystemExit(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {b}")
        return images
    if not b.is_file():
        raise SystemExit(f"b: {b} is not a file or folder")
    return [b]


# ----------------------------------------------------------------------------------------- ComfyUI in-process


def wants_cpu(args: argparse.Namespace) -> bool:
    if args.cpu or args.demo:
        return True
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    has_gpu = torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())
    return not has_gpu


def start_comfyui(root: Path, cpu: bool, extra_args: list[str]):
    """Import ComfyUI from ``root`` with its command line parsed; returns its ``server`` module."""
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise SystemExit(f"{root} is not a ComfyUI folder (no main.py / comfy/); pass --comfyui")
    sys.path.insert(0, str(root))
    saved_argv = sys.argv
    sys.argv = ["main.py", *(["--cpu"] if cpu else []), *extra_args]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        # Order matters: arguments (--cpu) are parsed before comfy.model_management loads, and utils/ is imported
        # before nodes.py puts comfy/ first on sys.path (where comfy/utils.py would shadow the utils package).
        for module in ("comfy.cli_args", "utils.extra_config", "utils.install_util"):
            importlib.import_module(module)
        return importlib.import_module("server")
    finally:
        sys.argv = saved_argv


def apply_model_paths(root: Path) -> None:
    """extra_model_paths.yaml beside main.py and --extra-model-paths-config, as main.py applies them."""
    import itertools

    import utils.extra_config
    from comfy.cli_args import args

    configs = [root / "extra_model_paths.yaml"] if (root / "extra_model_paths.yaml").is_file() else []
    configs += [Path(p) for p in itertools.chain(*(args.extra_model_paths_config or []))]
    for config in configs:
        utils.extra_config.load_extra_path_config(str(config))


def use_private_folders(work: Path) -> None:
    """LoadImage reads, SaveImage / PreviewImage write here: ComfyUI's own folders stay untouched."""
    import folder_paths

    for name, setter in (
        ("input", folder_paths.set_input_directory),
        ("output", folder_paths.set_output_directory),
        ("temp", folder_paths.set_temp_directory),
    ):
        (work / name).mkdir(parents=True, exist_ok=True)
        setter(str(work / name))


def load_nodes(server_module, stand_in) -> None:
    """ComfyUI's built-in nodes, then this pack (other custom node packs are not needed and not loaded)."""
    import nodes

    server_module.PromptServer.instance = stand_in
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(PACK_DIR))) or "LoRWeB_LoadBasis" not in nodes.NODE_CLASS_MAPPINGS:
        raise SystemExit(f"the LoRWeB pack in {PACK_DIR} did not load into ComfyUI (see the messages above)")


def make_executor(stand_in):
    import inspect

    import execution

    cache = execution.CacheType.CLASSIC
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:  # 0.8.0
        return execution.PromptExecutor(stand_in, cache_type=cache, cache_args={"lru": 0, "ram": 0})
    return execution.PromptExecutor(stand_in, cache_type=cache)


class DefinitionsOf:
    """``/object_info``-shaped node definitions of the ComfyUI running in this process, built on demand."""

    def __init__(self):
        import nodes

        self.classes = nodes.NODE_CLASS_MAPPINGS

    def __contains__(self, node_type: object) -> bool:
        return node_type in self.classes

    def __getitem__(self, node_type: str) -> dict:
        return node_definition(self.classes[node_type])


# ------------------------------------------------------------------------------------------------ progress


class ProgressServer:
    """Stand-in for ComfyUI's PromptServer: turns the executor's messages into tqdm bars."""

    client_id = "lorweb-runner"
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.sockets_metadata = {}
        self.prompt: dict = {}
        self.nodes_bar = None
        self.steps_bar = None

    def start(self, prompt: dict, label: str) -> None:
        from tqdm import tqdm

        self.prompt = prompt
        self.nodes_bar = tqdm(total=len(prompt), desc=label, unit="node", dynamic_ncols=True)

    def finish(self) -> None:
        self._close_steps()
        if self.nodes_bar is not None:
            self.nodes_bar.update(self.nodes_bar.total - self.nodes_bar.n)
            self.nodes_bar.close()
            self.nodes_bar = None

    def send_sync(self, event, data, sid=None) -> None:
        if self.nodes_bar is None or not isinstance(data, dict):
            return
        if event == "execution_cached":
            self.nodes_bar.update(len(data.get("nodes") or []))
        elif event == "executing" and data.get("node") is not None:
            self._close_steps()
            self.nodes_bar.update(1)
            self.nodes_bar.set_postfix_str(self.prompt.get(data["node"], {}).get("class_type", str(data["node"])))

    def step(self, value, total, preview_image=None, prompt_id=None, node_id=None) -> None:
        """ComfyUI's progress hook (sampler steps and other ProgressBar users)."""
        from tqdm import tqdm

        if self.steps_bar is None or self.steps_bar.total != total:
            self._close_steps()
            self.steps_bar = tqdm(total=total, desc="  steps", unit="step", leave=False, dynamic_ncols=True)
        self.steps_bar.update(value - self.steps_bar.n)

    def _close_steps(self) -> None:
        if self.steps_bar is not None:
            self.steps_bar.close()
            self.steps_bar = None

    def queue_updated(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------ the graph


@dataclass
class RunSettings:
    """Everything the runner sets in the graph (None: keep the workflow's value)."""

    prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    reverse: bool = False
    models: dict[str, str | None] = field(default_factory=dict)
    demo_text_encoder: str | None = None  # demo: CLIPLoader (sd3) with this CLIP-L instead of DualCLIPLoader
    bypass_kontext_scale: bool = False  # demo: keep the small grid (the scale node goes to ~1 megapixel)
    save_grid: bool = False
    save_chart: bool = False


def unique_node(prompt: dict, class_type: str) -> str:
    found = [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]
    if len(found) != 1:
        raise SystemExit(f"the workflow needs exactly one {class_type} node, it has {len(found)}")
    return found[0]


def linked_node(prompt: dict, node_id: str, input_name: str) -> str:
    value = prompt[node_id]["inputs"].get(input_name)
    if not isinstance(value, list):
        raise SystemExit(f"{prompt[node_id]['class_type']}.{input_name} is not connected in the workflow")
    return value[0]


def image_loaders(prompt: dict) -> dict[str, str]:
    """The LoadImage node of a, a′ and b: the ones feeding the Analogy Grid."""
    grid = unique_node(prompt, "LoRWeB_AnalogyGrid")
    loaders = {role: linked_node(prompt, grid, role) for role in ("a", "a_prime", "b")}
    for role, node_id in loaders.items():
        if prompt[node_id]["class_type"] != "LoadImage":
            raise SystemExit(f"the Analogy Grid's {role} must come from a LoadImage node")
    return loaders


def build_prompt(workflow: dict, definitions, settings: RunSettings) -> dict:
    """The API prompt of the workflow with the settings applied."""
    if settings.bypass_kontext_scale:
        for node in workflow["nodes"]:
            if node["type"] == "FluxKontextImageScale":
                node["mode"] = MODE_BYPASS
    prompt = ui_to_api(workflow, definitions)
    _set_values(prompt, settings)
    _set_outputs(prompt, settings)
    return prompt


def _set_values(prompt: dict, settings: RunSettings) -> None:
    targets = {
        ("UNETLoader", "unet_name"): settings.models.get("unet"),
        ("DualCLIPLoader", "clip_name1"): settings.models.get("clip_l"),
        ("DualCLIPLoader", "clip_name2"): settings.models.get("t5"),
        ("VAELoader", "vae_name"): settings.models.get("vae"),
        ("CLIPVisionLoader", "clip_name"): settings.models.get("clip_vision"),
        ("LoRWeB_LoadBasis", "basis_name"): settings.models.get("basis"),
        ("LoRWeB_LoadBasis", "config"): settings.models.get("basis_config"),
        ("CLIPTextEncode", "text"): settings.prompt,
        ("KSampler", "seed"): settings.seed,
        ("KSampler", "steps"): settings.steps,
        ("LoRWeB_AnalogyGrid", "reverse"): settings.reverse or None,
        ("LoRWeB_EncodeAnalogy", "reverse"): settings.reverse or None,
    }
    for (class_type, name), value in targets.items():
        if value is not None:
            prompt[unique_node(prompt, class_type)]["inputs"][name] = value
    if settings.demo_text_encoder:
        clip = unique_node(prompt, "DualCLIPLoader")
        prompt[clip] = {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": settings.demo_text_encoder, "type": "sd3", "device": "default"},
        }


def _set_outputs(prompt: dict, settings: RunSettings) -> None:
    """b′ via the workflow's SaveImage; the chart and the whole generated grid only when asked for."""
    save = unique_node(prompt, "SaveImage")
    prompt[save]["inputs"]["filename_prefix"] = "lorweb_b_prime"
    apply = unique_node(prompt, "LoRWeB_ApplyBasis")
    for node_id in [n for n, node in prompt.items() if node["class_type"] == "PreviewImage"]:
        del prompt[node_id]  # the workflow's chart preview; re-added below under a known id when wanted
    if settings.save_chart:
        prompt[CHART_NODE] = {
            "class_type": "SaveImage",
            "inputs": {"images": [apply, 2], "filename_prefix": "lorweb_chart"},
        }
    if settings.save_grid:
        decoded = linked_node(prompt, unique_node(prompt, "LoRWeB_CropResult"), "image")
        prompt[GRID_NODE] = {
            "class_type": "SaveImage",
            "inputs": {"images": [decoded, 0], "filename_prefix": "lorweb_grid"},
        }


# ------------------------------------------------------------------------------------------------ running


def place_image(source: Path, input_dir: Path, name: str) -> str:
    """Copy an image into the (private) input folder; LoadImage takes it by file name."""
    target = input_dir / (name + source.suffix.lower())
    shutil.copyfile(source, target)
    return target.name


def execute(executor, stand_in: ProgressServer, prompt: dict, label: str) -> dict:
    """Validate and run one prompt; returns the outputs' UI data. Exits with ComfyUI's message on failure."""
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise SystemExit("ComfyUI refused the workflow: " + describe_errors(prompt, error, node_errors))
    stand_in.start(prompt, label)
    try:
        executor.execute(prompt, prompt_id, extra_data={"client_id": stand_in.client_id}, execute_outputs=outputs)
    finally:
        stand_in.finish()
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        detail = errors[0] if errors else {}
        raise SystemExit(f"{detail.get('node_type', 'a node')} failed: {detail.get('exception_message', errors)}")
    return executor.history_result.get("outputs", {})


def describe_errors(prompt: dict, error: dict, node_errors: dict) -> str:
    lines = [error.get("message", str(error)) if isinstance(error, dict) else str(error)]
    for node_id, problem in (node_errors or {}).items():
        for item in problem.get("errors", []):
            lines.append(
                f"  {prompt.get(node_id, {}).get('class_type', node_id)}: {item.get('message')}: {item.get('details')}"
            )
    return "\n".join(lines)


def output_file(outputs: dict, node_id: str) -> Path:
    import folder_paths

    image = outputs[node_id]["images"][0]
    folder = folder_paths.get_directory_by_type(image.get("type", "output"))
    return Path(folder) / image.get("subfolder", "") / image["filename"]


def collect(outputs: dict, prompt: dict, out_dir: Path, stem: str) -> list[Path]:
    """Move b′ (and the grid / chart) from the private output folder to ``out_dir``."""
    save = next(
        node_id
        for node_id, node in prompt.items()
        if node["class_type"] == "SaveImage" and node["inputs"].get("filename_prefix") == "lorweb_b_prime"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for node_id, suffix in ((save, "b_prime"), (GRID_NODE, "grid"), (CHART_NODE, "chart")):
        if outputs.get(node_id, {}).get("images"):
            target = out_dir / f"{stem}_{suffix}.png"
            shutil.move(output_file(outputs, node_id), target)
            written.append(target)
    return written


@dataclass
class Job:
    a: Path
    a_prime: Path
    bs: list[Path]
    settings: RunSettings
    out: Path


def run_jobs(job: Job, workflow: dict, executor, stand_in: ProgressServer, work: Path) -> list[Path]:
    import folder_paths

    input_dir = Path(folder_paths.get_input_directory())
    prompt = build_prompt(workflow, DefinitionsOf(), job.settings)
    loaders = image_loaders(prompt)
    prompt[loaders["a"]]["inputs"]["image"] = place_image(job.a, input_dir, "lorweb_a")
    prompt[loaders["a_prime"]]["inputs"]["image"] = place_image(job.a_prime, input_dir, "lorweb_a_prime")
    written = []
    for index, b in enumerate(job.bs, 1):
        prompt[loaders["b"]]["inputs"]["image"] = place_image(b, input_dir, f"lorweb_b_{index:05d}")
        outputs = execute(executor, stand_in, prompt, f"b {index}/{len(job.bs)} {b.name}")
        written += collect(outputs, prompt, job.out, b.stem)
    return written


def settings_from(args: argparse.Namespace, demo_files: dict[str, str] | None) -> RunSettings:
    models = {
        name: getattr(args, name) for name in ("unet", "clip_l", "t5", "vae", "clip_vision", "basis", "basis_config")
    }
    settings = RunSettings(
        prompt=args.prompt,
        seed=args.seed,
        steps=args.steps,
        reverse=args.reverse,
        models=models,
        save_grid=args.save_grid,
        save_chart=args.save_chart,
    )
    if demo_files is not None:
        for name, folder in (
            ("unet", "diffusion_models"),
            ("vae", "vae"),
            ("clip_vision", "clip_vision"),
            ("basis", "lorweb"),
        ):
            settings.models[name] = settings.models[name] or demo_files[folder]
        settings.models["basis_config"] = settings.models["basis_config"] or "auto"
        settings.demo_text_encoder = args.clip_l or demo_files["text_encoders"]
        settings.bypass_kontext_scale = True
        settings.prompt = settings.prompt or DEMO_PROMPT
        settings.steps = settings.steps or DEMO_STEPS
    return settings


def prepare_demo(args: argparse.Namespace) -> dict[str, str]:
    """Demo weights and images (made once, reused), registered with ComfyUI's model folders."""
    import lorweb_demo

    cache = args.demo_cache or lorweb_demo.default_cache()
    lorweb_demo.ensure_demo_files(cache)
    lorweb_demo.register_demo_folders(cache)
    images = lorweb_demo.write_demo_images(cache / "images")
    args.a, args.a_prime, args.b = args.a or images["a"], args.a_prime or images["a_prime"], args.b or images["b"]
    return dict(lorweb_demo.FILES)


def peak_memory_text() -> str:
    try:
        import resource
    except ImportError:  # not on Windows
        return ""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform != "darwin" else 1 / 1024  # macOS reports bytes
    return f", peak memory {peak_kib * scale / 1024**2:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    root = args.comfyui or default_comfyui()
    if root is None:
        raise SystemExit("this pack is not inside ComfyUI/custom_nodes: pass --comfyui <ComfyUI folder>")
    root = root.expanduser().absolute()
    server_module = start_comfyui(root, wants_cpu(args), shlex.split(args.comfy_args))
    apply_model_paths(root)
    work = Path(tempfile.mkdtemp(prefix="lorweb-run-"))
    try:
        use_private_folders(work)
        stand_in = ProgressServer()
        load_nodes(server_module, stand_in)
        import comfy.utils

        comfy.utils.set_progress_bar_enabled(False)  # the sampler's own bar; ours shows the steps instead
        comfy.utils.set_progress_bar_global_hook(stand_in.step)
        demo_files = prepare_demo(args) if args.demo else None
        job = Job(args.a, args.a_prime, b_images(args.b), settings_from(args, demo_files), args.out)
        written = run_jobs(job, load_workflow(args.workflow), make_executor(stand_in), stand_in, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in written:
        print(f"wrote {path}")
    print(f"done in {time.monotonic() - started:.0f} s{peak_memory_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
