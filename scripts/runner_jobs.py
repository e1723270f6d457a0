"""The headless runner's work list: which b images this process edits, and where their results go.

Launched by ``torchrun`` or ``accelerate launch``, every process runs the same command; RANK and WORLD_SIZE (set by
both launchers) split the sorted b images as ``images[rank::world_size]``. No process talks to another: each loads
the models once and writes its own b′ files into the shared ``--out`` folder, under the names one process would use.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from runner_prompt import CHART_NODE, GRID_NODE, RunSettings, SaveOutput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Share:
    """This process' part of a run that several processes share (rank 0 of 1 when launched alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ=os.environ) -> Share:
        """RANK / WORLD_SIZE / LOCAL_RANK as torchrun and accelerate set them."""
        try:
            rank, world_size = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
            local_rank = int(environ.get("LOCAL_RANK", rank))
        except ValueError as error:
            raise SystemExit(f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers ({error})") from None
        if world_size < 1 or not 0 <= rank < world_size:
            raise SystemExit(f"RANK={rank} does not fit WORLD_SIZE={world_size}")
        return cls(rank, world_size, local_rank)

    @property
    def label(self) -> str:
        return f"[rank {self.rank}/{self.world_size}] " if self.world_size > 1 else ""

    def pick(self, images: list[Path]) -> list[Path]:
        return images[self.rank :: self.world_size]


def b_images(b: Path) -> list[Path]:
    """b itself, or every image in the folder b, sorted by name (the same list in every process)."""
    if b.is_dir():
        images = sorted(p for p in b.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise SystemExit(f"--b: no images ({', '.join(IMAGE_SUFFIXES)}) in {b}")
    elif b.is_file():
        images = [b]
    else:
        raise SystemExit(f"--b: {b} is not a file or folder")
    stems = [p.stem for p in images]
    clashes = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clashes:
        raise SystemExit(
            f"--b: several images share a name ({', '.join(clashes)}): their results would overwrite each other; "
            "rename them or put them in separate folders"
        )
    return images


def planned(settings: RunSettings) -> list[SaveOutput]:
    """The files a run writes for one b image, in the order they are written: b′ last (--skip-existing takes a
    b whose b′ exists as finished)."""
    extra = [SaveOutput(GRID_NODE, "grid")] * settings.save_grid + [
        SaveOutput(CHART_NODE, "chart")
    ] * settings.save_chart
    outputs = [*extra, *settings.outputs]
    return sorted(outputs, key=lambda output: output.suffix == "b_prime")  # stable: the workflow's order otherwise


def output_names(b: Path, settings: RunSettings) -> list[str]:
    """The files a run writes for one b image."""
    return [f"{b.stem}_{output.suffix}{output.ext}" for output in planned(settings)]


def not_done(images: list[Path], settings: RunSettings, out: Path) -> list[Path]:
    """The images of ``images`` whose outputs are not all in ``out`` yet (--skip-existing)."""
    return [b for b in images if not all((out / name).is_file() for name in output_names(b, settings))]


@dataclass
class Job:
    a: Path
    a_prime: Path
    bs: list[Path]
    settings: RunSettings
    out: Path
    images: list[tuple[str, Path]] = field(default_factory=list)  # --image: (node id or title, file)
    demo_images: Path | None = None  # --demo: where the templates' images are


def place_image(source: Path, input_dir: Path, name: str) -> str:
    """Copy an image into the (private) input folder; LoadImage takes it by file name."""
    target = input_dir / (name + source.suffix.lower())
    shutil.copyfile(source, target)
    return target.name


def output_file(outputs: dict, output: SaveOutput) -> Path | None:
    """Where ComfyUI wrote the node's file in this run (the first image of a SaveImage; the LoRA of Save Composed
    LoRA, inside the first loras folder); None when the node wrote nothing."""
    import folder_paths

    result = outputs.get(output.node_id, {})
    if output.is_lora:
        saved = result.get("lorweb_saved") or []
        return Path(folder_paths.get_folder_paths("loras")[0]) / saved[0]["lora_name"] if saved else None
    images = result.get("images") or []
    if not images:
        return None
    folder = folder_paths.get_directory_by_type(images[0].get("type", "output"))
    return Path(folder) / images[0].get("subfolder", "") / images[0]["filename"]


def collect(outputs: dict, settings: RunSettings, out_dir: Path, stem: str) -> list[Path]:
    """Move each Save node's file (and the grid / chart) from the private folders to ``out_dir``, b′ last.

    Each file appears whole or not at all (copied under a temporary name, then renamed), so ``--skip-existing``
    never takes a half-written file for a finished one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for output in planned(settings):
        source = output_file(outputs, output)
        if source is None:
            continue
        target = out_dir / f"{stem}_{output.suffix}{output.ext}"
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.move(source, partial)
        os.replace(partial, target)
        written.append(target)
    return written
