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

import numpy as np
import pytest
import torch
import yaml
from comfy_host import COMFYUI_PYTHON, COMFYUI_ROOT, REPO_ROOT
from PIL import Image
from safetensors.torch import load_file, save_file

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


def _demo_config(demo_run: dict, folder: Path, **model) -> Path:
    """The demo's config with the demo files by path (a plain --config run registers no demo folders)."""
    cache = demo_run["cache"]
    document = yaml.safe_load((demo_run["out"] / "train_demo.yaml").read_text())
    document["output_dir"] = str(folder / "run")
    document["model"].update({key: str(cache.joinpath(*FILES[demo_key])) for key, demo_key in _MODEL_FILES.items()})
    document["model"].update(model)
    config = folder / "train.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


def _train(config: Path) -> subprocess.CompletedProcess:
    command = [COMFYUI_PYTHON or sys.executable, str(TRAIN), "--config", str(config)]
    return subprocess.run(command, cwd=COMFYUI_ROOT, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)


def test_nan_text_encodings_stop_the_run_and_leave_no_basis(demo_run, tmp_path):
    """The run a user reported: CLIP-L's file given as the T5-XXL (ComfyUI then encodes NaN). It must stop at the
    cache with the pack's message naming the text encoder, exit 2, and write no basis or checkpoint."""
    clip_l = str(demo_run["cache"].joinpath(*FILES["clip_l"]))
    result = _train(_demo_config(demo_run, tmp_path, backend_options={}, t5xxl=clip_l))  # as DualCLIPLoader loads
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-5000:]
    assert "LoRWeB training:" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "text encoder" in result.stderr, result.stderr[-3000:]
    run = tmp_path / "run"
    assert not list(run.glob("*.safetensors")) and not (run / "checkpoints").exists()  # no basis, no checkpoint
    for cached in run.rglob("*.safetensors"):  # what the cache kept (the images' encodings) is finite: reusable
        assert all(torch.isfinite(t.float()).all() for t in load_file(str(cached)).values()), cached


def _scaled_fp8_copy(source: Path, target: Path) -> None:
    """The demo Flux in the layout of the fp8-scaled Kontext users download: the block Linears' weights in
    float8_e4m3fn, each with its ``scale_weight``, and the ``scaled_fp8`` marker ComfyUI detects the format by."""
    converted = {}
    for key, value in load_file(str(source)).items():
        if key.endswith(".weight") and value.ndim == 2 and "blocks." in key:
            scale = value.float().abs().amax().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
            converted[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            converted[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            converted[key] = value
    converted["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(converted, str(target))


def test_the_fp8_scaled_kontext_layout_trains_and_blocks_are_always_checkpointed(demo_run, tmp_path):
    """ComfyUI loads fp8-scaled files into its quantized Linear modules (0.8.0 and newer: mixed-precision ops, not
    nn.Linear); the trainer must find and train through them (it once refused the README's fp8 Kontext). Asked for
    no gradient checkpointing, it checkpoints anyway and says why: ComfyUI's Flux blocks add residuals in place, and
    backward through them without recomputation fails ("modified by an inplace operation"). The same run renders a
    sample sheet through ComfyUI's VAE decoder (a, a', b, b' per row)."""
    flux = tmp_path / "flux_fp8_scaled.safetensors"
    _scaled_fp8_copy(demo_run["cache"].joinpath(*FILES["unet"]), flux)
    config = _demo_config(demo_run, tmp_path, diffusion_model=str(flux), weight_dtype="default")
    document = yaml.safe_load(config.read_text())
    document["train"].update(steps=1, save_every=1, gradient_checkpointing=False, sample_every=1, sample_steps=2)
    config.write_text(yaml.safe_dump(document))
    result = _train(config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "gradient checkpointing is on although" in result.stdout + result.stderr
    basis = load_file(str(tmp_path / "run" / "lorweb_demo_trained.safetensors"))
    assert len(basis) == 80 and all(torch.isfinite(t.float()).all() for t in basis.values())
    sheet = Image.open(tmp_path / "run" / "samples" / "step_000000001.png")
    tile = sheet.width // 4  # four columns of equal tiles, one row per example (the demo's four pairs)
    assert sheet.width == 4 * tile and sheet.height == 4 * tile and tile >= 16
    assert np.asarray(sheet).std() > 0  # not one flat colour (what NaN would give)
