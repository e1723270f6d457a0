"""Composing LoRAs over the steps (LoRWeB_ComposeLoRASet, ScheduledStrength) in a real ComfyUI on a tiny Flux.

Equalities are checked against ComfyUI's own LoRA loader (LoraLoaderModelOnly) sampled the same way, never against
the composition code itself. Activations (x W^T + x A^T B^T) and merged weights (x (W + B A)^T) round differently in
float32; over a few steps of the tiny model that stays below 1e-5 of the latent's scale, so 1e-4 is the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from comfy_host import ExecutionFailed
from host_graphs import (
    close,
    compose_base_nodes,
    compose_files,
    compose_runtime,
    composed,
    lora_set_nodes,
    samples,
    stock,
)
from lorweb_testing import GOLDEN_TENSORS
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def files(host):
    return compose_files(host)


def test_composite_of_copies_equals_one_lora(host, files):
    a = files["loras"]["a"]
    expected = samples(host, stock(files, [(a, 0.8)]))
    for count in (2, 3):
        close(samples(host, composed(files, [(a, 0.8)] * count, "composite")), expected)


def test_switch_with_tau_beyond_the_steps_is_the_first_lora(host, files):
    a, b = files["loras"]["a"], files["loras"]["b"]
    expected = samples(host, stock(files, [(b, 0.7)]))
    close(samples(host, composed(files, [(b, 0.7), (a, 1.0)], "switch", steps=3, tau=3)), expected)
    close(samples(host, composed(files, [(b, 0.7), (a, 1.0)], "switch", steps=3, tau=5)), expected)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_one_step_composite_and_cmlora_are_weighted_means_of_single_lora_samples(host, files, cfg):
    """One Euler step returns the denoised prediction, affine in the model output: a weighted mean of per-LoRA
    predictions is the same weighted mean of the per-LoRA samples (CFG is affine too)."""
    a, b, c = files["loras"]["a"], files["loras"]["b"], files["loras"]["c"]
    alone = [samples(host, stock(files, [(name, 1.0)], steps=1, cfg=cfg)) for name in (a, b, c)]
    loras = [(a, 1.0), (b, 1.0), (c, 1.0)]
    close(samples(host, composed(files, loras, "composite", steps=1, cfg=cfg)), sum(alone) / 3)
    dominant, other = 2.5 / 4.5, 1 / 4.5  # (N - 0.5) / (2N - 1.5) and 1 / (2N - 1.5) for N = 3
    expected = dominant * alone[0] + other * (alone[1] + alone[2])
    for cache in ("off", "non-uniform"):
        close(samples(host, composed(files, loras, "cmlora", steps=1, cfg=cfg, cache=cache)), expected)


def test_cmlora_without_caching_of_copies_equals_one_lora(host, files):
    """Caching off: every LoRA fresh every step, so copies of one LoRA give that LoRA whatever the weights.
    (With caching, copies refreshed at different steps carry different stale contributions: not an identity.)"""
    a = files["loras"]["a"]
    expected = samples(host, stock(files, [(a, 0.9)], steps=6))
    for cache, interval in (("off", 3), ("uniform", 1)):
        prompt = composed(files, [(a, 0.9)] * 3, "cmlora", steps=6, cache=cache, cache_interval=interval)
        close(samples(host, prompt), expected)


def test_merge_equals_chained_lora_loaders(host, files):
    loras = [(files["loras"]["a"], 0.6), (files["loras"]["b"], -0.4), (files["loras"]["c"], 1.2)]
    expected_samples = samples(host, stock(files, loras))
    expected_weights = host.support().PROBES["weights"]
    actual_samples = samples(host, composed(files, loras, "merge"))
    actual_weights = host.support().PROBES["weights"]
    assert torch.equal(actual_samples, expected_samples)
    assert all(torch.equal(actual_weights[k], expected_weights[k]) for k in expected_weights)


def _forwards_per_step(host, steps: int) -> list[int]:
    per_step = [0] * steps
    for step, forwards in compose_runtime(host).state.combined.calls:
        per_step[step] += forwards
    return per_step


def test_forwards_per_step_of_each_method(host, files):
    a, b, c = files["loras"]["a"], files["loras"]["b"], files["loras"]["c"]
    loras = [(a, 1.0), (b, 1.0), (c, 1.0)]
    host.run(composed(files, loras, "composite", steps=6))
    assert _forwards_per_step(host, 6) == [3] * 6
    host.run(composed(files, loras, "switch", steps=6, tau=2))
    assert _forwards_per_step(host, 6) == [1] * 6
    host.run(composed(files, loras, "cmlora", steps=6, cache="off"))
    assert _forwards_per_step(host, 6) == [3] * 6
    # non-uniform refresh for T = 6 (re-derived): every 2 in [0, int(2.25)), every 3 in [2, int(5.25)), every 2 after
    refresh = set(range(0, 2, 2)) | set(range(2, 5, 3)) | set(range(5, 6, 2))
    assert refresh == {0, 2, 5}
    host.run(composed(files, loras, "cmlora", steps=6, cache="non-uniform"))
    expected = [4 if s == 0 else 2 if s in refresh else 1 for s in range(6)]
    assert _forwards_per_step(host, 6) == expected
    # three cached contributions of one 1 x 16 x 4 x 4 float32 prediction each, released after sampling
    state = compose_runtime(host).state.combined
    assert state.cache_bytes == 3 * 16 * 4 * 4 * 4 and state.deltas == {}
    # the reference code turns caching off with the non-uniform schedule: every LoRA every step
    host.run(composed(files, loras, "cmlora", steps=6, cache="non-uniform", reference_behaviour=True))
    assert _forwards_per_step(host, 6) == [3] * 6


def test_two_calls_per_step_do_not_advance_the_schedule_twice(host, files):
    """Heun calls the model twice per step (not on the last): the refreshes still happen once per step."""
    a, b = files["loras"]["a"], files["loras"]["b"]
    host.run(composed(files, [(a, 1.0), (b, 1.0)], "cmlora", steps=6, sampler="heun", cache="non-uniform"))
    calls = compose_runtime(host).state.combined.calls
    assert len(calls) == 2 * 6 - 1  # heun: 2 model calls per step, the last step is a plain Euler step
    extra = sum(forwards - 1 for _, forwards in calls)
    # step 0 fills the base and the other LoRA (2 extra), each later refresh step {2, 5} one base pass
    assert extra == 2 + 2
    assert sorted({step for step, _ in calls}) == list(range(6))


def test_weights_are_the_originals_during_and_after_sampling_and_no_hook_is_left(host, files):
    loras = [(files["loras"]["a"], 1.0), (files["loras"]["c"], 1.0)]
    for method in ("switch", "composite", "cmlora"):
        host.run(composed(files, loras, method, steps=4))
        probe = host.support().PROBES
        assert all(torch.equal(probe["weights"][k], files["original"][k]) for k in files["original"]), method
        diffusion = probe["model"].model.diffusion_model
        assert not any(module._forward_hooks for module in diffusion.modules()), method


def test_interrupting_a_composed_run_leaves_the_model_unpatched(host, files):
    import comfy.model_management
    import comfy.patcher_extension
    import comfy.sample

    host.run(composed(files, [(files["loras"]["a"], 1.0), (files["loras"]["b"], 1.0)], "cmlora", steps=4))
    model = host.support().PROBES["model"].clone()
    seen = []

    def interrupt_on_third_call(executor, *args, **kwargs):
        seen.append(1)
        if len(seen) == 3:
            raise comfy.model_management.InterruptProcessingException()
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_interrupt", interrupt_on_third_call
    )
    latent = torch.zeros(1, 16, 4, 4)
    positive = [[torch.randn(1, 5, 16), {"pooled_output": torch.randn(1, 8), "guidance": 2.5}]]
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample(model, noise, 4, 1.0, "euler", "simple", positive, positive, latent)
    diffusion = model.model.diffusion_model
    assert not any(module._forward_hooks for module in diffusion.modules())
    comfy.model_management.unload_all_models()
    state = diffusion.state_dict()
    assert all(torch.equal(state[k], files["original"][k]) for k in files["original"])


def test_scheduled_strength_constant_equals_lora_at_that_strength(host, files):
    a = files["loras"]["a"]
    expected = samples(host, stock(files, [(a, 0.5)], steps=4))
    nodes, lora_set = lora_set_nodes([(a, 1.0)])
    for start, end, strengths in ((0.5, 0.5, ""), (0.0, 0.0, "0.5"), (1.0, 0.0, "0.5, 0.5, 0.5")):
        prompt = {**compose_base_nodes(files["flux"], 1.0, 4, "euler", ["scheduled", 0]), **nodes}
        prompt["scheduled"] = {
            "class_type": "LoRWeB_ScheduledStrength",
            "inputs": {"model": ["flux", 0], "lora_set": lora_set, "start": start, "end": end, "strengths": strengths},
        }
        close(samples(host, prompt), expected)


def test_analogy_in_a_set_equals_apply_basis(host, files):
    """An analogy first in a switch set with tau beyond the steps samples as LoRWeB_ApplyBasis does."""
    analogy_nodes = {
        "basis": {
            "class_type": "LoRWeB_LoadBasis",
            "inputs": {"basis_name": "compose_golden.safetensors", "config": "auto"},
        },
        "analogy": {
            "class_type": "LoRWeBTest_AnalogyFromQuery",
            "inputs": {"path": str(GOLDEN_TENSORS), "key": "query_square", "query_mode": "cat-aa'b"},
        },
        "apply": {
            "class_type": "LoRWeB_ApplyBasis",
            "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "analogy": ["analogy", 0], "strength": 0.8},
        },
    }
    expected = samples(host, {**compose_base_nodes(files["flux"], 1.0, 3, "euler", ["apply", 0]), **analogy_nodes})
    prompt = {**compose_base_nodes(files["flux"], 1.0, 3, "euler", ["compose", 0]), **analogy_nodes}
    prompt["set0"] = {
        "class_type": "LoRWeB_LoraSetAddAnalogy",
        "inputs": {"basis": ["basis", 0], "weights": ["apply", 1], "strength": 0.8, "name": "golden"},
    }
    prompt["set1"] = {
        "class_type": "LoRWeB_LoraSetAddLoRA",
        "inputs": {"lora_set": ["set0", 0], "lora_name": files["loras"]["a"], "strength": 1.0},
    }
    prompt["compose"] = {
        "class_type": "LoRWeB_ComposeLoRASet",
        "inputs": {
            "model": ["flux", 0],
            "lora_set": ["set1", 0],
            "method": "switch",
            "tau": 10,
            "cache": "non-uniform",
            "cache_interval": 3,
            "late_fraction": 0.55,
            "low_frequency_count": -1,
            "reference_behaviour": False,
        },
    }
    close(samples(host, prompt), expected)


def test_a_lora_for_another_model_is_refused_with_a_message(host, files):
    prompt = composed(files, [("compose_not_flux.safetensors", 1.0)], "cmlora")
    with pytest.raises(ExecutionFailed, match="has no key that matches this model"):
        host.run(prompt)


def test_only_safetensors_lora_files_are_read(host, files):
    (host.models / "loras" / "compose_pickled.ckpt").write_bytes(b"not read")
    add = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_LoraSetAddLoRA"]
    with pytest.raises(ValueError, match="reads only .safetensors"):
        add.execute("compose_pickled.ckpt", 1.0)


def _flux_with_dtype(host, path: str, dtype, manual_cast):
    """TinyFluxLoader's construction with another storage dtype (fp8 weights computed in float32)."""
    import json

    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as handle:
        config = json.loads(handle.metadata()["lorweb_test_unet_config"])
    state = load_file(path)
    model_config = comfy.model_detection.model_config_from_unet_config(config, state)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(state, "")
    model.load_model_weights(state, "")
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    )


