"""Training data: three layouts read into analogy examples, checked up front with messages that name the file.

(a) ``reference``: the reference's preprocessed layout, ``control/<id>.jpg`` = [a | a' | b] side by side,
    ``target/<id>.jpg`` = b', ``target/<id>.txt`` = the instruction.
(b) ``quadruplets``: ``metadata.jsonl`` lines ``{"a", "a_prime", "b", "b_prime", "instruction"}`` (paths relative to
    the file, inside the data folder), or folders ``a/ a_prime/ b/ b_prime/`` with the same file names and
    ``instructions/<stem>.txt``.
(c) ``pairs``: ``metadata.jsonl`` lines ``{"a", "a_prime", "instruction"}`` or folders ``a/ a_prime/``; each pair
    becomes the self-analogy (a, a', a, a') and is trained with LoC's LoRA Reverse term.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lorweb_ops.errors import LoRWeBError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ROLES = ("a", "a_prime", "b", "b_prime")
#: an instruction is a sentence (T5 reads at most 512 tokens of it); a larger file is not one, and is not read whole
MAX_INSTRUCTION_BYTES = 64 * 1024
#: a metadata.jsonl line: four image paths and an instruction
MAX_METADATA_LINE = MAX_INSTRUCTION_BYTES + 16 * 1024


@dataclass(frozen=True)
class Example:
    """One analogy a : a' :: b : b'. ``sources[role]`` is a path, or ``(path, part, parts)`` for a strip's part."""

    id: str
    sources: dict = field(repr=False)
    instruction: str
    pair_only: bool = False


def read_dataset(path: str | os.PathLike, layout: str = "auto") -> list[Example]:
    """Read and check every example (all images opened once); an empty or broken data set is an error."""
    root = Path(path)
    if not root.is_dir():
        raise LoRWeBError(f"data folder not found: {root}. Set data.path to the folder that holds your data.")
    layout = detect_layout(root) if layout == "auto" else layout
    readers = {"reference": read_reference, "quadruplets": read_quadruplets, "pairs": read_pairs}
    examples = readers[layout](root)
    if not examples:
        raise LoRWeBError(
            f"{root}: no training examples found for layout {layout!r}. Put the images in one of the layouts of "
            "docs/training.md (control/ + target/, metadata.jsonl, or a/ a_prime/ [b/ b_prime/] folders)."
        )
    for example in examples:
        check_sizes(example)
    return examples


def detect_layout(root: Path) -> str:
    if (root / "control").is_dir() and (root / "target").is_dir():
        return "reference"
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        first = next((line for line in _lines(metadata) if line[1].strip()), None)
        return "quadruplets" if first and "b" in _json_line(metadata, *first) else "pairs"
    if (root / "a").is_dir() and (root / "a_prime").is_dir():
        return "quadruplets" if (root / "b").is_dir() else "pairs"
    raise LoRWeBError(
        f"{root}: cannot tell the data layout. Expected control/ + target/ (reference), metadata.jsonl, or folders "
        "a/ and a_prime/ (plus b/ and b_prime/ for quadruplets). See docs/training.md."
    )


def read_reference(root: Path) -> list[Example]:
    examples = []
    for control in sorted(_images(root / "control")):
        target = _find_image(root / "target", control.stem)
        if target is None:
            raise LoRWeBError(f"{control}: no target/{control.stem}.jpg (b') beside it. Add it or remove the control.")
        caption = target.with_suffix(".txt")
        if not caption.is_file():
            raise LoRWeBError(f"{target}: its instruction file {caption.name} is missing. Write the edit into it.")
        sources = {"a": (control, 0, 3), "a_prime": (control, 1, 3), "b": (control, 2, 3), "b_prime": target}
        examples.append(Example(control.stem, sources, _read_instruction(caption)))
    return examples


def read_quadruplets(root: Path) -> list[Example]:
    return _read_metadata(root, ROLES, False) if (root / "metadata.jsonl").is_file() else _read_folders(root, ROLES)


def read_pairs(root: Path) -> list[Example]:
    roles = ("a", "a_prime")
    pairs = _read_metadata(root, roles, True) if (root / "metadata.jsonl").is_file() else _read_folders(root, roles)
    return [
        Example(e.id, {**e.sources, "b": e.sources["a"], "b_prime": e.sources["a_prime"]}, e.instruction, True)
        for e in pairs
    ]


