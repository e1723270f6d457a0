"""The pack's node schemas read from its source with ``ast``, and the rules that keep released nodes compatible.

CI has no ComfyUI, so nothing here imports the node modules: each ``define_schema`` is evaluated symbolically, just
far enough to know every node's id, its inputs (name, socket type, optional, display name) and its outputs. Only
the patterns ``lorweb_comfy/*.py`` use are understood; anything else stops with :class:`SchemaError` naming the file and
line, so an input is never dropped silently. ``tests/host/test_node_snapshot_matches_comfyui.py`` checks the result
against what a real ComfyUI registers.

Refresh the committed snapshot after adding a node or an optional input (from the repository root)::

    python tests/node_schemas.py --write
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODES = ROOT / "lorweb_comfy"
SNAPSHOT = ROOT / "tests" / "data" / "node_schemas.json"
REFRESH_COMMAND = "python tests/node_schemas.py --write"

#: ``io.<class>`` -> the socket type ComfyUI serves (its ``io_type``); the host test checks each against ComfyUI
IO_TYPES = {
    "Boolean": "BOOLEAN",
    "ClipVision": "CLIP_VISION",
    "Combo": "COMBO",
    "Conditioning": "CONDITIONING",
    "Float": "FLOAT",
    "Image": "IMAGE",
    "Int": "INT",
    "Latent": "LATENT",
    "Model": "MODEL",
    "String": "STRING",
    "Vae": "VAE",
}
#: socket types the editor shows as widgets: a saved workflow keeps their values by position (``widgets_values``)
WIDGET_TYPES = frozenset({"BOOLEAN", "COMBO", "FLOAT", "INT", "STRING"})

Schema = dict  # {"display_name": str, "inputs": [input, ...], "outputs": [output, ...]}


class SchemaError(Exception):
    """A schema written in a way this reader does not understand (extend the reader rather than guess)."""


# ---- symbolic values --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IoNamespace:
    """``comfy_api.latest.io``."""


@dataclass(frozen=True)
class IoMember:
    """``io.<name>``: a socket type class, ``io.Custom`` or ``io.Schema``."""

    name: str


@dataclass(frozen=True)
class SocketType:
    """A type whose ``.Input``/``.Output`` make sockets: ``io.Image`` or ``io.Custom("LORWEB_BASIS")``."""

    io_type: str


@dataclass(frozen=True)
class Maker:
    """``<type>.Input`` or ``<type>.Output``, not yet called."""

    socket: SocketType
    kind: str


@dataclass(frozen=True)
class Function:
    """A function defined in one of the node modules (helpers that build inputs or outputs)."""

    module: Module
    node: ast.FunctionDef


@dataclass
class Lazy:
    """An argument not evaluated until it is used: tooltips may hold things this reader need not resolve."""

    module: Module
    node: ast.expr
    env: dict


@dataclass
class Return(Exception):
    value: object


# ---- modules ----------------------------------------------------------------------------------------------------


class Module:
    """One file of ``lorweb_comfy/``: its top-level names, resolved on demand."""

    def __init__(self, path: Path, loader: Callable[[str], Module]):
        self.path = path
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        self.loader = loader
        self.bindings: dict[str, ast.AST] = {}
        for statement in self.tree.body:
            self._bind(statement)
        self.values: dict[str, object] = {}

    def _bind(self, statement: ast.stmt) -> None:
        if isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
            self.bindings[statement.name] = statement
        elif isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    self.bindings[target.id] = statement
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            self.bindings[statement.target.id] = statement
        elif isinstance(statement, ast.ImportFrom):
            for alias in statement.names:
                self.bindings[alias.asname or alias.name] = statement

    def where(self, node: ast.AST) -> str:
        return f"{_shown(self.path)}:{getattr(node, 'lineno', '?')}"

    def fail(self, node: ast.AST, what: str) -> SchemaError:
        source = ast.get_source_segment(self.path.read_text(encoding="utf-8"), node) or ast.dump(node)
        return SchemaError(
            f"{self.where(node)}: {what}: {source!r}. tests/node_schemas.py reads schemas from the source without "
            "ComfyUI and does not understand this pattern; write the schema more plainly or extend the reader."
        )

    def lookup(self, name: str, node: ast.AST) -> object:
        if name not in self.values:
            self.values[name] = self._resolve(name, node)
        return self.values[name]

    def _resolve(self, name: str, node: ast.AST) -> object:
        binding = self.bindings.get(name)
        if binding is None:
            raise self.fail(node, f"name {name!r} is not defined at the top of the module")
        if isinstance(binding, ast.FunctionDef):
            return Function(self, binding)
        if isinstance(binding, ast.ClassDef):
            return binding
        if isinstance(binding, (ast.Assign, ast.AnnAssign)):
            return evaluate(self, binding.value, {})
        return self._imported(binding, name, node)

    def _imported(self, statement: ast.ImportFrom, name: str, node: ast.AST) -> object:
        original = next(alias.name for alias in statement.names if (alias.asname or alias.name) == name)
        if statement.module == "comfy_api.latest" and original == "io":
            return IoNamespace()
        if statement.level == 1 and statement.module:  # from .types import Basis: a sibling node module
            return self.loader(statement.module).lookup(original, node)
        raise self.fail(node, f"{name!r} comes from outside lorweb_comfy/ ({statement.module})")


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


# ---- expressions and statements ---------------------------------------------------------------------------------


def evaluate(module: Module, node: ast.expr, env: dict) -> object:
    """The value of ``node``, as far as schemas need it."""
    handler = _EXPRESSIONS.get(type(node))
    if handler is None:
        raise module.fail(node, f"cannot evaluate a {type(node).__name__}")
    return handler(module, node, env)


def _name(module: Module, node: ast.Name, env: dict) -> object:
    if node.id in env:
        value = env[node.id]
        return evaluate(value.module, value.node, value.env) if isinstance(value, Lazy) else value
    return module.lookup(node.id, node)


def _attribute(module: Module, node: ast.Attribute, env: dict) -> object:
    base = evaluate(module, node.value, env)
    if isinstance(base, IoNamespace):
        return SocketType(IO_TYPES[node.attr]) if node.attr in IO_TYPES else IoMember(node.attr)
    if isinstance(base, IoMember):
        raise module.fail(node, f"io.{base.name} is not in IO_TYPES (add its ComfyUI io_type there)")
    if isinstance(base, SocketType) and node.attr in ("Input", "Output"):
        return Maker(base, node.attr)
    raise module.fail(node, "cannot evaluate this attribute")


def _joined(module: Module, node: ast.JoinedStr, env: dict) -> str:
    parts = []
    for part in node.values:
        if isinstance(part, ast.FormattedValue):
            if part.format_spec is not None or part.conversion != -1:
                raise module.fail(part, "f-string conversions and format specs are not supported")
            part = part.value
        parts.append(str(evaluate(module, part, env)))
    return "".join(parts)


def _sequence(module: Module, node: ast.List | ast.Tuple, env: dict) -> list:
    items: list = []
    for element in node.elts:
        if isinstance(element, ast.Starred):
            items += _as_list(module, element, evaluate(module, element.value, env))
        else:
            items.append(evaluate(module, element, env))
    return items


def _as_list(module: Module, node: ast.AST, value: object) -> list:
    if not isinstance(value, (list, tuple)):
        raise module.fail(node, "expected a list or tuple here")
    return list(value)


def _binop(module: Module, node: ast.BinOp, env: dict) -> object:
    left, right = evaluate(module, node.left, env), evaluate(module, node.right, env)
    if isinstance(node.op, ast.Add) and type(left) is type(right) and isinstance(left, (str, list)):
        return left + right
    raise module.fail(node, "only + of two strings or two lists is supported")


def _call(module: Module, node: ast.Call, env: dict) -> object:
    function = evaluate(module, node.func, env)
    if isinstance(function, Maker):
        return _socket(module, node, env, function)
    if function == IoMember("Custom"):
        return SocketType(_text(module, _argument(module, node, env, 0, "io_type"), node))
    if function == IoMember("Schema"):
        return _schema(module, node, env)
    if isinstance(function, Function):
        return call_function(function, node, module, env)
    raise module.fail(node, "cannot evaluate a call of this")


_EXPRESSIONS: dict[type, Callable] = {
    ast.Constant: lambda module, node, env: node.value,
    ast.Name: _name,
    ast.Attribute: _attribute,
    ast.JoinedStr: _joined,
    ast.List: _sequence,
    ast.Tuple: _sequence,
    ast.BinOp: _binop,
    ast.Call: _call,
}


def call_function(function: Function, call: ast.Call, caller: Module, env: dict) -> object:
    """Run a helper's body with its parameters bound to the (lazy) arguments of ``call``."""
    definition = function.node
    parameters = [argument.arg for argument in definition.args.args]
    if definition.args.vararg or definition.args.kwarg or definition.args.kwonlyargs or definition.args.defaults:
        raise function.module.fail(definition, "helpers with defaults, *args or **kwargs are not supported")
    if len(call.args) + len(call.keywords) != len(parameters) or any(k.arg is None for k in call.keywords):
        raise caller.fail(call, f"call does not bind each parameter of {definition.name} once")
    local = dict(zip(parameters, (Lazy(caller, argument, env) for argument in call.args), strict=False))
    local |= {keyword.arg: Lazy(caller, keyword.value, env) for keyword in call.keywords}
    try:
        execute(function.module, definition.body, local)
    except Return as result:
        return result.value
    raise function.module.fail(definition, f"{definition.name} returns nothing")


