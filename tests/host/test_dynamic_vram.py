"""The pack's nodes under ComfyUI's dynamic-VRAM model patcher (``ModelPatcherDynamic``, ComfyUI >= 0.33).

On a 0.33 GPU every stock loader builds ``ModelPatcherDynamic``. Here (CPU only) the support pack swaps in
``CpuModelPatcherDynamic`` (ComfyUI's class kept on a CPU load device; see support_pack/dynamic.py for what that
does and does not reach) and the same prompts run as on the legacy patcher: the effective weights are W + strength x
the golden delta, the samples equal the legacy patcher's, the weights come back bitwise and nothing (patch, forward
hook, wrapper) is left on the model. ComfyUI 0.3.64 and 0.8.0 have no dynamic patcher: the ``dynamic`` fixture
asserts that absence, and every test then ends there.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from comfy_host import comfyui_version
from host_graphs import (
    GOLDEN_FLUX,
    STRENGTH,
    close,
    compose_base_nodes,
    compose_files,
    composed,
    expected_delta,
    golden_analogy,
    graph,
    lora_set_nodes,
    patched_layers,
    stock,
)
from lorweb_testing import GOLDEN

#: legacy and dynamic patching do the same float32 arithmetic here (the tiny Flux's weights are force-loaded)
SAME = 1e-6


@pytest.fixture(scope="module")
def dynamic(host):
    """The switch to the dynamic patcher (a context manager), or None where ComfyUI has none (asserted)."""
    import comfy.model_patcher

    has_dynamic = hasattr(comfy.model_patcher, "ModelPatcherDynamic")
    if comfyui_version() < (0, 33, 0):
        assert not has_dynamic, f"ComfyUI {comfyui_version()} unexpectedly has ModelPatcherDynamic"
        assert host.support().CpuModelPatcherDynamic is None
        return None
    assert has_dynamic, f"ComfyUI {comfyui_version()} has no ModelPatcherDynamic"
    return host.support().dynamic_core_patcher


@pytest.fixture(scope="module")
def compose(host):
    return compose_files(host)


def run(host, prompt: dict, dynamic=None) -> dict:
    """Runs ``prompt`` (under the dynamic patcher when its switch is given); returns what the probe recorded."""
    host.support().PROBES.clear()
    with dynamic() if dynamic else contextlib.nullcontext():
        _, outputs = host.run(prompt)
    probe = dict(host.support().PROBES, outputs=outputs)
    assert probe["model"].is_dynamic() == bool(dynamic)
    return probe


def assert_left_clean(host, probe: dict, original: dict) -> None:
    """After ComfyUI unloads: weights bitwise, no forward hook, the loader's model without patches or wrappers."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    diffusion = probe["model"].model.diffusion_model
    state = diffusion.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original), "weights not restored bitwise"
    assert not any(module._forward_hooks for module in diffusion.modules()), "a forward hook was left"
    loaded = host.support().LOADED["model"]
    assert not loaded.patches and not loaded.wrappers, "the input model was changed"
    assert loaded.forced_hooks is None and not loaded.hook_patches  # ModelPatcherDynamic refuses ComfyUI hooks


def test_dynamic_patcher_exists_from_0_33_and_builds_on_cpu_only_through_the_test_class(host, dynamic):
    if dynamic is None:
        return  # absence asserted by the fixture (ComfyUI < 0.33)
    import comfy.model_patcher

    model = torch.nn.Linear(2, 2)
    cpu = torch.device("cpu")
    # ComfyUI's own class hands CPU load devices the legacy patcher: hence the support pack's CPU class
    assert type(comfy.model_patcher.ModelPatcherDynamic(model, cpu, cpu)) is comfy.model_patcher.ModelPatcher
    with dynamic():
        patcher = comfy.model_patcher.CoreModelPatcher(model, cpu, cpu)
        assert isinstance(patcher, comfy.model_patcher.ModelPatcherDynamic) and patcher.is_dynamic()
        assert patcher.clone().is_dynamic()
    assert comfy.model_patcher.CoreModelPatcher is comfy.model_patcher.ModelPatcher  # switched back


