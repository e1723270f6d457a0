"""The example images of the templates, drawn by this code (no third-party pictures), and their opt-in copy.

Two procedural scenes (a sailboat at sunset, a house on a meadow) and the edit the templates ask for, a pencil
sketch made with a colour-dodge of the blurred negative. The forward template uses
``a = boat photo, a' = boat sketch, b = house photo``; the reverse template takes ``b = house sketch``.

Users:   python scripts/example_inputs.py install [--input-dir DIR]
         copies the PNGs from the pack's example_inputs/ into ComfyUI's input folder (by default the one of the
         ComfyUI this pack is installed in), never replacing a different file of the same name.
Authors: python scripts/example_inputs.py generate   (rewrites example_inputs/*.png)

Only numpy and Pillow (both come with ComfyUI); everything is elementwise numpy maths, so the pictures come out
the same on every machine.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

PACK_DIR = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = PACK_DIR / "example_inputs"
SIZE = 512
BLUR_RADIUS = 8

Canvas = np.ndarray  # [SIZE, SIZE, 3] float RGB in 0..1


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in 0..1, x to the right and y downwards."""
    coords = (np.arange(SIZE, dtype=np.float64) + 0.5) / SIZE
    return np.meshgrid(coords, coords)


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Soft (anti-aliased) inside mask from a signed distance in pixels: negative inside."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)[..., None]


def _paint(canvas: Canvas, mask: np.ndarray, colour) -> Canvas:
    return canvas * (1.0 - mask) + np.asarray(colour, dtype=np.float64) * mask


def _vertical_gradient(y: np.ndarray, top, bottom) -> Canvas:
    t = y[..., None]
    return np.asarray(top, dtype=np.float64) * (1.0 - t) + np.asarray(bottom, dtype=np.float64) * t


def _circle(x, y, cx, cy, radius) -> np.ndarray:
    return _coverage((np.hypot(x - cx, y - cy) - radius) * SIZE)


def _box(x, y, left, top, right, bottom) -> np.ndarray:
    outside = np.maximum(np.maximum(left - x, x - right), np.maximum(top - y, y - bottom))
    return _coverage(outside * SIZE)


def _triangle(x, y, corners) -> np.ndarray:
    """Inside a counter-clockwise or clockwise triangle: the largest signed distance to its three edges."""
    (x0, y0), (x1, y1), (x2, y2) = corners
    orientation = np.sign((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0))
    distances = []
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y1)), ((x1, y1), (x2, y2)), ((x2, y2), (x0, y0))):
        length = np.hypot(bx - ax, by - ay)
        distances.append(-orientation * ((bx - ax) * (y - ay) - (by - ay) * (x - ax)) / length)
    return _coverage(np.maximum.reduce(distances) * SIZE)


def sailboat_scene() -> Canvas:
    """a: a sailboat on the sea at sunset."""
    x, y = _grid()
    canvas = _vertical_gradient(y / 0.62, (0.16, 0.22, 0.52), (0.98, 0.62, 0.32))
    canvas = _paint(canvas, _circle(x, y, 0.70, 0.50, 0.09), (1.0, 0.86, 0.45))
    waves = 0.012 * np.sin(x * 40.0 + y * 9.0) + 0.006 * np.sin(x * 97.0 - y * 31.0)
    sea = _vertical_gradient((y - 0.62) / 0.38, (0.12, 0.30, 0.48), (0.03, 0.12, 0.25)) + waves[..., None]
    canvas = _paint(canvas, _coverage((0.62 - y) * SIZE), sea)
    canvas = _paint(canvas, _triangle(x, y, ((0.26, 0.66), (0.62, 0.66), (0.56, 0.74))), (0.42, 0.20, 0.10))
    canvas = _paint(canvas, _triangle(x, y, ((0.26, 0.66), (0.56, 0.74), (0.32, 0.74))), (0.42, 0.20, 0.10))
    canvas = _paint(canvas, _box(x, y, 0.435, 0.26, 0.447, 0.66), (0.25, 0.15, 0.08))
    canvas = _paint(canvas, _triangle(x, y, ((0.455, 0.27), (0.455, 0.63), (0.64, 0.63))), (0.96, 0.95, 0.90))
    canvas = _paint(canvas, _triangle(x, y, ((0.427, 0.32), (0.427, 0.63), (0.30, 0.63))), (0.88, 0.30, 0.24))
    return np.clip(canvas, 0.0, 1.0)


