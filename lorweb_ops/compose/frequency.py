"""CMLoRA's frequency profile: how much of an image's spectrum is high frequency, to order a set's LoRAs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import LoRWeBError


def grayscale_uint8(image: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` floats in 0..1 (ComfyUI IMAGE) or uint8 -> the reference's gray: RGB mean truncated to uint8."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise LoRWeBError(f"expected one RGB image [H, W, 3], got shape {list(image.shape)}")
    if image.dtype != np.uint8:
        image = np.clip(255.0 * image[..., :3].astype(np.float64), 0, 255).astype(np.uint8)
    return image[..., :3].astype(np.float64).mean(axis=2).astype(np.uint8)


def radial_profile(gray: np.ndarray) -> np.ndarray:
    """Mean log amplitude per integer radius around the centre of the shifted spectrum, normalised by its max."""
    spectrum = np.log(np.abs(np.fft.fftshift(np.fft.fft2(gray.astype(np.float64)))) + 1e-8)
    rows, cols = spectrum.shape
    y, x = np.indices(spectrum.shape)
    radius = np.floor(np.hypot(y - rows // 2, x - cols // 2)).astype(np.int64)
    sums = np.bincount(radius.ravel(), weights=spectrum.ravel())
    counts = np.bincount(radius.ravel())
    profile = (sums / counts).astype(np.float32)  # the reference stores ring means as float32
    return profile / profile.max()


def high_frequency_score(profile: np.ndarray, cutoff: float = 0.2) -> float:
    """Mean of the normalised profile over radii >= ``cutoff`` of the largest radius (72 of 362 at 512²)."""
    start = int(cutoff * (len(profile) - 1))
    return float(np.mean(profile[start:], dtype=np.float64))


def frequency_score(image: np.ndarray) -> float:
    return high_frequency_score(radial_profile(grayscale_uint8(image)))


def partition(scores: Sequence[float], threshold: float = 0.0) -> tuple[list[int], int]:
    """Order high -> low (stable) and count the LoRAs whose score change is above ``threshold``."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order, sum(1 for s in scores if s > threshold)


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def render_profiles(profiles: dict[str, np.ndarray], cutoff: float = 0.2, size=(640, 400)) -> Image.Image:
    """The radial profiles as a line plot (x: radius / max radius, y: normalised log amplitude), PIL only."""
    width, height = size
    left, right, top, bottom = 50, 190, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    low = min(float(np.min(p)) for p in profiles.values()) if profiles else 0.0
    low = min(low, 0.99)

    def to_xy(position: float, value: float) -> tuple[float, float]:
        x = left + position * (width - left - right)
        y = top + (1.0 - (value - low) / (1.0 - low)) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    cut_x = to_xy(cutoff, low)[0]
    draw.line([cut_x, top, cut_x, height - bottom], fill=(160, 160, 160))
    draw.text((cut_x + 3, top + 2), f"{cutoff:g} r_max", fill=(100, 100, 100), font=font)
    draw.text((left, height - bottom + 8), "radius / max radius (0 .. 1)", fill=(0, 0, 0), font=font)
    draw.text((4, top), f"{1.0:.2f}", fill=(0, 0, 0), font=font)
    draw.text((4, height - bottom - 10), f"{low:.2f}", fill=(0, 0, 0), font=font)
    for index, (name, profile) in enumerate(profiles.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        positions = np.linspace(0.0, 1.0, len(profile))
        draw.line([to_xy(p, float(v)) for p, v in zip(positions, profile, strict=True)], fill=colour, width=2)
        draw.text((width - right + 8, top + 14 * index), name[:28], fill=colour, font=font)
    return image