def execute(module: Module, body: list[ast.stmt], env: dict) -> None:
    """Run statements; ``return`` raises :class:`Return`."""
    for statement in body:
        if isinstance(statement, ast.Return) and statement.value is not None:
            raise Return(evaluate(module, statement.value, env))
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring
        if isinstance(statement, ast.Assign) and _plain_target(statement.targets):
            env[statement.targets[0].id] = evaluate(module, statement.value, env)
        elif isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
            env[statement.target.id] = _binop(module, ast.BinOp(statement.target, statement.op, statement.value), env)
        elif isinstance(statement, ast.For) and isinstance(statement.target, ast.Name) and not statement.orelse:
            # one shared env, as in Python: the loop variable stays bound and ``+=`` in the body is kept
            for item in _as_list(module, statement.iter, evaluate(module, statement.iter, env)):
                env[statement.target.id] = item
                execute(module, statement.body, env)
        else:
            raise module.fail(statement, f"cannot run a {type(statement).__name__} statement here")


def _plain_target(targets: list[ast.expr]) -> bool:
    return len(targets) == 1 and isinstance(targets[0], ast.Name)


# ---- sockets and schemas ----------------------------------------------------------------------------------------


def _argument(module: Module, call: ast.Call, env: dict, position: int, keyword: str) -> object:
    for item in call.keywords:
        if item.arg == keyword:
            return evaluate(module, item.value, env)
    if len(call.args) > position:
        return evaluate(module, call.args[position], env)
    return None


