"""Is every value of a float tensor finite? Checked on the bit patterns, a bounded chunk at a time.

A float is NaN or ±Inf exactly when all its exponent bits are ones, i.e. when its bits with the sign cleared are at
least those of +Inf. So one integer ``and`` and one integer maximum per chunk decide it, with no float arithmetic.
Why not ``torch.isfinite(t.abs().amax())`` (the earlier check): on fp16 CPU tensors it allocates a full-size
``abs`` copy per tensor and runs two parallel kernels through torch's thread pool; with two threads on busy
cores that check of the 1.67 GB basis took 3-12 s (0.2 s with one thread) against about 1 s for reading the
file. numpy runs these integer kernels on the calling thread at memory speed (about 0.15 s for that basis);
``benchmarks/load_probe.py --vs-read`` measures the load against a plain read (docs/developers.md).
"""

from __future__ import annotations

import numpy as np
import torch

#: float dtype -> (integer dtype of the same width, mask that clears the sign bit, bits of +Inf)
_LAYOUTS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}
#: bytes of scratch per check: small enough to stay in the CPU cache, large enough that the per-chunk Python
#: overhead is negligible (a 1.67 GB basis is ~1600 chunks)
CHUNK_BYTES = 1 << 20


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no value of ``tensor`` is NaN, +Inf or -Inf; exactly ``bool(torch.isfinite(tensor).all())``."""
    layout = _LAYOUTS.get(tensor.dtype)
    if layout is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        # not a case the pack's files produce (they are read into contiguous CPU memory): torch's own test
        return bool(torch.isfinite(tensor).all())
    integer, sign_cleared, infinity = layout
    bits = tensor.detach().reshape(-1).view(integer).numpy()  # a view: no copy of the data
    return _bits_below(bits, sign_cleared, infinity)


def _bits_below(bits: np.ndarray, mask: int, limit: int) -> bool:
    """Every ``bits & mask`` below ``limit``, computed into one reused chunk-sized buffer (bounded memory)."""
    step = max(1, CHUNK_BYTES // bits.itemsize)
    scratch = np.empty(min(step, bits.size), dtype=bits.dtype)
    for start in range(0, bits.size, step):
        chunk = bits[start : start + step]
        cleared = np.bitwise_and(chunk, mask, out=scratch[: chunk.size])
        if cleared.max() >= limit:
            return False
    return True
