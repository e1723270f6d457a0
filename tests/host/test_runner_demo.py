"""``scripts/run_analogy.py --demo`` end to end: random weights, the example workflow, ComfyUI's executor, b′ on disk.

The demo weights (~2 GB of random files) go to a pytest temporary folder unless LORWEB_DEMO_CACHE names a folder to
reuse between runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from comfy_host import COMFYUI_PYTHON, COMFYUI_ROOT, REPO_ROOT
from PIL import Image

RUNNER = REPO_ROOT / "scripts" / "run_analogy.py"
DEMO_TILE = 64  # the demo's a, a′, b are 64 x 64: the Kontext grid is 128 x 128
TIMEOUT_SECONDS = 900


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [COMFYUI_PYTHON or sys.executable, str(RUNNER), "--comfyui", COMFYUI_ROOT, *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)


def test_demo_writes_b_prime_grid_and_chart(tmp_path):
    cache = os.environ.get("LORWEB_DEMO_CACHE") or str(tmp_path / "demo-cache")
    out = tmp_path / "out"
    result = _run(tmp_path, "--demo", "--demo-cache", cache, "--out", str(out), "--save-grid", "--save-chart")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-10000:]

    b_prime = Image.open(out / "demo_b_b_prime.png")
    assert b_prime.format == "PNG" and b_prime.size == (DEMO_TILE, DEMO_TILE)
    assert Image.open(out / "demo_b_grid.png").size == (2 * DEMO_TILE, 2 * DEMO_TILE)
    assert Image.open(out / "demo_b_chart.png").format == "PNG"
    assert "wrote" in result.stdout and "done in" in result.stdout
    # ComfyUI's own folders are not written: images went through a private temporary folder
    for folder in ("input", "output", "temp"):
        assert not list(Path(COMFYUI_ROOT, folder).glob("lorweb_*")), folder


def test_the_real_graph_without_model_files_is_refused_naming_each_file(tmp_path):
    """The non-demo path (DualCLIPLoader, FluxKontextImageScale) converts and reaches ComfyUI's validation."""
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
    assert result.returncode != 0 and "ComfyUI refused the workflow" in result.stderr
    for name in (
        "flux1-dev-kontext_fp8_scaled.safetensors",
        "clip_l.safetensors",
        "t5xxl_fp8_e4m3fn_scaled.safetensors",
        "ae.safetensors",
        "clip-vit-large-patch14.safetensors",
        "lorweb_model.safetensors",
    ):
        assert name in result.stderr, name
    assert not (tmp_path / "out").exists()
