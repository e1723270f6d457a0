"""ComfyUI glue: thin V3 nodes over ``lorweb_ops``. The only part of the pack that imports ``comfy``."""
