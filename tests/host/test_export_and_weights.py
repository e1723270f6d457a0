"""Save Composed LoRA, Blend Analogies, Adjust Mix and Apply LoRA Basis Weights through ComfyUI's executor.

The saved LoRA is loaded back with ComfyUI's stock LoraLoaderModelOnly on the tiny golden-width Flux: every key must
be used and the weights must equal the ones the pack's own patch produces.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from comfy_host import ExecutionFailed, PromptRejected
from host_graphs import GOLDEN_FLUX, ksampler
from lorweb_testing import GOLDEN, GOLDEN_CKPT, GOLDEN_TENSORS, golden_tensors, random_basis_tensors, write_safetensors
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import lorweb_ops
from lorweb_ops import MixWeights
from lorweb_ops.flux_layout import module_shape, released_module_names

STRENGTH = 0.8
BASIS = "export_golden.safetensors"
UNMATCHED = ("lora key not loaded", "NOT LOADED")


@pytest.fixture(scope="module")
def files(host):
    """The golden basis (and a copy under another name), a tiny Flux, and the golden analogy's tiles."""
    lorweb = host.models / "lorweb"
    shutil.copy(GOLDEN_CKPT, lorweb / BASIS)
    shutil.copy(GOLDEN_CKPT, lorweb / "export_other_copy.safetensors")
    flux_path = host.base / "export_tiny_flux.safetensors"
    original = host.support().write_tiny_flux(str(flux_path), **GOLDEN_FLUX)
    tiles = lorweb_ops.grid_quadrants(Image.open(GOLDEN / "grid_square.png").convert("RGB"))
    for name, tile in tiles.items():
        tile.save(host.input / f"export_{name}.png")
    return {"flux": str(flux_path), "original": original, "basis": lorweb_ops.load_basis(lorweb / BASIS)}


# ---- graph pieces ------------------------------------------------------------------------------------


def sampled(model: list, flux_path: str) -> dict:
    """Tiny Flux loader, a short Kontext-style sampling of ``model`` and the weight probe."""
    return {
        "flux": {"class_type": "LoRWeBTest_TinyFluxLoader", "inputs": {"path": flux_path}},
        "text": {
            "class_type": "LoRWeBTest_RandomTextConditioning",
            "inputs": {"tokens": 5, "context_dim": 16, "pooled_dim": 8, "seed": 1},
        },
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "reference": {
            "class_type": "ReferenceLatent",
            "inputs": {"conditioning": ["text", 0], "latent": ["latent", 0]},
        },
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "sample": ksampler(model, ["reference", 0], steps=2),
        "probe": {"class_type": "LoRWeBTest_ProbeWeights", "inputs": {"model": model, "samples": ["sample", 0]}},
    }


def analogy_nodes(name: str, key: str) -> dict:
    return {
        name: {
            "class_type": "LoRWeBTest_AnalogyFromQuery",
            "inputs": {"path": str(GOLDEN_TENSORS), "key": key, "query_mode": "cat-aa'b"},
        }
    }


def applied(flux_path: str, key="query_square", strength=STRENGTH, basis=BASIS) -> dict:
    """Load basis -> golden analogy -> Apply Weighted LoRA Basis on the tiny Flux, sampled and probed."""
    prompt = sampled(["apply", 0], flux_path)
    prompt.update(analogy_nodes("analogy", key))
    prompt["basis"] = {"class_type": "LoRWeB_LoadBasis", "inputs": {"basis_name": basis, "config": "auto"}}
    prompt["apply"] = {
        "class_type": "LoRWeB_ApplyBasis",
        "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "analogy": ["analogy", 0], "strength": strength},
    }
    return prompt


def without_sampling(prompt: dict) -> dict:
    """Drop the probe so the node under test is the prompt's only output (else ComfyUI runs the rest anyway)."""
    for node in ("sample", "probe"):
        prompt.pop(node)
    return prompt


