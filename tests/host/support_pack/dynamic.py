"""Test-only: ComfyUI's dynamic-VRAM model patcher (``ModelPatcherDynamic``, ComfyUI >= 0.33) on a CPU-only machine.

On a GPU, ComfyUI 0.33's ``main.py`` initialises comfy-aimdo and sets ``comfy.model_patcher.CoreModelPatcher =
ModelPatcherDynamic``; every stock loader then builds that class. Neither can happen here as ComfyUI does it:

* ``main.py --cpu --enable-dynamic-vram`` stops in ``comfy_aimdo.control.init_devices`` (``int(None)``: the CPU
  device has no index); without ``--cpu`` ComfyUI stops at "Found no NVIDIA driver".
* ``ModelPatcherDynamic(model, cpu, cpu)`` returns a plain ``ModelPatcher`` (``__new__`` reroutes CPU load devices),
  and so does every ``clone()`` of one.
* comfy-aimdo's host buffers need its library, which ``comfy_aimdo.host_buffer`` binds when it is imported.

So the host tests use :class:`CpuModelPatcherDynamic`: ComfyUI's class, kept on a CPU load device. Its two
overrides are the CPU reroute (skipped) and ``partially_unload``, which asserts a non-CPU device; without a GPU
there is no vbar, so what it frees is the force-loaded weights' backups (ComfyUI's own ``restore_loaded_backups``).
Everything else (clone, add_patches, load, sampling, unpatching) is ComfyUI's code.

What this does not reach: on CPU there is no vbar, so a module over 16 KiB gets its ``LowVramPatch`` attached but
ComfyUI's CPU cast path never calls it. Modules of the tiny test Flux (hidden 8) are all under 16 KiB, which
ComfyUI force-loads and patches in place (``patch_weight_to_device``), on a GPU too.
"""

from __future__ import annotations

import contextlib
import importlib

import comfy.model_patcher

#: ComfyUI's dynamic patcher class, or None (ComfyUI before 0.33 has none)
MODEL_PATCHER_DYNAMIC = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)

if MODEL_PATCHER_DYNAMIC is not None:

    class CpuModelPatcherDynamic(MODEL_PATCHER_DYNAMIC):
        """ModelPatcherDynamic that stays itself on a CPU load device (see the module docstring)."""

        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return self.restore_loaded_backups()

else:
    CpuModelPatcherDynamic = None


def init_aimdo() -> None:
    """Load comfy-aimdo's library (it loads without a GPU) and rebind ``comfy_aimdo.host_buffer`` to it."""
    import comfy_aimdo.control
    import comfy_aimdo.host_buffer

    if comfy_aimdo.host_buffer.lib is None:
        if not comfy_aimdo.control.init():
            raise RuntimeError("comfy_aimdo.control.init() failed: the dynamic patcher cannot be built here")
        importlib.reload(comfy_aimdo.host_buffer)  # binds control.lib and its signatures at import


@contextlib.contextmanager
def dynamic_core_patcher():
    """While active, ComfyUI's loaders (and the test loader) build :class:`CpuModelPatcherDynamic`, as main.py makes
    them build ModelPatcherDynamic on a GPU."""
    init_aimdo()
    previous = comfy.model_patcher.CoreModelPatcher
    comfy.model_patcher.CoreModelPatcher = CpuModelPatcherDynamic
    try:
        yield
    finally:
        comfy.model_patcher.CoreModelPatcher = previous