def _apply_weights_prompt(flux: str) -> dict:
    """Apply LoRA Basis Weights fed by Apply Weighted LoRA Basis' weights; sampled and probed."""
    prompt = graph(flux, golden_analogy())
    prompt["apply_weights"] = {
        "class_type": "LoRWeB_ApplyWeights",
        "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "weights": ["apply", 1], "strength": STRENGTH},
    }
    for node in ("sample", "probe"):
        prompt[node]["inputs"]["model"] = ["apply_weights", 0]
    return prompt


@pytest.mark.parametrize("node", ["LoRWeB_ApplyBasis", "LoRWeB_ApplyWeights"])
def test_apply_patches_the_golden_delta_and_samples_like_the_legacy_patcher(host, files, golden, dynamic, node):
    if dynamic is None:
        return  # absence asserted by the fixture (ComfyUI < 0.33)
    import comfy.model_management

    prompt = (
        graph(files["flux"], golden_analogy()) if node == "LoRWeB_ApplyBasis" else _apply_weights_prompt(files["flux"])
    )
    legacy = run(host, prompt)
    comfy.model_management.unload_all_models()
    probe = run(host, prompt, dynamic)
    original, weights = files["original"], probe["weights"]
    layers = patched_layers()
    for layer in layers:
        key = f"{layer}.weight"
        expected = original[key] + STRENGTH * expected_delta(golden, "released_like", layer)
        torch.testing.assert_close(weights[key], expected, rtol=0, atol=1e-5, msg=key)
    untouched = [k for k in original if k.rsplit(".", 1)[0] not in layers]
    assert untouched and all(torch.equal(weights[k], original[k]) for k in untouched)
    assert torch.isfinite(probe["samples"]).all()
    close(probe["samples"], legacy["samples"], tolerance=SAME)
    assert_left_clean(host, probe, original)


@pytest.mark.parametrize("method", ["merge", "switch", "composite", "cmlora"])
def test_compose_methods_under_the_dynamic_patcher(host, compose, dynamic, method):
    """Each method against ComfyUI's LoRA loader on the dynamic patcher (the legacy tests' identities) and against
    the same composition on the legacy patcher."""
    if dynamic is None:
        return  # absence asserted by the fixture (ComfyUI < 0.33)
    a, b, c = (compose["loras"][k] for k in "abc")
    identities = {
        "merge": ([(a, 0.6), (b, -0.4), (c, 1.2)], {}, [(a, 0.6), (b, -0.4), (c, 1.2)]),
        "switch": ([(b, 0.7), (a, 1.0)], {"tau": 5}, [(b, 0.7)]),
        "composite": ([(a, 0.8)] * 2, {}, [(a, 0.8)]),
        "cmlora": ([(a, 0.9)] * 3, {"cache": "off"}, [(a, 0.9)]),
    }
    loras, options, stock_loras = identities[method]
    expected = run(host, stock(compose, stock_loras, steps=4), dynamic)
    probe = run(host, composed(compose, loras, method, steps=4, **options), dynamic)
    if method == "merge":  # the same patches as chained LoraLoaderModelOnly: bitwise
        assert torch.equal(probe["samples"], expected["samples"])
        assert all(torch.equal(probe["weights"][k], expected["weights"][k]) for k in expected["weights"])
    else:  # on the activations: the weights stay the originals while sampling
        close(probe["samples"], expected["samples"])
        assert all(torch.equal(probe["weights"][k], compose["original"][k]) for k in compose["original"])
    assert_left_clean(host, probe, compose["original"])

    three = [(a, 1.0), (b, 1.0), (c, 1.0)]
    legacy = run(host, composed(compose, three, method, steps=4))
    probe = run(host, composed(compose, three, method, steps=4), dynamic)
    close(probe["samples"], legacy["samples"], tolerance=SAME)
    assert_left_clean(host, probe, compose["original"])