def save_node(weights: list, prefix: str | list, rank: int = 0, basis: list | None = None) -> dict:
    return {
        "class_type": "LoRWeB_SaveComposedLoRA",
        "inputs": {
            "basis": basis or ["basis", 0],
            "weights": weights,
            "filename_prefix": prefix,
            "rank": rank,
            "dtype": "float32",
        },
    }


def run(host, prompt: dict) -> dict:
    """host.run, insisting that every output node ran: ComfyUI silently skips outputs that fail validation, and
    a skipped probe would leave the previous run's weights behind."""
    host.support().PROBES.clear()
    _, outputs = host.run(prompt)
    expected = {node for node in ("probe", "save") if node in prompt}
    assert expected <= outputs.keys(), f"outputs that did not run: {expected - outputs.keys()}"
    return outputs


def probed(host) -> dict[str, torch.Tensor]:
    return host.support().PROBES["weights"]


def load_with_stock_loader(host, files, lora_name: str, caplog, strength=STRENGTH) -> tuple[dict, list[str]]:
    """LoraLoaderModelOnly on a fresh tiny Flux; returns the probed weights and ComfyUI's unmatched-key warnings."""
    import comfy.model_management

    prompt = sampled(["lora", 0], files["flux"])
    prompt["lora"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["flux", 0], "lora_name": lora_name, "strength_model": strength},
    }
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(host, prompt)
    warnings = [r.getMessage() for r in caplog.records if any(text in r.getMessage() for text in UNMATCHED)]
    weights = probed(host)
    comfy.model_management.unload_all_models()
    return weights, warnings


def assert_same_weights(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=key)


NEW_NODES = {
    "LoRWeB_SaveComposedLoRA": ("Save Composed LoRA", ["STRING"]),
    "LoRWeB_BlendAnalogies": ("Blend Analogies", ["LORWEB_WEIGHTS"]),
    "LoRWeB_ApplyWeights": ("Apply LoRA Basis Weights", ["MODEL", "LORWEB_WEIGHTS", "IMAGE"]),
    "LoRWeB_AdjustMix": ("Adjust Mix", ["LORWEB_WEIGHTS"]),
}


def test_new_nodes_are_registered_with_tooltips_everywhere(host):
    for node_id, (display_name, outputs) in NEW_NODES.items():
        info = host.nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()  # what /object_info serves
        assert (info["display_name"], info["category"], info["output"]) == (display_name, "LoRWeB", outputs)
        assert info["description"] and info["output_node"] == (node_id == "LoRWeB_SaveComposedLoRA")
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, spec in inputs.items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(info["output_tooltips"]) == len(outputs) and all(info["output_tooltips"]), node_id


# ---- Save Composed LoRA ------------------------------------------------------------------------------


def test_saved_lora_loads_with_the_stock_loader_like_the_pack_patch(host, files, caplog):
    import comfy.model_management

    prompt = applied(files["flux"])
    prompt["save"] = save_node(["apply", 1], "lorweb_test/full")
    outputs = run(host, prompt)
    pack = probed(host)
    comfy.model_management.unload_all_models()
    info = outputs["save"]["lorweb_saved"][0]
    assert info["lora_name"] == "lorweb_test/full_00001_.safetensors"
    assert info["exact"] and info["rank"] == info["full_rank"] == 6 and info["energy_min"] == 1.0
    assert any(file.stem for file in (host.models / "loras" / "lorweb_test").iterdir())

    path = host.models / "loras" / info["lora_name"]
    state = load_file(str(path))  # plain safetensors reads the whole file
    assert len(state) == 3 * len(files["basis"].modules)
    assert all(
        k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for k in state
    )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["lorweb_basis"] == BASIS and "non-commercial" in metadata["license"]

    loaded, warnings = load_with_stock_loader(host, files, info["lora_name"], caplog)
    assert warnings == []
    assert_same_weights(loaded, pack, atol=1e-5)
    changed = [k for k in pack if not torch.equal(pack[k], files["original"][k])]
    assert len(changed) == 13  # the 20 basis modules land in 13 Flux weights, all of them patched
    # and both equal the reference implementation's own deltas (golden), not just each other
    for key, delta in golden_flux_deltas().items():
        expected = files["original"][f"{key}.weight"] + STRENGTH * delta
        torch.testing.assert_close(loaded[f"{key}.weight"], expected, rtol=0, atol=1e-5, msg=key)


