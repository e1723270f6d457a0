"""The LoRWeB mixing settings (ai-toolkit ``network_kwargs``) and how they are resolved.

Precedence: a config given by the caller, else a yaml found beside the basis file, else the
values of the released model. Keys a config leaves out always take the *released* values
(not the reference code's own fallbacks, which differ for ``query_mode``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from .bounded_yaml import BoundedLoader, ConfigTooComplex, child, entries, node_kind, read_config_text, scalar
from .checks import show
from .errors import LoRWeBError

#: Query modes built from an external image encoder, and how many embeddings each concatenates.
QUERY_MODE_EMBEDDINGS = {
    "cat-aa'b": 3,  # [E(a) | E(a') | E(b)] -- the released model
    "ca'-ca": 1,  # E(a') - E(a)
    "ca'-ca+cb": 1,  # E(a') - E(a) + E(b)
    "aa'bb'": 1,  # E(whole grid)
    "caa'bb'": 1,  # E(whole grid)
    "caa'b": 1,  # E(grid with the bottom-right quadrant black)
    "caa'": 1,  # E(top half of the grid: a | a')
}
#: Modes that use encoder token features; the reference's layer cannot consume them.
TOKEN_FEATURE_MODES = ("paa'b", "paa'b3", "cat-paa'b", "cat-paa'b3")

MIXING_TYPES = ("mean", "sum")
MAX_HEADS = 1024  # far above any key size a basis has (the released one: 128)
PROJECTION_TYPES = ("linear", "none")


@dataclass(frozen=True)
class BasisSettings:
    """How a basis turns a query into per-module coefficients (``network_kwargs`` of the config)."""

    query_mode: str = "cat-aa'b"
    lora_heads: int = 1
    lora_softmax: bool = True
    mixing_coeffs_type: str = "mean"
    query_projection_type: str = "linear"
    external_query_model: str = "openai/clip-vit-large-patch14"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


RELEASED_SETTINGS = BasisSettings()
_KNOWN_KEYS = set(RELEASED_SETTINGS.as_dict())


def resolve_settings(config: Any, basis_path: str | None = None) -> tuple[BasisSettings, str]:
    """Resolve ``config`` (None, a yaml path or a mapping) into settings and a description of the source."""
    if config is None:
        found = find_config_beside(basis_path) if basis_path else None
        if found is None:
            return RELEASED_SETTINGS, "released defaults"
        return settings_from_yaml(found), found
    if isinstance(config, BasisSettings):
        return config, "given settings"
    if isinstance(config, Mapping):
        return settings_from_kwargs(config, "the given mapping"), "given mapping"
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        return settings_from_yaml(path), path
    raise LoRWeBError(
        f"config must be None, a path to an ai-toolkit config.yaml or a mapping of network_kwargs, "
        f"not {type(config).__name__}."
    )


def find_config_beside(basis_path: str) -> str | None:
    """The ai-toolkit yaml saved beside a basis: ``<file stem>.yaml``, then ``config.yaml``."""
    folder = os.path.dirname(os.path.abspath(basis_path))
    stem = os.path.splitext(os.path.basename(basis_path))[0]
    for name in (f"{stem}.yaml", f"{stem}.yml", "config.yaml", "config.yml"):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def settings_from_yaml(path: str) -> BasisSettings:
    """Read ``config.process[0].network.network_kwargs`` of an ai-toolkit training config."""
    text = read_config_text(path, _CONFIG_FIX)
    loader = BoundedLoader(text)
    try:
        document = loader.get_single_node()
        kwargs = _network_kwargs(document, loader, path)
    except ConfigTooComplex as error:
        raise LoRWeBError(
            f"{path} is not an ai-toolkit config: {error}. Give the config.yaml saved beside the basis."
        ) from None
    except yaml.YAMLError as error:
        raise LoRWeBError(
            f"{path} is not readable YAML ({show(str(error), 200)}). Give the ai-toolkit config.yaml saved "
            "beside the basis."
        ) from None
    finally:
        loader.dispose()
    return settings_from_kwargs(kwargs, path)


_CONFIG_FIX = "Give the ai-toolkit config.yaml saved beside the basis."


def _network_kwargs(document: yaml.Node | None, loader: BoundedLoader, path: str) -> dict[str, Any]:
    network = child(child(child(document, "config"), "process"), 0)
    network = child(network, "network")
    if not isinstance(network, yaml.MappingNode):
        raise LoRWeBError(
            f"{path} is not an ai-toolkit training config: it has no config.process[0].network section. "
            "Give the config.yaml saved beside the LoRWeB checkpoint, or choose 'auto'."
        )
    kind = child(network, "type")
    kind = "attlora" if kind is None else scalar(kind, loader, "network.type", path)
    if str(kind).lower() != "attlora":
        raise LoRWeBError(
            f"{path} describes a network of type {show(kind)}, not a LoRWeB basis ('attlora'). "
            "Give the config.yaml that was saved with the LoRWeB checkpoint."
        )
    kwargs = child(network, "network_kwargs")
    if kwargs is None or (isinstance(kwargs, yaml.ScalarNode) and kwargs.tag.endswith(":null")):
        return {}
    if not isinstance(kwargs, yaml.MappingNode):
        raise LoRWeBError(f"{path}: network.network_kwargs must be a mapping, found a {node_kind(kwargs)}.")
    wanted = _KNOWN_KEYS | {"external_query"}
    return {
        key.value: scalar(value, loader, f"network_kwargs.{key.value}", path)
        for key, value in entries(kwargs, "network_kwargs", path)
        if key.value in wanted
    }


def settings_from_kwargs(kwargs: Mapping, source: str) -> BasisSettings:
    """Validate ``network_kwargs``; keys left out take the released values, unrelated keys are ignored."""
    if kwargs.get("external_query") is not None and not _as_bool(kwargs["external_query"], "external_query", source):
        raise LoRWeBError(
            f"{source}: external_query is false, so the basis mixes from the layer inputs at every step. "
            "Only external-encoder bases can be applied as a weight patch; this pack supports those only."
        )
    values = {key: kwargs[key] for key in _KNOWN_KEYS if kwargs.get(key) is not None}
    settings = BasisSettings(
        query_mode=check_query_mode(
            _text(values.get("query_mode", RELEASED_SETTINGS.query_mode), "query_mode", source), source
        ),
        lora_heads=_check_heads(values.get("lora_heads", RELEASED_SETTINGS.lora_heads), source),
        lora_softmax=_as_bool(values.get("lora_softmax", RELEASED_SETTINGS.lora_softmax), "lora_softmax", source),
        mixing_coeffs_type=_check_choice(
            values.get("mixing_coeffs_type", RELEASED_SETTINGS.mixing_coeffs_type),
            MIXING_TYPES,
            "mixing_coeffs_type",
            source,
        ),
        query_projection_type=_check_choice(
            values.get("query_projection_type", RELEASED_SETTINGS.query_projection_type),
            PROJECTION_TYPES,
            "query_projection_type",
            source,
        ),
        external_query_model=_text(
            values.get("external_query_model", RELEASED_SETTINGS.external_query_model), "external_query_model", source
        ),
    )
    return settings


def check_query_mode(mode: str, source: str) -> str:
    if mode in QUERY_MODE_EMBEDDINGS:
        return mode
    if mode in TOKEN_FEATURE_MODES:
        raise LoRWeBError(
            f"{source}: query_mode {mode!r} uses encoder token features; the reference implementation cannot "
            "apply it either (its query size does not fit the layer). Supported modes: "
            + ", ".join(QUERY_MODE_EMBEDDINGS)
            + "."
        )
    raise LoRWeBError(
        f"{source}: unknown query_mode {show(mode)}. Supported modes: " + ", ".join(QUERY_MODE_EMBEDDINGS) + "."
    )


def _check_heads(value: Any, source: str) -> int:
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_HEADS:
        return value
    if text is not None and text.isdigit() and len(text) <= 4 and 1 <= int(text) <= MAX_HEADS:
        return int(text)
    raise LoRWeBError(f"{source}: lora_heads must be a whole number from 1 to {MAX_HEADS}, found {show(value)}.")


def _text(value: Any, name: str, source: str) -> str:
    if not isinstance(value, str):
        raise LoRWeBError(f"{source}: {name} must be text, found {show(value)}.")
    return value


def _check_choice(value: Any, choices: tuple[str, ...], name: str, source: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise LoRWeBError(f"{source}: {name} must be one of {', '.join(choices)}, found {show(value)}.")
    return value


def _as_bool(value: Any, name: str, source: str) -> bool:
    # ai-toolkit's command line writes booleans as the strings "true"/"false".
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise LoRWeBError(f"{source}: {name} must be true or false, found {show(value)}.")
