"""The pack's nodes run through ComfyUI's own executor on a tiny Flux with the golden widths."""

from __future__ import annotations

import pytest
import torch
from comfy_host import ExecutionFailed, PromptRejected
from host_graphs import GOLDEN_FLUX, STRENGTH, clip_analogy, expected_delta, golden_analogy, graph, patched_layers
from lorweb_testing import (
    GOLDEN,
    GOLDEN_CKPT,
    GOLDEN_TENSORS,
    GOLDEN_VARIANTS,
    random_basis_tensors,
    write_ai_toolkit_config,
    write_safetensors,
)
from PIL import Image
from safetensors.torch import load_file

import lorweb_ops
from lorweb_ops.flux_layout import released_module_names


@pytest.mark.parametrize("variant", list(GOLDEN_VARIANTS))
def test_patched_weights_equal_golden_delta_and_restore_bitwise(host, files, golden, variant):
    import comfy.model_management

    host.run(graph(files["flux"], golden_analogy(), config=f"{variant}.yaml"))
    probe = host.support().PROBES
    original, weights = files["original"], probe["weights"]
    layers = patched_layers()
    assert len(layers) == 13  # 20 modules land in 13 BFL weights (3 fused)
    for layer in layers:
        key = f"{layer}.weight"
        expected = original[key] + STRENGTH * expected_delta(golden, variant, layer)
        torch.testing.assert_close(weights[key], expected, rtol=0, atol=1e-5, msg=f"{variant} {key}")
    untouched = [k for k in original if k.rsplit(".", 1)[0] not in layers]
    assert untouched and all(torch.equal(weights[k], original[k]) for k in untouched)

    samples = probe["samples"]
    assert samples.shape == (1, 16, 4, 4) and torch.isfinite(samples).all()

    comfy.model_management.unload_all_models()
    restored = probe["model"].model.diffusion_model.state_dict()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_clip_vision_path_reproduces_the_golden_query_and_delta(host, files, golden):
    """a, a', b through LoadImage and ComfyUI's (fp16) CLIP vision: query ~1e-3, delta ~2e-3 of max|dW|."""
    import comfy.model_management

    from lorweb_ops.images import from_pil

    support = host.support()
    clip_vision = support.TinyClipVisionLoader().load(str(GOLDEN / "tiny_clip_vision"))[0]
    encode = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_EncodeAnalogy"]
    tiles = [from_pil(Image.open(host.input / f"{n}.png")) for n in ("a", "a_prime", "b")]
    analogy = encode.execute(clip_vision, *tiles).result[0]
    reference = golden["query_square"].reshape(1, -1)
    assert analogy.query_mode == "cat-aa'b" and analogy.embed_dim == 5
    relative = (analogy.query - reference).abs().max() / reference.abs().max()
    assert relative < 2e-3, f"query differs from the reference by {relative:.2e} of its largest value"

    node, extra = clip_analogy()
    host.run(graph(files["flux"], node, extra=extra))
    weights, original = support.PROBES["weights"], files["original"]
    for layer in patched_layers():
        delta = (weights[f"{layer}.weight"] - original[f"{layer}.weight"]) / STRENGTH
        golden_delta = expected_delta(golden, "released_like", layer)
        assert (delta - golden_delta).abs().max() <= 2e-3 * golden_delta.abs().max() + 1e-6, layer
    comfy.model_management.unload_all_models()


def test_analogy_grid_and_crop_nodes(host, files):
    grid_node = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_AnalogyGrid"]
    crop_node = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_CropResult"]
    from lorweb_ops.images import from_pil

    tiles = [from_pil(Image.open(host.input / f"{n}.png")) for n in ("a", "a_prime", "b")]
    grid = grid_node.execute(*tiles).result[0]
    reference = from_pil(Image.open(GOLDEN / "grid_square.png").convert("RGB"))
    assert torch.equal(grid, reference)
    crop = crop_node.execute(grid).result[0]
    assert torch.equal(crop, tiles[2])


