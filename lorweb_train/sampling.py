"""Rendering samples during training, the pure maths: sigma schedule, Euler sampler, quadrant crop, sample sheet.

No ComfyUI import: the trainer supplies ``predict(x, sigma)`` (the model with the basis mixed in) and the backend's
decoder. The schedule is the one the pack's workflows sample with in ComfyUI (Flux's ``ModelSamplingFlux`` with
shift 1.15 and the ``simple`` scheduler, Euler), so a sample looks like what the basis will give there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from lorweb_ops.images import to_pil

#: ComfyUI's Flux default (``ModelSamplingFlux``, ``sampling_settings.shift``); Kontext uses it unchanged
FLUX_SHIFT = 1.15
#: the columns of a sample sheet: the analogy's three inputs and the rendered answer
SHEET_COLUMNS = ("a", "a_prime", "b", "b_prime")

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shifted_sigma(t: float, shift: float = FLUX_SHIFT) -> float:
    """Flux's time shift: ``e^shift / (e^shift + 1/t - 1)``; 1 at t = 1, 0 at t = 0, more steps at high noise."""
    if t <= 0.0:
        return 0.0
    return math.exp(shift) / (math.exp(shift) + (1.0 / t - 1.0))


#: ComfyUI's model sampling tabulates sigma at t = 1/10000 .. 1 and schedulers pick table entries
_TABLE_SIZE = 10000


def sigma_schedule(steps: int, shift: float = FLUX_SHIFT) -> torch.Tensor:
    """``steps + 1`` sigmas from 1 down to 0: the shifted sigma at evenly spaced times, then 0.

    The times are those ComfyUI's ``simple`` scheduler picks from its 10000-entry table (evenly spaced entries,
    the index truncated), so the sigmas equal the ones the pack's workflows sample with.
    """
    if steps < 1:
        raise ValueError(f"sigma_schedule needs at least one step, got {steps}")
    stride = _TABLE_SIZE / steps
    times = [(_TABLE_SIZE - int(i * stride)) / _TABLE_SIZE for i in range(steps)]
    return torch.tensor([shifted_sigma(t, shift) for t in times] + [0.0], dtype=torch.float64)


def euler_sample(predict: Predict, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate the flow ``dx/dsigma = v`` from ``noise`` (at ``sigmas[0]``) to ``sigmas[-1]`` with Euler steps.

    ``predict(x, sigma)`` returns the velocity ``v = noise - x0`` the model was trained to predict (the loss's
    target), ``sigma`` a ``[batch]`` tensor. ``x`` stays float32 whatever precision the model computes in, so
    rounding does not build up over the steps.
    """
    x = noise.float()
    batch = x.shape[0]
    for current, following in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        sigma = torch.full((batch,), current, dtype=torch.float32, device=x.device)
        velocity = predict(x, sigma).float()
        x = x + (following - current) * velocity
    return x


def grid_quadrants(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images ``[N, H, W, 3]`` of 2x2 grids -> their quadrants ``[N, H/2, W/2, 3]`` by position.

    The control grid is ``[a | a'] / [b | b]`` and the target grid ``[a | a'] / [b | b']`` (see
    ``lorweb_train.data.training_grids``), so top-left is a, top-right a', bottom-left b, bottom-right b'.
    """
    height, width = images.shape[1] // 2, images.shape[2] // 2
    return {
        "top_left": images[:, :height, :width],
        "top_right": images[:, :height, width : 2 * width],
        "bottom_left": images[:, height : 2 * height, :width],
        "bottom_right": images[:, height : 2 * height, width : 2 * width],
    }


def bottom_right(images: torch.Tensor) -> torch.Tensor:
    """b' of rendered target grids ``[N, H, W, 3]``."""
    return grid_quadrants(images)["bottom_right"]


def sample_sheet(rows: Sequence[Sequence[torch.Tensor]], background: int = 40) -> Image.Image:
    """One row per analogy, one column per tile (``[H, W, 3]`` in 0..1), as one RGB image.

    Every cell has the size of the largest tile, so analogies of other aspect ratios share the sheet; a smaller
    tile sits in its cell's top-left corner on a dark background. Equal tiles give exactly ``columns x W`` by
    ``rows x H`` pixels.
    """
    if not rows or not rows[0]:
        raise ValueError("sample_sheet needs at least one row with at least one tile")
    cell_height = max(int(tile.shape[0]) for row in rows for tile in row)
    cell_width = max(int(tile.shape[1]) for row in rows for tile in row)
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * cell_width, len(rows) * cell_height), (background,) * 3)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(to_pil(tile), (c * cell_width, r * cell_height))
    return sheet


def write_png(image: Image.Image, path: str) -> None:
    """Write under a temporary name in the same folder and rename: a reader sees the whole file or none."""
    temporary = path + ".tmp"
    image.save(temporary, format="PNG")
    os.replace(temporary, path)