def golden_flux_deltas() -> dict[str, torch.Tensor]:
    """The golden reference's dW of every patched Flux weight: fused layers as given, the others per module."""
    golden = golden_tensors()
    deltas = {key.split("::")[-1]: value.float() for key, value in golden.items() if "released_like::dW_fused::" in key}
    for name in released_module_names(depth=1, single_depth=1):
        in_features, out_features = module_shape(name, hidden=8, mlp=32)  # the golden widths
        target = lorweb_ops.flux_target(name, in_features, out_features)
        if not target.fused:
            deltas[target.bfl_layer] = golden[f"released_like::dW::{name}"].float()
    assert len(deltas) == 13
    return deltas


def test_the_unmatched_key_check_would_see_a_stray_key(host, files, caplog):
    """Positive control for the log capture above: a LoRA with a key ComfyUI cannot place is reported."""
    exported = lorweb_ops.export_lora(
        files["basis"],
        lorweb_ops.MixWeights(
            files["basis"].path, files["basis"].modules, {m: torch.ones(3) / 3 for m in files["basis"].modules}
        ),
    )
    tensors = dict(exported.tensors)
    tensors["transformer.not_a_layer.lora_A.weight"] = torch.zeros(6, 8)
    write_safetensors(host.models / "loras" / "stray_key_control.safetensors", tensors)
    _, warnings = load_with_stock_loader(host, files, "stray_key_control.safetensors", caplog)
    assert any("transformer.not_a_layer.lora_A.weight" in w for w in warnings)


def test_saving_twice_never_overwrites(host, files):
    import comfy.model_management

    names = []
    for _ in range(2):
        prompt = applied(files["flux"])
        prompt["save"] = save_node(["apply", 1], "lorweb_test/twice")
        names.append(run(host, prompt)["save"]["lorweb_saved"][0]["lora_name"])
    comfy.model_management.unload_all_models()
    assert names == ["lorweb_test/twice_00001_.safetensors", "lorweb_test/twice_00002_.safetensors"]


def test_rank_reduced_lora_reports_energy_and_loads_cleanly(host, files, caplog):
    import comfy.model_management

    prompt = applied(files["flux"])
    prompt["save"] = save_node(["apply", 1], "lorweb_test/rank2", rank=2)
    outputs = run(host, prompt)
    comfy.model_management.unload_all_models()
    info = outputs["save"]["lorweb_saved"][0]
    assert info["rank"] == 2 and not info["exact"]
    assert 0 < info["energy_min"] <= info["energy_mean"] < 1
    assert outputs["save"]["text"][0].startswith("saved lorweb_test/rank2_00001_.safetensors: 20 layers, rank 2 of 6")

    state = load_file(str(host.models / "loras" / info["lora_name"]))
    loaded, warnings = load_with_stock_loader(host, files, info["lora_name"], caplog, strength=1.0)
    assert warnings == []
    key = "transformer.transformer_blocks.0.attn.to_out.0"
    expected = (
        files["original"]["double_blocks.0.img_attn.proj.weight"]
        + state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
    )
    torch.testing.assert_close(loaded["double_blocks.0.img_attn.proj.weight"], expected, rtol=0, atol=1e-5)
    assert state[f"{key}.alpha"].item() == 2.0


def test_a_filename_prefix_that_leaves_the_loras_folder_is_refused(host, files):
    for prefix, message in (
        ("../outside", "may not leave models/loras"),
        ("", "filename_prefix is empty"),
        ("/tmp/abs", "must be a relative name inside models/loras"),
    ):
        prompt = without_sampling(applied(files["flux"]))
        prompt["save"] = save_node(["apply", 1], prefix)
        with pytest.raises(PromptRejected) as rejected:
            run(host, prompt)
        assert message in str(rejected.value), prefix


