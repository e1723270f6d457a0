"""The training config (yaml): defaults are the reference recipe; every key can be changed; unknown keys are refused.

Sections: ``data``, ``network``, ``train``, ``model`` plus a few top-level keys. The reference's values come from
``LoRWeB_default_PROMPTS.yaml`` and the README command of orincolor/LoRWeB (K = 32, r = 4, ``cat-aa'b``, softmax).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import yaml

from lorweb_ops.bounded_yaml import read_plain_yaml
from lorweb_ops.checks import show
from lorweb_ops.errors import LoRWeBError
from lorweb_ops.settings import QUERY_MODE_EMBEDDINGS, RELEASED_SETTINGS, BasisSettings

#: query modes whose query is built from per-image embeddings (the cache holds E(a), E(a'), E(b), E(b'))
TRAINABLE_QUERY_MODES = ("cat-aa'b", "ca'-ca", "ca'-ca+cb")
DATA_LAYOUTS = ("auto", "reference", "quadruplets", "pairs")
#: bounds far above any useful value (Kontext is trained at 512-1024 px), so that a typo cannot ask for terabytes;
#: the basis' memory is checked against the machine once the model's layer sizes are known (Trainer)
MAX_RESOLUTION, MAX_BATCH = 4096, 1024
#: Euler steps per sample: 20-30 are plenty for Flux; more would only stall training while it renders
MAX_SAMPLE_STEPS = 100
#: steps and accumulation far above any run (the reference trains 10k steps); with them and the seed bounded, every
#: per-sample generator seed (seed * 1_000_003 + position) stays within the 64 bits torch accepts
MAX_STEPS, MAX_ACCUMULATION, MAX_SEED = 10**8, 1024, 2**32 - 1
#: ``name`` becomes file names inside output_dir: one plain file-name part, nothing that could leave the folder
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass
class DataConfig:
    path: str = ""
    layout: str = "auto"  # auto | reference (control/ + target/) | quadruplets | pairs
    resolution: int = 512  # grid area ~ resolution^2, as the reference's bucket [512]
    caption_dropout: float = 0.05
    swap_probability: float = 0.5  # random a<->a' together with b<->b' (reference: is_bidirectional_analogy)
    cache_dir: str = ""  # default: <output_dir>/cache
    validation_fraction: float = 0.0  # held out of training, reported as validation loss


@dataclass
class NetworkConfig:
    """The ``network`` section: the basis's size, and its mixing settings (:class:`BasisSettings`'s fields, written
    flat as in ai-toolkit's ``network_kwargs``; the defaults are the released model's)."""

    num_loras: int = 32
    rank: int = 4
    keys_dim: int = 128
    lora_heads: int = RELEASED_SETTINGS.lora_heads
    lora_softmax: bool = RELEASED_SETTINGS.lora_softmax
    mixing_coeffs_type: str = RELEASED_SETTINGS.mixing_coeffs_type
    query_mode: str = RELEASED_SETTINGS.query_mode
    query_projection_type: str = RELEASED_SETTINGS.query_projection_type
    external_query_model: str = RELEASED_SETTINGS.external_query_model
    modules: Any = "all"  # "all" Linears of the Flux blocks, or a list of diffusers module names

    def settings(self) -> BasisSettings:
        return BasisSettings(**{name: getattr(self, name) for name in RELEASED_SETTINGS.as_dict()})


@dataclass
class TrainConfig:
    batch_size: int = 6  # global batch per optimiser step (split over processes)
    steps: int = 10000
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.05
    optimizer: str = "adamw8bit"  # adamw8bit (bitsandbytes on CUDA, else plain AdamW) | adamw
    lr_scheduler: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # bf16 | fp16 | no
    gradient_checkpointing: bool = True
    guidance: float = 1.0  # Flux guidance embedding while training (reference: train.cfg_scale default 1)
    timestep_weighting: str = "weighted"  # weighted (ai-toolkit bell table) | none
    reverse_weight: Any = None  # LoRA Reverse term; None = 1.0 for pairs-only data, 0 for quadruplets
    save_every: int = 250
    keep_checkpoints: int = 4
    save_dtype: str = "float16"
    log_every: int = 1
    validation_every: int = 0  # steps; 0 = only at the end (when there is a validation split)
    log_with: str = ""  # accelerate tracker: "" | tensorboard | wandb | all
    sample_every: int = -1  # steps between sample sheets; 0 = never; -1 = auto (250 on CUDA, never on the CPU)
    sample_steps: int = 20  # Euler steps per rendered sample
    sample_guidance: float = 2.5  # Flux guidance for samples (the pack's workflows use 2.5 at inference)


@dataclass
class ModelConfig:
    backend: str = "comfyui"  # "comfyui", or "package.module:factory" returning a FluxBackend
    backend_options: dict = field(default_factory=dict)
    comfyui_root: str = ""  # ComfyUI source tree (for backend comfyui when run outside ComfyUI)
    diffusion_model: str = ""  # Kontext file (bf16 or fp8), as in models/diffusion_models
    weight_dtype: str = "default"  # default | fp8_e4m3fn | fp8_e5m2 (ComfyUI's UNETLoader choices)
    clip_l: str = ""
    t5xxl: str = ""
    vae: str = ""
    clip_vision: str = ""  # CLIP ViT-L/14 vision file, as in models/clip_vision
    init: str = ""  # an existing basis to fine-tune (--init); K, rank and query settings then come from it


@dataclass
class TrainingConfig:
    output_dir: str = "output/lorweb_basis"
    name: str = "lorweb_model"
    seed: int = 42
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def cache_dir(self) -> str:
        return self.data.cache_dir or os.path.join(self.output_dir, "cache")


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> TrainingConfig:
    """Read a training yaml; keys left out take the recipe defaults, unknown keys are an error naming them."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoRWeBError(f"training config not found: {path}. Give the path of your train.yaml.")
    # the same bounds as a basis config (size, nesting, number of values; no aliases)
    document = read_plain_yaml(path, "Fix the file (see docs/training.md) and run again.")
    if document is None:
        raise LoRWeBError(
            f"{path} is empty (or only comments). Write the training settings into it, at least data.path "
            "(see docs/training.md)."
        )
    return config_from_mapping(document, path, overrides, relative_to=os.path.dirname(os.path.abspath(path)))


