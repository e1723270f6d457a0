"""The trainer on ComfyUI's own Flux (tiny, real layer layout): it trains through the ComfyUI glue, and the basis it
saves loads in Load LoRA Basis and patches a model through Apply Weighted LoRA Basis to the same outputs the
training-time injection gives."""

from __future__ import annotations

import shutil

import pytest
import torch
from lorweb_testing import GOLDEN
from safetensors.torch import load_file, save_file
from train_testing import latents_16, text_16_8, training_config, write_quadruplets

import lorweb_ops

FLUX = dict(hidden=8, mlp_ratio=4.0, heads=1, axes=[2, 2, 4], depth=1, single_depth=1, context=16, vec=8)


@pytest.fixture(scope="module")
def trained(host, tmp_path_factory):
    from lorweb_train.backends.comfyui import backend_from_comfy
    from lorweb_train.config import config_from_mapping
    from lorweb_train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("train")
    support = host.support()
    flux_path = host.base / "tiny_flux_for_training.safetensors"
    original = support.write_tiny_flux(str(flux_path), **FLUX)
    write_quadruplets(tmp / "data", 2, seed=1)
    patcher = support.TinyFluxLoader().load(str(flux_path))[0]
    clip_vision = support.TinyClipVisionLoader().load(str(GOLDEN / "tiny_clip_vision"))[0]
    backend = backend_from_comfy(
        patcher, torch.device("cpu"), encode_text=text_16_8, encode_latents=latents_16, clip_vision=clip_vision
    )
    sections = dict(
        data={"resolution": 64},
        train={"steps": 3, "lr": 5e-2, "gradient_checkpointing": True, "save_dtype": "float32"},
        model={"backend": "comfyui"},
    )
    config = config_from_mapping(training_config(tmp, tmp / "data", **sections), "host test")
    trainer = Trainer(config, backend=backend)
    basis_path = trainer.train()
    lorweb = host.models / "lorweb"
    shutil.copy(basis_path, lorweb / "trained.safetensors")
    shutil.copy(tmp / "out" / "config.yaml", lorweb / "trained.yaml")
    query = trainer._query(trainer.cached[trainer.train_files[0]], 0)
    save_file({"query": query.contiguous()}, str(tmp / "query.safetensors"))
    yield {"trainer": trainer, "flux": str(flux_path), "original": original, "query": str(tmp / "query.safetensors")}
    trainer.close()  # hooks off, ComfyUI's own RoPE back


def test_training_runs_on_comfyuis_flux(trained):
    trainer = trained["trainer"]
    assert [step for step, _ in trainer.losses] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in trainer.losses)
    layer = trainer.basis.layer("single_transformer_blocks.0.proj_out")
    assert layer.lora_B.abs().max() > 0  # the basis moved away from its zero start
    loaded = lorweb_ops.load_basis(trainer.final_basis_path, use_cache=False)
    assert (loaded.num_loras, loaded.rank, len(loaded.modules)) == (4, 2, 20)


def test_saved_basis_patches_comfyuis_model_like_the_training_injection(host, trained):
    import comfy.model_management

    prompt = {
        "flux": {"class_type": "LoRWeBTest_TinyFluxLoader", "inputs": {"path": trained["flux"]}},
        "basis": {"class_type": "LoRWeB_LoadBasis", "inputs": {"basis_name": "trained.safetensors", "config": "auto"}},
        "analogy": {
            "class_type": "LoRWeBTest_AnalogyFromQuery",
            "inputs": {"path": trained["query"], "key": "query", "query_mode": "cat-aa'b"},
        },
        "apply": {
            "class_type": "LoRWeB_ApplyBasis",
            "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "analogy": ["analogy", 0], "strength": 1.0},
        },
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "probe": {"class_type": "LoRWeBTest_ProbeWeights", "inputs": {"model": ["apply", 0], "samples": ["latent", 0]}},
    }
    host.run(prompt)
    probe = host.support().PROBES
    basis = lorweb_ops.load_basis(str(host.models / "lorweb" / "trained.safetensors"), use_cache=False)
    query = load_file(trained["query"])["query"]  # the file ComfyUI's analogy node read
    coefficients = lorweb_ops.mixing_coefficients(basis, query)
    for name, module in probe["model"].model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
            expected = trained["original"][f"{name}.weight"] + lorweb_ops.flux_delta(basis, coefficients, name)
            torch.testing.assert_close(probe["weights"][f"{name}.weight"], expected, rtol=0, atol=1e-5)

    # the same forward: ComfyUI's patched model vs the trainer's hooks on the unpatched training model
    trainer = trained["trainer"]
    generator = torch.Generator().manual_seed(3)
    x, reference = torch.randn(1, 16, 8, 8, generator=generator), torch.randn(1, 16, 8, 8, generator=generator)
    context, pooled = torch.randn(1, 5, 16, generator=generator), torch.randn(1, 8, generator=generator)
    args = (x, torch.tensor([0.6]), context)
    kwargs = dict(y=pooled, guidance=torch.tensor([1.0]), ref_latents=[reference])
    with torch.no_grad():
        patched = probe["model"].model.diffusion_model(*args, **kwargs)
        trainer.injector.set_mix(trainer.basis(query.reshape(1, -1)))
        hooked = trainer.backend.diffusion_model(*args, **kwargs)
        trainer.injector.clear_mix()
    torch.testing.assert_close(hooked, patched, rtol=1e-4, atol=1e-5)
    comfy.model_management.unload_all_models()


def test_comfyui_loading_glue_names_missing_files(host, tmp_path):
    from lorweb_ops.errors import LoRWeBError
    from lorweb_train.backends.comfyui import comfyui_backend, resolve
    from lorweb_train.config import ModelConfig

    with pytest.raises(LoRWeBError, match=r"neither a file nor in ComfyUI's models/diffusion_models"):
        resolve("no_such_kontext.safetensors", "diffusion_models", "diffusion_model")
    with pytest.raises(LoRWeBError, match="model.diffusion_model is empty"):
        comfyui_backend(ModelConfig(), torch.device("cpu"))
    existing = tmp_path / "kontext.safetensors"
    existing.write_bytes(b"")
    assert resolve(str(existing), "diffusion_models", "diffusion_model") == str(existing)
