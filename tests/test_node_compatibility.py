"""Released nodes stay compatible: the schemas read from ``lorweb_comfy/*.py`` against the committed snapshot.

Saved workflows name nodes by id, inputs by name and type, widget values and outputs by position. The snapshot
(tests/data/node_schemas.json) records the released schemas; ``python tests/node_schemas.py --write`` refreshes it.
"""

from __future__ import annotations

import copy
import textwrap
import warnings
from pathlib import Path

import pytest
from node_schemas import (
    COMPATIBILITY_RULE,
    REFRESH_COMMAND,
    SchemaError,
    additions,
    compatibility_problems,
    extract_schemas,
    load_snapshot,
)


def test_released_nodes_are_unchanged():
    released, current = load_snapshot(), extract_schemas()
    problems = compatibility_problems(released, current)
    assert not problems, "\n".join(["Released nodes changed:", *problems, COMPATIBILITY_RULE])
    notes = additions(released, current)
    if notes:
        # Allowed, but the snapshot must learn them so that they are protected once released.
        message = f"node schemas differ from the snapshot ({'; '.join(notes)}); run `{REFRESH_COMMAND}`"
        warnings.warn(message, stacklevel=1)


def test_snapshot_holds_every_registered_node_with_inputs():
    released = load_snapshot()
    assert len(released) == 14 and all(node_id.startswith("LoRWeB_") for node_id in released)
    encode = [item["name"] for item in released["LoRWeB_EncodeAnalogy"]["inputs"]]
    # the helper-built extra pairs and the shared strength input are resolved, not dropped
    assert encode[-2:] == ["a_4", "a_prime_4"] and len(encode) == 12
    assert [item["name"] for item in released["LoRWeB_ApplyBasis"]["inputs"]][-1] == "strength"
    assert released["LoRWeB_LoraSetAddLoRA"]["inputs"][-1] == {
        "name": "lora_set",
        "type": "LORWEB_LORA_SET",
        "optional": True,
        "display_name": None,
    }


# ---- the rules on small made-up schemas -------------------------------------------------------------------------


def _input(name: str, type_: str = "IMAGE", optional: bool = False) -> dict:
    return {"name": name, "type": type_, "optional": optional, "display_name": None}


def _output(name: str, type_: str = "IMAGE") -> dict:
    return {"name": name, "type": type_, "is_list": False}


RELEASED = {
    "X_Node": {
        "display_name": "Node",
        "inputs": [_input("image"), _input("strength", "FLOAT"), _input("mode", "COMBO", optional=True)],
        "outputs": [_output("model", "MODEL"), _output("chart")],
    }
}


def _changed(edit) -> dict:
    schemas = copy.deepcopy(RELEASED)
    edit(schemas["X_Node"])
    return schemas


def _rename(node: dict) -> None:
    node["inputs"][0]["name"] = "picture"


def _insert(index: int, item: dict):
    return lambda node: node["inputs"].insert(index, item)


BREAKING = {
    "node removed": (lambda schemas: schemas.pop("X_Node"), "the released node is gone"),
    "input renamed": (lambda s: _rename(s["X_Node"]), "input 'image' (IMAGE) was removed or renamed"),
    "input removed": (lambda s: s["X_Node"]["inputs"].pop(1), "input 'strength' (FLOAT) was removed"),
    "input type": (lambda s: s["X_Node"]["inputs"][1].update(type="INT"), "changed type from FLOAT to INT"),
    "now required": (lambda s: s["X_Node"]["inputs"][2].update(optional=False), "optional and is now required"),
    "required added": (lambda s: s["X_Node"]["inputs"].insert(2, _input("mask")), "new input 'mask' (IMAGE)"),
    "inputs reordered": (lambda s: s["X_Node"]["inputs"].reverse(), "inputs were reordered"),
    "widget before widgets": (
        lambda s: _insert(1, _input("seed", "INT", optional=True))(s["X_Node"]),
        "no longer start with the released widgets",
    ),
    "output type": (lambda s: s["X_Node"]["outputs"][1].update(type="MASK"), "output 1 changed"),
    "output removed": (lambda s: s["X_Node"]["outputs"].pop(), "output 1 'chart' (IMAGE) was removed"),
    "outputs reordered": (lambda s: s["X_Node"]["outputs"].reverse(), "output 0 changed from 'model' (MODEL)"),
    "output became a list": (lambda s: s["X_Node"]["outputs"][1].update(is_list=True), "to 'chart' (IMAGE, list)"),
}


