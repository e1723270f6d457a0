"""``scripts/run_analogy.py`` end to end: random weights, the example workflow, ComfyUI's executor, b′ on disk.

The demo weights (~2.2 GB on disk) are written once per module to a pytest temporary folder, unless
LORWEB_DEMO_CACHE names a folder to reuse between runs. Besides the single run: every template of example_workflows/
as shipped (one file per Save node), the T5-XXL through the templates' DualCLIPLoader, extra Save nodes (a second
SaveImage, Save Composed LoRA), two processes launched by torchrun (the b images split between them),
--skip-existing, and a GGUF diffusion model through city96's UnetLoaderGGUF with --custom-nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from comfy_host import COMFYUI_PYTHON, COMFYUI_ROOT, REPO_ROOT
from gguf_files import write_gguf
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from lorweb_demo import FILES  # noqa: E402  (importing it imports no ComfyUI)
from runner_prompt import save_outputs  # noqa: E402

RUNNER = REPO_ROOT / "scripts" / "run_analogy.py"
WORKFLOW = REPO_ROOT / "example_workflows" / "lorweb_analogy_flux_kontext.json"
TEMPLATES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
#: the templates as main shipped them before the glue moved from nodes/ (44bfcdf): saved workflows must keep running
SAVED_BEFORE_THE_MOVE = sorted((REPO_ROOT / "tests" / "data" / "saved_before_the_move").glob("*.json"))
DEMO_TILE = 64  # the demo's a, a′, b are 64 x 64: the Kontext grid is 128 x 128
TIMEOUT_SECONDS = 1200
# One thread in every process, as torchrun sets it: CPU sums then add up in the same order in one process and in two.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _run(cwd: Path, *args: str, launcher: tuple[str, ...] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    command = [COMFYUI_PYTHON or sys.executable, *launcher, str(RUNNER), "--comfyui", COMFYUI_ROOT, *args]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, env={**os.environ, **(env or {})}
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-10000:]
    return result


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> str:
    return os.environ.get("LORWEB_DEMO_CACHE") or str(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def b_folder(tmp_path_factory) -> Path:
    """Three b images (a red square, a green triangle, a yellow ring)."""
    folder = tmp_path_factory.mktemp("bs")
    for name, draw in (
        ("b1_square", lambda d: d.rectangle((12, 12, 52, 52), fill="red")),
        ("b2_triangle", lambda d: d.polygon([(32, 8), (56, 56), (8, 56)], fill="green")),
        ("b3_ring", lambda d: d.ellipse((10, 10, 54, 54), outline="yellow", width=8)),
    ):
        image = Image.new("RGB", (DEMO_TILE, DEMO_TILE), "white")
        draw(ImageDraw.Draw(image))
        image.save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, demo_cache, b_folder) -> Path:
    """The three b images edited by one process (the reference for the split runs)."""
    out = tmp_path_factory.mktemp("one-process")
    _ok(_run(out, "--demo", "--demo-cache", demo_cache, "--b", str(b_folder), "--out", str(out), env=ONE_THREAD))
    return out


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_demo_writes_b_prime_grid_and_chart(tmp_path, demo_cache):
    out = tmp_path / "out"
    result = _ok(_run(tmp_path, "--demo", "--demo-cache", demo_cache, "--out", str(out), "--save-grid", "--save-chart"))

    b_prime = Image.open(out / "demo_b_b_prime.png")
    assert b_prime.format == "PNG" and b_prime.size == (DEMO_TILE, DEMO_TILE)
    assert Image.open(out / "demo_b_grid.png").size == (2 * DEMO_TILE, 2 * DEMO_TILE)
    assert Image.open(out / "demo_b_chart.png").format == "PNG"
    assert "wrote" in result.stdout and "done in" in result.stdout
    # ComfyUI's own folders are not written: images went through a private temporary folder
    for folder in ("input", "output", "temp"):
        assert not list(Path(COMFYUI_ROOT, folder).glob("lorweb_*")), folder
    # the demo Flux has a real Kontext file's layout (BFL: q/k norms as .scale), which every ComfyUI version
    # detects; ComfyUI 0.33's own module names them .weight, and a cache written that way broke 0.8.0
    folder, name = FILES["unet"]
    with safe_open(str(Path(demo_cache, folder, name)), framework="pt") as handle:
        norms = [key for key in handle.keys() if key.rsplit(".", 1)[0].endswith(("query_norm", "key_norm"))]
    assert norms and all(key.endswith(".scale") for key in norms), norms


def test_two_processes_under_torchrun_write_the_files_one_process_writes(tmp_path, demo_cache, b_folder, one_process):
    out = tmp_path / "out"
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    args = ("--demo", "--demo-cache", demo_cache, "--b", str(b_folder), "--out", str(out))
    result = _ok(_run(tmp_path, *args, launcher=torchrun, env=ONE_THREAD))

    expected = sorted(p.name for p in one_process.iterdir())
    assert expected == ["b1_square_b_prime.png", "b2_triangle_b_prime.png", "b3_ring_b_prime.png"]
    assert sorted(p.name for p in out.iterdir()) == expected
    for name in expected:
        assert np.array_equal(_pixels(out / name), _pixels(one_process / name)), name
        assert (out / name).read_bytes() == (one_process / name).read_bytes(), name  # the saved prompt too
    # the sorted list split as [rank::2]: b1 and b3 in rank 0, b2 in rank 1
    wrote = [line for line in result.stdout.splitlines() if " wrote " in line]
    assert sorted(wrote) == sorted(
        [f"[rank 0/2] wrote {out / expected[0]}", f"[rank 1/2] wrote {out / expected[1]}"]
        + [f"[rank 0/2] wrote {out / expected[2]}"]
    )


def test_skip_existing_picks_up_a_stopped_run(tmp_path, demo_cache, b_folder, one_process):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("b1_square_b_prime.png", "b3_ring_b_prime.png"):  # a run stopped after b1 and b3
        (out / name).write_bytes((one_process / name).read_bytes())
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args = ("--demo", "--demo-cache", demo_cache, "--b", str(b_folder), "--out", str(out), "--skip-existing")

    result = _ok(_run(tmp_path, *args, env=ONE_THREAD))
    assert "skipping 2 b images" in result.stdout
    assert [line for line in result.stdout.splitlines() if "wrote " in line] == [
        f"wrote {out / 'b2_triangle_b_prime.png'}"
    ]
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # the finished ones untouched
    assert np.array_equal(_pixels(out / "b2_triangle_b_prime.png"), _pixels(one_process / "b2_triangle_b_prime.png"))

    again = _ok(_run(tmp_path, *args))
    assert "nothing to do" in again.stdout and "wrote" not in again.stdout


def _gguf_workflow(path: Path) -> None:
    """The example workflow with UNETLoader swapped for UnetLoaderGGUF (its one widget: the file name)."""
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    for node in workflow["nodes"]:
        if node["type"] == "UNETLoader":
            node["type"] = "UnetLoaderGGUF"
            node["widgets_values"] = node["widgets_values"][:1]
    path.write_text(json.dumps(workflow), encoding="utf-8")


def test_custom_nodes_run_a_gguf_workflow(tmp_path, demo_cache, one_process):
    models = tmp_path / "gguf_models"
    models.mkdir()
    demo_flux = load_file(str(Path(demo_cache).joinpath(*FILES["unet"])))
    write_gguf(models / "tiny-flux.gguf", demo_flux)  # block weights in Q8_0, as users have a quantized Kontext
    paths = tmp_path / "extra_model_paths.yaml"
    paths.write_text(f"gguf_test:\n    diffusion_models: {models}\n", encoding="utf-8")
    workflow = tmp_path / "gguf_workflow.json"
    _gguf_workflow(workflow)
    args = ("--demo", "--demo-cache", demo_cache, "--workflow", str(workflow), "--unet", "tiny-flux.gguf")
    comfy_args = ("--comfy-args", f"--extra-model-paths-config {paths}")

    without = _run(tmp_path, *args, *comfy_args, "--out", str(tmp_path / "no"))
    assert without.returncode != 0 and "UnetLoaderGGUF" in without.stderr, without.stderr[-3000:]
    assert "--custom-nodes" in without.stderr

    out = tmp_path / "out"
    result = _ok(_run(tmp_path, *args, *comfy_args, "--custom-nodes", "--out", str(out)))
    assert f"wrote {out / 'demo_b_b_prime.png'}" in result.stdout
    b_prime = _pixels(out / "demo_b_b_prime.png")
    assert b_prime.shape == (DEMO_TILE, DEMO_TILE, 3) and b_prime.std() > 0


def test_the_real_graph_without_model_files_names_each_file_and_option(tmp_path):
    """The non-demo path (DualCLIPLoader, FluxKontextImageScale) converts; missing files are named in CLI terms."""
    image = tmp_path / "tile.png"
    Image.new("RGB", (32, 32), "white").save(image)
    empty_base = tmp_path / "base"
    result = _run(
        tmp_path,
        "--a",
        str(image),
        "--a-prime",
        str(image),
        "--b",
        str(image),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "out"),
        "--cpu",
        "--comfy-args",
        f"--base-directory {empty_base}",
    )
    assert result.returncode != 0 and "model files missing" in result.stderr, result.stderr[-3000:]
    for option, name, folder in (
        ("--unet", "flux1-dev-kontext_fp8_scaled.safetensors", "diffusion_models"),
        ("--clip-l", "clip_l.safetensors", "text_encoders"),
        ("--t5", "t5xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders"),
        ("--vae", "ae.safetensors", "vae"),
        ("--clip-vision", "clip-vit-large-patch14.safetensors", "clip_vision"),
        ("--basis", "lorweb_model.safetensors", "lorweb"),
    ):
        line = next(line for line in result.stderr.splitlines() if repr(name) in line)
        assert line.strip().startswith(f"{option} {name!r} is not in ComfyUI's {folder} folder"), line
        assert str(empty_base / "models" / folder) in line and f"or pass {option}" in line, line
    assert "press R" not in result.stderr
    assert not (tmp_path / "out").exists()


def _varied(path: Path) -> np.ndarray:
    """The image's pixels, after checking it is not one flat colour (what NaN gives once SaveImage clips it)."""
    pixels = _pixels(path).astype(np.float64)
    assert np.isfinite(pixels).all() and pixels.std() > 0, f"{path} is one flat colour"
    return pixels


