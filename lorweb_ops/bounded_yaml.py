"""A YAML reader that a hostile file cannot stall or blow up: bounded size, nesting and node count, no aliases
expanded. Used for a basis's ai-toolkit config (read node by node) and the trainer's config (read whole).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from .checks import show
from .errors import LoRWeBError

#: An ai-toolkit config is a few kB. These bounds keep a hostile file to well under a second and a few MB.
MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 20_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigTooComplex(Exception):
    pass


class BoundedLoader(yaml.SafeLoader):
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
            raise ConfigTooComplex(f"it nests deeper than {MAX_CONFIG_DEPTH} levels")
        if self._nodes > MAX_CONFIG_NODES:
            raise ConfigTooComplex(f"it has more than {MAX_CONFIG_NODES} values")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class PlainLoader(BoundedLoader):
    """The bounded loader for documents that are constructed whole: aliases are refused outright."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise ConfigTooComplex("it uses YAML aliases (*name); write the values out")
        return super().compose_node(parent, index)


def read_plain_yaml(path: str, fix: str) -> Any:
    """A whole yaml document, within the same bounds as a basis config and without aliases.

    ``fix`` ends every message: what the user should give instead (e.g. "Give the path of your train.yaml.").
    """
    loader = PlainLoader(read_config_text(path, fix))
    try:
        return loader.get_single_data()
    except ConfigTooComplex as error:
        raise LoRWeBError(f"{path} cannot be read: {error}. {fix}") from None
    except (yaml.YAMLError, ValueError) as error:
        raise LoRWeBError(f"{path} is not readable YAML ({show(str(error), 200)}). {fix}") from None
    finally:
        loader.dispose()


def read_config_text(path: str, fix: str) -> str:
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


def child(node: yaml.Node | None, key: str | int) -> yaml.Node | None:
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


def entries(node: yaml.MappingNode, name: str, path: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    """The scalar-keyed entries of mapping ``name``; a merge key (``<<``) is refused, not followed."""
    if any(key.tag == _MERGE_TAG for key, _ in node.value):
        raise LoRWeBError(f"{path}: {name} uses a YAML merge key (<<); write its values out instead.")
    return [(key, value) for key, value in node.value if isinstance(key, yaml.ScalarNode)]


def scalar(node: yaml.Node, loader: BoundedLoader, name: str, path: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise LoRWeBError(f"{path}: {name} must be a single value, found a {node_kind(node)}.")
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError):
        raise LoRWeBError(f"{path}: {name} has a value YAML cannot read: {show(node.value)}.") from None


def node_kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "mapping", yaml.SequenceNode: "list"}.get(type(node), "value")
