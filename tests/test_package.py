"""The package's shape: importable without ComfyUI, and nothing that can unpickle a user's file."""

import ast
import re
import subprocess
import sys

from lorweb_testing import ROOT

PACK_CODE = [
    *ROOT.glob("lorweb_ops/**/*.py"),
    *ROOT.glob("lorweb_comfy/**/*.py"),
    ROOT / "__init__.py",
    *ROOT.glob("scripts/*.py"),
]
#: ComfyUI's top-level modules: only the glue (``lorweb_comfy/``, the trainer's backend, the scripts) imports them.
COMFYUI_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "nodes",
    "execution",
    "server",
    "node_helpers",
    "latent_preview",
    "comfyui_version",
}
TRAINER_GLUE = ROOT / "lorweb_train" / "backends" / "comfyui.py"


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_library_and_pack_root_import_without_comfyui():
    out = run_python(
        "import importlib.util, sys\n"
        "import lorweb_ops\n"
        "spec = importlib.util.spec_from_file_location('lorweb_pack', '__init__.py',"
        " submodule_search_locations=['.'])\n"
        "pack = importlib.util.module_from_spec(spec); spec.loader.exec_module(pack)\n"
        "print(pack.WEB_DIRECTORY, callable(pack.comfy_entrypoint),"
        " any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules))"
    )
    assert out.split() == ["./web", "True", "False"]


def test_no_pickle_loading_anywhere():
    pattern = re.compile(r"torch\.load\(|pickle\.|allow_pickle\s*=\s*True|load_torch_file")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in PACK_CODE
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def imported_roots(path) -> set[str]:
    """The top-level names of every import in a file, those inside functions included."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_glue_touches_comfyui():
    plain = [*ROOT.glob("lorweb_ops/**/*.py"), *ROOT.glob("lorweb_train/**/*.py")]
    assert TRAINER_GLUE in plain and len(plain) > 30
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & COMFYUI_MODULES)
        for path in plain
        if path != TRAINER_GLUE and imported_roots(path) & COMFYUI_MODULES
    }
    assert not offenders, offenders
    assert "comfy" in imported_roots(TRAINER_GLUE)  # the check reads what it should


def test_the_pack_imports_its_packages_by_their_top_level_names_only():
    """No relative import of the library from the glue: ComfyUI imports the pack under its folder's path, where a
    relative import would make a second copy of ``lorweb_ops`` beside the one the trainer and scripts import."""
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in [ROOT / "__init__.py", *ROOT.glob("lorweb_comfy/**/*.py")]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0 and (node.level > 1 or path.parent == ROOT)
    ]
    assert not offenders, offenders
