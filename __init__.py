"""LoRWeB for ComfyUI: visual-analogy editing (a : a' :: b : b') on FLUX.1 Kontext with a learned LoRA basis.

ComfyUI loads this folder as a custom node pack. Nothing here imports ComfyUI at module level, so the
package also imports under plain pytest.

One import identity: the pack's packages (``lorweb_ops``, ``lorweb_comfy``, ``lorweb_train``) are always imported
by their top-level names, here as in the trainer, the scripts and the tests. ComfyUI imports this folder under its
folder name; importing the packages relatively from here would give a second copy of the library in the same
process (two ``LoRWeBError`` classes, two basis caches).
"""

import os
import sys

WEB_DIRECTORY = "./web"

_PACK_FOLDER = os.path.dirname(os.path.abspath(__file__))
if _PACK_FOLDER not in sys.path:
    sys.path.append(_PACK_FOLDER)  # appended, never first: nothing of ComfyUI's is shadowed


async def comfy_entrypoint():
    from lorweb_comfy.extension import LoRWeBExtension
    from lorweb_comfy.model_folders import register_lorweb_folder

    register_lorweb_folder()
    return LoRWeBExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
