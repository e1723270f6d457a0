"""The schemas tests/node_schemas.py reads from the source (no ComfyUI) are the ones ComfyUI really registers.

The pure compatibility test trusts that reader; here each pack node's ``/object_info`` definition from a running
ComfyUI is turned into the same shape and compared with it, and checked against the committed snapshot's rules.
"""

from __future__ import annotations

from comfy_host import PACK_LINK_NAME
from node_schemas import COMPATIBILITY_RULE, IO_TYPES, compatibility_problems, extract_schemas, load_snapshot


def _input(name: str, spec: tuple | list, optional: bool) -> dict:
    # a V1 combo lists its options in place of the type; V3 nodes serve "COMBO", but accept both
    type_ = "COMBO" if isinstance(spec[0], list) else spec[0]
    options = spec[1] if len(spec) > 1 else {}
    return {"name": name, "type": type_, "optional": optional, "display_name": options.get("display_name")}


def served_schema(info: dict) -> dict:
    """What ComfyUI serves for one node, in the reader's shape (required inputs first, as object_info orders them)."""
    groups = [(info["input"].get(group, {}), group == "optional") for group in ("required", "optional")]
    outputs = zip(info["output_name"], info["output"], info["output_is_list"], strict=True)
    return {
        "display_name": info["display_name"],
        "inputs": [_input(name, spec, optional) for specs, optional in groups for name, spec in specs.items()],
        "outputs": [{"name": name, "type": type_, "is_list": is_list} for name, type_, is_list in outputs],
    }


def pack_schemas(host) -> dict[str, dict]:
    """{node_id: served schema} of the nodes ComfyUI loaded from this pack (not the test support pack)."""
    schemas = {}
    for node_id, node_class in host.nodes.NODE_CLASS_MAPPINGS.items():
        info = node_class.GET_NODE_INFO_V1() if hasattr(node_class, "GET_NODE_INFO_V1") else None
        if info and info.get("python_module") == f"custom_nodes.{PACK_LINK_NAME}":
            schemas[node_id] = served_schema(info)
    return dict(sorted(schemas.items()))


def test_source_reader_matches_what_comfyui_registers(host):
    served, read = pack_schemas(host), extract_schemas()
    assert list(served) == list(read), "the pack's node ids in ComfyUI differ from those read from the source"
    for node_id in read:
        assert served[node_id] == read[node_id], node_id


def test_registered_nodes_keep_the_released_schemas(host):
    problems = compatibility_problems(load_snapshot(), pack_schemas(host))
    assert not problems, "\n".join([*problems, COMPATIBILITY_RULE])


def test_io_type_table_is_comfyuis(host):
    from comfy_api.latest import io

    assert {name: getattr(io, name).io_type for name in IO_TYPES} == IO_TYPES
