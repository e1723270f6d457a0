"""LoRWeB for ComfyUI: visual-analogy editing (a : a' :: b : b') on FLUX.1 Kontext with a learned LoRA basis.

ComfyUI loads this folder as a custom node pack. Nothing here imports ComfyUI at module level, so the
package also imports under plain pytest.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.model_folders import register_lorweb_folder

    register_lorweb_folder()
    from .nodes.extension import LoRWeBExtension

    return LoRWeBExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
