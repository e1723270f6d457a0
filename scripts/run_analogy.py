#!/usr/bin/env python
"""Run a LoRWeB visual analogy (a : a′ :: b : b′) headless, through ComfyUI's own executor, in this process.

Run it with the Python that runs ComfyUI. It loads a UI-format workflow (default: the pack's example; any made
of ComfyUI's nodes and the pack's, e.g. the compose templates), converts it to an API prompt with the node
definitions of that ComfyUI, sets the images, prompt and model files, and executes it. b may be one image or a
folder (every image in it is edited; models stay loaded between images). Each Save node gives one file per b.

    python custom_nodes/comfyui-lorweb/scripts/run_analogy.py --a a.png --a-prime a2.png --b photos/ \\
        --prompt "Turn the photo into a pencil sketch." --out results/

    python custom_nodes/comfyui-lorweb/scripts/run_analogy.py --demo --out /tmp/lorweb-demo

    torchrun --nproc_per_node 4 custom_nodes/comfyui-lorweb/scripts/run_analogy.py ... --b photos/ --skip-existing

``--demo`` writes small random weights of every kind the templates load, under the names they load (no downloads),
to a cache folder and runs the graph on the CPU at 128x128 in 4 steps: a check that the install works, not a
picture.
ComfyUI's own input, output and model folders are never written: images go through a private temporary folder.
Launched by ``torchrun`` or ``accelerate launch``, the processes split the b images between them (runner_jobs.py).
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).absolute().parent
PACK_DIR = SCRIPTS.parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import comfy_harness  # noqa: E402
from lorweb_workflow import load_workflow  # noqa: E402
from runner_jobs import Job, Share, b_images, collect, not_done, place_image  # noqa: E402
from runner_progress import ProgressServer  # noqa: E402
from runner_prompt import (  # noqa: E402
    DefinitionsOf,
    RunSettings,
    build_prompt,
    describe,
    find_node,
    image_loaders,
    missing_model_files,
    other_image_loaders,
    parse_set,
    save_outputs,
)

WORKFLOW = PACK_DIR / "example_workflows" / "lorweb_analogy_flux_kontext.json"
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
    parser.add_argument(
        "--strength",
        type=float,
        help="the analogy's strength: the Apply node that applies it, or its entry in a LoRA set (workflow: 1)",
    )
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
        help="UI workflow to run (default: the pack's example); any of ComfyUI's nodes and the pack's, with one "
        "Analogy Grid (--a, --a-prime and --b are its images)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="set a node's input (NODE: its id or title; VALUE: JSON or text), e.g. --set 40.cfg=1.5; "
        "for what an option cannot say (several nodes could take it). Repeatable",
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NODE=PATH",
        help="the image of a LoadImage node the grid does not take (e.g. a second example pair); NODE: its id or "
        "title. Without it such a node loads its file from ComfyUI's input folder. Repeatable",
    )
    parser.add_argument("--demo", action="store_true", help="random small weights, CPU, 128x128, 4 steps")
    parser.add_argument(
        "--demo-t5",
        action="store_true",
        help="demo: keep the workflow's DualCLIPLoader with the demo T5-XXL (4.76 B parameters in fp8: "
        "about 9 GB more memory and minutes on a CPU) instead of CLIP-L alone",
    )
    parser.add_argument("--demo-cache", type=Path, help="folder for the demo weights (default ~/.cache/lorweb-demo)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (automatic without a GPU and in --demo)")
    parser.add_argument("--comfy-args", default="", help="more ComfyUI command-line options, e.g. '--lowvram'")
    parser.add_argument(
        "--custom-nodes",
        action="store_true",
        help="also load the custom node packs installed in that ComfyUI (e.g. ComfyUI-GGUF for UnetLoaderGGUF)",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave out b images whose results are already in --out (to pick up a stopped run)",
    )
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
    try:
        args.set = [parse_set(text) for text in args.set]
    except ValueError as error:
        parser.error(f"--set: {error}")
    images = []
    for text in args.image:
        reference, equals, path = text.partition("=")
        if not equals or not reference or not path:
            parser.error(f"--image: {text!r} is not NODE=PATH")
        if not Path(path).is_file():
            parser.error(f"--image {reference}: {path} is not a file")
        images.append((reference, Path(path)))
    args.image = images
    if args.demo_t5 and not args.demo:
        parser.error("--demo-t5 goes with --demo")
    return args


def default_comfyui() -> Path | None:
    """ComfyUI/custom_nodes/<pack>/scripts/run_analogy.py -> ComfyUI (the path as installed, links kept)."""
    custom_nodes = PACK_DIR.parent
    if custom_nodes.name == "custom_nodes" and (custom_nodes.parent / "main.py").is_file():
        return custom_nodes.parent
    return None


# ------------------------------------------------------------------------------------------------ running


def settings_from(args: argparse.Namespace, workflow: dict, demo: bool) -> RunSettings:
    models = {
        name: getattr(args, name) for name in ("unet", "clip_l", "t5", "vae", "clip_vision", "basis", "basis_config")
    }
    settings = RunSettings(
        prompt=args.prompt,
        seed=args.seed,
        steps=args.steps,
        strength=args.strength,
        reverse=args.reverse,
        models=models,
        sets=list(args.set),
        save_grid=args.save_grid,
        save_chart=args.save_chart,
        outputs=save_outputs(workflow),
    )
    if demo:  # the demo files carry the templates' names: the workflow's own model names find them
        import lorweb_demo

        if not args.demo_t5:
            settings.demo_text_encoder = args.clip_l or lorweb_demo.FILES["clip_l"][1]
        settings.bypass_kontext_scale = True
        settings.prompt = settings.prompt or DEMO_PROMPT
        settings.steps = settings.steps or DEMO_STEPS
    return settings


def prepare_demo(args: argparse.Namespace) -> Path:
    """Demo weights and images (made once, reused), registered first with ComfyUI's model folders; returns the
    folder of the demo images (the templates' image names are there too)."""
    import lorweb_demo

    cache = args.demo_cache or lorweb_demo.default_cache()
    lorweb_demo.ensure_demo_files(cache)
    lorweb_demo.register_demo_folders(cache)
    images = lorweb_demo.write_demo_images(cache / "images")
    args.a, args.a_prime, args.b = args.a or images["a"], args.a_prime or images["a_prime"], args.b or images["b"]
    return cache / "images"


def flat_images(paths: list[Path]) -> list[Path]:
    """The PNG files among ``paths`` that are one colour: what NaN or infinite values give (SaveImage clips
    them to black)."""
    import numpy as np
    from PIL import Image

    flat = []
    for path in paths:
        if path.suffix == ".png":
            with Image.open(path) as image:
                pixels = np.asarray(image)
            if pixels.size and (pixels == pixels.reshape(-1, pixels.shape[-1])[0]).all():
                flat.append(path)
    return flat


def peak_memory_text() -> str:
    try:
        import resource
    except ImportError:  # not on Windows
        return ""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform != "darwin" else 1 / 1024  # macOS reports bytes
    return f", peak memory {peak_kib * scale / 1024**2:.1f} GiB"


def use_own_gpu(share: Share) -> None:
    """One GPU per process when launched by torchrun / accelerate: LOCAL_RANK picks it among the visible ones."""
    if share.world_size == 1:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(index) for index in range(share.local_rank + 1)]
    if share.local_rank >= len(devices):
        raise SystemExit(f"LOCAL_RANK={share.local_rank} but only {len(devices)} GPUs are visible ({visible})")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[share.local_rank]  # before torch looks at the GPUs


