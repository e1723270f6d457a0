"""Frequency Profile in a real ComfyUI: a tiny Flux, three LoRA files and ComfyUI's own Flux-layout VAE (random
weights). The scores are recomputed here from images made with the stock LoRA loader, sampler and VAE decode, with a
float64 numpy re-derivation of the reference statistic; the node's order and partition must follow them."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from comfy_host import REPO_ROOT
from host_graphs import GOLDEN_FLUX
from safetensors.torch import save_file

if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.append(str(REPO_ROOT / "scripts"))

HIDDEN, MLP = 8, 32
SETTINGS = dict(seed=3, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple")


def flux_vae():
    """ComfyUI's VAE class on a random state dict of the Flux autoencoder layout (z = 16, ch 128, mult 1 2 4 4)."""
    import comfy.sd
    from lorweb_demo import flux_vae_engine

    with torch.device("meta"):
        engine = flux_vae_engine()
    generator = torch.Generator().manual_seed(11)
    state = {}
    for key, value in engine.state_dict().items():
        if key.endswith(".bias"):
            state[key] = torch.zeros(value.shape)
        elif value.ndim == 1:  # group norm scales
            state[key] = torch.ones(value.shape)
        else:  # variance-preserving so the decoded image varies instead of saturating
            fan_in = math.prod(value.shape[1:])
            state[key] = torch.randn(value.shape, generator=generator) / math.sqrt(fan_in)
    return comfy.sd.VAE(sd=state)


def write_loras(folder) -> list[str]:
    names = []
    for index, scale in enumerate((1.5, 0.05, 0.6)):
        generator = torch.Generator().manual_seed(40 + index)
        tensors = {
            "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, HIDDEN, generator=generator),
            "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": scale
            * torch.randn(HIDDEN, 2, generator=generator),
            "diffusion_model.single_blocks.0.linear2.lora_A.weight": torch.randn(2, HIDDEN + MLP, generator=generator),
            "diffusion_model.single_blocks.0.linear2.lora_B.weight": scale
            * torch.randn(HIDDEN, 2, generator=generator),
        }
        name = f"compose_frequency_{index}.safetensors"
        save_file(tensors, str(folder / name))
        names.append(name)
    return names


def reference_score(image: np.ndarray) -> float:
    """The notebook's statistic, float64, one ring at a time, on a ComfyUI IMAGE [H, W, 3] in 0..1."""
    rgb = np.clip(255.0 * image.astype(np.float64), 0, 255).astype(np.uint8)
    gray = rgb.astype(np.float64).mean(axis=2).astype(np.uint8).astype(np.float64)
    log_amplitude = np.log(np.abs(np.fft.fftshift(np.fft.fft2(gray))) + 1e-8)
    rows, cols = gray.shape
    y, x = np.ogrid[:rows, :cols]
    radius = np.sqrt((y - rows // 2) ** 2 + (x - cols // 2) ** 2)
    rings = int(radius.max()) + 1
    profile = np.array(
        [np.mean(log_amplitude[(radius >= i) & (radius < i + 1)]) for i in range(rings)], dtype=np.float32
    )
    profile = profile / profile.max()
    return float(np.mean(profile[int(0.2 * (rings - 1)) :].astype(np.float64)))


@pytest.fixture(scope="module")
def setup(host):
    flux_path = host.base / "frequency_tiny_flux.safetensors"
    host.support().write_tiny_flux(str(flux_path), **GOLDEN_FLUX)
    model = host.support().TinyFluxLoader().load(str(flux_path))[0]
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 5, 16, generator=generator), {"pooled_output": torch.randn(1, 8), "guidance": 2.5}]]
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    return {
        "model": model,
        "vae": flux_vae(),
        "loras": write_loras(host.models / "loras"),
        "cond": positive,
        "latent": latent,
    }


def _image(host, setup, model) -> np.ndarray:
    latent = host.nodes.common_ksampler(
        model, **SETTINGS, positive=setup["cond"], negative=setup["cond"], latent=setup["latent"]
    )[0]
    return setup["vae"].decode(latent["samples"])[0].detach().float().numpy()


def test_frequency_profile_orders_by_the_recomputed_score_change(host, setup):
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    lora_set = None
    for name in setup["loras"]:
        lora_set = nodes["LoRWeB_LoraSetAddLoRA"].execute(name, 1.0, lora_set).result[0]
    output = nodes["LoRWeB_FrequencyProfile"].execute(
        setup["model"], lora_set, setup["vae"], setup["cond"], setup["cond"], setup["latent"], threshold=0.0, **SETTINGS
    )
    ordered, plot, report = output.result

    base = reference_score(_image(host, setup, setup["model"]))
    stock = host.nodes.LoraLoaderModelOnly()
    changes = {
        name: reference_score(_image(host, setup, stock.load_lora_model_only(setup["model"], name, 1.0)[0])) - base
        for name in setup["loras"]
    }
    assert len(set(changes.values())) == 3, changes  # the three LoRAs change the image differently
    expected = sorted(setup["loras"], key=lambda n: -changes[n])
    assert [entry.name for entry in ordered.entries] == expected
    assert ordered.high_count == sum(1 for c in changes.values() if c > 0)
    np.testing.assert_allclose(ordered.scores, [changes[n] for n in expected], rtol=1e-5, atol=1e-7)
    assert plot.shape == (1, 400, 640, 3) and plot.std() > 0
    assert all(name in report for name in setup["loras"])
    assert output.ui is not None  # the plot is shown in the node