def _read_metadata(root: Path, roles: tuple[str, ...], pair_only: bool) -> list[Example]:
    metadata = root / "metadata.jsonl"
    examples = []
    for number, line in _lines(metadata):
        if not line.strip():
            continue
        record = _json_line(metadata, number, line)
        missing = [key for key in (*roles, "instruction") if key not in record]
        if missing:
            raise LoRWeBError(
                f"{metadata} line {number}: missing {', '.join(missing)}. Each line needs "
                f"{', '.join(roles)} (image paths relative to the file) and instruction."
            )
        where = f"{metadata} line {number}"
        sources = {role: _existing(root, record[role], where) for role in roles}
        instruction = str(record["instruction"])
        if len(instruction.encode("utf-8", "replace")) > MAX_INSTRUCTION_BYTES:
            raise LoRWeBError(f"{where}: the instruction is {_too_long(len(instruction.encode('utf-8', 'replace')))}")
        examples.append(Example(str(record.get("id", number))[:200], sources, instruction, pair_only))
    return examples


def _read_folders(root: Path, roles: tuple[str, ...]) -> list[Example]:
    examples = []
    for first in sorted(_images(root / roles[0])):
        sources = {roles[0]: first}
        for role in roles[1:]:
            match = _find_image(root / role, first.stem)
            if match is None:
                raise LoRWeBError(
                    f"{first}: no {role}/{first.stem}.* beside it. Every example needs the same file name in "
                    f"{', '.join(r + '/' for r in roles)}."
                )
            sources[role] = match
        caption = root / "instructions" / f"{first.stem}.txt"
        instruction = _read_instruction(caption) if caption.is_file() else ""
        examples.append(Example(first.stem, sources, instruction, False))
    return examples


