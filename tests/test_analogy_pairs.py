"""Several example pairs (a_i, a'_i) in one analogy: the mean of the per-pair queries, on the golden basis.

The expected numbers are re-derived here from the basis tensors (the query projection and keys of each module),
not taken from the code under test.
"""

from __future__ import annotations

import pytest
import torch
from lorweb_testing import GOLDEN, GOLDEN_CKPT
from PIL import Image

import lorweb_ops


@pytest.fixture(scope="module")
def basis():
    return lorweb_ops.load_basis(str(GOLDEN_CKPT))


@pytest.fixture(scope="module")
def embed(basis):
    """A fixed linear image encoder with the golden basis' embedding size (query_dim = 3 x 5)."""
    per_image = basis.query_dim // 3
    generator = torch.Generator().manual_seed(11)
    projection = torch.randn(224 * 224 * 3, per_image, generator=generator) / 224.0

    def encode(batch: torch.Tensor) -> torch.Tensor:
        return batch.reshape(batch.shape[0], -1) @ projection

    return encode


@pytest.fixture(scope="module")
def tiles():
    return lorweb_ops.grid_quadrants(Image.open(GOLDEN / "grid_square.png").convert("RGB"))


def _second_pair(tiles) -> tuple[Image.Image, Image.Image]:
    # another example of "the same edit": the tiles mirrored
    return tiles["a"].transpose(Image.FLIP_LEFT_RIGHT), tiles["a_prime"].transpose(Image.FLIP_LEFT_RIGHT)


def test_identical_pairs_give_exactly_the_one_pair_analogy(basis, embed, tiles):
    one = lorweb_ops.encode_analogy(tiles["a"], tiles["a_prime"], tiles["b"], embed)
    for count in (2, 3, 4):
        pairs = [(tiles["a"], tiles["a_prime"])] * count
        several = lorweb_ops.encode_analogy_pairs(pairs, tiles["b"], embed)
        assert several.pairs == count
        assert torch.equal(several.query, one.query)
        mixed_once = lorweb_ops.mixing_coefficients(basis, one.query)
        mixed_several = lorweb_ops.mixing_coefficients(basis, several.query)
        for module in basis.modules:
            assert torch.equal(mixed_several[module], mixed_once[module]), module


def test_one_pair_is_the_paper_analogy(embed, tiles):
    one = lorweb_ops.encode_analogy(tiles["a"], tiles["a_prime"], tiles["b"], embed)
    listed = lorweb_ops.encode_analogy_pairs([(tiles["a"], tiles["a_prime"])], tiles["b"], embed)
    assert torch.equal(listed.query, one.query) and listed.pairs == 1


def test_two_pairs_average_the_queries_and_so_the_logits(basis, embed, tiles):
    second = _second_pair(tiles)
    first_query = lorweb_ops.encode_analogy(tiles["a"], tiles["a_prime"], tiles["b"], embed).query
    second_query = lorweb_ops.encode_analogy(*second, tiles["b"], embed).query
    assert not torch.allclose(first_query, second_query)
    both = lorweb_ops.encode_analogy_pairs([(tiles["a"], tiles["a_prime"]), second], tiles["b"], embed)
    torch.testing.assert_close(both.query, (first_query + second_query) / 2, rtol=0, atol=1e-6)
    mixed = lorweb_ops.mixing_coefficients(basis, both.query)
    for module in basis.modules:
        expected = torch.softmax((_logits(basis, module, first_query) + _logits(basis, module, second_query)) / 2, 0)
        torch.testing.assert_close(mixed[module], expected, rtol=0, atol=1e-6)


def _logits(basis, module: str, query: torch.Tensor) -> torch.Tensor:
    """The released settings (1 head, softmax, mean): logits_k = <W_q q, key_k> / sqrt(keys_dim)."""
    weights = basis.weights[module]
    projected = weights.to_q.float() @ query.reshape(-1)
    return weights.lora_keys.float() @ projected / projected.numel() ** 0.5


def test_no_pair_is_an_error(embed, tiles):
    with pytest.raises(lorweb_ops.LoRWeBError, match="at least one example pair"):
        lorweb_ops.encode_analogy_pairs([], tiles["b"], embed)