def house_scene() -> Canvas:
    """b: a house with a tree on a meadow under a blue sky."""
    x, y = _grid()
    canvas = _vertical_gradient(y / 0.60, (0.30, 0.55, 0.88), (0.72, 0.85, 0.97))
    for cx, cy, rx in ((0.20, 0.16, 0.09), (0.28, 0.14, 0.07), (0.74, 0.22, 0.08), (0.81, 0.20, 0.06)):
        canvas = _paint(canvas, _coverage((np.hypot((x - cx) / rx, (y - cy) / (rx * 0.55)) - 1.0) * rx * SIZE), 0.98)
    grass_texture = 0.03 * np.sin(x * 211.0) * np.sin(y * 173.0) + 0.02 * np.sin(x * 53.0 + y * 41.0)
    grass = _vertical_gradient((y - 0.60) / 0.40, (0.40, 0.68, 0.30), (0.22, 0.45, 0.16)) + grass_texture[..., None]
    canvas = _paint(canvas, _coverage((0.60 - y) * SIZE), grass)
    canvas = _paint(canvas, _box(x, y, 0.30, 0.46, 0.64, 0.74), (0.93, 0.86, 0.70))
    canvas = _paint(canvas, _triangle(x, y, ((0.26, 0.47), (0.68, 0.47), (0.47, 0.30))), (0.70, 0.18, 0.14))
    canvas = _paint(canvas, _box(x, y, 0.44, 0.59, 0.51, 0.74), (0.45, 0.27, 0.15))
    for left in (0.34, 0.55):
        canvas = _paint(canvas, _box(x, y, left, 0.52, left + 0.06, 0.58), (0.35, 0.55, 0.80))
    canvas = _paint(canvas, _box(x, y, 0.785, 0.52, 0.815, 0.76), (0.40, 0.26, 0.14))
    canvas = _paint(canvas, _circle(x, y, 0.80, 0.45, 0.10), (0.20, 0.48, 0.20))
    return np.clip(canvas, 0.0, 1.0)


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur with edge padding (cumulative sums: exact and platform-independent)."""
    for axis in (0, 1):
        padded = np.pad(image, [(radius + 1, radius) if a == axis else (0, 0) for a in range(image.ndim)], "edge")
        summed = np.cumsum(padded, axis=axis)
        upper = np.take(summed, range(2 * radius + 1, summed.shape[axis]), axis=axis)
        lower = np.take(summed, range(0, summed.shape[axis] - 2 * radius - 1), axis=axis)
        image = (upper - lower) / (2 * radius + 1)
    return image


def pencil_sketch(canvas: Canvas) -> Canvas:
    """The edit: grey pencil lines on paper (colour-dodge of the luminance by its blurred negative)."""
    luminance = canvas @ np.array([0.299, 0.587, 0.114])
    negative_blur = _box_blur(_box_blur(1.0 - luminance, BLUR_RADIUS), BLUR_RADIUS)
    sketch = np.clip(luminance / np.maximum(1.0 - negative_blur, 1e-3), 0.0, 1.0)
    x, y = _grid()
    paper = 0.97 + 0.015 * np.sin(x * 301.0 + y * 17.0) * np.sin(y * 263.0)
    grey = np.clip(sketch**2.2 * paper, 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=2)


def night_lighting(canvas: Canvas) -> Canvas:
    """A second edit, for the compose examples: night lighting (darker, blue cast, a warm glow from the top left)."""
    x, y = _grid()
    glow = 0.25 * np.exp(-((x - 0.2) ** 2 + (y - 0.25) ** 2) / 0.05)
    night = canvas * np.array([0.28, 0.33, 0.55]) + glow[..., None] * np.array([0.9, 0.7, 0.35])
    return np.clip(night, 0.0, 1.0)


def to_image(canvas: Canvas) -> Image.Image:
    return Image.fromarray(np.round(canvas * 255.0).astype(np.uint8), mode="RGB")


#: file name -> how to draw it
EXAMPLES: dict[str, Callable[[], Canvas]] = {
    "lorweb_a.png": sailboat_scene,
    "lorweb_a_prime.png": lambda: pencil_sketch(sailboat_scene()),
    "lorweb_b.png": house_scene,
    "lorweb_b_sketch.png": lambda: pencil_sketch(house_scene()),
    # the second example pair of the compose templates: another edit (night lighting) on the same kind of scene
    "lorweb_a2.png": sailboat_scene,
    "lorweb_a2_prime.png": lambda: night_lighting(sailboat_scene()),
}


def generate(folder: Path = EXAMPLES_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in EXAMPLES.items():
        to_image(draw()).save(folder / name, optimize=True)
        written.append(folder / name)
    return written


def default_input_dir() -> Path:
    """ComfyUI's input folder next to the custom_nodes folder this pack is installed in."""
    return PACK_DIR.parents[1] / "input"


def install(input_dir: Path) -> list[str]:
    """Copy the example PNGs into ``input_dir``; a different file of the same name is left alone (reported)."""
    if not input_dir.is_dir():
        raise SystemExit(
            f"{input_dir} is not a folder. Give ComfyUI's input folder with --input-dir "
            "(e.g. --input-dir ComfyUI/input)."
        )
    report = []
    for name in EXAMPLES:
        source, target = EXAMPLES_DIR / name, input_dir / name
        if target.exists() and not filecmp.cmp(source, target, shallow=False):
            report.append(f"kept your own {target} (not replaced)")
        elif target.exists():
            report.append(f"already there: {target}")
        else:
            shutil.copyfile(source, target)
            report.append(f"copied {name} -> {target}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    copy = commands.add_parser("install", help="copy the example images into ComfyUI's input folder")
    copy.add_argument("--input-dir", type=Path, default=None, help="default: the input folder of this ComfyUI")
    commands.add_parser("generate", help="redraw example_inputs/*.png (for the pack's authors)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        for path in generate():
            print(f"wrote {path}")
        return 0
    for line in install(args.input_dir or default_input_dir()):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
