"""The package's shape: importable without ComfyUI, and nothing that can unpickle a user's file."""

import re
import subprocess
import sys

from lorweb_testing import ROOT

PACK_CODE = [*ROOT.glob("lorweb_ops/*.py"), *ROOT.glob("nodes/*.py"), ROOT / "__init__.py", *ROOT.glob("scripts/*.py")]


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


def test_only_nodes_touch_comfy():
    pattern = re.compile(r"^\s*(import comfy|from comfy|import folder_paths|from comfy_api)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.glob("lorweb_ops/*.py") if pattern.search(p.read_text())]
    assert not offenders, offenders
