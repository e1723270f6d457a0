"""Demo weights for ``run_analogy.py --demo``: small random models that ComfyUI's stock loaders accept.

Key sets and shapes come from ComfyUI's own classes built on the meta device, so the files fit the ComfyUI that
is running (0.3.64, 0.8.0 and 0.33 give the same keys). Nothing is downloaded. Call these only after ComfyUI has
been started in this process (``comfy`` must be importable and its arguments parsed). Every file is written under
the name the pack's templates load (example_workflows/*.json), so each template runs on them as shipped.

* Flux: the real Flux shapes (hidden 3072, T5 4096 / CLIP-L 768 inputs, guidance embedding) with one double and
  one single block, bf16 (~1.1 GB); UNETLoader detects it as FLUX.1 dev/Kontext.
* text: a CLIP-L text model with Hugging Face key names (DualCLIPLoader's clip_l, or CLIPLoader type ``sd3`` alone,
  which pads its tokens to the 4096 T5 width; Flux reads the first 768 pooled values), and a T5-XXL for
  DualCLIPLoader type ``flux``. ComfyUI builds that T5 from a fixed config (t5_config_xxl.json: 24 layers,
  4096 wide, 4.76 B parameters) whatever the file holds, so it is the full layout in fp8: random embeddings,
  norms 1 and every linear weight 0, written as a sparse file (4.76 GB long, ~130 MB on disk where the file system
  keeps holes). It returns the normalised token embeddings: finite, and different per prompt.
* VAE: a full-size Flux VAE (16 latent channels). CLIP vision: a full-size ViT-L/14 (CLIPVisionLoader picks
  models by layer count). Basis: the released LoRWeB format for the 20 modules of those two blocks. LoRA: an
  ordinary kohya-format LoRA on two layers of that Flux (the compose template's placeholder name).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # appended, never first: nothing of ComfyUI's is shadowed (the pack's __init__.py does the same)
    sys.path.append(str(REPO_ROOT))

from lorweb_ops.basis_format import ai_toolkit_config, module_tensors, write_config  # noqa: E402  (plain library)
from lorweb_ops.files import write_whole  # noqa: E402
from lorweb_ops.flux_layout import module_shape, released_module_names  # noqa: E402
from lorweb_ops.settings import RELEASED_SETTINGS  # noqa: E402

FORMAT = 3  # bump when the files change, so old caches are rebuilt (3: Flux q/k norms as .scale, the BFL layout)
HIDDEN, MLP = 3072, 4 * 3072
NUM_LORAS, RANK, KEYS_DIM, QUERY_DIM = 32, 4, 128, 3 * 768
TILE = 64  # demo images are TILE x TILE: the Kontext grid is 2*TILE square
#: what the runner sets -> (ComfyUI model folder, file name): the names the templates load
FILES = {
    "unet": ("diffusion_models", "flux1-dev-kontext_fp8_scaled.safetensors"),
    "clip_l": ("text_encoders", "clip_l.safetensors"),
    "t5": ("text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
    "vae": ("vae", "ae.safetensors"),
    "clip_vision": ("clip_vision", "clip-vit-large-patch14.safetensors"),
    "basis": ("lorweb", "lorweb_model.safetensors"),
    "lora": ("loras", "your_style_lora.safetensors"),
}
FOLDERS = tuple(dict.fromkeys(folder for folder, _ in FILES.values()))
FORMAT_1_PREFIX = "lorweb-demo-"  # the file names of format 1, removed when a cache is rebuilt
#: the runner's default a, a′, b (b′ is written as demo_b_b_prime.png)
IMAGES = {"a": "demo_a.png", "a_prime": "demo_a_prime.png", "b": "demo_b.png"}
#: every image a template's LoadImage nodes name, drawn as the demo's shapes
TEMPLATE_IMAGES = {
    "lorweb_a.png": ("circle", "red"),
    "lorweb_a_prime.png": ("circle", "blue"),
    "lorweb_b.png": ("square", "red"),
    "lorweb_b_sketch.png": ("square", "blue"),
    "lorweb_a2.png": ("square", "green"),
    "lorweb_a2_prime.png": ("circle", "green"),
}


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorweb-demo"


def ensure_demo_files(cache: Path, log: Callable[[str], None] = print) -> None:
    """Write every missing demo file into ``cache`` (reused when its manifest matches)."""
    manifest = cache / "manifest.json"
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else None
    if recorded == _manifest(cache):
        return
    # files of an older format are rewritten; finished files of an interrupted first run are kept
    rewrite = recorded is not None and recorded.get("format") != FORMAT
    if rewrite:
        for old in cache.glob(f"*/{FORMAT_1_PREFIX}*"):
            old.unlink()
    writers = {
        "unet": write_flux,
        "clip_l": write_clip_text,
        "t5": write_t5xxl,
        "vae": write_vae,
        "clip_vision": write_clip_vision,
        "basis": write_basis,
        "lora": write_lora,
    }
    for key, (folder, name) in FILES.items():
        path = cache / folder / name
        if rewrite or not path.is_file():
            log(f"demo: writing random {folder} weights to {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_whole(path, writers[key])
    write_basis_config(cache / "lorweb" / "config.yaml")
    write_demo_images(cache / "images")
    write_whole(manifest, lambda path: path.write_text(json.dumps(_manifest(cache))))


def _manifest(cache: Path) -> dict:
    sizes = {
        name: (cache / folder / name).stat().st_size if (cache / folder / name).is_file() else None
        for folder, name in FILES.values()
    }
    return {"format": FORMAT, "files": sizes}


def register_demo_folders(cache: Path) -> None:
    """Make ComfyUI's loaders find the demo files first (they carry the templates' names, as real models do).

    The user's own model folders stay registered, after the demo's; nothing in them is written or read by name.
    """
    import folder_paths

    for folder in FOLDERS:
        folder_paths.add_model_folder_path(folder, str(cache / folder), is_default=True)


def random_state(shapes: dict[str, torch.Size], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Initialisation-like values: norm weights 1, biases 0, everything else N(0, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if len(shape) == 1 and key.endswith((".weight", ".scale")):
            state[key] = torch.ones(shape, dtype=dtype)
        elif len(shape) == 1 and key.endswith(".bias"):
            state[key] = torch.zeros(shape, dtype=dtype)
        else:
            state[key] = (0.02 * torch.randn(shape, generator=generator)).to(dtype)
    return state


def _meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    with torch.device("meta"):
        module = build()
    return {key: value.shape for key, value in module.state_dict().items()}


def _save(path: Path, shapes: dict[str, torch.Size], dtype: torch.dtype, seed: int) -> None:
    from safetensors.torch import save_file

    save_file(random_state(shapes, dtype, seed), str(path), metadata={"lorweb_demo": "random weights"})


def flux_shapes(depth: int = 1, single_depth: int = 1) -> dict[str, torch.Size]:
    """Keys and shapes of ComfyUI's own Flux at the real widths with ``depth`` double / ``single_depth`` single
    blocks (hidden 3072, 24 heads, T5 4096 and CLIP-L 768 inputs, guidance embedding: what detection expects)."""
    import comfy.ldm.flux.model
    import comfy.ops

    params = dict(
        in_channels=16,
        out_channels=16,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=HIDDEN,
        mlp_ratio=4.0,
        num_heads=24,
        depth=depth,
        depth_single_blocks=single_depth,
        axes_dim=[16, 56, 56],
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=True,
        txt_ids_dims=[],
    )
    known = {field.name for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}  # 0.3.64: fewer fields
    params = {key: value for key, value in params.items() if key in known}
    shapes = _meta_shapes(
        lambda: comfy.ldm.flux.model.Flux(**params, dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
    )
    return {_bfl_file_key(key): shape for key, shape in shapes.items()}


def _bfl_file_key(key: str) -> str:
    """The key as a BFL Flux file stores it. Newer ComfyUI (0.33) names the q/k RMSNorm weights ``.weight`` in its
    module and renames the files' ``.scale`` on load; a demo file must have the files' layout, which every version
    reads (one written with ``.weight`` is not detected as Flux by 0.8.0)."""
    if key.endswith(("query_norm.weight", "key_norm.weight")):
        return key[: -len(".weight")] + ".scale"
    return key


def write_flux(path: Path) -> None:
    _save(path, flux_shapes(), torch.bfloat16, seed=1)


def _comfy_json(name: str) -> dict:
    import comfy.clip_model  # ``comfy`` itself is a namespace package (no __file__)

    return json.loads(Path(os.path.dirname(comfy.clip_model.__file__), name).read_text())


def write_clip_text(path: Path) -> None:
    import comfy.clip_model
    import comfy.ops

    config = _comfy_json("sd1_clip_config.json")  # CLIP-L text: 12 layers, 768 wide
    shapes = _meta_shapes(lambda: comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.manual_cast))
    _save(path, shapes, torch.float16, seed=2)


def write_clip_vision(path: Path) -> None:
    import comfy.clip_model
    import comfy.ops

    config = _comfy_json("clip_vision_config_vitl.json")  # ViT-L/14: 24 layers, 1024 wide, projection 768
    shapes = _meta_shapes(
        lambda: comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.manual_cast)
    )
    _save(path, shapes, torch.float16, seed=3)


def t5xxl_shapes() -> dict[str, torch.Size]:
    """Keys and shapes of the T5-XXL encoder that DualCLIPLoader (type flux) builds: ComfyUI's own T5 class with
    the config it hard-codes (comfy/text_encoders/t5_config_xxl.json)."""
    import comfy.ops
    import comfy.text_encoders.t5

    config = json.loads(Path(os.path.dirname(comfy.text_encoders.t5.__file__), "t5_config_xxl.json").read_text())
    return _meta_shapes(lambda: comfy.text_encoders.t5.T5(config, torch.float8_e4m3fn, "meta", comfy.ops.manual_cast))


def write_t5xxl(path: Path) -> None:
    """The T5-XXL layout in fp8 e4m3fn: random embeddings, norms 1, every other weight 0 (left as file holes)."""
    generator = torch.Generator().manual_seed(6)

    def values(key: str, shape: torch.Size) -> torch.Tensor | None:
        if key == "shared.weight":  # token embeddings: what makes the encoding depend on the prompt
            return torch.randn(shape, generator=generator).clamp(-4, 4).to(torch.float8_e4m3fn)
        if key.endswith("layer_norm.weight"):
            return torch.ones(shape, dtype=torch.float8_e4m3fn)
        return None  # attention, feed-forward and position biases: 0

    write_sparse_safetensors(path, t5xxl_shapes(), torch.float8_e4m3fn, values, {"lorweb_demo": "random weights"})


#: safetensors' names of the dtypes the demo writes
SAFETENSORS_DTYPES = {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}


def write_sparse_safetensors(
    path: Path,
    shapes: dict[str, torch.Size],
    dtype: torch.dtype,
    values: Callable[[str, torch.Size], torch.Tensor | None],
    metadata: dict[str, str],
) -> None:
    """A .safetensors file (the documented layout: 8-byte header length, JSON header, data) whose all-zero tensors
    are holes: a 4.76 B-parameter file costs the disk and the memory of its few real tensors only.

    ``values(key, shape)`` gives a tensor of ``dtype``, or None for zeros."""
    import struct

    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for key in sorted(shapes):
        size = shapes[key].numel() * itemsize
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shapes[key]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        start = file.tell()
        for key in sorted(shapes):
            tensor = values(key, shapes[key])
            if tensor is None:
                continue
            if tensor.dtype != dtype or tensor.shape != shapes[key]:
                raise ValueError(
                    f"{key}: got {tensor.dtype} {tuple(tensor.shape)}, the layout needs {dtype} {tuple(shapes[key])}"
                )
            file.seek(start + header[key]["data_offsets"][0])
            file.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        file.truncate(start + offset)  # the zeros at the end are a hole too


#: the two layers of the demo Flux the demo LoRA changes (BFL names, as ComfyUI's Flux has them)
LORA_LAYERS = {"double_blocks.0.img_attn.proj": (HIDDEN, HIDDEN), "single_blocks.0.linear2": (HIDDEN + MLP, HIDDEN)}


def write_lora(path: Path, seed: int = 7) -> None:
    """An ordinary Flux LoRA (kohya keys: lora_unet_<layer>.lora_down/lora_up/alpha), rank 4, fp16."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (fan_in, fan_out) in LORA_LAYERS.items():
        prefix = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{prefix}.lora_down.weight"] = (torch.randn(RANK, fan_in, generator=generator) / fan_in**0.5).half()
        tensors[f"{prefix}.lora_up.weight"] = (0.05 * torch.randn(fan_out, RANK, generator=generator)).half()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(RANK)).half()
    save_file(tensors, str(path), metadata={"lorweb_demo": "random LoRA"})


