"""The bit-pattern finiteness check agrees with ``torch.isfinite(t).all()`` on every value and at every position."""

import tracemalloc

import pytest
import torch

from lorweb_ops.finite import CHUNK_BYTES, all_finite

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGERS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}  # fmt: skip
#: (exponent bits, mantissa bits) of each format
WIDTHS = {torch.float16: (5, 10), torch.bfloat16: (8, 7), torch.float32: (8, 23), torch.float64: (11, 52)}


def reference(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def from_bits(patterns: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Floats with the given unsigned bit patterns (sign bit included)."""
    width = torch.finfo(dtype).bits
    signed = [p - (1 << width) if p >= 1 << (width - 1) else p for p in patterns]
    return torch.tensor(signed, dtype=INTEGERS[dtype]).view(dtype)


def special_patterns(dtype: torch.dtype, count: int = 64) -> list[int]:
    """Infinities, NaNs with assorted payloads (quiet, signalling, smallest, largest), the largest finite values,
    subnormals and zeros, with both signs."""
    exponent_bits, mantissa_bits = WIDTHS[dtype]
    sign, ones = 1 << (exponent_bits + mantissa_bits), ((1 << exponent_bits) - 1) << mantissa_bits
    full = (1 << mantissa_bits) - 1
    generator = torch.Generator().manual_seed(0)
    payloads = [1, 2, full, 1 << (mantissa_bits - 1), (1 << (mantissa_bits - 1)) + 1, full >> 1]
    payloads += [int(torch.randint(1, full + 1, (1,), generator=generator)) for _ in range(count)]
    magnitudes = [ones] + [ones | p for p in payloads]  # non-finite
    magnitudes += [ones - 1, ones - (1 << mantissa_bits), 0, 1, full, 1 << mantissa_bits]  # finite edges
    return magnitudes + [sign | m for m in magnitudes]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_alone(dtype):
    """All 65536 values of the two 16-bit formats, each on its own."""
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    expected = torch.isfinite(values)
    assert int((~expected).sum()) == 2 * (1 << WIDTHS[dtype][1])  # ±Inf and every NaN, both signs
    for index in range(values.numel()):
        bits = (index - (1 << 15)) & 0xFFFF
        assert all_finite(values[index : index + 1]) == bool(expected[index]), f"bits {bits:#06x}"


@pytest.mark.parametrize("dtype", FLOATS)
def test_special_values_alone_and_among_finite_values(dtype):
    for value in from_bits(special_patterns(dtype), dtype):
        alone = value.reshape(1)
        among = torch.linspace(-3, 3, 1001, dtype=torch.float64).to(dtype)
        among[500] = value
        assert all_finite(alone) == reference(alone) and all_finite(among) == reference(among), value
    info = torch.finfo(dtype)
    extremes = torch.tensor([info.max, -info.max, info.tiny, -info.tiny, -0.0], dtype=dtype)
    extremes = torch.cat([extremes, from_bits([1, (1 << (torch.finfo(dtype).bits - 1)) | 1], dtype)])
    assert all_finite(extremes) and reference(extremes)  # largest, smallest normal, -0, smallest subnormals


@pytest.mark.parametrize("dtype", FLOATS)
def test_one_bad_value_anywhere_in_a_large_tensor(dtype):
    """At the ends, on each side of every chunk boundary and at random positions; in tensors of several chunks."""
    step = CHUNK_BYTES // torch.finfo(dtype).bits * 8
    size = 3 * step + 9  # divisible by 3, not by a chunk
    generator = torch.Generator().manual_seed(1)
    tensor = torch.randn(size, generator=generator, dtype=torch.float32).to(dtype) * 1000
    assert all_finite(tensor) and reference(tensor)
    positions = [0, size - 1] + [k * step + d for k in (1, 2, 3) for d in (-1, 0, 1)]
    positions += torch.randint(0, size, (6,), generator=generator).tolist()
    bad = from_bits(special_patterns(dtype, count=4), dtype)
    bad = bad[~torch.isfinite(bad)]
    for number, position in enumerate(positions):
        value = bad[number % bad.numel()]
        tensor[position] = value
        assert not all_finite(tensor) and not all_finite(tensor.reshape(-1, 3)), (position, value)
        tensor[position] = 1.0
    assert all_finite(tensor.reshape(-1, 3))


@pytest.mark.parametrize("dtype", FLOATS)
def test_shapes_views_and_other_tensors(dtype):
    base = torch.randn(6, 5, 4, dtype=torch.float32).to(dtype)
    base[0, 0, 0] = float("nan")
    cases = [
        base,
        base[1:],  # a view at a storage offset, past the NaN
        base[:, 1:].contiguous(),
        base.transpose(0, 2),  # not contiguous: torch's own test
        base[1:].transpose(0, 2),
        base[0, 0, 0],  # 0-d
        base[1, 1, 1],
        base[:0],  # empty
        base[1:].clone().requires_grad_(dtype is not torch.float16 and dtype is not torch.bfloat16),
    ]
    for case in cases:
        assert all_finite(case) == reference(case), case.shape


def test_dtypes_without_a_layout_use_torchs_test():
    assert all_finite(torch.tensor([1, 2], dtype=torch.int32))
    assert not all_finite(torch.tensor([1.0, float("inf")], dtype=torch.complex64))


def test_memory_stays_within_one_chunk():
    """numpy reports its buffers to tracemalloc: the check of a 64 MB tensor allocates one chunk, not a copy."""
    tensor = torch.zeros(32 << 20, dtype=torch.float16)
    tracemalloc.start()
    try:
        assert all_finite(tensor)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < CHUNK_BYTES + (64 << 10)
