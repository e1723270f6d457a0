"""The bad-input matrix through a running ComfyUI server: every bad prompt gets an error that says what to do,
and the good prompt queued after it still succeeds (the server survives everything)."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from comfy_host import HOST_DIR, SUPPORT_LINK_NAME, comfyui_version
from comfy_server import get_json, make_base, post_json, running_server
from host_graphs import GOLDEN_FLUX, clip_analogy, golden_analogy, graph
from lorweb_testing import GOLDEN_CKPT, random_basis_tensors, write_ai_toolkit_config, write_safetensors
from PIL import Image
from safetensors.torch import load_file

import lorweb_ops
from lorweb_ops.flux_layout import released_module_names

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
    _write_hostile_files(folder)


def _write_raw_safetensors(path, header: str, data: bytes) -> None:
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def _write_hostile_files(folder) -> None:
    """Files built to hurt (see tests/test_hostile_files.py for the full pure-test matrix)."""
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}'
    _write_raw_safetensors(folder / "gap_header.safetensors", '{"t": ' + entry + "}", bytes(8))
    _write_raw_safetensors(folder / "deep_header.safetensors", "[" * 100_000 + "]" * 100_000, bytes(8))
    huge = '{"t": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 8]}}'
    _write_raw_safetensors(folder / "huge_shape.safetensors", huge, bytes(8))
    degenerate = random_basis_tensors(released_module_names(1, 1))
    for name in [key for key in degenerate if key.endswith(".lora_A")]:
        degenerate[name] = torch.zeros(3, 8, 0)
    write_safetensors(folder / "degenerate.safetensors", degenerate)
    laughs = ['l0: &l0 ["lol"]'] + [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    network = "config:\n  process:\n    - network:\n        type: attlora\n        network_kwargs:\n"
    (folder / "laughs.yaml").write_text("\n".join(laughs) + "\n" + network + "          lora_heads: *l8\n")
    (folder / "deep.yaml").write_text("config: " + "[" * 50_000 + "]" * 50_000 + "\n")
    (folder / "huge.yaml").write_text(network + "          lora_heads: 1\n" + "# padding\n" * 40_000)
    (folder / "bigint.yaml").write_text(network + "          lora_heads: " + "9" * 5000 + "\n")


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
    "header the format refuses (gap)": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="gap_header.safetensors"),
        "error",
        "gap_header.safetensors could not be read as safetensors: the safetensors library refuses it (invalid offset",
    ),
    "deeply nested header": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="deep_header.safetensors"),
        "error",
        "deep_header.safetensors could not be read as safetensors",
    ),
    "shape of 2**64 numbers": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="huge_shape.safetensors"),
        "error",
        "huge_shape.safetensors could not be read as safetensors",
    ),
    "degenerate basis (rank 0)": (
        lambda b: graph(flux(b), golden_analogy(), basis_name="degenerate.safetensors"),
        "error",
        "with a dimension of size 0; the basis is degenerate",
    ),
    "billion laughs config": (
        lambda b: graph(flux(b), golden_analogy(), config="laughs.yaml"),
        "error",
        "lora_heads must be a single value, found a list",
    ),
    "deeply nested config": (
        lambda b: graph(flux(b), golden_analogy(), config="deep.yaml"),
        "error",
        "nests deeper than 32 levels",
    ),
    "oversized config": (
        lambda b: graph(flux(b), golden_analogy(), config="huge.yaml"),
        "error",
        "is larger than 256 kB",
    ),
    "5000-digit number in a config": (
        lambda b: graph(flux(b), golden_analogy(), config="bigint.yaml"),
        "error",
        "lora_heads has a value YAML cannot read",
    ),
    "strength of 10**400 (JSON)": (
        lambda b: graph(flux(b), golden_analogy(), strength=10**400),
        "rejected",
        "strength",
    ),
    "image too small": (lambda b: with_clip(b, a_prime="tiny.png"), "error", "at least 16 pixels"),
}
GOOD_CASES = {
    "golden analogy": lambda b: graph(flux(b), golden_analogy()),
    "through CLIP vision": lambda b: with_clip(b),
    "alpha channel dropped": lambda b: with_clip(b, b="b_rgba.png"),
    "very non-square b": lambda b: with_clip(b, b="b_panorama.png"),
}


@pytest.fixture(scope="module")
def reference_latent(server) -> torch.Tensor:
    url, base = server
    return good_prompt_latent(url, base, "reference")


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_prompt_then_good_prompt(server, reference_latent, case):
    url, base = server
    build, expected_status, expected_message = BAD_CASES[case]
    status, message = queue(url, build(base))
    assert status == expected_status, message
    assert expected_message in message, message
    assert len(message) < 5000, message[:500]
    # the server is alive, and the same good prompt, run again from the file, gives bit-identical samples
    assert torch.equal(good_prompt_latent(url, base, case), reference_latent)


def good_prompt_latent(url: str, base, label: str) -> torch.Tensor:
    """The golden good prompt, made to run from scratch (its Flux read through a new link), its samples saved."""
    links = base / "flux_links"
    links.mkdir(exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in label)
    link = links / f"{tag}.safetensors"
    if not link.exists():
        link.symlink_to(base / "tiny_flux.safetensors")
    prompt = graph(str(link), golden_analogy())
    prompt["save"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["sample", 0], "filename_prefix": f"latents/{tag}"},
    }
    assert queue(url, prompt) == ("success", "")
    saved = sorted((base / "output" / "latents").glob(f"{tag}_*.latent"))
    return load_file(str(saved[-1]))["latent_tensor"]


def test_a_missing_config_is_named_once(server):
    """Load LoRA Basis validates only basis_name (one message per problem), so the config name meets ComfyUI's own
    list check: 0.8.0 refuses it when queued; 0.3.64 checks only V1-style combos there, so the node stops the run
    with its own message, before any weight is touched."""
    url, base = server
    status, message = queue(url, graph(flux(base), golden_analogy(), config="nope.yaml"))
    if comfyui_version() >= (0, 8, 0):
        assert status == "rejected" and message.count("config: 'nope.yaml' not in") == 1, (status, message)
    else:
        assert status == "error", (status, message)
        assert message.count("config 'nope.yaml' was not found in the lorweb model folder") == 1, message
    assert "nope.yaml' not in" not in message or "was not found" not in message  # one message, not both
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
