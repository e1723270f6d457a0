"""The headless runner's work list: which b images this process edits, and where their results go.

Launched by ``torchrun`` or ``accelerate launch``, every process runs the same command; RANK and WORLD_SIZE (set by
both launchers) split the sorted b images as ``images[rank::world_size]``. No process talks to another: each loads
the models once and writes its own b′ files into the shared ``--out`` folder, under the names one process would use.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from runner_prompt import B_PRIME_PREFIX, CHART_NODE, GRID_NODE, RunSettings

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


def output_names(b: Path, settings: RunSettings) -> list[str]:
    """The files a run writes for one b image."""
    suffixes = ["b_prime"] + ["grid"] * settings.save_grid + ["chart"] * settings.save_chart
    return [f"{b.stem}_{suffix}.png" for suffix in suffixes]


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


def place_image(source: Path, input_dir: Path, name: str) -> str:
    """Copy an image into the (private) input folder; LoadImage takes it by file name."""
    target = input_dir / (name + source.suffix.lower())
    shutil.copyfile(source, target)
    return target.name


def output_file(outputs: dict, node_id: str) -> Path:
    import folder_paths

    image = outputs[node_id]["images"][0]
    folder = folder_paths.get_directory_by_type(image.get("type", "output"))
    return Path(folder) / image.get("subfolder", "") / image["filename"]


def collect(outputs: dict, prompt: dict, out_dir: Path, stem: str) -> list[Path]:
    """Move b′ (and the grid / chart) from the private output folder to ``out_dir``, b′ last.

    Each file appears whole or not at all (copied under a temporary name, then renamed), so ``--skip-existing``
    never takes a half-written file for a finished one.
    """
    save = next(
        node_id
        for node_id, node in prompt.items()
        if node["class_type"] == "SaveImage" and node["inputs"].get("filename_prefix") == B_PRIME_PREFIX
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for node_id, suffix in ((GRID_NODE, "grid"), (CHART_NODE, "chart"), (save, "b_prime")):
        if outputs.get(node_id, {}).get("images"):
            target = out_dir / f"{stem}_{suffix}.png"
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            shutil.move(output_file(outputs, node_id), partial)
            os.replace(partial, target)
            written.append(target)
    return written