def test_scheduled_strength_under_the_dynamic_patcher(host, compose, dynamic):
    if dynamic is None:
        return  # absence asserted by the fixture (ComfyUI < 0.33)
    a, b = compose["loras"]["a"], compose["loras"]["b"]
    expected = run(host, stock(compose, [(a, 0.5)], steps=4), dynamic)

    def scheduled(loras, start, end, strengths):
        nodes, lora_set = lora_set_nodes(loras)
        prompt = {**compose_base_nodes(compose["flux"], 1.0, 4, "euler", ["scheduled", 0]), **nodes}
        prompt["scheduled"] = {
            "class_type": "LoRWeB_ScheduledStrength",
            "inputs": {"model": ["flux", 0], "lora_set": lora_set, "start": start, "end": end, "strengths": strengths},
        }
        return prompt

    probe = run(host, scheduled([(a, 1.0)], 0.5, 0.5, ""), dynamic)
    close(probe["samples"], expected["samples"])
    assert all(torch.equal(probe["weights"][k], compose["original"][k]) for k in compose["original"])
    assert_left_clean(host, probe, compose["original"])

    ramp = scheduled([(a, 1.0), (b, 0.5)], 1.0, 0.0, "")
    legacy = run(host, ramp)
    probe = run(host, ramp, dynamic)
    close(probe["samples"], legacy["samples"], tolerance=SAME)
    assert_left_clean(host, probe, compose["original"])


def test_saved_lora_loads_with_the_stock_loader_under_the_dynamic_patcher(host, files, golden, dynamic):
    if dynamic is None:
        return  # absence asserted by the fixture (ComfyUI < 0.33)
    import comfy.model_management

    prompt = graph(files["flux"], golden_analogy())
    prompt["save"] = {
        "class_type": "LoRWeB_SaveComposedLoRA",
        "inputs": {
            "basis": ["basis", 0],
            "weights": ["apply", 1],
            "filename_prefix": "lorweb_dynamic/full",
            "rank": 0,
            "dtype": "float32",
        },
    }
    pack = run(host, prompt, dynamic)
    comfy.model_management.unload_all_models()
    saved = pack["outputs"]["save"]["lorweb_saved"][0]
    assert saved["exact"] and saved["lora_name"].startswith("lorweb_dynamic/full_")

    loaded = run(host, stock(files, [(saved["lora_name"], STRENGTH)]), dynamic)
    for layer in patched_layers():
        key = f"{layer}.weight"
        expected = files["original"][key] + STRENGTH * expected_delta(golden, "released_like", layer)
        torch.testing.assert_close(loaded["weights"][key], expected, rtol=0, atol=1e-5, msg=key)
        torch.testing.assert_close(loaded["weights"][key], pack["weights"][key], rtol=0, atol=1e-5, msg=key)
    assert_left_clean(host, loaded, files["original"])