@pytest.mark.parametrize("template", TEMPLATES + SAVED_BEFORE_THE_MOVE, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_template_runs_as_shipped_on_the_demo_weights(tmp_path, demo_cache, template):
    """Each template's own model and image names resolve to the demo files; each Save node writes its file."""
    out = tmp_path / "out"
    result = _ok(_run(tmp_path, "--demo", "--demo-cache", demo_cache, "--workflow", str(template), "--out", str(out)))

    expected = [f"demo_b_{output.suffix}{output.ext}" for output in save_outputs(json.loads(template.read_text()))]
    assert expected == ["demo_b_b_prime.png"]  # every shipped template has one Save node: b′
    assert sorted(p.name for p in out.iterdir()) == expected
    assert _varied(out / expected[0]).shape == (DEMO_TILE, DEMO_TILE, 3)
    assert "flat colour" not in result.stderr


def test_the_templates_dual_clip_loader_runs_the_demo_t5(tmp_path, demo_cache):
    """--demo-t5: DualCLIPLoader (flux) with the demo's full-layout T5-XXL, as the template ships it."""
    out = tmp_path / "out"
    result = _ok(_run(tmp_path, "--demo", "--demo-t5", "--demo-cache", demo_cache, "--out", str(out)))
    assert "CLIPLoader" not in result.stdout.replace("DualCLIPLoader", "")
    _varied(out / "demo_b_b_prime.png")
    t5 = Path(demo_cache).joinpath(*FILES["t5"])
    assert t5.stat().st_size > 4.7e9  # the layout ComfyUI builds: 4.76 B parameters in fp8


def _with_more_saves(template: Path, path: Path) -> None:
    """The template plus a SaveImage of the whole decoded grid and a Save Composed LoRA of the analogy."""
    workflow = json.loads(template.read_text(encoding="utf-8"))
    by_type = {node["type"]: node for node in workflow["nodes"]}
    link = max(link[0] for link in workflow["links"]) + 1
    added = [
        (90, "SaveImage", "Whole grid", ["x"], [("images", "IMAGE", by_type["VAEDecode"]["id"], 0)]),
        (
            91,
            "LoRWeB_SaveComposedLoRA",
            "Instruction LoRA",
            ["lorweb/analogy", 0, "float32"],
            [
                ("basis", "LORWEB_BASIS", by_type["LoRWeB_LoadBasis"]["id"], 0),
                ("weights", "LORWEB_WEIGHTS", by_type["LoRWeB_ApplyBasis"]["id"], 1),
            ],
        ),
    ]
    for node_id, node_type, title, values, inputs in added:
        sockets = []
        for slot, (name, kind, origin, origin_slot) in enumerate(inputs):
            workflow["links"].append([link, origin, origin_slot, node_id, slot, kind])
            sockets.append({"name": name, "type": kind, "link": link})
            link += 1
        workflow["nodes"].append(
            {"id": node_id, "type": node_type, "title": title, "mode": 0, "inputs": sockets, "widgets_values": values}
        )
    path.write_text(json.dumps(workflow), encoding="utf-8")


def test_each_save_node_writes_its_own_file_and_options_name_ambiguous_nodes(tmp_path, demo_cache):
    workflow = tmp_path / "more_saves.json"
    _with_more_saves(REPO_ROOT / "example_workflows" / "lorweb_compose_analogy_and_lora.json", workflow)
    out = tmp_path / "out"
    args = ("--demo", "--demo-cache", demo_cache, "--workflow", str(workflow), "--out", str(out), "--strength", "0.5")
    result = _ok(_run(tmp_path, *args))

    assert sorted(p.name for p in out.iterdir()) == [
        "demo_b_b_prime.png",
        "demo_b_instruction_lora.safetensors",
        "demo_b_whole_grid.png",
    ]
    assert _varied(out / "demo_b_whole_grid.png").shape == (2 * DEMO_TILE, 2 * DEMO_TILE, 3)
    _varied(out / "demo_b_b_prime.png")
    assert any(key.endswith("lora_A.weight") for key in load_file(str(out / "demo_b_instruction_lora.safetensors")))
    assert not list(Path(demo_cache, "loras").glob("lorweb*")), "Save Composed LoRA wrote into a model folder"
    assert f"wrote {out / 'demo_b_b_prime.png'}" in result.stdout.splitlines()[-2]  # b′ last

    two = REPO_ROOT / "example_workflows" / "lorweb_compose_two_analogies_cmlora.json"
    ambiguous = _run(tmp_path, "--demo", "--demo-cache", demo_cache, "--workflow", str(two), "--strength", "0.5")
    assert ambiguous.returncode != 0 and "--strength is ambiguous" in ambiguous.stderr, ambiguous.stderr[-3000:]
    assert "(node 50): strength" in ambiguous.stderr and "(node 51): strength" in ambiguous.stderr