def test_strength_through_a_link(host, files):
    """A strength fed by another node is absent at queue time and checked when it arrives."""
    extra = {"strength": {"class_type": "PrimitiveFloat", "inputs": {"value": STRENGTH}}}
    prompt = graph(files["flux"], golden_analogy(), extra=extra)
    prompt["apply"]["inputs"]["strength"] = ["strength", 0]
    host.run(prompt)
    weights, original = host.support().PROBES["weights"], files["original"]
    key = "double_blocks.0.img_attn.proj.weight"
    assert not torch.equal(weights[key], original[key])


def test_strength_zero_returns_the_model_unpatched(host, files):
    host.run(graph(files["flux"], golden_analogy(), strength=0.0))
    weights, original = host.support().PROBES["weights"], files["original"]
    assert all(torch.equal(weights[k], original[k]) for k in original)


# ---- bad inputs: the message the user sees, and no weight touched ---------------------------------


def run_failing(host, prompt) -> str:
    """Run a prompt that must fail; check that the model it loaded was left as it was. Returns the message."""
    host.support().LOADED.clear()
    with pytest.raises(ExecutionFailed) as failure:
        host.run(prompt)
    loaded = host.support().LOADED
    if loaded:
        model = loaded["model"]
        assert not model.patches, "a failed run left patches on the input model"
        original = load_file(loaded["path"])
        state = model.model.diffusion_model.state_dict()
        assert all(torch.equal(state[k], original[k]) for k in original), "a failed run changed weights"
    return str(failure.value)


def test_basis_for_more_blocks_than_the_model_has(host, files):
    modules = released_module_names(depth=2, single_depth=1)
    write_safetensors(host.models / "lorweb" / "two_blocks.safetensors", random_basis_tensors(modules))
    message = run_failing(host, graph(files["flux"], golden_analogy(), basis_name="two_blocks.safetensors"))
    assert "does not fit this Flux model" in message
    assert "double_blocks.1.img_attn.qkv is missing from the model" in message


def test_basis_of_another_width_than_the_model(host, files, tmp_path):
    wide = dict(GOLDEN_FLUX, hidden=16, axes=[4, 4, 8])
    flux_path = str(tmp_path / "wide_flux.safetensors")
    original = host.support().write_tiny_flux(flux_path, **wide)
    message = run_failing(host, graph(flux_path, golden_analogy()))
    assert "does not fit this Flux model (20 of 20 basis modules)" in message
    assert (
        "double_blocks.0.img_attn.proj is [16, 16] but transformer_blocks.0.attn.to_out.0 needs rows 0..8 x 8"
        " columns; double_blocks.0.img_attn.qkv is [48, 16] but" in message
    )
    model = host.support().TinyFluxLoader().load(flux_path)[0]
    apply = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyBasis"]
    basis = lorweb_ops.load_basis(GOLDEN_CKPT)
    analogy = host.support().AnalogyFromQuery().load(str(GOLDEN_TENSORS), "query_square", "cat-aa'b")[0]
    with pytest.raises(ValueError, match="does not fit"):
        apply.execute(model, basis, analogy, 1.0)
    assert not model.patches  # nothing was registered on the input model
    state = model.model.diffusion_model.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_a_model_that_is_not_flux(host, files):
    clip_vision = host.support().TinyClipVisionLoader().load(str(GOLDEN / "tiny_clip_vision"))[0]
    apply = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyBasis"]
    analogy = host.support().AnalogyFromQuery().load(str(GOLDEN_TENSORS), "query_square", "cat-aa'b")[0]
    with pytest.raises(ValueError, match="is not a Flux model: it has no double_blocks.*FLUX.1 Kontext"):
        apply.execute(clip_vision.patcher, lorweb_ops.load_basis(GOLDEN_CKPT), analogy, 1.0)
    assert not clip_vision.patcher.patches


