"""The loss curve as a PNG (PIL only, no plotting library): raw step losses, their moving average, validation."""

from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw

RAW, AVERAGE, VALIDATION = (170, 190, 230), (30, 70, 200), (220, 90, 30)


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

        _line(draw, [place(s, v) for s, v in losses], RAW)
        _line(draw, [place(s, v) for s, v in _moving_average(losses)], AVERAGE)
        validation_points = [place(s, v) for s, v in validation]
        _line(draw, validation_points, VALIDATION, width=3)
        _markers(draw, validation_points, VALIDATION)  # often one point (at the end): a line alone would hide it
        if validation:
            _label_last(draw, validation_points[-1], f"validation {validation[-1][1]:.4g}", (left, right))
        draw.text((left, bottom + 8), f"step {int(min(steps))} .. {int(max(steps))}", fill="black")
        draw.text((4, top), f"{high:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{low:.4g}", fill="black")
    entries = [("loss", RAW), ("mean of 20", AVERAGE)] + ([("validation", VALIDATION)] if validation else [])
    _legend(draw, entries, (right, bottom + 8))
    temporary = path + ".tmp"  # the plot appears whole or not at all
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def _moving_average(losses: list, window: int = 20) -> list:
    averaged = []
    for i, (step, _) in enumerate(losses):
        chunk = [v for _, v in losses[max(0, i - window + 1) : i + 1]]
        averaged.append((step, sum(chunk) / len(chunk)))
    return averaged


def _markers(draw: ImageDraw.ImageDraw, points: list, colour, radius: int = 4) -> None:
    for x, y in points:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline="black")


def _label_last(draw: ImageDraw.ImageDraw, point: tuple, text: str, span: tuple[float, float]) -> None:
    """The latest validation value beside its marker, kept inside the plot (left of it near the right edge)."""
    x, y = point
    width = draw.textlength(text)
    x = x + 8 if x + 8 + width <= span[1] else x - 8 - width
    draw.text((max(span[0] + 2, x), y - 14), text, fill=VALIDATION)


def _legend(draw: ImageDraw.ImageDraw, entries: list, anchor: tuple[float, float]) -> None:
    """Colour swatch + name per curve, right-aligned at ``anchor``."""
    right, y = anchor
    x = right - sum(draw.textlength(name) + 26 for name, _ in entries)
    for name, colour in entries:
        draw.rectangle((x, y + 3, x + 12, y + 7), fill=colour)
        draw.text((x + 16, y), name, fill="black")
        x += draw.textlength(name) + 26


def _line(draw: ImageDraw.ImageDraw, points: list, colour, width: int = 1) -> None:
    if len(points) > 1:
        draw.line(points, fill=colour, width=width)
    elif points:
        x, y = points[0]
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
