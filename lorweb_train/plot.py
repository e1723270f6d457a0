"""The loss curve as a PNG (PIL only, no plotting library): raw step losses, their moving average, validation."""

from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw


def write_loss_plot(losses: list, validation: list, path: str, size: tuple[int, int] = (800, 400)) -> None:
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 20, width - 20, height - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    losses = [(s, v) for s, v in losses if math.isfinite(v)]  # a non-finite value would make the axes "nan"
    validation = [(s, v) for s, v in validation if math.isfinite(v)]
    points = [(float(s), float(v)) for s, v in losses] + [(float(s), float(v)) for s, v in validation]
    if points:
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        low, high = min(values), max(values)
        span_x, span_y = max(1.0, max(steps) - min(steps)), max(1e-12, high - low)

        def place(step: float, value: float) -> tuple[float, float]:
            x = left + (step - min(steps)) / span_x * (right - left)
            return x, bottom - (value - low) / span_y * (bottom - top)

        _line(draw, [place(s, v) for s, v in losses], (170, 190, 230))
        _line(draw, [place(s, v) for s, v in _moving_average(losses)], (30, 70, 200))
        _line(draw, [place(s, v) for s, v in validation], (220, 90, 30), width=3)
        draw.text((left, bottom + 8), f"step {int(min(steps))} .. {int(max(steps))}", fill="black")
        draw.text((4, top), f"{high:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{low:.4g}", fill="black")
    draw.text((right - 260, bottom + 8), "loss (blue: mean of 20), validation (orange)", fill="black")
    temporary = path + ".tmp"  # the plot appears whole or not at all
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def _moving_average(losses: list, window: int = 20) -> list:
    averaged = []
    for i, (step, _) in enumerate(losses):
        chunk = [v for _, v in losses[max(0, i - window + 1) : i + 1]]
        averaged.append((step, sum(chunk) / len(chunk)))
    return averaged


def _line(draw: ImageDraw.ImageDraw, points: list, colour, width: int = 1) -> None:
    if len(points) > 1:
        draw.line(points, fill=colour, width=width)
    elif points:
        x, y = points[0]
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