# ---- Blend, Adjust, Apply Weights -----------------------------------------------------------------------


def two_analogies_blended(flux_path: str, t: float, strength=STRENGTH) -> dict:
    """Two Apply nodes (square and non-square golden queries) -> Blend -> Apply LoRA Basis Weights."""
    prompt = applied(flux_path, strength=0.0)  # strength 0: only the weights are wanted from these
    prompt.update(analogy_nodes("analogy_2", "query_nonsquare"))
    prompt["apply_2"] = {
        "class_type": "LoRWeB_ApplyBasis",
        "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "analogy": ["analogy_2", 0], "strength": 0.0},
    }
    prompt["blend"] = {
        "class_type": "LoRWeB_BlendAnalogies",
        "inputs": {"weights_1": ["apply", 1], "weights_2": ["apply_2", 1], "t": t},
    }
    prompt["apply_weights"] = {
        "class_type": "LoRWeB_ApplyWeights",
        "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "weights": ["blend", 0], "strength": strength},
    }
    for node in ("sample", "probe"):
        prompt[node]["inputs"]["model"] = ["apply_weights", 0]
    return prompt


def test_blend_of_two_analogies_through_the_executor(host, files):
    import comfy.model_management

    t = 0.3
    outputs = run(host, two_analogies_blended(files["flux"], t))
    weights = probed(host)
    comfy.model_management.unload_all_models()
    basis, golden = files["basis"], golden_tensors()
    first = lorweb_ops.mixing_coefficients(basis, golden["query_square"])
    second = lorweb_ops.mixing_coefficients(basis, golden["query_nonsquare"])
    blended = {m: (1 - t) * first[m] + t * second[m] for m in basis.modules}
    for layer in sorted({target.bfl_layer for target in lorweb_ops.module_targets(basis)}):
        expected = files["original"][f"{layer}.weight"] + STRENGTH * lorweb_ops.flux_delta(basis, blended, layer)
        torch.testing.assert_close(weights[f"{layer}.weight"], expected, rtol=0, atol=1e-5, msg=layer)
    mix = outputs["apply_weights"]["lorweb_mix"][0]
    assert mix["layers"] == 20 and mix["strength"] == STRENGTH


def test_apply_weights_equals_apply_basis_bitwise(host, files):
    import comfy.model_management

    run(host, applied(files["flux"]))
    direct = probed(host)
    comfy.model_management.unload_all_models()
    prompt = applied(files["flux"], strength=0.0)
    prompt["apply_weights"] = {
        "class_type": "LoRWeB_ApplyWeights",
        "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "weights": ["apply", 1], "strength": STRENGTH},
    }
    for node in ("sample", "probe"):
        prompt[node]["inputs"]["model"] = ["apply_weights", 0]
    run(host, prompt)
    via_weights = probed(host)
    samples = host.support().PROBES["samples"]
    comfy.model_management.unload_all_models()
    assert direct.keys() == via_weights.keys()
    assert all(torch.equal(direct[k], via_weights[k]) for k in direct)
    assert any(not torch.equal(direct[k], files["original"][k]) for k in direct)
    assert torch.isfinite(samples).all()


def test_apply_weights_node_outputs_match_apply_basis(host, files):
    """Called directly: same MODEL patches, same weights and the same chart for the same weights."""
    support = host.support()
    model = support.TinyFluxLoader().load(files["flux"])[0]
    analogy = support.AnalogyFromQuery().load(str(GOLDEN_TENSORS), "query_square", "cat-aa'b")[0]
    apply = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyBasis"]
    apply_weights = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyWeights"]
    direct = apply.execute(model, files["basis"], analogy, STRENGTH)
    again = apply_weights.execute(model, files["basis"], direct.result[1], STRENGTH)
    assert torch.equal(direct.result[2], again.result[2])
    assert ui_data(direct) == ui_data(again) and "lorweb_mix" in ui_data(direct)
    first, second = direct.result[0].patches, again.result[0].patches
    assert first.keys() == second.keys() and not model.patches


