"""Preprocessing, grid, crops and query building against the reference's own pixels and query."""

import pytest
import torch
from lorweb_testing import CLIP_MEAN, CLIP_STD, GOLDEN, clip_pixel_values, golden_tensors
from PIL import Image

import lorweb_ops
from lorweb_ops.images import from_pil, single_image, to_pil


@pytest.fixture(scope="module")
def golden():
    return golden_tensors()


@pytest.fixture(scope="module")
def square_tiles():
    return lorweb_ops.grid_quadrants(Image.open(GOLDEN / "grid_square.png").convert("RGB"))


@pytest.fixture(scope="module")
def tiny_clip():
    transformers = pytest.importorskip("transformers")
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(str(GOLDEN / "tiny_clip_vision")).eval()
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def embed(batch):  # ComfyUI IMAGE batch [N, S, S, 3] -> image_embeds [N, d]
        return model(pixel_values=(batch.permute(0, 3, 1, 2) - mean) / std).image_embeds

    return model, embed


def test_pixels_match_clip_image_processor(golden, square_tiles):
    pixels = clip_pixel_values([square_tiles["a"], square_tiles["a_prime"], square_tiles["b"]])
    torch.testing.assert_close(pixels, golden["clip_pixel_values_square"], rtol=0, atol=1e-6)


def test_query_matches_reference(golden, square_tiles, tiny_clip):
    _, embed = tiny_clip
    analogy = lorweb_ops.encode_analogy(square_tiles["a"], square_tiles["a_prime"], square_tiles["b"], embed)
    assert analogy.query_mode == "cat-aa'b" and analogy.embed_dim == 5
    torch.testing.assert_close(analogy.query, golden["query_square"].reshape(1, -1), rtol=0, atol=1e-5)


def test_nonsquare_reference_quirk_is_reproducible(golden, tiny_clip):
    """The reference crops with half the width on both axes; reference_quadrants reproduces its query."""
    model, _ = tiny_clip
    grid = Image.open(GOLDEN / "grid_nonsquare.png").convert("RGB")
    crops = lorweb_ops.reference_quadrants(grid)
    assert [c.size for c in crops.values()] == [(200, 200), (200, 200), (200, 40)]
    with torch.no_grad():
        embeds = model(pixel_values=clip_pixel_values(list(crops.values()))).image_embeds
    torch.testing.assert_close(embeds.reshape(1, -1), golden["query_nonsquare"].reshape(1, -1), rtol=0, atol=1e-5)
    assert [c.size for c in lorweb_ops.grid_quadrants(grid).values()] == [(200, 120)] * 3


def test_grid_matches_the_reference_png():
    grid = Image.open(GOLDEN / "grid_square.png").convert("RGB")
    tiles = lorweb_ops.grid_quadrants(grid)
    rebuilt = lorweb_ops.build_grid(tiles["a"], tiles["a_prime"], tiles["b"])
    assert rebuilt.size == grid.size
    assert torch.equal(from_pil(rebuilt), from_pil(grid))


def test_grid_resizes_a_prime_and_b_to_a():
    a, a_prime, b = Image.new("RGB", (30, 20), "red"), Image.new("RGB", (50, 50), "green"), Image.new("RGB", (7, 9))
    grid = lorweb_ops.build_grid(a, a_prime, b)
    assert grid.size == (60, 40)
    assert grid.getpixel((45, 10)) == (0, 128, 0)


def test_crop_result_takes_bottom_right_quadrant():
    image = torch.arange(2 * 6 * 8 * 3, dtype=torch.float32).reshape(2, 6, 8, 3)
    crop = lorweb_ops.crop_result(image)
    assert crop.shape == (2, 3, 4, 3)
    assert torch.equal(crop, image[:, 3:, 4:, :])


def test_image_round_trip_drops_alpha():
    rgba = torch.rand(1, 20, 24, 4)
    pil = to_pil(single_image(rgba, "a"))
    assert pil.mode == "RGB" and pil.size == (24, 20)
    torch.testing.assert_close(from_pil(pil), (rgba[..., :3] * 255).round() / 255, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("cat-aa'b", ["a", "a_prime", "b"]),
        ("ca'-ca", ["a", "a_prime"]),
        ("ca'-ca+cb", ["a", "a_prime", "b"]),
        ("aa'bb'", ["grid"]),
        ("caa'bb'", ["grid"]),
        ("caa'b", ["grid_without_target"]),
        ("caa'", ["top_half"]),
    ],
)
def test_every_external_mode_has_its_images(mode, expected):
    a, a_prime, b = (Image.new("RGB", (10, 8), c) for c in ("red", "green", "blue"))
    images = lorweb_ops.encoder_images(a, a_prime, b, mode)
    assert list(images) == expected
    if mode == "caa'b":
        assert images["grid_without_target"].getpixel((15, 12)) == (0, 0, 0)
        assert images["grid_without_target"].getpixel((5, 12)) == (0, 0, 255)
    if mode == "caa'":
        assert images["top_half"].size == (20, 8)


def test_combined_queries_follow_the_reference_formulas():
    e = {"a": torch.tensor([1.0, 2.0]), "a_prime": torch.tensor([4.0, 8.0]), "b": torch.tensor([0.5, 0.25])}
    assert lorweb_ops.combine_embeddings("cat-aa'b", e).tolist() == [[1, 2, 4, 8, 0.5, 0.25]]
    assert lorweb_ops.combine_embeddings("ca'-ca", e).tolist() == [[3, 6]]
    assert lorweb_ops.combine_embeddings("ca'-ca+cb", e).tolist() == [[3.5, 6.25]]
    assert lorweb_ops.combine_embeddings("aa'bb'", {"grid": torch.tensor([7.0])}).tolist() == [[7]]
