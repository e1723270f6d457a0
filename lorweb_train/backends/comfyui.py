"""ComfyUI glue for the trainer: the frozen base model and encoders from ComfyUI's own loaders and model files.

The only trainer file that imports ``comfy``. ``model.backend: comfyui`` in the training yaml selects
:func:`comfyui_backend`; run the trainer with ComfyUI's python (and ``model.comfyui_root`` when started outside the
ComfyUI folder). File names are paths, or names inside ComfyUI's model folders (``diffusion_models``,
``text_encoders``, ``vae``, ``clip_vision``), as its loader nodes list them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from lorweb_ops.errors import LoRWeBError
from lorweb_train.backend import FluxBackend

_FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


#: the pack's folder (three levels above this file); installed as ComfyUI/custom_nodes/<pack>
_PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _is_comfyui_root(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, "comfy")) and os.path.isfile(os.path.join(folder, "folder_paths.py"))


def find_comfyui_root(configured: str = "") -> str:
    """``model.comfyui_root`` when set, else the current folder or the ComfyUI this pack is installed in."""
    if configured:
        return configured
    candidates = (os.getcwd(), os.path.dirname(os.path.dirname(_PACK_ROOT)))
    return next((folder for folder in candidates if _is_comfyui_root(folder)), "")


def ensure_comfy(comfyui_root: str = "") -> None:
    """Make ``import comfy`` work: already importable (inside ComfyUI), or from the ComfyUI folder (found from the
    current folder or the pack's install place, or ``model.comfyui_root``)."""
    try:
        import comfy.sd  # noqa: F401

        return
    except ImportError:
        pass
    root = find_comfyui_root(comfyui_root)
    if not root or not _is_comfyui_root(root):
        raise LoRWeBError(
            "the trainer loads the base model with ComfyUI's loaders, but ComfyUI is not importable. Run it with "
            "ComfyUI's python from the ComfyUI folder, or set model.comfyui_root to the ComfyUI folder (the one "
            f"holding comfy/ and models/){f' (now {root!r})' if root else ''}."
        )
    sys.path.insert(0, os.path.abspath(root))


def resolve(name: str, folder: str, what: str) -> str:
    """A path, or a file name inside one of ComfyUI's model folders."""
    if not name:
        raise LoRWeBError(f"model.{what} is empty: give the {what} file (a path or a name in models/{folder}).")
    if os.path.isfile(name):
        return name
    import folder_paths

    found = folder_paths.get_full_path(folder, name)
    if found is None:
        raise LoRWeBError(
            f"model.{what} {name!r} is neither a file nor in ComfyUI's models/{folder}: "
            f"{folder_paths.get_filename_list(folder)[:5]}. Fix the name or give a full path."
        )
    return found


def comfy_on_cpu() -> None:
    """ComfyUI picks its device when comfy.model_management is first imported (``--cpu``): ask for the CPU before,
    so a machine without a GPU does not stop at ComfyUI's "Found no NVIDIA driver". Inside a running ComfyUI the
    choice is already made and is left alone."""
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True


def comfyui_backend(model_config, device: torch.device) -> FluxBackend:
    """Kontext (bf16 or fp8), CLIP-L + T5-XXL, the Flux VAE and CLIP ViT-L/14 vision, as users already have them."""
    ensure_comfy(model_config.comfyui_root)
    if device.type == "cpu":
        comfy_on_cpu()
    import comfy.clip_vision
    import comfy.sd
    import comfy.utils

    options = {"dtype": _FP8[model_config.weight_dtype]} if model_config.weight_dtype in _FP8 else {}
    patcher = comfy.sd.load_diffusion_model(
        resolve(model_config.diffusion_model, "diffusion_models", "diffusion_model"), model_options=options
    )
    clip = _load_text_encoders(model_config)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(resolve(model_config.vae, "vae", "vae")))
    clip_vision = comfy.clip_vision.load(resolve(model_config.clip_vision, "clip_vision", "clip_vision"))
    return backend_from_comfy(
        patcher, device, encode_text=text_encoder(clip), vae=vae, clip_vision=clip_vision, description=str(options)
    )


def _load_text_encoders(model_config):
    """CLIP-L + T5-XXL as DualCLIPLoader (type flux) loads them. ``backend_options: {text_encoders: clip_l}`` loads
    CLIP-L alone as CLIPLoader type sd3 does (its tokens padded to T5's 4096 width; Flux reads the first 768 pooled
    values): for smoke tests only (the demo), since Kontext was trained with T5."""
    import comfy.sd

    clip_l = resolve(model_config.clip_l, "text_encoders", "clip_l")
    choice = model_config.backend_options.get("text_encoders", "clip_l+t5xxl")
    if choice == "clip_l":
        return comfy.sd.load_clip(ckpt_paths=[clip_l], clip_type=comfy.sd.CLIPType.SD3)
    if choice != "clip_l+t5xxl":
        raise LoRWeBError(
            f"model.backend_options.text_encoders {str(choice)[:40]!r}: use clip_l+t5xxl (the default) or clip_l."
        )
    t5xxl = resolve(model_config.t5xxl, "text_encoders", "t5xxl")
    return comfy.sd.load_clip(ckpt_paths=[clip_l, t5xxl], clip_type=comfy.sd.CLIPType.FLUX)