#: the Flux autoencoder's layout (z 16, ch 128, mult 1 2 4 4), as ComfyUI's AutoencodingEngine takes it
FLUX_VAE_CONFIG = {
    "double_z": True,
    "z_channels": 16,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def flux_vae_engine():
    """ComfyUI's AutoencodingEngine in the Flux VAE layout (build it under ``torch.device("meta")`` for shapes)."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    coder = "comfy.ldm.modules.diffusionmodules.model."
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": coder + "Encoder", "params": FLUX_VAE_CONFIG},
        decoder_config={"target": coder + "Decoder", "params": FLUX_VAE_CONFIG},
    )


def write_vae(path: Path) -> None:
    _save(path, _meta_shapes(flux_vae_engine), torch.float16, seed=4)


def write_basis(path: Path, modules: list[str] | None = None, num_loras: int = NUM_LORAS, seed: int = 5) -> Path:
    """A random basis in the released on-disk format (ai-toolkit attlora keys, fp16) at the real widths.

    ``modules``: diffusers module names (default: the 20 of double block 0 and single block 0). Drawn one
    module at a time in fp16, so even the full 494-module size needs little more memory than the file.
    """
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules or released_module_names(depth=1, single_depth=1):
        fan_in, fan_out = module_shape(name)
        # scaled so the composed delta changes the weights by some per cent, as a trained LoRA would
        parts = {
            "lora_A": torch.randn(num_loras, fan_in, RANK, generator=generator) / fan_in**0.5,
            "lora_B": 0.05 * torch.randn(num_loras, RANK, fan_out, generator=generator),
            "lora_keys": torch.randn(num_loras, KEYS_DIM, generator=generator),
            "to_q": torch.randn(KEYS_DIM, QUERY_DIM, generator=generator) / QUERY_DIM**0.5,
        }
        tensors.update(module_tensors(name, {part: t.half() for part, t in parts.items()}))
    save_file(tensors, str(path), metadata={"format": "pt", "lorweb_demo": "random basis"})
    return path


def write_basis_config(path: Path) -> None:
    """The ai-toolkit config.yaml saved beside a basis, with the released mixing settings."""
    config = ai_toolkit_config(
        "lorweb-demo", rank=RANK, num_loras=NUM_LORAS, keys_dim=KEYS_DIM, settings=RELEASED_SETTINGS
    )
    write_config(path, config)


def demo_shape(kind: str, colour: str, size: int = TILE) -> Image.Image:
    """A plain shape on white: the demo analogy is 'red circle -> blue circle' applied to a red square."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=colour)
    return image


def write_demo_images(folder: Path) -> dict[str, Path]:
    """The runner's a, a′, b and every image the templates load (under their names); returns a, a′, b."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {
        **{IMAGES[role]: shape for role, shape in (("a", ("circle", "red")), ("a_prime", ("circle", "blue")))},
        IMAGES["b"]: ("square", "red"),
        **TEMPLATE_IMAGES,
    }
    for name, (kind, colour) in shapes.items():
        if not (folder / name).is_file():
            write_whole(
                folder / name, lambda path, kind=kind, colour=colour: demo_shape(kind, colour).save(path, "PNG")
            )
    return {role: folder / name for role, name in IMAGES.items()}