def _text(module: Module, value: object, node: ast.AST) -> str:
    if not isinstance(value, str) or not value:
        raise module.fail(node, "expected a non-empty string here")
    return value


def _socket(module: Module, call: ast.Call, env: dict, maker: Maker) -> dict:
    # Only the first positional argument (the id) is read positionally: the rest differ between socket classes
    # (Combo's second is options), so a positional use of them is refused rather than misread.
    if len(call.args) > 1 or any(isinstance(argument, ast.Starred) for argument in call.args):
        raise module.fail(call, "pass everything after the id by keyword")
    if any(keyword.arg is None for keyword in call.keywords):
        raise module.fail(call, "**kwargs in a socket are not supported")
    display_name = _argument(module, call, env, 99, "display_name")
    if maker.kind == "Output":
        name = display_name or _argument(module, call, env, 0, "id") or maker.socket.io_type
        is_list = bool(_argument(module, call, env, 99, "is_output_list"))
        return {"name": name, "type": maker.socket.io_type, "is_list": is_list}
    optional = _argument(module, call, env, 99, "optional")
    if not isinstance(optional, (bool, type(None))):
        raise module.fail(call, "optional must be True or False")
    name = _text(module, _argument(module, call, env, 0, "id"), call)
    return {"name": name, "type": maker.socket.io_type, "optional": bool(optional), "display_name": display_name}


def _schema(module: Module, call: ast.Call, env: dict) -> dict:
    if call.args:
        raise module.fail(call, "pass io.Schema's arguments by keyword")
    node_id = _text(module, _argument(module, call, env, 99, "node_id"), call)
    inputs = _sockets(module, call, env, "inputs", "Input")
    outputs = _sockets(module, call, env, "outputs", "Output")
    # ComfyUI serves required inputs first, then optional ones (object_info's input_order); the editor lays out
    # sockets and widgets in that order, so the snapshot keeps it.
    inputs = [item for item in inputs if not item["optional"]] + [item for item in inputs if item["optional"]]
    display_name = _argument(module, call, env, 99, "display_name")
    return {"node_id": node_id, "display_name": display_name, "inputs": inputs, "outputs": outputs}


