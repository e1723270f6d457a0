"""One import identity: the pack loaded by ComfyUI, the trainer's ComfyUI glue and the tests share one library.

ComfyUI imports the pack under its folder name; the pack's packages are imported by their top-level names, so
the library exists once in the process: one ``LoRWeBError`` class, one basis cache.
"""

from __future__ import annotations

import shutil
import sys

import pytest
from lorweb_testing import GOLDEN_CKPT

import lorweb_ops
import lorweb_ops.basis

PACKAGES = ("lorweb_ops", "lorweb_comfy", "lorweb_train")


def copies_under_other_names() -> list[str]:
    """Modules of the pack's packages imported under any name but their top-level one: a second copy, as a relative
    import from the pack's folder (``<custom_nodes path>.lorweb_ops``) would make."""
    return sorted(name for name in sys.modules for package in PACKAGES if f".{package}." in f"{name}.")


def test_the_pack_as_comfyui_loaded_it_and_the_trainer_share_one_library(host):
    import lorweb_train.backends.comfyui as trainer_glue

    load_basis_node = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_LoadBasis"]
    assert load_basis_node.__module__ == "lorweb_comfy.basis_nodes"
    assert copies_under_other_names() == []
    assert trainer_glue.LoRWeBError is lorweb_ops.LoRWeBError
    assert sys.modules["lorweb_comfy.basis_nodes"].load_basis is lorweb_ops.load_basis


def test_an_error_from_a_node_is_the_library_error_the_trainer_catches(host):
    import lorweb_train.backends.comfyui as trainer_glue

    (host.models / "lorweb" / "not_a_basis.safetensors").write_bytes(b"\x08" + bytes(15))
    load_basis_node = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_LoadBasis"]
    with pytest.raises(trainer_glue.LoRWeBError):
        load_basis_node.execute("not_a_basis.safetensors", "auto")


def test_a_basis_loaded_by_the_node_is_in_the_cache_the_library_reads(host):
    name = "identity_case.safetensors"
    shutil.copy(GOLDEN_CKPT, host.models / "lorweb" / name)
    lorweb_ops.basis.clear_basis_cache()
    prompt = {
        "basis": {"class_type": "LoRWeB_LoadBasis", "inputs": {"basis_name": name, "config": "auto"}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["basis", 0]}},
    }
    host.run(prompt)
    from_node_run = lorweb_ops.load_basis(host.models / "lorweb" / name)
    assert len(lorweb_ops.basis._CACHE) == 1  # the node's load filled the one cache; this call was a hit
    again = lorweb_ops.load_basis(host.models / "lorweb" / name)
    assert next(iter(again.weights.values())) is next(iter(from_node_run.weights.values()))
