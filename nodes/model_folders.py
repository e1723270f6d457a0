"""The ``models/lorweb`` folder: basis files (.safetensors) and the ai-toolkit config yamls saved beside them."""

from __future__ import annotations

import os

import folder_paths

FOLDER = "lorweb"
BASIS_EXTENSIONS = {".safetensors"}
CONFIG_EXTENSIONS = (".yaml", ".yml")
AUTO_CONFIG = "auto"


def register_lorweb_folder() -> None:
    """Add ``models/lorweb``, keeping paths that extra_model_paths.yaml registered before us."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    # made at start-up so users (and the Missing Models dialog's downloads) find the folder to put the basis in
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass  # a read-only models folder: the messages name the folder for the user to create
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | BASIS_EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(BASIS_EXTENSIONS))


def basis_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def config_files() -> list[str]:
    """Yaml files under the lorweb folders, as paths relative to their folder."""
    found = set()
    for folder in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(folder):
            continue
        for directory, _, files in os.walk(folder, followlinks=True):
            for name in files:
                if name.lower().endswith(CONFIG_EXTENSIONS):
                    found.add(os.path.relpath(os.path.join(directory, name), folder).replace(os.sep, "/"))
    return sorted(found)


def resolve_in_folder(name: str) -> str | None:
    """The full path of ``name`` inside a lorweb folder, or None.

    Names that climb out (``..``, absolute paths) are refused; links placed inside the folder are followed,
    as ComfyUI does for every model folder.
    """
    for folder in folder_paths.get_folder_paths(FOLDER):
        root = os.path.abspath(folder)
        candidate = os.path.normpath(os.path.join(root, name))
        if os.path.commonpath([root, candidate]) == root and os.path.isfile(candidate):
            return candidate
    return None


def missing_file_message(kind: str, name: str) -> str:
    folders = ", ".join(folder_paths.get_folder_paths(FOLDER)) or f"models/{FOLDER}"
    return (
        f"{kind} {name!r} was not found in the lorweb model folder ({folders}). Put the file there "
        "(names may not leave the folder) and refresh the node list (press R)."
    )