def config_from_mapping(
    document: Any, source: str, overrides: dict | None = None, relative_to: str = ""
) -> TrainingConfig:
    """``relative_to``: the folder relative paths in ``document`` are read from (the config file's own folder, so a
    config works from wherever the trainer is started). Overrides are command-line values: relative to the current
    folder, as a shell user expects."""
    if not isinstance(document, dict):
        raise LoRWeBError(
            f"{source}: the training config must be a mapping of sections, found {show(document)}. Write it as "
            "'data:', 'network:', 'train:' ... sections with keys below them (see docs/training.md)."
        )
    config = _build(TrainingConfig, document, source, "")
    if relative_to:
        _anchor_paths(config, relative_to)
    for dotted, value in (overrides or {}).items():
        _set_dotted(config, dotted, value, source)
    validate(config, source)
    return config


#: config values that are folders or files written by path (anchored to the config's folder when relative)
_PATH_KEYS = ("output_dir", "data.path", "data.cache_dir", "model.comfyui_root", "model.init")
#: model files: a path, or a bare name looked up in ComfyUI's model folders (anchored only when the file is there)
_MODEL_FILE_KEYS = ("model.diffusion_model", "model.clip_l", "model.t5xxl", "model.vae", "model.clip_vision")


def _anchor_paths(config: TrainingConfig, folder: str) -> None:
    for dotted in _PATH_KEYS + _MODEL_FILE_KEYS:
        section, _, key = dotted.rpartition(".")
        owner = getattr(config, section) if section else config
        value = os.path.expanduser(getattr(owner, key))
        if os.path.isabs(value):
            setattr(owner, key, value)
            continue
        anchored = os.path.join(folder, value)
        if value and (dotted in _PATH_KEYS or os.path.isfile(anchored)):
            setattr(owner, key, os.path.normpath(anchored))


