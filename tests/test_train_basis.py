"""The trainable basis against the inference library: saved format, coefficients, dense deltas, injection, loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from tolerances import assert_reordered_close
from train_testing import tiny_flux

import lorweb_ops
from lorweb_train.basis_module import TrainableBasis, save_basis
from lorweb_train.config import NetworkConfig
from lorweb_train.injection import (
    BasisInjector,
    enable_gradient_checkpointing,
    flux_module_shapes,
    mixed_lora_output,
)
from lorweb_train.loss import bell_weights, flow_matching_loss, noisy_latents, sigmas_for

QUERY_DIM = 15


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only fight over the 2 CI cores
    yield
    torch.set_num_threads(threads)


def random_trained_basis(model, seed: int = 1) -> TrainableBasis:
    """A basis with every tensor random (as after training), so B = 0 cannot hide mistakes."""
    torch.manual_seed(seed)
    basis = TrainableBasis(flux_module_shapes(model), NetworkConfig(num_loras=4, rank=2, keys_dim=8), QUERY_DIM)
    with torch.no_grad():
        for parameter in basis.parameters():
            parameter.normal_(0, 0.3)
    return basis


def test_init_follows_the_recipe():
    model = tiny_flux()
    basis = TrainableBasis(flux_module_shapes(model), NetworkConfig(num_loras=4, rank=2, keys_dim=8), QUERY_DIM)
    layer = basis.layer("single_transformer_blocks.0.proj_out")  # in = hidden + mlp = 48
    assert layer.lora_A.shape == (4, 48, 2) and layer.lora_B.shape == (4, 2, 16)
    assert layer.lora_keys.shape == (4, 8) and layer.to_q.weight.shape == (8, QUERY_DIM) and layer.to_q.bias is None
    assert torch.count_nonzero(layer.lora_B) == 0  # the untrained basis changes nothing
    # Kaiming-uniform with a = sqrt(5) on [K, in, r]: fan_in = in * r, bound = 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(48 * 2)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound


def test_module_shapes_cover_every_block_linear():
    shapes = flux_module_shapes(tiny_flux(depth=2, single_depth=3))
    assert len(shapes) == 2 * 14 + 3 * 6
    assert shapes["transformer_blocks.1.norm1.linear"] == (16, 96)
    assert shapes["single_transformer_blocks.2.proj_mlp"] == (16, 32)
    assert shapes["transformer_blocks.0.attn.add_v_proj"] == (16, 16)


def test_saved_basis_loads_and_mixes_like_the_inference_library(tmp_path):
    model = tiny_flux()
    basis = random_trained_basis(model)
    path = save_basis(basis, str(tmp_path / "mine.safetensors"), "mine", dtype=torch.float32)
    loaded = lorweb_ops.load_basis(path, use_cache=False)
    assert set(loaded.modules) == set(basis.module_names) and (loaded.num_loras, loaded.rank, loaded.keys_dim) == (
        4,
        2,
        8,
    )
    assert loaded.settings == lorweb_ops.RELEASED_SETTINGS and loaded.settings_source.endswith("config.yaml")
    kwargs = yaml.safe_load((tmp_path / "config.yaml").read_text())["config"]["process"][0]["network"]
    assert kwargs["type"] == "attlora" and kwargs["network_kwargs"]["loras_num"] == 4

    query = torch.randn(QUERY_DIM, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        trained = basis(query[None])
    reference = lorweb_ops.mixing_coefficients(loaded, query)
    for name in basis.module_names:
        layer = basis.layer(name)
        # independent re-derivation of the reference formula: softmax(W_q q . keys / sqrt(Dk))
        logits = (layer.to_q.weight @ query) @ layer.lora_keys.T / math.sqrt(8)
        expected = torch.softmax(logits, dim=-1).detach()
        torch.testing.assert_close(trained[name][0], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(reference[name], expected, atol=1e-6, rtol=1e-5)
        dense = torch.einsum("k,kir,kro->oi", expected, layer.lora_A.detach(), layer.lora_B.detach())
        torch.testing.assert_close(lorweb_ops.delta_weight(loaded, name, expected), dense, atol=1e-6, rtol=1e-5)


def test_mixed_lora_output_hand_case():
    # K = 2, in = 2, r = 1, out = 1: A_0 = [1, 0], A_1 = [0, 1]; B_0 = 2, B_1 = 3
    lora_a = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])
    lora_b = torch.tensor([[[2.0]], [[3.0]]])
    x = torch.tensor([[[1.0, 1.0]], [[1.0, 1.0]]])  # two samples, one token each
    coefficients = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    out = mixed_lora_output(x, lora_a, lora_b, coefficients)
    assert out.flatten().tolist() == [2.0, 0.25 * 2 + 0.75 * 3]


def patched_copy(model, loaded, coefficients, sign=1.0):
    """The base model with every fused weight += sign * flux_delta (the inference library's dense path)."""
    patched = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in patched.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
                module.weight += sign * lorweb_ops.flux_delta(loaded, coefficients, name)
    return patched


def model_inputs(batch: int, seed: int = 4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, 8, 8, generator=generator)
    reference = torch.randn(batch, 12, 8, 8, generator=generator)
    context = torch.randn(batch, 6, 8, generator=generator)
    pooled = torch.randn(batch, 8, generator=generator)
    return x, torch.tensor([0.3, 0.8][:batch]), context, pooled, torch.ones(batch), reference


@pytest.mark.parametrize("checkpointing", [False, True])
def test_injection_equals_the_dense_patch_per_sample(tmp_path, checkpointing):
    """Two different analogies in one batch: each sample's output equals the model patched with its own dW."""
    model = tiny_flux().eval()
    basis = random_trained_basis(model)
    loaded = lorweb_ops.load_basis(save_basis(basis, str(tmp_path / "b.safetensors"), "b", dtype=torch.float32))
    queries = torch.randn(2, QUERY_DIM, generator=torch.Generator().manual_seed(2))
    x, sigma, context, pooled, guidance, reference = model_inputs(2)

    hooked = copy.deepcopy(model)
    injector = BasisInjector(hooked, basis).attach()
    if checkpointing:
        enable_gradient_checkpointing(hooked)
    for sign in (1.0, -1.0):  # -1: LoRA Reverse's negated delta
        with torch.no_grad():
            injector.set_mix(basis(queries), sign)
            out = hooked(x, sigma, context, y=pooled, guidance=guidance, ref_latents=[reference])
            injector.clear_mix()
        for i in range(2):
            coefficients = lorweb_ops.mixing_coefficients(loaded, queries[i])
            expected = patched_copy(model, loaded, coefficients, sign)(
                x[i : i + 1], sigma[i : i + 1], context[i : i + 1], y=pooled[i : i + 1],
                guidance=guidance[i : i + 1], ref_latents=[reference[i : i + 1]],
            )  # fmt: skip
            torch.testing.assert_close(out[i : i + 1], expected, atol=2e-5, rtol=1e-4)
    injector.clear_mix()
    with torch.no_grad():  # no mix set: the untouched base model
        plain = hooked(x, sigma, context, y=pooled, guidance=guidance, ref_latents=[reference])
    torch.testing.assert_close(plain, model(x, sigma, context, y=pooled, guidance=guidance, ref_latents=[reference]))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_flux()
    x, sigma, context, pooled, guidance, reference = model_inputs(2)
    queries = torch.randn(2, QUERY_DIM, generator=torch.Generator().manual_seed(2))
    gradients = []
    for checkpointing in (False, True):
        hooked, basis = copy.deepcopy(model), random_trained_basis(model)
        injector = BasisInjector(hooked, basis).attach()
        if checkpointing:
            enable_gradient_checkpointing(hooked)
        injector.set_mix(basis(queries))
        hooked(x, sigma, context, y=pooled, guidance=guidance, ref_latents=[reference]).square().mean().backward()
        injector.clear_mix()
        gradients.append(torch.cat([p.grad.flatten() for p in basis.parameters()]))
    # the recompute repeats the same operations; at most the kernels' summation order may differ (2 samples of
    # 16 noise + 16 reference + 6 text tokens summed into each weight gradient)
    assert_reordered_close(gradients[1], gradients[0], 2 * (16 + 16 + 6), "checkpointed gradients")


def test_flow_matching_loss_by_hand():
    weights = bell_weights()
    assert weights.shape == (1000,) and weights.min() == 0 and abs(float(weights.mean()) - 1) < 1e-5
    # the peak sits at index 500: (1 - min y) / mean(y - min y)
    x = torch.arange(1000.0)
    y = torch.exp(-2 * ((x - 500) / 1000) ** 2)
    assert abs(float(weights[500]) - float((1 - y.min()) / (y - y.min()).mean())) < 1e-4
    assert float(sigmas_for(torch.tensor([0]))) == 1.0 and abs(float(sigmas_for(torch.tensor([999]))) - 0.001) < 1e-7
    latents, noise = torch.full((1, 1, 1, 2), 2.0), torch.full((1, 1, 1, 2), -1.0)
    sigma = sigmas_for(torch.tensor([500]))  # linspace(1000, 1, 1000) steps by 1: t = 500 -> sigma 0.5
    assert float(sigma) == 0.5
    noisy = noisy_latents(latents, noise, sigma)
    assert torch.equal(noisy, torch.full_like(latents, 0.5 * 2 - 0.5))
    prediction = torch.tensor([[[[0.0, -3.0]]]])  # target noise - latents = -3: errors 3 and 0
    loss = flow_matching_loss(prediction, latents, noise, torch.tensor([500]), "weighted")
    assert abs(float(loss) - float(weights[500]) * 9 / 2) < 1e-5
    assert abs(float(flow_matching_loss(prediction, latents, noise, torch.tensor([500]), "none")) - 4.5) < 1e-6
