"""The bad-input matrix through a running ComfyUI server: every bad prompt gets an error that says what to do,
and the good prompt queued after it still succeeds (the server survives everything)."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from comfy_host import HOST_DIR, SUPPORT_LINK_NAME
from comfy_server import get_json, make_base, post_json, running_server
from host_graphs import GOLDEN_FLUX, clip_analogy, golden_analogy, graph
from lorweb_testing import GOLDEN_CKPT, random_basis_tensors, write_ai_toolkit_config, write_safetensors
from PIL import Image
from safetensors.torch import load_file

import lorweb_ops
from lorweb_ops.flux_map import released_module_names

RUN_SECONDS = 120


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("matrix_base"), {SUPPORT_LINK_NAME: HOST_DIR / "support_pack"})
    _write_bases(base / "models" / "lorweb")
    support = host.support()
    support.write_tiny_flux(str(base / "tiny_flux.safetensors"), **GOLDEN_FLUX)
    support.write_tiny_flux(str(base / "wide_flux.safetensors"), **dict(GOLDEN_FLUX, hidden=16, axes=[4, 4, 8]))
    _write_images(base / "input")
    with running_server(base) as url:
        yield url, base


def _write_bases(folder):
    shutil.copy(GOLDEN_CKPT, folder / "golden.safetensors")
    (folder / "garbage.safetensors").write_bytes(b"definitely not tensors" * 10)
    data = (folder / "golden.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) - 500])
    write_safetensors(
        folder / "ordinary_lora.safetensors",
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
        },
    )
    mixed = random_basis_tensors(released_module_names(1, 0))
    mixed.update(random_basis_tensors(released_module_names(0, 1), num_loras=4))
    write_safetensors(folder / "inconsistent.safetensors", mixed)
    poisoned = load_file(str(GOLDEN_CKPT))
    poisoned["transformer.transformer_blocks.0.attn.to_q.lora_A"][0, 0, 0] = float("nan")
    write_safetensors(folder / "nan.safetensors", poisoned)
    write_safetensors(folder / "query12.safetensors", random_basis_tensors(released_module_names(1, 1), query_dim=12))
    (folder / "malformed.yaml").write_text("config: [unclosed\n  : :", encoding="utf-8")
    (folder / "unrelated.yaml").write_text("model: flux\nsteps: 28\n", encoding="utf-8")
    write_ai_toolkit_config(folder / "token_mode.yaml", query_mode="cat-paa'b")


def _write_images(folder):
    grid = Image.open(HOST_DIR.parent / "data" / "golden" / "grid_square.png").convert("RGB")
    tiles = lorweb_ops.grid_quadrants(grid)
    for name, tile in tiles.items():
        tile.save(folder / f"{name}.png")
    tiles["b"].convert("RGBA").save(folder / "b_rgba.png")
    Image.new("RGB", (8, 8), "white").save(folder / "tiny.png")
    tiles["b"].resize((1600, 40)).save(folder / "b_panorama.png")


def queue(url: str, prompt: dict) -> tuple[str, str]:
    """Queue a prompt; returns ("rejected", message) or the run's ("success" | "error", message)."""
    status, body = post_json(url + "/prompt", {"prompt": prompt, "client_id": "lorweb-matrix"})
    if status != 200:
        return "rejected", str(body)
    prompt_id, deadline = body["prompt_id"], time.monotonic() + RUN_SECONDS
    while not (history := get_json(f"{url}/history/{prompt_id}")):
        assert time.monotonic() < deadline, "the prompt did not finish"
        time.sleep(0.2)
    run = history[prompt_id]["status"]
    errors = [data.get("exception_message", "") for event, data in run["messages"] if event == "execution_error"]
    return run["status_str"], " ".join(errors)


def flux(base, name="tiny_flux.safetensors") -> str:
    return str(base / name)


def with_clip(base, **images) -> dict:
    node, extra = clip_analogy(**images)
    return graph(flux(base), node, extra=extra)