def _build(cls: type, values: dict, source: str, prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    instance = cls()
    for key, value in values.items():
        if key not in known:
            hint = difflib.get_close_matches(str(key)[:100], list(known), n=1)
            suggestion = f" Did you mean {prefix + hint[0]!r}?" if hint else ""
            raise LoRWeBError(
                f"{source}: unknown config key {show(prefix + str(key), 100)}.{suggestion} Known keys here: "
                f"{', '.join(known)}."
            )
        default = getattr(instance, key)
        if is_dataclass(default):
            if not isinstance(value, dict):
                raise LoRWeBError(f"{source}: {prefix}{key} must be a section (a mapping), found {show(value)}.")
            value = _build(type(default), value, source, f"{prefix}{key}.")
        else:
            value = _coerce(value, default, f"{prefix}{key}", source)
        setattr(instance, key, value)
    return instance


def _coerce(value: Any, default: Any, name: str, source: str) -> Any:
    """Accept the yaml's value when it has the default's type (ints for floats, 'true' strings for bools)."""
    if default is None or isinstance(default, (list, dict)) or name in ("network.modules",):
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)  # yaml reads 1e-3 as a string
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    raise LoRWeBError(f"{source}: {name} must be a {type(default).__name__} (like {default!r}), found {show(value)}.")


def _set_dotted(config: TrainingConfig, dotted: str, value: Any, source: str) -> None:
    *sections, key = dotted.split(".")
    target = config
    for section in sections:
        target = getattr(target, section, None)
        if not is_dataclass(target):
            raise LoRWeBError(f"{source}: unknown config section {dotted!r}.")
    if not hasattr(target, key):
        raise LoRWeBError(f"{source}: unknown config key {dotted!r}.")
    setattr(target, key, _coerce(value, getattr(target, key), dotted, source))


