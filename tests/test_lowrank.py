"""One low-rank term on a Linear's activations, its row slices, and when a weight takes it."""

import pytest
import torch

from lorweb_ops.lowrank import LowRankTerm, add_row_slices, lowrank_output, weight_fits


def test_lowrank_output_equals_the_dense_delta():
    generator = torch.Generator().manual_seed(0)
    up, down, x = torch.randn(12, 3, generator=generator), torch.randn(3, 5, generator=generator), torch.randn(2, 7, 5)
    term = LowRankTerm("m", up, down, scale=0.5)
    expected = x.double() @ (0.8 * 0.5 * up.double() @ down.double()).T
    torch.testing.assert_close(lowrank_output(term, x, 0.8).double(), expected, rtol=1e-5, atol=1e-6)


def test_row_slices_land_on_their_rows_and_overlapping_ones_add_up():
    """A fused qkv of width 3 x 4: a LoRA on k, another on k and v, one on the whole layer (written out by index)."""
    generator = torch.Generator().manual_seed(1)
    output = torch.randn(2, 5, 12, generator=generator)
    k, kv, whole = (torch.randn(2, 5, n, generator=generator) for n in (4, 8, 12))
    expected = output.clone()
    expected[..., 4:8] += k
    expected[..., 4:12] += kv
    expected += whole
    result = add_row_slices(output, [(4, kv), (0, whole), (4, k)])
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
    assert add_row_slices(output, []) is output


def test_row_slices_are_added_out_of_place_for_autograd():
    output = torch.zeros(3, 6, requires_grad=True)
    delta = torch.ones(3, 2, requires_grad=True)
    add_row_slices(output, [(2, delta)]).sum().backward()
    assert torch.equal(delta.grad, torch.ones(3, 2)) and torch.equal(output.grad, torch.ones(3, 6))


def test_row_slices_take_the_output_dtype():
    result = add_row_slices(torch.zeros(2, 4, dtype=torch.bfloat16), [(0, torch.ones(2, 4, dtype=torch.float32))])
    assert result.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "shape, in_features, start, count, sliced, fits",
    [
        ((12, 4), 4, 4, 4, True, True),  # k of a fused qkv
        ((12, 4), 4, 8, 8, True, False),  # runs past the last row
        ((12, 4), 5, 0, 4, True, False),  # other input width
        ((12, 4), 4, 0, 12, False, True),  # a whole layer, exactly
        ((16, 4), 4, 0, 12, False, False),  # a whole-layer term must cover the whole layer
        ((12,), 4, 0, 12, False, False),  # not a Linear weight
        ((), 4, 0, 12, False, False),  # missing
    ],
)
def test_when_a_weight_takes_a_term(shape, in_features, start, count, sliced, fits):
    assert weight_fits(shape, in_features, start, count, sliced=sliced) is fits