def start(args: argparse.Namespace, share: Share):
    """ComfyUI in this process with its nodes; returns the progress stand-in."""
    root = args.comfyui or default_comfyui()
    if root is None:
        raise SystemExit("this pack is not inside ComfyUI/custom_nodes: pass --comfyui <ComfyUI folder>")
    root = root.expanduser().absolute()
    cpu = args.cpu or args.demo
    if not cpu:
        use_own_gpu(share)
    try:
        comfy_harness.start_comfyui(root, cpu=comfy_harness.wants_cpu(cpu), extra_args=shlex.split(args.comfy_args))
        comfy_harness.apply_model_paths(root)
        stand_in = ProgressServer(share.label)
        # with --custom-nodes the pack normally loads from ComfyUI's custom_nodes; this checkout only when it did not
        comfy_harness.load_nodes(stand_in, custom_nodes=args.custom_nodes, packs={PACK_DIR: comfy_harness.PACK_NODE})
    except comfy_harness.HarnessError as error:
        raise SystemExit(f"--comfyui: {error}" if "ComfyUI folder" in str(error) else str(error)) from None
    comfy_harness.hook_progress(stand_in)
    return stand_in


def execute(executor, stand_in: ProgressServer, prompt: dict, label: str) -> dict:
    """Validate and run one prompt; returns the outputs' UI data. Exits with ComfyUI's message on failure."""
    stand_in.start(prompt, label)
    try:
        return comfy_harness.run_prompt(executor, prompt, extra_data={"client_id": stand_in.client_id})
    except comfy_harness.PromptRejected as rejected:
        raise SystemExit("ComfyUI refused the workflow: " + rejected.describe(prompt)) from None
    except comfy_harness.ExecutionFailed as failure:
        raise SystemExit(f"{failure.node_type} failed: {failure}") from None
    finally:
        stand_in.finish()


def prompt_for(job: Job, workflow: dict, custom_nodes: bool) -> dict:
    """The API prompt of the job; a node type this ComfyUI did not load is named with what to do about it."""
    try:
        return build_prompt(copy.deepcopy(workflow), DefinitionsOf(), job.settings)
    except KeyError as error:
        fix = (
            "install the node pack that provides it into ComfyUI's custom_nodes folder"
            if custom_nodes
            else "pass --custom-nodes to load the node packs installed in ComfyUI (e.g. ComfyUI-GGUF)"
        )
        raise SystemExit(f"--workflow: {error.args[0]}: {fix}") from None