def with_batch(base) -> dict:
    node, extra = clip_analogy()
    extra["batch_b"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["image_b", 0], "amount": 2}}
    node["inputs"]["b"] = ["batch_b", 0]
    return graph(flux(base), node, extra=extra)


BAD_CASES = {
    "missing basis": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="missing.safetensors"),
        "rejected",
        "was not found in the lorweb model folder",
    ),
    "name escaping the folder": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="../tiny_flux.safetensors"),
        "rejected",
        "names may not leave the folder",
    ),
    "missing config": (
        lambda b: graph(flux(b), golden_analogy(), config="nope.yaml"),
        "rejected",
        "config 'nope.yaml' was not found",
    ),
    "NaN strength": (
        lambda b: graph(flux(b), golden_analogy(), strength=float("nan")),
        "rejected",
        "strength must be a number between -10 and 10",
    ),
    "absurd strength": (
        lambda b: graph(flux(b), golden_analogy(), strength=1e9),
        "rejected",
        "strength must be a number between -10 and 10",
    ),
    "not a safetensors file": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="garbage.safetensors"),
        "error",
        "could not be read as safetensors",
    ),
    "truncated file": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="truncated.safetensors"),
        "error",
        "damaged or incomplete: download it again",
    ),
    "ordinary LoRA as basis": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="ordinary_lora.safetensors"),
        "error",
        "is an ordinary LoRA",
    ),
    "inconsistent basis": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="inconsistent.safetensors"),
        "error",
        "every module of a basis must agree",
    ),
    "NaN in the basis": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="nan.safetensors"),
        "error",
        "contains NaN or Inf values",
    ),
    "malformed config": (
        lambda b: graph(flux(b), golden_analogy(), config="malformed.yaml"),
        "error",
        "is not readable YAML",
    ),
    "unknown config": (
        lambda b: graph(flux(b), golden_analogy(), config="unrelated.yaml"),
        "error",
        "is not an ai-toolkit training config",
    ),
    "token-feature query mode": (
        lambda b: graph(flux(b), golden_analogy(), config="token_mode.yaml"),
        "error",
        "uses encoder token features",
    ),
    "encoder size vs basis": (
        lambda b: dict(
            with_clip(b),
            basis={"class_type": "LoRWeB_LoadBasis", "inputs": {"basis_name": "query12.safetensors", "config": "auto"}},
        ),
        "error",
        "expects 12 (4 per image)",
    ),
    "model of another width": (
        lambda b: graph(flux(b, "wide_flux.safetensors"), golden_analogy()),
        "error",
        "does not fit this Flux model",
    ),
    "image batch": (with_batch, "error", "scripts/run_analogy.py"),
    "image too small": (lambda b: with_clip(b, a_prime="tiny.png"), "error", "at least 16 pixels"),
}
GOOD_CASES = {
    "golden analogy": lambda b: graph(flux(b), golden_analogy()),
    "through CLIP vision": lambda b: with_clip(b),
    "alpha channel dropped": lambda b: with_clip(b, b="b_rgba.png"),
    "very non-square b": lambda b: with_clip(b, b="b_panorama.png"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_prompt_then_good_prompt(server, case):
    url, base = server
    build, expected_status, expected_message = BAD_CASES[case]
    status, message = queue(url, build(base))
    assert status == expected_status, message
    assert expected_message in message, message
    assert queue(url, fresh_good_prompt(base)) == ("success", "")


def fresh_good_prompt(base) -> dict:
    """A good prompt the server has not cached (new seed), so it really runs."""
    prompt = graph(flux(base), golden_analogy())
    prompt["sample"]["inputs"]["seed"] = time.monotonic_ns() % 2**31
    return prompt


@pytest.mark.parametrize("case", list(GOOD_CASES))
def test_unusual_but_valid_prompts_succeed(server, case):
    url, base = server
    assert queue(url, GOOD_CASES[case](base)) == ("success", "")