def _sockets(module: Module, call: ast.Call, env: dict, keyword: str, kind: str) -> list[dict]:
    value = _argument(module, call, env, 99, keyword)
    items = [] if value is None else _as_list(module, call, value)
    for item in items:
        if not isinstance(item, dict) or ("optional" in item) != (kind == "Input"):
            raise module.fail(call, f"every item of {keyword} must be a <type>.{kind}(...)")
    return items


# ---- the pack ---------------------------------------------------------------------------------------------------


def _loader(nodes_dir: Path) -> Callable[[str], Module]:
    cache: dict[str, Module] = {}

    def load(name: str) -> Module:
        if name not in cache:
            path = nodes_dir / f"{name}.py"
            if not path.is_file():
                raise SchemaError(f"{_shown(path)} is imported by a node module but does not exist")
            cache[name] = Module(path, load)
        return cache[name]

    return load


def registered_classes(extension: Module) -> list[tuple[str, ast.ClassDef, Module]]:
    """The node classes ``get_node_list`` returns, with the module each is defined in."""
    method = _method(extension, "LoRWeBExtension", "get_node_list")
    returns = [statement for statement in method.body if isinstance(statement, ast.Return)]
    if len(returns) != 1 or not isinstance(returns[0].value, ast.List):
        raise extension.fail(method, "get_node_list must return one list literal of node classes")
    classes = []
    for element in returns[0].value.elts:
        if not isinstance(element, ast.Name):
            raise extension.fail(element, "each node in get_node_list must be a plain class name")
        binding = extension.bindings.get(element.id)
        if not isinstance(binding, ast.ImportFrom) or binding.level != 1:
            raise extension.fail(element, "node classes must be imported from a sibling module")
        home = extension.loader(binding.module)
        definition = home.bindings.get(element.id)
        if not isinstance(definition, ast.ClassDef):
            raise home.fail(home.tree, f"no class {element.id} defined here")
        classes.append((element.id, definition, home))
    return classes


def _method(module: Module, class_name: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    definition = module.bindings.get(class_name)
    if not isinstance(definition, ast.ClassDef):
        raise SchemaError(f"{_shown(module.path)}: no class {class_name}")
    for statement in definition.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) and statement.name == name:
            return statement
    raise module.fail(definition, f"class {class_name} has no {name}()")


def node_schema(class_name: str, module: Module) -> dict:
    method = _method(module, class_name, "define_schema")
    try:
        execute(module, method.body, {"cls": None})
    except Return as result:
        if isinstance(result.value, dict) and "node_id" in result.value:
            return result.value
    raise module.fail(method, f"{class_name}.define_schema must return io.Schema(...)")


def extract_schemas(nodes_dir: Path = NODES) -> dict[str, Schema]:
    """{node_id: schema} of every node the pack registers, read from the source."""
    load = _loader(nodes_dir)
    schemas: dict[str, Schema] = {}
    for class_name, _, module in registered_classes(load("extension")):
        schema = node_schema(class_name, module)
        node_id = schema.pop("node_id")
        if node_id in schemas:
            raise SchemaError(f"node id {node_id} is defined twice (second time by {class_name})")
        schemas[node_id] = schema
    return dict(sorted(schemas.items()))


# ---- compatibility rules ----------------------------------------------------------------------------------------

COMPATIBILITY_RULE = (
    "Released node ids, input names and types, and outputs must not change: saved workflows refer to them. "
    "Add a new node, or a new optional input (a widget after the existing widgets), instead."
)


def compatibility_problems(released: dict[str, Schema], current: dict[str, Schema]) -> list[str]:
    """Every change from ``released`` to ``current`` that could break a saved workflow."""
    problems = []
    for node_id, old in released.items():
        new = current.get(node_id)
        if new is None:
            problems.append(f"{node_id}: the released node is gone (removed, or its node_id renamed)")
            continue
        problems += [f"{node_id}: {problem}" for problem in _input_problems(old["inputs"], new["inputs"])]
        problems += [f"{node_id}: {problem}" for problem in _output_problems(old["outputs"], new["outputs"])]
    return problems