def ui_data(output) -> dict:
    # a plain dict on both ComfyUI versions today; a UI object with as_dict() in the V3 API's newer shape
    return output.ui if isinstance(output.ui, dict) else output.ui.as_dict()


def test_weights_for_another_basis_are_refused_before_anything_is_patched(host, files):
    prompt = applied(files["flux"], strength=0.0)
    prompt["other"] = {
        "class_type": "LoRWeB_LoadBasis",
        "inputs": {"basis_name": "export_other_copy.safetensors", "config": "auto"},
    }
    prompt["apply_weights"] = {
        "class_type": "LoRWeB_ApplyWeights",
        "inputs": {"model": ["flux", 0], "basis": ["other", 0], "weights": ["apply", 1], "strength": STRENGTH},
    }
    for node in ("sample", "probe"):
        prompt[node]["inputs"]["model"] = ["apply_weights", 0]
    with pytest.raises(ExecutionFailed) as failure:
        run(host, prompt)
    message = str(failure.value)
    assert f"these weights were made for the basis {BASIS}" in message
    assert "not for export_other_copy.safetensors" in message and "connect that basis" in message

    modules = released_module_names(depth=2, single_depth=1)
    write_safetensors(host.models / "lorweb" / "export_two_blocks.safetensors", random_basis_tensors(modules))
    wider = lorweb_ops.load_basis(host.models / "lorweb" / "export_two_blocks.safetensors")
    model = host.support().TinyFluxLoader().load(files["flux"])[0]
    weights = MixWeights(
        files["basis"].path,
        files["basis"].modules,
        lorweb_ops.mixing_coefficients(files["basis"], golden_tensors()["query_square"]),
    )
    apply_weights = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyWeights"]
    with pytest.raises(
        ValueError,
        match=f"cover 20 modules of {BASIS} but the basis export_two_blocks.safetensors "
        "has 34: 14 of the basis' modules are missing",
    ):
        apply_weights.execute(model, wider, weights, 1.0)
    assert not model.patches


def test_save_refuses_weights_of_another_basis(host, files):
    prompt = applied(files["flux"], strength=0.0)
    prompt["other"] = {
        "class_type": "LoRWeB_LoadBasis",
        "inputs": {"basis_name": "export_other_copy.safetensors", "config": "auto"},
    }
    prompt["save"] = save_node(["apply", 1], "lorweb_test/wrong", basis=["other", 0])
    with pytest.raises(ExecutionFailed, match=f"made for the basis {BASIS}"):
        run(host, prompt)
    assert not list((host.models / "loras").glob("**/wrong_*"))


def test_blending_weights_of_two_bases_is_refused(host, files):
    prompt = two_analogies_blended(files["flux"], 0.5)
    prompt["other"] = {
        "class_type": "LoRWeB_LoadBasis",
        "inputs": {"basis_name": "export_other_copy.safetensors", "config": "auto"},
    }
    prompt["apply_2"]["inputs"]["basis"] = ["other", 0]
    with pytest.raises(ExecutionFailed) as failure:
        run(host, prompt)
    assert "weights_1 belong to the basis export_golden.safetensors" in str(failure.value)
    assert "but weights_2 to export_other_copy.safetensors" in str(failure.value)


