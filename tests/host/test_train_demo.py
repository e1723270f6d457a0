"""The trainer's smoke run as the README gives it, from the ComfyUI folder: ``scripts/train_basis.py --demo`` trains
on the demo's weights (the diffusion model stored in fp8, as a user's fp8 Kontext) and generated pairs, and the
basis it writes loads and applies in ComfyUI through the headless runner's example workflow.

The demo weights are shared with test_runner_demo.py through LORWEB_DEMO_CACHE when it is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from comfy_host import COMFYUI_PYTHON, COMFYUI_ROOT, REPO_ROOT
from safetensors.torch import load_file

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from lorweb_demo import FILES  # noqa: E402  (importing it imports no ComfyUI)

TRAIN = REPO_ROOT / "scripts" / "train_basis.py"
RUNNER = REPO_ROOT / "scripts" / "run_analogy.py"
TIMEOUT_SECONDS = 1200
#: training config key -> the demo file for it (lorweb_demo.FILES keys)
_MODEL_FILES = {"diffusion_model": "unet", "clip_l": "clip_l", "vae": "vae", "clip_vision": "clip_vision"}


def _run(*command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [COMFYUI_PYTHON or sys.executable, *command],
        cwd=COMFYUI_ROOT,  # where the README's commands run
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-10000:]
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    cache = Path(os.environ.get("LORWEB_DEMO_CACHE") or tmp_path_factory.mktemp("demo-cache"))
    out = tmp_path_factory.mktemp("train-demo") / "run"
    result = _run(str(TRAIN), "--demo", "--out", str(out), "--demo-cache", str(cache))
    return {"cache": cache, "out": out, "log": result.stdout + result.stderr}


def test_the_demo_trains_and_saves_a_finite_basis_that_moved(demo_run):
    out = demo_run["out"]
    basis = load_file(str(out / "lorweb_demo_trained.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in basis.values())
    ups = [t for name, t in basis.items() if name.endswith(".lora_B")]
    assert len(ups) == 20 and ups[0].shape[0] == 4  # the demo Flux's two blocks, K = 4
    assert any(t.abs().max() > 0 for t in ups)  # lora_B starts at zero: it trained
    assert (out / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
    assert (out / "train_demo.yaml").is_file()  # the config it ran, for the user to read and copy
    assert "run_analogy.py --demo" in demo_run["log"]  # it tells the user how to apply it


def test_the_demo_basis_applies_in_comfyui(demo_run, tmp_path):
    cache = demo_run["cache"]
    assert (cache / "lorweb" / "lorweb_demo_trained.safetensors").is_file()
    assert (cache / "lorweb" / "lorweb_demo_trained.yaml").is_file()
    _run(
        str(RUNNER), "--comfyui", COMFYUI_ROOT, "--demo", "--demo-cache", str(cache),
        "--basis", "lorweb_demo_trained.safetensors", "--out", str(tmp_path),
    )  # fmt: skip
    assert (tmp_path / "demo_b_b_prime.png").is_file()  # the runner refuses a flat (NaN) image itself


def test_nan_text_encodings_stop_the_run_and_leave_no_basis(demo_run, tmp_path):
    """The run a user reported: CLIP-L's file given as the T5-XXL (ComfyUI then encodes NaN). It must stop at the
    cache with the pack's message naming the text encoder, exit 2, and write no basis or checkpoint."""
    cache = demo_run["cache"]
    document = yaml.safe_load((demo_run["out"] / "train_demo.yaml").read_text())
    document["output_dir"] = str(tmp_path / "nan-run")
    document["model"].update(
        backend_options={},  # CLIP-L + "T5" as DualCLIPLoader loads them
        **{key: str(cache.joinpath(*FILES[demo_key])) for key, demo_key in _MODEL_FILES.items()},
        t5xxl=str(cache.joinpath(*FILES["clip_l"])),
    )
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(document))
    result = subprocess.run(
        [COMFYUI_PYTHON or sys.executable, str(TRAIN), "--config", str(config)],
        cwd=COMFYUI_ROOT, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-5000:]
    assert "LoRWeB training:" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "text encoder" in result.stderr, result.stderr[-3000:]
    assert not list((tmp_path / "nan-run").rglob("*.safetensors"))