def validate(config: TrainingConfig, source: str) -> None:
    """Values that cannot work, refused before any model or data is touched."""
    net, train, data = config.network, config.train, config.data
    checks = [
        (net.num_loras >= 1 and net.rank >= 1 and net.keys_dim >= 1, "network.num_loras, rank, keys_dim must be >= 1"),
        (net.keys_dim % max(net.lora_heads, 1) == 0 and net.lora_heads >= 1, "network.lora_heads must divide keys_dim"),
        (net.mixing_coeffs_type in ("mean", "sum"), "network.mixing_coeffs_type must be mean or sum"),
        (net.query_projection_type in ("linear", "none"), "network.query_projection_type must be linear or none"),
        (
            net.query_mode in TRAINABLE_QUERY_MODES,
            f"network.query_mode must be one of {', '.join(TRAINABLE_QUERY_MODES)} for training "
            f"(known at inference: {', '.join(QUERY_MODE_EMBEDDINGS)})",
        ),
        (data.layout in DATA_LAYOUTS, f"data.layout must be one of {', '.join(DATA_LAYOUTS)}"),
        (0.0 <= data.caption_dropout <= 1.0, "data.caption_dropout must be within 0..1"),
        (0.0 <= data.swap_probability <= 1.0, "data.swap_probability must be within 0..1"),
        (0.0 <= data.validation_fraction < 1.0, "data.validation_fraction must be within 0..1 (exclusive)"),
        (data.resolution >= 16, "data.resolution must be at least 16 pixels"),
        (train.batch_size >= 1 and train.steps >= 1, "train.batch_size and train.steps must be >= 1"),
        (train.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1"),
        (train.steps <= MAX_STEPS, f"train.steps must be at most {MAX_STEPS}"),
        (
            train.gradient_accumulation_steps <= MAX_ACCUMULATION,
            f"train.gradient_accumulation_steps must be at most {MAX_ACCUMULATION}",
        ),
        (0 <= config.seed <= MAX_SEED, f"seed must be within 0..{MAX_SEED}"),
        (train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (math.isfinite(train.lr) and train.lr > 0, "train.lr must be a positive finite number, e.g. 1e-3"),
        (_betas_ok(train.betas), "train.betas must be two numbers within 0..1 (1 excluded), e.g. [0.9, 0.99]"),
        (math.isfinite(train.weight_decay) and train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (math.isfinite(train.max_grad_norm) and train.max_grad_norm >= 0, "train.max_grad_norm must be >= 0"),
        (net.num_loras <= 1024 and net.rank <= 256, "network.num_loras must be <= 1024 and rank <= 256"),
        (net.keys_dim <= 8192 and net.lora_heads <= net.keys_dim, "network.keys_dim must be <= 8192"),
        (data.resolution <= MAX_RESOLUTION, f"data.resolution must be at most {MAX_RESOLUTION} pixels"),
        (train.batch_size <= MAX_BATCH, f"train.batch_size must be at most {MAX_BATCH}"),
        (train.optimizer in ("adamw8bit", "adamw"), "train.optimizer must be adamw8bit or adamw"),
        (train.lr_scheduler in ("constant", "linear", "cosine"), "train.lr_scheduler must be constant/linear/cosine"),
        (train.mixed_precision in ("bf16", "fp16", "no"), "train.mixed_precision must be bf16, fp16 or no"),
        (train.timestep_weighting in ("weighted", "none"), "train.timestep_weighting must be weighted or none"),
        (train.save_dtype in ("float16", "bfloat16", "float32"), "train.save_dtype must be float16/bfloat16/float32"),
        (train.save_every >= 1 and train.keep_checkpoints >= 1, "train.save_every and keep_checkpoints must be >= 1"),
        (isinstance(config.model.backend_options, dict), "model.backend_options must be a mapping (or left out)"),
        (train.sample_every >= -1, "train.sample_every must be a number of steps, 0 (never) or -1 (auto)"),
        (1 <= train.sample_steps <= MAX_SAMPLE_STEPS, f"train.sample_steps must be within 1..{MAX_SAMPLE_STEPS}"),
        (
            math.isfinite(train.sample_guidance) and 0.0 <= train.sample_guidance <= 100.0,
            "train.sample_guidance must be within 0..100 (Kontext: 2.5)",
        ),
        (
            math.isfinite(train.guidance) and 0.0 <= train.guidance <= 100.0,
            "train.guidance must be within 0..100 (Kontext trains with 1)",
        ),
        (_reverse_weight_ok(train.reverse_weight), "train.reverse_weight must be a finite number >= 0, or empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise LoRWeBError(f"{source}: {message}.")
    if not data.path:
        raise LoRWeBError(f"{source}: data.path is empty. Set it to the folder of your training data.")
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,3})?", config.device):
        raise LoRWeBError(f"{source}: device {config.device[:40]!r} is not one of auto, cpu, cuda, cuda:N.")
    _check_name(config.name, source)
    _check_output_dir(config.output_dir, source)


def _reverse_weight_ok(weight: Any) -> bool:
    if weight is None:
        return True
    return isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight >= 0


def _betas_ok(betas: Any) -> bool:
    numbers = isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas)
    return numbers and all(not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)


def _check_name(name: str, source: str) -> None:
    """``name`` is joined to output_dir for every file the run writes, so it must stay one plain file name."""
    if not _NAME_PATTERN.fullmatch(name) or ".." in name:
        raise LoRWeBError(
            f"{source}: name {name[:120]!r} cannot be a file name in output_dir: use 1-100 letters, digits, '_', "
            "'-' or '.', starting with a letter or digit (no path separators, no '..'). Put folders in output_dir."
        )


def _check_output_dir(output_dir: str, source: str) -> None:
    """An output_dir that is a file, or lies under one, is refused at load (writability is probed before training)."""
    if not output_dir:
        raise LoRWeBError(f"{source}: output_dir is empty. Set it to the folder the basis should be written to.")
    path = os.path.abspath(output_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)  # the nearest part that exists must be a folder
    if not os.path.isdir(path):
        raise LoRWeBError(
            f"{source}: output_dir {output_dir!r} cannot be a folder: {path} is a file. Choose another output_dir."
        )


def prepare_output_dir(folder: str, what: str = "output_dir") -> None:
    """Create ``folder`` and write and remove a probe file in it, so an unwritable folder (permissions, a read-only
    or full disk) is a message before any model is loaded, not a traceback at the first checkpoint."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe_"):
            pass
    except OSError as error:
        raise LoRWeBError(
            f"{what} {folder} is not writable ({error.strerror or error}). Choose a folder you can write to "
            "(and with free space), or fix its permissions."
        ) from None


def dump_config(config: TrainingConfig, path: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:  # whole or not at all
        yaml.safe_dump(config.as_dict(), handle, sort_keys=False)
    os.replace(path + ".tmp", path)