def test_fp8_weights_compose_like_float32_weights_of_the_same_values(host, files):
    """Weights rounded to float8 values, stored once as float32 and once as float8_e4m3fn (computed in float32):
    composing on the fp8 model equals the stock LoRA loader on the float32 copy, and the fp8 weights stay as they
    were (ComfyUI's own patching of fp8 weights would round the merged weights back to fp8)."""
    import comfy.model_management
    import comfy.sample
    from safetensors import safe_open

    with safe_open(files["flux"], framework="pt") as handle:
        metadata = handle.metadata()
    # every value representable in float8 (biases and norm scales are stored in fp8 too)
    rounded = {k: v.to(torch.float8_e4m3fn).float() for k, v in files["original"].items()}
    path = str(host.base / "compose_fp8_values.safetensors")
    save_file(rounded, path, metadata=metadata)
    float32 = _flux_with_dtype(host, path, torch.float32, None)
    fp8 = _flux_with_dtype(host, path, torch.float8_e4m3fn, torch.float32)
    assert fp8.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    before = {k: v.clone() for k, v in fp8.model.diffusion_model.state_dict().items()}

    a = files["loras"]["a"]
    generator = torch.Generator().manual_seed(9)
    positive = [[torch.randn(1, 5, 16, generator=generator), {"pooled_output": torch.randn(1, 8), "guidance": 2.5}]]
    latent = torch.zeros(1, 16, 4, 4)
    noise = torch.randn(latent.shape, generator=generator)

    def sample(model):
        return comfy.sample.sample(model, noise, 3, 1.0, "euler", "simple", positive, positive, latent, seed=0)

    expected = sample(host.nodes.LoraLoaderModelOnly().load_lora_model_only(float32, a, 0.8)[0])
    lora_set = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_LoraSetAddLoRA"].execute(a, 0.8).result[0]
    compose = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_ComposeLoRASet"]
    composed = compose.execute(fp8, lora_set, "composite", 5, "non-uniform", 3, 0.55, -1, False).result[0]
    close(sample(composed), expected)
    comfy.model_management.unload_all_models()
    after = fp8.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k].float(), before[k].float()) and after[k].dtype == before[k].dtype for k in before)