def place_other_images(job: Job, prompt: dict, input_dir: Path, sources: list[Path]) -> None:
    """The LoadImage nodes outside the grid: --image, else their own file from ``sources`` (ComfyUI's input
    folder; the demo's images first in --demo)."""
    given = {find_node(prompt, reference, "--image"): path for reference, path in job.images}
    grid = image_loaders(prompt)
    for node_id in given:
        if node_id in grid.values():
            role = next(role for role, loader in grid.items() if loader == node_id)
            raise SystemExit(
                f"--image: {describe(prompt, node_id)} is the grid's {role}: pass --{role.replace('_', '-')}"
            )
    for node_id in other_image_loaders(prompt):
        if node_id in given:
            prompt[node_id]["inputs"]["image"] = place_image(given[node_id], input_dir, f"lorweb_node_{node_id}")
            continue
        name = str(prompt[node_id]["inputs"].get("image", ""))
        found = next((folder / name for folder in sources if name and (folder / name).is_file()), None)
        if found is None:
            where = ", ".join(str(folder) for folder in sources)
            raise SystemExit(
                f"{describe(prompt, node_id)} loads {name!r}, which is not in {where}: put it there, or pass "
                f"--image {node_id}=PATH"
            )
        prompt[node_id]["inputs"]["image"] = place_image(found, input_dir, Path(name).stem)


def run_job(job: Job, workflow: dict, stand_in: ProgressServer, work: Path, args: argparse.Namespace) -> list[Path]:
    """Every b of the job through one executor: the models load once and stay loaded."""
    import folder_paths

    sources = ([job.demo_images] if job.demo_images else []) + [Path(folder_paths.get_input_directory())]
    comfy_harness.use_private_folders(work)
    # Save Composed LoRA writes into the first loras folder: a private one, moved to --out like the images
    folder_paths.add_model_folder_path("loras", str(work / "loras"), is_default=True)
    input_dir = work / "input"
    prompt = prompt_for(job, workflow, args.custom_nodes)
    if missing := missing_model_files(prompt):
        raise SystemExit("model files missing:\n  " + "\n  ".join(missing))
    loaders = image_loaders(prompt)
    prompt[loaders["a"]]["inputs"]["image"] = place_image(job.a, input_dir, "lorweb_a")
    prompt[loaders["a_prime"]]["inputs"]["image"] = place_image(job.a_prime, input_dir, "lorweb_a_prime")
    place_other_images(job, prompt, input_dir, sources)
    executor = comfy_harness.make_executor(stand_in)
    written = []
    for index, b in enumerate(job.bs, 1):
        # named after b, not its place in this process' list: the prompt saved in b′ is the same in any process
        prompt[loaders["b"]]["inputs"]["image"] = place_image(b, input_dir, f"lorweb_b_{b.stem}")
        outputs = execute(executor, stand_in, prompt, f"b {index}/{len(job.bs)} {b.name}")
        written += collect(outputs, job.settings, job.out, b.stem)
    return written


def job_for(args: argparse.Namespace, settings: RunSettings, share: Share) -> tuple[Job, int]:
    """This process' b images: its share of the sorted list, without the finished ones with --skip-existing.

    Returns the job and how many finished images were left out."""
    mine = share.pick(b_images(args.b))
    todo = not_done(mine, settings, args.out) if args.skip_existing else mine
    return Job(args.a, args.a_prime, todo, settings, args.out, images=args.image), len(mine) - len(todo)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    share = Share.from_environment()
    try:
        workflow = load_workflow(args.workflow)
    except ValueError as error:
        raise SystemExit(f"--workflow: {error}") from None
    if args.b is not None and not job_for(args, settings_from(args, workflow, False), share)[0].bs:
        print(f"{share.label}nothing to do: no b image left for this process")  # said before ComfyUI starts
        return 0
    stand_in = start(args, share)  # models load once per process, in the first b image's run
    demo_images = prepare_demo(args) if args.demo else None
    job, skipped = job_for(args, settings_from(args, workflow, args.demo), share)
    job.demo_images = demo_images
    if skipped:
        print(f"{share.label}skipping {skipped} b images whose results are in {args.out} already")
    work = Path(tempfile.mkdtemp(prefix="lorweb-run-"))
    try:
        written = run_job(job, workflow, stand_in, work, args) if job.bs else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in written:
        print(f"{share.label}wrote {path}")
    if flat := flat_images(written):
        names = ", ".join(str(path) for path in flat)
        if args.demo:
            raise SystemExit(
                f"the demo wrote images of one flat colour ({names}): its random weights gave NaN or infinite "
                "values in this ComfyUI. Please report it with ComfyUI's version and the command line."
            )
        print(f"{share.label}warning: one flat colour (NaN or infinite values in the model?): {names}", file=sys.stderr)
    print(f"{share.label}done in {time.monotonic() - started:.0f} s{peak_memory_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