def _input_problems(old: list[dict], new: list[dict]) -> list[str]:
    problems = []
    current = {item["name"]: item for item in new}
    for item in old:
        match = current.get(item["name"])
        if match is None:
            problems.append(f"input {item['name']!r} ({item['type']}) was removed or renamed")
        elif match["type"] != item["type"]:
            problems.append(f"input {item['name']!r} changed type from {item['type']} to {match['type']}")
        elif item["optional"] and not match["optional"]:
            problems.append(f"input {item['name']!r} was optional and is now required")
    released = {item["name"] for item in old}
    for item in new:
        if item["name"] not in released and not item["optional"]:
            problems.append(f"new input {item['name']!r} ({item['type']}) is required; a new input must be optional")
    return problems + _order_problems(old, new)


def _order_problems(old: list[dict], new: list[dict]) -> list[str]:
    # A saved workflow keeps widget values as a list by position, so the released widgets must stay the first
    # widgets, in their order; sockets are matched by name but a changed order still reshuffles the node.
    released = [item["name"] for item in old]
    kept = [item["name"] for item in new if item["name"] in released]
    if kept != [name for name in released if name in kept]:
        return [f"inputs were reordered: released order {released}, now {kept}"]
    old_widgets = [item["name"] for item in old if item["type"] in WIDGET_TYPES]
    new_widgets = [item["name"] for item in new if item["type"] in WIDGET_TYPES]
    if new_widgets[: len(old_widgets)] != old_widgets and set(old_widgets) <= set(new_widgets):
        return [
            f"widgets {new_widgets} no longer start with the released widgets {old_widgets}: saved widget values "
            "would land in the wrong widgets (put a new widget after the released ones)"
        ]
    return []


def _output_problems(old: list[dict], new: list[dict]) -> list[str]:
    # Links name an output by its position, so each released output keeps its place, type and name.
    problems = []
    for index, item in enumerate(old):
        if index >= len(new):
            problems.append(f"output {index} {item['name']!r} ({item['type']}) was removed")
        elif new[index] != item:
            problems.append(f"output {index} changed from {_describe(item)} to {_describe(new[index])}")
    return problems


def _describe(output: dict) -> str:
    return f"{output['name']!r} ({output['type']}{', list' if output['is_list'] else ''})"


def additions(released: dict[str, Schema], current: dict[str, Schema]) -> list[str]:
    """Allowed changes the snapshot does not record yet (new nodes, new optional inputs, new outputs, names)."""
    notes = [f"{node_id}: new node" for node_id in current if node_id not in released]
    notes += [
        f"{node_id}: new optional input, new output or display name"
        for node_id in released
        if node_id in current and current[node_id] != released[node_id]
    ]
    return notes


# ---- the snapshot -----------------------------------------------------------------------------------------------


def load_snapshot(path: Path = SNAPSHOT) -> dict[str, Schema]:
    return json.loads(path.read_text(encoding="utf-8"))["nodes"]


def write_snapshot(schemas: dict[str, Schema], path: Path = SNAPSHOT) -> None:
    document = {
        "about": "The pack's released node schemas; tests/test_node_compatibility.py keeps them compatible. "
        f"Written by `{REFRESH_COMMAND}`.",
        "nodes": schemas,
    }
    path.write_text(_format(document) + "\n", encoding="utf-8")


def _format(value: object, depth: int = 0) -> str:
    """JSON with one socket per line, so a diff of the snapshot shows each changed input or output on its own."""
    if isinstance(value, dict) and "type" in value:  # a socket
        return json.dumps(value, ensure_ascii=False)
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key)}: {_format(item, depth + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and value:
        return "[\n" + ",\n".join(inner + _format(item, depth + 1) for item in value) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {SNAPSHOT.relative_to(ROOT)}")
    parser.add_argument(
        "--force", action="store_true", help="write even when released nodes break (only for a node never released)"
    )
    args = parser.parse_args(argv)
    schemas = extract_schemas()
    if not args.write:
        print(json.dumps(schemas, indent=1, ensure_ascii=False))
        return 0
    problems = compatibility_problems(load_snapshot(), schemas) if SNAPSHOT.is_file() else []
    if problems and not args.force:
        print("Not written: these changes break released nodes.\n" + "\n".join(problems), file=sys.stderr)
        print(COMPATIBILITY_RULE, file=sys.stderr)
        return 1
    write_snapshot(schemas)
    print(f"wrote {len(schemas)} nodes to {SNAPSHOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
