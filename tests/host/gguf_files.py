"""GGUF files for the host tests, written with the `gguf` library as city96/ComfyUI-GGUF's converter lays them out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")


def in_blocks(key: str) -> bool:
    return key.startswith(BLOCK_PREFIXES)


def write_gguf(
    path: Path, state: dict[str, torch.Tensor], quant: str = "Q8_0", quantize: Callable[[str], bool] = in_blocks
) -> None:
    """A Flux state dict as GGUF (arch "flux"): the 2-D weights ``quantize`` picks whose width is a multiple of 32
    in ``quant``, everything else float32."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, tensor in state.items():
        data = tensor.float().numpy()  # one tensor at a time: the writer keeps only the packed arrays
        if data.ndim == 2 and data.shape[1] % 32 == 0 and quantize(key):
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