def _rotate_pairs(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoPE on consecutive pairs with Flux's ``[..., d, 2, 2]`` rotation matrices, in plain (differentiable) torch."""
    pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    rotated = freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]
    return rotated.reshape(*x.shape).type_as(x)


def _differentiable_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    return _rotate_pairs(xq, freqs_cis), _rotate_pairs(xk, freqs_cis)


def use_differentiable_rope() -> Callable[[], None]:
    """Training needs gradients through attention, but ComfyUI's Flux attention calls comfy_kitchen's fused RoPE,
    which has no backward. ComfyUI 0.33 has the switch its own trainer (TrainLoraNode) sets for this,
    ``comfy.model_management.in_training``, which routes RoPE through plain torch: set it. 0.8.0 calls the fused op
    directly: swap in the same rotation in plain torch. Returns the undo."""
    import comfy.ldm.flux.math as flux_math
    import comfy.model_management

    if hasattr(comfy.model_management, "in_training"):
        previous = comfy.model_management.in_training
        comfy.model_management.in_training = True

        def leave_training() -> None:
            comfy.model_management.in_training = previous

        return leave_training
    original = flux_math.apply_rope
    if not getattr(original, "__module__", "").startswith("comfy_kitchen"):
        return lambda: None
    flux_math.apply_rope = _differentiable_rope

    def restore() -> None:
        flux_math.apply_rope = original

    return restore


def text_encoder(clip) -> Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]:
    """ComfyUI's CLIP (Flux: CLIP-L pooled + T5-XXL tokens) as instructions -> (context, pooled)."""

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        contexts, pooled = [], []
        for text in texts:
            context, vector = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            contexts.append(context[0].float().cpu())
            pooled.append(vector[0].float().cpu())
        length = max(c.shape[0] for c in contexts)
        contexts = [torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[0])) for c in contexts]
        return torch.stack(contexts), torch.stack(pooled)

    return encode


def backend_from_comfy(patcher, device: torch.device, *, encode_text, vae=None, encode_latents=None,
                       clip_vision=None, embed_images=None, decode_latents=None,
                       description: str = "") -> FluxBackend:  # fmt: skip
    """A :class:`FluxBackend` around a ComfyUI ModelPatcher (its ``model.diffusion_model`` is what gets trained on).

    Latents are ComfyUI's VAE encoding passed through the model's own ``process_latent_in`` (shift and scale), the
    image embeddings ComfyUI's CLIP vision ``image_embeds`` of the pack's own resized/cropped pixels. With a VAE,
    ``decode_latents`` (for samples) undoes the shift and scale (``process_latent_out``) and decodes.
    """
    model = patcher.model
    diffusion_model = model.diffusion_model.to(device)
    if encode_latents is None:
        if vae is None:
            raise LoRWeBError("backend_from_comfy needs a VAE or an encode_latents function.")

        def encode_latents(images: torch.Tensor) -> torch.Tensor:
            return model.process_latent_in(vae.encode(images[..., :3]).float().cpu())

    if decode_latents is None and vae is not None:
        decode_latents = vae_decoder(model, vae)

    if embed_images is None:
        if clip_vision is None:
            raise LoRWeBError("backend_from_comfy needs a CLIP vision model or an embed_images function.")

        def embed_images(batch: torch.Tensor) -> torch.Tensor:
            return clip_vision.encode_image(batch, crop=False)["image_embeds"].float().cpu()

    # The text encoders (T5-XXL: 5-10 GB) and CLIP vision are reached only through this dict, so that releasing
    # them after the cache is built really frees them; the VAE stays (small, and samples decode with it).
    holders = {"encode_text": encode_text, "embed_images": embed_images}
    restore_rope = use_differentiable_rope()

    def release() -> None:
        import comfy.model_management

        holders.clear()  # the cache holds everything training needs; let the encoders go
        comfy.model_management.soft_empty_cache()

    compute_dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    if compute_dtype in _FP8.values():
        compute_dtype = torch.bfloat16
    name = f"comfyui {type(diffusion_model).__name__} {description} {getattr(clip_vision, 'image_size', '')}"
    return FluxBackend(
        diffusion_model,
        encode_latents,
        _held(holders, "encode_text"),
        _held(holders, "embed_images"),
        name.strip(),
        compute_dtype=compute_dtype,
        image_size=getattr(clip_vision, "image_size", 224),
        release_encoders=release,
        close=restore_rope,
        decode_latents=decode_latents,
        needs_checkpointing=True,  # ComfyUI's Flux blocks add residuals in place (x += ...)
    )


def _held(holders: dict, name: str) -> Callable:
    """Calls ``holders[name]`` while the backend still holds that encoder (until ``release_encoders``)."""

    def call(*args):
        if name not in holders:
            raise LoRWeBError(f"the backend's {name} encoder was released after the cache was built; load it again.")
        return holders[name](*args)

    return call


def vae_decoder(model, vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents as the model sees them -> images ``[N, H, W, 3]`` in 0..1, with the same VAE object that encoded.

    Encoding applied the model's ``process_latent_in`` (Flux: ``(z - shift) * scale``), so decoding first applies
    its inverse ``process_latent_out``; ComfyUI's ``VAE.decode`` then returns channels-last pixels clamped to 0..1.
    The closure keeps the VAE after ``release_encoders`` (only the decoder is used)."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        pixels = vae.decode(model.process_latent_out(latents.detach().float().cpu()))
        return pixels[..., :3].float().cpu()

    return decode