def test_trainer_glue_trains_on_a_dynamic_patchers_model(host, files, dynamic, tmp_path):
    """backend_from_comfy takes the diffusion model out of the patcher ComfyUI's loader returned (dynamic on a 0.33
    GPU) and trains LoRAs injected as forward hooks; the frozen base weights are left bitwise and the hooks go."""
    if dynamic is None:
        return  # absence asserted by the fixture (ComfyUI < 0.33)
    from train_testing import latents_16, text_16_8, training_config, write_quadruplets

    from lorweb_train.backends.comfyui import backend_from_comfy
    from lorweb_train.config import config_from_mapping
    from lorweb_train.trainer import Trainer

    support = host.support()
    with dynamic():
        patcher = support.TinyFluxLoader().load(files["flux"])[0]
    assert patcher.is_dynamic()
    clip_vision = support.TinyClipVisionLoader().load(str(GOLDEN / "tiny_clip_vision"))[0]
    backend = backend_from_comfy(
        patcher, torch.device("cpu"), encode_text=text_16_8, encode_latents=latents_16, clip_vision=clip_vision
    )
    assert backend.diffusion_model is patcher.model.diffusion_model
    write_quadruplets(tmp_path / "data", 2, seed=1)
    sections = dict(
        data={"resolution": 64},
        train={"steps": 2, "lr": 5e-2, "gradient_checkpointing": True, "save_dtype": "float32"},
        model={"backend": "comfyui"},
    )
    trainer = Trainer(
        config_from_mapping(training_config(tmp_path, tmp_path / "data", **sections), "dynamic"), backend=backend
    )
    try:
        trainer.train()
        assert [step for step, _ in trainer.losses] == [1, 2]
        assert all(torch.isfinite(torch.tensor(loss)) for _, loss in trainer.losses)
        assert trainer.basis.layer("single_transformer_blocks.0.proj_out").lora_B.abs().max() > 0
    finally:
        trainer.close()
    diffusion = patcher.model.diffusion_model
    assert not any(module._forward_hooks for module in diffusion.modules())
    state = diffusion.state_dict()
    assert all(torch.equal(state[k], files["original"][k]) for k in files["original"])
    assert not patcher.patches and not patcher.wrappers


def test_weights_over_16_kib_get_comfyuis_lowvram_patch_of_the_basis_delta(host, dynamic, tmp_path):
    """What a GPU runs for a real-size layer: ModelPatcherDynamic leaves the weight as it is and attaches a
    ``LowVramPatch`` that ComfyUI's cast calls on the weight at each forward. On CPU there is no vbar, so that call
    never happens (sampling here would use the plain weights): call the attached patch the way the cast does."""
    if dynamic is None:
        return  # absence asserted by the fixture (ComfyUI < 0.33)
    import comfy.model_management
    import comfy.model_patcher
    from lorweb_testing import random_basis_tensors, write_safetensors

    import lorweb_ops
    from lorweb_ops.flux_layout import released_module_names

    support = host.support()
    flux = str(tmp_path / "flux_hidden_64.safetensors")
    original = support.write_tiny_flux(flux, **dict(GOLDEN_FLUX, hidden=64, heads=1, axes=[8, 8, 48]))
    tensors = random_basis_tensors(released_module_names(1, 1), hidden=64, mlp=256, dtype=torch.float32)
    path = write_safetensors(tmp_path / "basis_hidden_64.safetensors", tensors)
    basis = lorweb_ops.load_basis(path, use_cache=False)
    query = torch.randn(1, basis.query_dim, generator=torch.Generator().manual_seed(5))
    analogy = lorweb_ops.Analogy(query, "cat-aa'b", {}, "random query", basis.query_dim // 3)
    with dynamic():
        model = support.TinyFluxLoader().load(flux)[0]
        patched = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyBasis"].execute(model, basis, analogy, 0.5).result[0]
    assert patched.is_dynamic()
    comfy.model_management.load_models_gpu([patched])
    coefficients = lorweb_ops.mixing_coefficients(basis, query)
    diffusion = patched.model.diffusion_model
    layers = sorted({target.bfl_layer for target in lorweb_ops.module_targets(basis)})
    for layer in layers:
        module = diffusion.get_submodule(layer)
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        assert size > 16 * 1024, f"{layer} ({size} bytes) is small enough to be force-loaded"
        assert torch.equal(module.weight, original[f"{layer}.weight"]), f"{layer} was patched in place"
        patch = module.weight_lowvram_function
        assert isinstance(patch, comfy.model_patcher.LowVramPatch), layer
        expected = original[f"{layer}.weight"] + 0.5 * lorweb_ops.flux_delta(basis, coefficients, layer)
        actual = patch(original[f"{layer}.weight"].clone())
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, msg=layer)
    comfy.model_management.unload_all_models()
    state = diffusion.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert not model.patches