def test_an_sd15_model_is_refused(host):
    """A real ComfyUI SD1.5 model (built on the meta device: only its layout matters here)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet = dict(
        use_checkpoint=False,
        image_size=32,
        out_channels=4,
        use_spatial_transformer=True,
        legacy=False,
        adm_in_channels=None,
        in_channels=4,
        model_channels=320,
        num_res_blocks=[2, 2, 2, 2],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        channel_mult=[1, 2, 4, 4],
        transformer_depth_middle=1,
        use_linear_in_transformer=False,
        context_dim=768,
        num_heads=8,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        use_temporal_attention=False,
        use_temporal_resblock=False,
    )
    config = comfy.supported_models.SD15(unet)
    model = config.get_model({}, "", device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    apply = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_ApplyBasis"]
    analogy = host.support().AnalogyFromQuery().load(str(GOLDEN_TENSORS), "query_square", "cat-aa'b")[0]
    with pytest.raises(ValueError, match=r"The MODEL \(BaseModel\) is not a Flux model"):
        apply.execute(patcher, lorweb_ops.load_basis(GOLDEN_CKPT), analogy, 1.0)
    assert not patcher.patches


def test_an_ordinary_lora_given_as_basis(host, files):
    write_safetensors(
        host.models / "lorweb" / "ordinary_lora.safetensors",
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
        },
    )
    message = run_failing(host, graph(files["flux"], golden_analogy(), basis_name="ordinary_lora.safetensors"))
    assert "is an ordinary LoRA" in message and "LoraLoaderModelOnly" in message


def test_an_encoder_whose_size_does_not_match_the_basis(host, files):
    tensors = random_basis_tensors(released_module_names(depth=1, single_depth=1), query_dim=12)
    write_safetensors(host.models / "lorweb" / "query12.safetensors", tensors)
    node, extra = clip_analogy()
    message = run_failing(host, graph(files["flux"], node, basis_name="query12.safetensors", extra=extra))
    assert "15 values" in message and "expects 12 (4 per image)" in message
    assert "openai/clip-vit-large-patch14" in message


def test_an_analogy_for_another_query_mode(host, files):
    write_ai_toolkit_config(host.models / "lorweb" / "diff_mode.yaml", query_mode="ca'-ca+cb")
    message = run_failing(host, graph(files["flux"], golden_analogy(), config="diff_mode.yaml"))
    assert 'query mode "cat-aa\'b" but the basis uses "ca\'-ca+cb"' in message


def test_token_feature_query_mode_is_refused(host, files):
    write_ai_toolkit_config(host.models / "lorweb" / "token_mode.yaml", query_mode="cat-paa'b")
    message = run_failing(host, graph(files["flux"], golden_analogy(), config="token_mode.yaml"))
    assert "uses encoder token features" in message


def test_an_image_batch_points_to_the_headless_runner(host, files):
    node, extra = clip_analogy()
    extra["batch_b"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["image_b", 0], "amount": 2}}
    node["inputs"]["b"] = ["batch_b", 0]
    message = run_failing(host, graph(files["flux"], node, extra=extra))
    assert "image 'b' is a batch of 2" in message and "scripts/run_analogy.py" in message


def test_an_image_too_small_to_encode(host, files):
    node, extra = clip_analogy(a_prime="tiny.png")
    message = run_failing(host, graph(files["flux"], node, extra=extra))
    assert "image 'a′' is 8x8 pixels" in message and "at least 16 pixels" in message


def test_queue_time_validation(host, files):
    with pytest.raises(PromptRejected) as missing:
        host.run(graph(files["flux"], golden_analogy(), basis_name="not_there.safetensors"))
    assert "basis file 'not_there.safetensors' was not found in the lorweb model folder" in str(missing.value)
    with pytest.raises(PromptRejected) as escaping:
        host.run(graph(files["flux"], golden_analogy(), basis_name="../../tiny_flux.safetensors"))
    assert "was not found in the lorweb model folder" in str(escaping.value)
    with pytest.raises(PromptRejected) as strength:
        host.run(graph(files["flux"], golden_analogy(), strength=float("nan")))
    assert "strength must be a number between -10 and 10" in str(strength.value)