def _lines(path: Path):
    """The lines of ``path``, each read with a bound (a line without an end is not read whole)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_METADATA_LINE + 1), b""), start=1):
            if len(raw) > MAX_METADATA_LINE:
                raise LoRWeBError(
                    f"{path} line {number} is longer than {MAX_METADATA_LINE // 1024} kB; a line holds four image "
                    "paths and an instruction (a sentence). Fix that line (one example per line)."
                )
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LoRWeBError(f"{path} line {number} is not UTF-8 text. Save the file as UTF-8.") from None


def _too_long(size: int) -> str:
    return (
        f"{size} bytes, more than the {MAX_INSTRUCTION_BYTES // 1024} kB an instruction may have (the text "
        "encoder reads a sentence or two). Write the edit as a short sentence."
    )


def _read_instruction(path: Path) -> str:
    """An instruction file, read with a bound."""
    with open(path, "rb") as handle:
        raw = handle.read(MAX_INSTRUCTION_BYTES + 1)
    if len(raw) > MAX_INSTRUCTION_BYTES:
        raise LoRWeBError(f"instruction file {path} is {_too_long(os.path.getsize(path))}")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise LoRWeBError(f"instruction file {path} is not UTF-8 text. Save it as UTF-8.") from None


def _json_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise LoRWeBError(f"{path} line {number} is not valid JSON ({error.msg}). Fix or remove that line.") from None
    if not isinstance(record, dict):
        raise LoRWeBError(f"{path} line {number} must be a JSON object with image paths and an instruction.")
    return record


def _images(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS] if folder.is_dir() else []


def _find_image(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{ext}" for ext in IMAGE_EXTENSIONS if (folder / f"{stem}{ext}").is_file()), None)


def _existing(root: Path, value: object, where: str) -> Path:
    """The image ``value`` names, relative to the data folder; a path that leaves the folder is refused (a data set
    from elsewhere must not make the trainer read, and train on, files outside the folder it was given)."""
    relative = str(value)
    normal = os.path.normpath(relative)
    if "\0" in relative:
        raise LoRWeBError(f"{where}: image path {relative[:200]!r} holds a NUL character. Fix the path.")
    if os.path.isabs(relative) or normal == ".." or normal.startswith(".." + os.sep):
        raise LoRWeBError(
            f"{where}: image path {relative[:200]!r} leaves the data folder {root}. Put the images in that folder "
            "(or below it) and give their paths relative to metadata.jsonl."
        )
    path = root / relative
    if not path.is_file():
        raise LoRWeBError(f"{where}: image {path} does not exist. Fix the path (relative to metadata.jsonl).")
    return path


#: training resizes the grid to ~resolution^2 anyway; a larger file would only cost memory (4 B/px once decoded)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def _too_large(path: Path, width: int = 0, height: int = 0) -> LoRWeBError:
    size = f"{width} x {height} pixels" if width else "too many pixels for PIL's decompression-bomb check"
    return LoRWeBError(
        f"image {path} is {size}, more than the {MAX_IMAGE_PIXELS // (1024 * 1024)} megapixels a training image "
        "may have. Downscale it (training uses about data.resolution^2 pixels per grid) or remove the example."
    )


def open_image(path: Path) -> Image.Image:
    """An RGB image, or an error naming the file (alpha is dropped, as ComfyUI does)."""
    try:
        with Image.open(path) as image:  # the header only: the size is checked before any pixel is decoded
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise _too_large(path, image.width, image.height)
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise _too_large(path) from None
    except FileNotFoundError:
        raise LoRWeBError(f"image {path} does not exist. Restore it or remove the example.") from None
    except (UnidentifiedImageError, OSError) as error:
        raise LoRWeBError(f"cannot read image {path} ({error}). Replace the file or remove the example.") from None


def load_images(example: Example) -> dict[str, Image.Image]:
    """The four images of an example (strip parts cut out of the reference's control image)."""
    opened: dict[Path, Image.Image] = {}
    images = {}
    for role in ROLES:
        source = example.sources[role]
        path, part, parts = (source, 0, 1) if isinstance(source, Path) else source
        if path not in opened:
            opened[path] = open_image(path)
        image = opened[path]
        if parts > 1:
            if image.width % parts:
                raise LoRWeBError(
                    f"{path} is {image.width} pixels wide, not {parts} equal parts [a | a' | b]. Re-export it with "
                    f"a width divisible by {parts}."
                )
            width = image.width // parts
            image = image.crop((part * width, 0, (part + 1) * width, image.height))
        images[role] = image
    return images


def check_sizes(example: Example) -> None:
    images = load_images(example)
    sizes = {role: image.size for role, image in images.items()}
    if len(set(sizes.values())) != 1:
        files = {role: str(s if isinstance(s, Path) else s[0]) for role, s in example.sources.items()}
        raise LoRWeBError(
            f"example {example.id!r}: the images have different sizes {sizes} ({files}). Resize a, a', b, b' to "
            "one size (the reference resizes them to the smallest common size before training)."
        )


def quadrant_size(width: int, height: int, resolution: int, multiple: int = 16) -> tuple[int, int]:
    """Quadrant size so that the 2x2 grid has about ``resolution^2`` pixels, each side a multiple of 16."""
    scale = resolution / (2.0 * (width * height) ** 0.5)
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))  # fmt: skip


def grid_image(top_left: Image.Image, top_right: Image.Image, bottom_left: Image.Image, bottom_right: Image.Image):
    width, height = top_left.size
    grid = Image.new("RGB", (2 * width, 2 * height))
    for tile, corner in ((top_left, (0, 0)), (top_right, (width, 0)), (bottom_left, (0, height)),
                         (bottom_right, (width, height))):  # fmt: skip
        grid.paste(tile, corner)
    return grid


def training_grids(images: dict[str, Image.Image], resolution: int) -> dict[str, Image.Image]:
    """The four grids an example needs: target/control, as given (0) and with a<->a', b<->b' swapped (1).

    Control = target with b' replaced by b (Kontext's input); the swapped orientation doubles as LoRA Reverse's
    reversed grid (its control shows b', its target b).
    """
    size = quadrant_size(*images["a"].size, resolution)
    a, ap, b, bp = (images[r].resize(size, Image.LANCZOS) for r in ROLES)
    return {
        "target_0": grid_image(a, ap, b, bp),
        "control_0": grid_image(a, ap, b, b),
        "target_1": grid_image(ap, a, bp, b),
        "control_1": grid_image(ap, a, bp, bp),
    }