def test_adjust_mix_through_the_executor(host, files):
    import comfy.model_management

    prompt = applied(files["flux"], strength=0.0)
    prompt["adjust"] = {
        "class_type": "LoRWeB_AdjustMix",
        "inputs": {"weights": ["apply", 1], "temperature": 1.0, "top_k": 1, "override": "0=1.0"},
    }
    prompt["apply_weights"] = {
        "class_type": "LoRWeB_ApplyWeights",
        "inputs": {"model": ["flux", 0], "basis": ["basis", 0], "weights": ["adjust", 0], "strength": 1.0},
    }
    for node in ("sample", "probe"):
        prompt[node]["inputs"]["model"] = ["apply_weights", 0]
    run(host, prompt)
    weights = probed(host)
    comfy.model_management.unload_all_models()
    basis = files["basis"]
    only_first = {m: torch.tensor([1.0, 0.0, 0.0]) for m in basis.modules}  # golden mixes all fall below 1.0
    for layer in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"):
        expected = files["original"][f"{layer}.weight"] + lorweb_ops.flux_delta(basis, only_first, layer)
        torch.testing.assert_close(weights[f"{layer}.weight"], expected, rtol=0, atol=1e-5)


def test_bad_override_text_is_rejected_at_queue_time(host, files):
    prompt = without_sampling(applied(files["flux"], strength=0.0))
    prompt["adjust"] = {
        "class_type": "LoRWeB_AdjustMix",
        "inputs": {"weights": ["apply", 1], "temperature": 1.0, "top_k": 0, "override": "7=one"},
    }
    prompt["save"] = save_node(["adjust", 0], "lorweb_test/never")
    with pytest.raises(PromptRejected) as rejected:
        run(host, prompt)
    assert "override weight 'one' for basis LoRA 7 is not a number" in str(rejected.value)


# ---- reverse analogy ----------------------------------------------------------------------------------


def test_reverse_switch_swaps_a_and_a_prime_in_the_query(host, files):
    from lorweb_ops.images import from_pil

    clip_vision = host.support().TinyClipVisionLoader().load(str(GOLDEN / "tiny_clip_vision"))[0]
    encode = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_EncodeAnalogy"]
    tiles = [from_pil(Image.open(host.input / f"export_{n}.png")) for n in ("a", "a_prime", "b")]
    forward = encode.execute(clip_vision, *tiles).result[0].query.reshape(3, -1)
    reverse = encode.execute(clip_vision, *tiles, reverse=True).result[0].query.reshape(3, -1)
    assert torch.equal(reverse, forward[[1, 0, 2]])


def test_linked_values_are_checked_when_the_nodes_run(host, files):
    """t, override, strength and filename_prefix fed by links reach validate_inputs as None: accepted there."""
    import comfy.model_management

    prompt = two_analogies_blended(files["flux"], 0.5)
    prompt["t"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 0.25}}
    prompt["override_text"] = {"class_type": "PrimitiveString", "inputs": {"value": "1=0.5"}}
    prompt["prefix"] = {"class_type": "PrimitiveString", "inputs": {"value": "lorweb_test/linked"}}
    prompt["strength"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 1.0}}
    prompt["blend"]["inputs"]["t"] = ["t", 0]
    prompt["adjust"] = {
        "class_type": "LoRWeB_AdjustMix",
        "inputs": {"weights": ["blend", 0], "temperature": 1.0, "top_k": 0, "override": ["override_text", 0]},
    }
    prompt["apply_weights"]["inputs"].update(weights=["adjust", 0], strength=["strength", 0])
    prompt["save"] = save_node(["apply_weights", 1], ["prefix", 0])
    outputs = run(host, prompt)
    comfy.model_management.unload_all_models()
    assert outputs["save"]["lorweb_saved"][0]["lora_name"] == "lorweb_test/linked_00001_.safetensors"
    assert "probe" in outputs and outputs["apply_weights"]["lorweb_mix"][0]["strength"] == 1.0  # the whole graph ran

    prompt["t"]["inputs"]["value"] = 2.0
    with pytest.raises(ExecutionFailed, match="t must be a number from 0"):
        run(host, prompt)
    prompt["t"]["inputs"]["value"] = 0.25
    prompt["prefix"]["inputs"]["value"] = "../escape"
    with pytest.raises(ExecutionFailed, match="may not leave models/loras"):
        run(host, prompt)
