"""A picture of the mix: which basis LoRAs an analogy chose, layer by layer, and how concentrated the mix is.

``mix_summary`` is the compact data the node UI draws (rows averaged per Flux block); ``render_mix_chart`` draws
the same as an image (PIL only, no plotting library).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .flux_layout import block_of
from .mixing import MixWeights

# viridis at 6 anchors, interpolated: perceptually even, readable for colour-blind users
_VIRIDIS = np.array(
    [[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132], [122, 209, 81], [253, 231, 37]], dtype=np.float32
)


def block_label(key: tuple[int, int]) -> str:
    return f"{'double' if key[0] == 0 else 'single'} {key[1]}"


def block_matrix(weights: MixWeights) -> tuple[list[str], torch.Tensor]:
    """``[blocks, K]``: each block's mean coefficients over its layers, blocks in model order."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for module in weights.modules:
        groups.setdefault(block_of(module), []).append(weights.coefficients[module])
    keys = sorted(groups)
    return [block_label(k) for k in keys], torch.stack([torch.stack(groups[k]).mean(0) for k in keys])


def mix_entropy(weights: MixWeights) -> tuple[float, float]:
    """Mean entropy (nats) of the per-layer mixes of |c| normalised to 1, and its fraction of the maximum log K."""
    matrix = weights.as_matrix().abs()
    probabilities = matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1e-12)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1).mean().item()
    num_loras = matrix.shape[1]
    return entropy, entropy / math.log(num_loras) if num_loras > 1 else 0.0


def dominant_loras(weights: MixWeights, top: int = 5) -> list[tuple[int, float]]:
    """The basis LoRAs with the largest mean coefficient over all layers: ``[(index, mean), ...]``."""
    means = weights.as_matrix().mean(dim=0)
    order = torch.argsort(means.abs(), descending=True)[:top]
    return [(int(i), float(means[i])) for i in order]


def mix_summary(weights: MixWeights, top: int = 5) -> dict:
    """JSON-ready data for the node UI: the per-block heat map (0..255), dominant LoRAs and entropy."""
    labels, matrix = block_matrix(weights)
    scale = float(matrix.abs().max()) or 1.0
    entropy, fraction = mix_entropy(weights)
    return {
        "layers": len(weights.modules),
        "num_loras": int(matrix.shape[1]),
        "rows": labels,
        "heat": (matrix.abs() / scale * 255).round().to(torch.uint8).tolist(),
        "scale": scale,
        "signed": bool((matrix < 0).any()),
        "dominant": [[index, round(value, 4)] for index, value in dominant_loras(weights, top)],
        "entropy": round(entropy, 4),
        "entropy_fraction": round(fraction, 4),
        "strength": weights.strength,
    }


def _colours(values: np.ndarray) -> np.ndarray:
    """0..1 -> viridis RGB."""
    position = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_VIRIDIS) - 2)
    fraction = (position - low)[..., None]
    return (_VIRIDIS[low] * (1 - fraction) + _VIRIDIS[low + 1] * fraction).astype(np.uint8)


def render_mix_chart(weights: MixWeights, width: int = 768, height: int = 512) -> Image.Image:
    """Heat map (blocks x basis LoRAs, mean |c| per block) with the mean weight per basis LoRA and the entropy."""
    labels, matrix = block_matrix(weights)
    magnitude = matrix.abs().numpy()
    summary_font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(image)

    left, top, heat_width, heat_height = 56, 28, width // 2 - 64, height - 60
    heat = _colours(magnitude / (magnitude.max() or 1.0))
    heat_image = Image.fromarray(heat, "RGB").resize((heat_width, heat_height), Image.NEAREST)
    image.paste(heat_image, (left, top))
    draw.text(
        (left, 8),
        f"{len(weights.modules)} layers x {matrix.shape[1]} basis LoRAs (mean |c| per block)",
        fill=(230, 230, 230),
        font=summary_font,
    )
    row_height = heat_height / len(labels)
    step = max(1, math.ceil(12 / row_height))
    for row in range(0, len(labels), step):
        draw.text((4, top + row * row_height), labels[row], fill=(180, 180, 180), font=summary_font)
    draw.text(
        (left, top + heat_height + 4),
        "basis LoRA 0 ... " + str(matrix.shape[1] - 1),
        fill=(180, 180, 180),
        font=summary_font,
    )

    _draw_bars(draw, weights, (width // 2 + 16, top, width - 16, top + heat_height // 2), summary_font)
    entropy, fraction = mix_entropy(weights)
    lines = [
        f"entropy {entropy:.3f} nats ({100 * fraction:.0f}% of uniform)",
        f"strength {weights.strength:g}",
        "dominant: " + ", ".join(f"#{i} {v:.3f}" for i, v in dominant_loras(weights, 5)),
    ]
    for number, line in enumerate(lines):
        draw.text(
            (width // 2 + 16, top + heat_height // 2 + 24 + 16 * number), line, fill=(230, 230, 230), font=summary_font
        )
    return image


def _draw_bars(draw: ImageDraw.ImageDraw, weights: MixWeights, box: tuple[int, int, int, int], font) -> None:
    """Mean coefficient of each basis LoRA over all layers, as a bar chart."""
    x0, y0, x1, y1 = box
    means = weights.as_matrix().mean(dim=0).numpy()
    peak = float(np.abs(means).max()) or 1.0
    draw.text((x0, y0 - 20), "mean weight per basis LoRA", fill=(230, 230, 230), font=font)
    baseline = (y0 + y1) // 2 if (means < 0).any() else y1
    bar_width = (x1 - x0) / len(means)
    colours = _colours(np.abs(means) / peak)
    for index, value in enumerate(means):
        bar_top = baseline - (value / peak) * (baseline - y0)
        left = x0 + index * bar_width
        draw.rectangle(
            [left, min(bar_top, baseline), left + max(bar_width - 1, 1), max(bar_top, baseline)],
            fill=tuple(int(c) for c in colours[index]),
        )
    draw.line([x0, baseline, x1, baseline], fill=(120, 120, 120))
