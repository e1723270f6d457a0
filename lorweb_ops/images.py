"""Image plumbing as the reference does it: the 2x2 Kontext grid, the b' crop, CLIP preprocessing.

Images travel as ComfyUI IMAGE tensors (``[B, H, W, C]`` float in 0..1) or PIL images. Resizing uses PIL
bicubic, like the reference (``build_control_image``) and Hugging Face's ``CLIPImageProcessor``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import LoRWeBError

MIN_IMAGE_SIDE = 16  # below this the encoder sees little more than interpolation


def single_image(image: torch.Tensor, name: str) -> torch.Tensor:
    """The one ``[H, W, C]`` image of a ComfyUI IMAGE batch; a batch of several is an error."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise LoRWeBError(f"image {name!r} must be a ComfyUI IMAGE [batch, height, width, channels]")
    if image.shape[0] != 1:
        raise LoRWeBError(
            f"image {name!r} is a batch of {image.shape[0]}; each analogy takes one image per input. Pick one "
            "(e.g. with ImageFromBatch), or, for many b images, pass them as a list (Rebatch Images with "
            "batch_size 1, or a folder loader that outputs a list): each b then gets its own analogy and result. "
            "From the command line: scripts/run_analogy.py with a folder."
        )
    height, width = image.shape[1], image.shape[2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise LoRWeBError(
            f"image {name!r} is {width}x{height} pixels; it needs at least {MIN_IMAGE_SIDE} pixels per side "
            "to be encoded (the encoder works at 224x224). Use a larger image."
        )
    return image[0]


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[H, W, C]`` float 0..1 -> RGB PIL (alpha dropped, grey expanded), rounding like ComfyUI's savers."""
    array = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]), mode="RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> ComfyUI IMAGE ``[1, H, W, 3]`` float32."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def match_size(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``(width, height)`` with PIL bicubic, as the reference does for a' and b (no-op if equal)."""
    return image if image.size == size else image.resize(size, Image.BICUBIC)


def build_grid(a: Image.Image, a_prime: Image.Image, b: Image.Image) -> Image.Image:
    """The Kontext input ``[a | a'] / [b | b]`` at a's size: the target slot holds a copy of b."""
    width, height = a.size
    a_prime, b = match_size(a_prime, a.size), match_size(b, a.size)
    grid = Image.new("RGB", (2 * width, 2 * height))
    for tile, corner in ((a, (0, 0)), (a_prime, (width, 0)), (b, (0, height)), (b, (width, height))):
        grid.paste(tile, corner)
    return grid


def crop_result(image: torch.Tensor) -> torch.Tensor:
    """The bottom-right quadrant (b') of generated grids, ``[B, H, W, C]`` -> ``[B, H - H//2, W - W//2, C]``."""
    height, width = image.shape[1], image.shape[2]
    return image[:, height // 2 :, width // 2 :, :]


def grid_quadrants(grid: Image.Image) -> dict[str, Image.Image]:
    """The a, a', b quadrants of a grid (true quadrants: identical to the reference for square tiles)."""
    width, height = grid.size
    w, h = width // 2, height // 2
    return {"a": grid.crop((0, 0, w, h)), "a_prime": grid.crop((w, 0, width, h)), "b": grid.crop((0, h, w, height))}


def reference_quadrants(grid: Image.Image) -> dict[str, Image.Image]:
    """The reference's crops, which use half the *width* on both axes (wrong for non-square tiles)."""
    width, height = grid.size
    side = width // 2
    return {
        "a": grid.crop((0, 0, side, side)),
        "a_prime": grid.crop((side, 0, width, side)),
        "b": grid.crop((0, side, side, height)),
    }


def clip_resize_crop(image: Image.Image, size: int = 224) -> Image.Image:
    """Shortest side -> ``size`` (long side truncated, PIL bicubic), then the centre ``size x size``."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    resized = image.convert("RGB").resize(new_size, Image.BICUBIC)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return resized.crop((left, top, left + size, top + size))


def clip_batch(images: list[Image.Image], size: int = 224) -> torch.Tensor:
    """Resized and cropped images as a ComfyUI IMAGE batch ``[N, size, size, 3]`` (values k/255)."""
    return torch.cat([from_pil(clip_resize_crop(image, size)) for image in images])
