"""The ``models/lorweb`` folder: basis files (.safetensors) and the ai-toolkit config yamls saved beside them.

Both go through ComfyUI's folder API: ``lorweb`` lists the basis files, ``lorweb_configs`` the yamls of the same
folders (ComfyUI caches both lists and re-reads a folder when it changes). Names are resolved by
``folder_paths.get_full_path``, which keeps them inside the folders and follows links placed there.
"""

from __future__ import annotations

import os

import folder_paths

from lorweb_ops.basis import file_identity
from lorweb_ops.checks import show
from lorweb_ops.errors import LoRWeBError
from lorweb_ops.settings import find_config_beside

FOLDER = "lorweb"
CONFIG_FOLDER = "lorweb_configs"
BASIS_EXTENSIONS = {".safetensors"}
CONFIG_EXTENSIONS = {".yaml", ".yml"}
AUTO_CONFIG = "auto"


def register_lorweb_folder() -> None:
    """Add ``models/lorweb``, keeping folders that extra_model_paths.yaml registered before us.

    The config key shares the basis key's list of folders, so a folder added to ``lorweb`` later (by another
    extra_model_paths.yaml, or ``add_model_folder_path``) is searched for configs too.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER)
    # made at start-up so users (and the Missing Models dialog's downloads) find the folder to put the basis in
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass  # a read-only models folder: the messages name the folder for the user to create
    folder_paths.add_model_folder_path(FOLDER, default)
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | BASIS_EXTENSIONS)
    folder_paths.folder_names_and_paths[CONFIG_FOLDER] = (paths, set(CONFIG_EXTENSIONS))


def basis_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def config_files() -> list[str]:
    """Yaml files under the lorweb folders, as paths relative to their folder."""
    return folder_paths.get_filename_list(CONFIG_FOLDER)


def basis_path(name: str) -> str | None:
    """The full path of basis file ``name`` in a lorweb folder, or None."""
    return folder_paths.get_full_path(FOLDER, name)


def config_path(name: str) -> str | None:
    """The full path of config ``name`` in a lorweb folder, or None."""
    return folder_paths.get_full_path(CONFIG_FOLDER, name)


def files_read(basis_name: str | None, config: str | None) -> list[str]:
    """The files Load LoRA Basis reads: the basis and its config, picked or (auto) found beside the basis."""
    basis = basis_path(basis_name) if basis_name else None
    if config in (None, AUTO_CONFIG):
        settings = find_config_beside(basis) if basis else None
    else:
        settings = config_path(config)
    return [path for path in (basis, settings) if path]


def file_fingerprint(path: str) -> tuple:
    """What tells ComfyUI that the file at ``path`` changed since the last run (a new fingerprint re-runs the node).

    The same identity the basis cache uses: inode and ctime too, so a file replaced in place with its size and
    mtime kept still counts as changed.
    """
    try:
        return file_identity(path)
    except LoRWeBError:  # gone since it was found: that is a change too
        return (path, None)


def missing_file_message(kind: str, name: str) -> str:
    folders = ", ".join(folder_paths.get_folder_paths(FOLDER)) or f"models/{FOLDER}"
    return (
        f"{kind} {show(name)} was not found in the lorweb model folder ({folders}). Put the file there "
        "(names may not leave the folder) and refresh the node list (press R)."
    )