@pytest.mark.parametrize("case", list(BREAKING))
def test_breaking_changes_are_reported_with_the_node(case):
    edit, expected = BREAKING[case]
    schemas = copy.deepcopy(RELEASED)
    edit(schemas)
    problems = compatibility_problems(RELEASED, schemas)
    assert problems and all(problem.startswith("X_Node: ") for problem in problems), problems
    assert any(expected in problem for problem in problems), problems


def _rename_for_display(node: dict) -> None:
    node["display_name"] = "Renamed"
    node["inputs"][0]["display_name"] = "picture"


ALLOWED = {
    "new node": lambda s: s.update(X_Other={"display_name": "Other", "inputs": [], "outputs": []}),
    "optional socket first": lambda s: s["X_Node"]["inputs"].insert(0, _input("mask", optional=True)),
    "optional widget last": lambda s: s["X_Node"]["inputs"].append(_input("seed", "INT", optional=True)),
    "output appended": lambda s: s["X_Node"]["outputs"].append(_output("report", "STRING")),
    "required made optional": lambda s: s["X_Node"]["inputs"][0].update(optional=True),
    "display names": lambda s: _rename_for_display(s["X_Node"]),
}


@pytest.mark.parametrize("case", list(ALLOWED))
def test_compatible_changes_pass_and_are_listed_for_the_snapshot(case):
    schemas = copy.deepcopy(RELEASED)
    ALLOWED[case](schemas)
    assert compatibility_problems(RELEASED, schemas) == []
    assert additions(RELEASED, schemas)  # the test tells to refresh the snapshot


def test_unchanged_schemas_need_no_refresh():
    assert compatibility_problems(RELEASED, RELEASED) == [] and additions(RELEASED, RELEASED) == []


# ---- the reader on small made-up node packs ---------------------------------------------------------------------

EXTENSION = """
from comfy_api.latest import ComfyExtension, io
from .things import Thing


class LoRWeBExtension(ComfyExtension):
    async def get_node_list(self):
        return [Thing]
"""


def _pack(tmp_path: Path, inputs: str, prelude: str = "") -> Path:
    (tmp_path / "extension.py").write_text(EXTENSION)
    (tmp_path / "types.py").write_text('from comfy_api.latest import io\nBasis = io.Custom("MY_BASIS")\n')
    body = f"""
from comfy_api.latest import io
from .types import Basis
{prelude}

class Thing(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="X_Thing", display_name="Thing", inputs={inputs}, outputs=[Basis.Output()])
"""
    (tmp_path / "things.py").write_text(textwrap.dedent(body))
    return tmp_path


def test_reader_resolves_helpers_loops_and_custom_types(tmp_path):
    prelude = """
NUMBERS = (2, 3)


def pair(number):
    return io.Image.Input(f"a_{number}", display_name=f"a {number}", optional=True)


def pairs():
    items = []
    for number in NUMBERS:
        items += [pair(number)]
    return items
"""
    schemas = extract_schemas(_pack(tmp_path, '[Basis.Input("basis"), *pairs()]', prelude))
    thing = schemas["X_Thing"]
    assert [(item["name"], item["type"], item["optional"]) for item in thing["inputs"]] == [
        ("basis", "MY_BASIS", False),
        ("a_2", "IMAGE", True),
        ("a_3", "IMAGE", True),
    ]
    assert thing["outputs"] == [{"name": "MY_BASIS", "type": "MY_BASIS", "is_list": False}]


UNREADABLE = {
    "comprehension": ('[io.Image.Input(f"a_{n}") for n in (1, 2)]', "cannot evaluate a ListComp"),
    "unknown io type": ('[io.Mask.Input("mask")]', "io.Mask is not in IO_TYPES"),
    "positional display name": ('[io.Image.Input("a", "A")]', "pass everything after the id by keyword"),
    "conditional": ('[io.Image.Input("a")] if FLAG else []', "cannot evaluate a IfExp"),
    "computed optional": ('[io.Image.Input("a", optional=FLAG)]', "'FLAG' is not defined"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_reader_refuses_what_it_cannot_resolve_naming_the_line(tmp_path, case):
    inputs, expected = UNREADABLE[case]
    with pytest.raises(SchemaError, match="things.py:") as error:
        extract_schemas(_pack(tmp_path, inputs))
    assert expected in str(error.value)
