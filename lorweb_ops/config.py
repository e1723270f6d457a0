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


#: An ai-toolkit config is a few kB. These bounds keep a hostile file to well under a second and a few MB.
MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 20_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigTooComplex(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe composer with a bound on nesting and on the number of nodes.

    Only the node graph is built (aliases stay references to one node, so nothing is expanded); the few values
    the pack needs are constructed from it afterwards, one scalar at a time.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        if self._depth > MAX_CONFIG_DEPTH:
            raise _ConfigTooComplex(f"it nests deeper than {MAX_CONFIG_DEPTH} levels")
        if self._nodes > MAX_CONFIG_NODES:
            raise _ConfigTooComplex(f"it has more than {MAX_CONFIG_NODES} values")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _PlainLoader(_BoundedLoader):
    """The bounded loader for documents that are constructed whole: aliases are refused outright."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _ConfigTooComplex("it uses YAML aliases (*name); write the values out")
        return super().compose_node(parent, index)


def read_plain_yaml(path: str, fix: str) -> Any:
    """A whole yaml document, within the same bounds as a basis config and without aliases.

    ``fix`` ends every message: what the user should give instead (e.g. "Give the path of your train.yaml.").
    """
    loader = _PlainLoader(_read_config_text(path, fix))
    try:
        return loader.get_single_data()
    except _ConfigTooComplex as error:
        raise LoRWeBError(f"{path} cannot be read: {error}. {fix}") from None
    except (yaml.YAMLError, ValueError) as error:
        raise LoRWeBError(f"{path} is not readable YAML ({show(str(error), 200)}). {fix}") from None
    finally:
        loader.dispose()


def settings_from_yaml(path: str) -> BasisSettings:
    """Read ``config.process[0].network.network_kwargs`` of an ai-toolkit training config."""
    text = _read_config_text(path, _CONFIG_FIX)
    loader = _BoundedLoader(text)
    try:
        document = loader.get_single_node()
        kwargs = _network_kwargs(document, loader, path)
    except _ConfigTooComplex as error:
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


def _read_config_text(path: str, fix: str) -> str:
    if not os.path.isfile(path):
        raise LoRWeBError(f"config file not found: {path}. {fix}")
    with open(path, "rb") as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise LoRWeBError(f"{path} is larger than {MAX_CONFIG_BYTES // 1024} kB; a config is a few kB. {fix}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LoRWeBError(f"{path} is not UTF-8 text. {fix}") from None


def _network_kwargs(document: yaml.Node | None, loader: _BoundedLoader, path: str) -> dict[str, Any]:
    network = _child(_child(_child(document, "config"), "process"), 0)
    network = _child(network, "network")
    if not isinstance(network, yaml.MappingNode):
        raise LoRWeBError(
            f"{path} is not an ai-toolkit training config: it has no config.process[0].network section. "
            "Give the config.yaml saved beside the LoRWeB checkpoint, or choose 'auto'."
        )
    kind = _child(network, "type")
    kind = "attlora" if kind is None else _scalar(kind, loader, "network.type", path)
    if str(kind).lower() != "attlora":
        raise LoRWeBError(
            f"{path} describes a network of type {show(kind)}, not a LoRWeB basis ('attlora'). "
            "Give the config.yaml that was saved with the LoRWeB checkpoint."
        )
    kwargs = _child(network, "network_kwargs")
    if kwargs is None or (isinstance(kwargs, yaml.ScalarNode) and kwargs.tag.endswith(":null")):
        return {}
    if not isinstance(kwargs, yaml.MappingNode):
        raise LoRWeBError(f"{path}: network.network_kwargs must be a mapping, found a {_node_kind(kwargs)}.")
    wanted = _KNOWN_KEYS | {"external_query"}
    return {
        key.value: _scalar(value, loader, f"network_kwargs.{key.value}", path)
        for key, value in _entries(kwargs, path)
        if key.value in wanted
    }


def _child(node: yaml.Node | None, key: str | int) -> yaml.Node | None:
    """``node[key]`` on the composed graph (the last of repeated keys wins, as in PyYAML), or None."""
    if isinstance(key, int):
        return node.value[key] if isinstance(node, yaml.SequenceNode) and len(node.value) > key else None
    if not isinstance(node, yaml.MappingNode):
        return None
    found = None
    for name, value in node.value:
        if isinstance(name, yaml.ScalarNode) and name.value == key:
            found = value
    return found


def _entries(node: yaml.MappingNode, path: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    if any(name.tag == _MERGE_TAG for name, _ in node.value):
        raise LoRWeBError(f"{path}: network_kwargs uses a YAML merge key (<<); write its values out instead.")
    return [(name, value) for name, value in node.value if isinstance(name, yaml.ScalarNode)]


def _scalar(node: yaml.Node, loader: _BoundedLoader, name: str, path: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise LoRWeBError(f"{path}: {name} must be a single value, found a {_node_kind(node)}.")
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError):
        raise LoRWeBError(f"{path}: {name} has a value YAML cannot read: {show(node.value)}.") from None


def _node_kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "mapping", yaml.SequenceNode: "list"}.get(type(node), "value")


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
