"""What the trainer needs from a base model, as plain callables (so the trainer never imports ComfyUI).

The ComfyUI glue (``lorweb_train/backends/comfyui.py``) builds one from ComfyUI's own loaders; tests build one
from a tiny Flux-shaped torch module. The encoders are used once, to fill the cache, and can then be released; the
VAE's decoder (``decode_latents``) is kept when the trainer renders samples.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lorweb_ops.errors import LoRWeBError

#: images ``[N, H, W, 3]`` in 0..1 -> latents ``[N, C, h, w]`` (already shifted/scaled for the model)
EncodeLatents = Callable[[torch.Tensor], torch.Tensor]
#: latents ``[N, C, h, w]`` as the model sees them -> images ``[N, H, W, 3]`` in 0..1 (the inverse of EncodeLatents)
DecodeLatents = Callable[[torch.Tensor], torch.Tensor]
#: instructions -> (context ``[N, L, D]``, pooled ``[N, Dv]``)
EncodeText = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
#: resized, centre-cropped images ``[N, S, S, 3]`` -> pooled image embeddings ``[N, d]`` (CLIP ``image_embeds``)
EmbedImages = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FluxBackend:
    """A frozen Flux (BFL layer names; ``forward(x, timestep, context, y, guidance, ref_latents)``) and encoders."""

    diffusion_model: nn.Module
    encode_latents: EncodeLatents | None
    encode_text: EncodeText | None
    embed_images: EmbedImages | None
    description: str
    compute_dtype: torch.dtype = torch.float32
    image_size: int = 224
    release_encoders: Callable[[], None] = field(default=lambda: None)
    close: Callable[[], None] = field(default=lambda: None)  # undo what the backend changed for training
    decode_latents: DecodeLatents | None = None  # only needed for samples (train.sample_every)
    #: the blocks must be checkpointed: their forward adds residuals in place on tensors the backward needs
    #: (ComfyUI's Flux does), which only a recomputed block can go through
    needs_checkpointing: bool = False

    def predict(self, noisy, sigmas, context, pooled, guidance, reference) -> torch.Tensor:
        dtype = self.compute_dtype
        return self.diffusion_model(
            noisy.to(dtype),
            sigmas.to(dtype),
            context.to(dtype),
            y=pooled.to(dtype),
            guidance=guidance.to(dtype),
            ref_latents=[reference.to(dtype)],
        )


def make_backend(model_config, device: torch.device) -> FluxBackend:
    """``model.backend``: ``comfyui`` (the glue beside the nodes) or ``package.module:factory``."""
    spec = model_config.backend
    if spec == "comfyui":
        spec = "lorweb_train.backends.comfyui:comfyui_backend"
    module_name, _, function = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as error:
        raise LoRWeBError(
            f"model.backend {model_config.backend!r} cannot be loaded ({error}). Use 'comfyui' (run with ComfyUI's "
            "python, or set model.comfyui_root) or 'package.module:factory'."
        ) from None
    try:
        backend = factory(model_config, device)
    except LoRWeBError:
        raise
    except Exception as error:  # a user's factory: its failure is a message, not a traceback
        raise LoRWeBError(
            f"model.backend {model_config.backend!r} failed while loading the model: {type(error).__name__}: "
            f"{str(error)[:300]}. Check model.backend_options and the model files it loads."
        ) from None
    if not isinstance(backend, FluxBackend):
        raise LoRWeBError(
            f"model.backend {model_config.backend!r} returned {type(backend).__name__}, not a FluxBackend."
        )
    for parameter in backend.diffusion_model.parameters():
        parameter.requires_grad_(False)
    return backend
