"""The diffusers -> BFL/ComfyUI layer map for the released 494-module basis."""

import pytest

from lorweb_ops import LoRWeBError, flux_target, released_module_names

H, MLP = 3072, 12288


def test_released_basis_has_494_modules_and_the_modelcard_parameter_count():
    from lorweb_testing import module_shapes

    names = released_module_names()
    assert len(names) == 494 == len(set(names))
    num_loras, rank, keys_dim, query_dim = 32, 4, 128, 2304
    total = 0
    for name in names:
        fan_in, fan_out = module_shapes(name, H, MLP)
        total += num_loras * rank * (fan_in + fan_out) + num_loras * keys_dim + keys_dim * query_dim
    assert total == 835_051_520


@pytest.mark.parametrize(
    "module, fan_in, fan_out, layer, start",
    [
        ("transformer_blocks.3.attn.to_q", H, H, "double_blocks.3.img_attn.qkv", 0),
        ("transformer_blocks.3.attn.to_k", H, H, "double_blocks.3.img_attn.qkv", H),
        ("transformer_blocks.3.attn.to_v", H, H, "double_blocks.3.img_attn.qkv", 2 * H),
        ("transformer_blocks.0.attn.add_v_proj", H, H, "double_blocks.0.txt_attn.qkv", 2 * H),
        ("single_transformer_blocks.37.attn.to_k", H, H, "single_blocks.37.linear1", H),
        ("single_transformer_blocks.37.proj_mlp", H, MLP, "single_blocks.37.linear1", 3 * H),
    ],
)
def test_fused_rows(module, fan_in, fan_out, layer, start):
    target = flux_target(module, fan_in, fan_out)
    assert (target.bfl_layer, target.row_start, target.row_count, target.fused) == (layer, start, fan_out, True)
    assert target.model_key == f"diffusion_model.{layer}.weight"


@pytest.mark.parametrize(
    "module, layer",
    [
        ("transformer_blocks.18.norm1.linear", "double_blocks.18.img_mod.lin"),
        ("transformer_blocks.18.norm1_context.linear", "double_blocks.18.txt_mod.lin"),
        ("transformer_blocks.1.attn.to_out.0", "double_blocks.1.img_attn.proj"),
        ("transformer_blocks.1.attn.to_add_out", "double_blocks.1.txt_attn.proj"),
        ("transformer_blocks.1.ff.net.0.proj", "double_blocks.1.img_mlp.0"),
        ("transformer_blocks.1.ff.net.2", "double_blocks.1.img_mlp.2"),
        ("transformer_blocks.1.ff_context.net.0.proj", "double_blocks.1.txt_mlp.0"),
        ("transformer_blocks.1.ff_context.net.2", "double_blocks.1.txt_mlp.2"),
        ("single_transformer_blocks.5.proj_out", "single_blocks.5.linear2"),
        ("single_transformer_blocks.5.norm.linear", "single_blocks.5.modulation.lin"),
    ],
)
def test_whole_weights(module, layer):
    target = flux_target(module, H, H)
    assert (target.bfl_layer, target.row_start, target.fused) == (layer, 0, False)


@pytest.mark.parametrize(
    "module",
    ["norm_out.linear", "x_embedder", "transformer_blocks.0.attn.norm_q", "single_transformer_blocks.0.attn.to_out.0"],
)
def test_modules_outside_the_blocks_are_refused(module):
    with pytest.raises(LoRWeBError, match="not a Linear inside a Flux transformer block"):
        flux_target(module, H, H)
