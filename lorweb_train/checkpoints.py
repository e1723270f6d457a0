"""Is a checkpoint folder whole? Cheap checks of its files before ``--resume`` loads them.

A checkpoint is renamed from ``step_N.tmp`` only once complete, but a disk can still fill, a copy can be cut short
or a file can be edited by hand. Truncation is what these checks catch without reading the tensors: a safetensors
file shorter than its header says, a torch.save zip without its central directory (written last), a
``trainer_state.json`` that is not JSON or has no step.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

STATE_FILE = "trainer_state.json"
_TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")  # accelerate writes these with torch.save (a zip archive)


def read_trainer_state(folder: Path) -> dict:
    """The trainer state of a checkpoint; ValueError (saying what is wrong) when it is not usable."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{STATE_FILE} cannot be read ({type(error).__name__})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{STATE_FILE} is not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise ValueError(f'{STATE_FILE} has no "step" (a whole number)')
    return state


def _safetensors_problem(path: Path) -> str | None:
    """The safetensors library checks the header and that the data covers the file exactly (truncation fails it)."""
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except (SafetensorError, OSError) as error:
        return f"the safetensors library refuses it ({str(error)[:160]})"


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError):
        return "it is not a complete torch.save archive"


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when its files look whole."""
    try:
        read_trainer_state(folder)
    except ValueError as error:
        return str(error)
    for path in sorted(folder.iterdir()):
        problem = None
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in _TORCH_SUFFIXES:
            problem = _zip_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    return None
