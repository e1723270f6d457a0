"""Load LoRA Basis and ComfyUI's folder API: lists, look-ups, and re-runs when the config found beside the basis
(``auto``) appears, changes or goes away."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from host_graphs import STRENGTH, expected_delta, golden_analogy, graph, patched_layers
from lorweb_testing import GOLDEN_CKPT, GOLDEN_VARIANTS, write_ai_toolkit_config


def assert_patched_like(host, files, golden, variant: str) -> None:
    """The last run's weights are the tiny Flux plus the golden delta of ``variant`` (independent numbers)."""
    weights, original = host.support().PROBES["weights"], files["original"]
    for layer in patched_layers():
        key = f"{layer}.weight"
        expected = original[key] + STRENGTH * expected_delta(golden, variant, layer)
        torch.testing.assert_close(weights[key], expected, rtol=0, atol=1e-5, msg=f"{variant} {key}")


def test_the_auto_config_beside_the_basis_counts_in_the_rerun_fingerprint(host, files, golden):
    folder = host.models / "lorweb" / "auto_case"
    folder.mkdir()
    shutil.copy(GOLDEN_CKPT, folder / "golden_copy.safetensors")
    prompt = graph(files["flux"], golden_analogy(), basis_name="auto_case/golden_copy.safetensors", config="auto")
    executor = host.executor()  # one executor: ComfyUI reuses cached node outputs unless a fingerprint changed

    host.run(prompt, executor=executor)  # no yaml beside it: the released settings
    assert_patched_like(host, files, golden, "released_like")

    write_ai_toolkit_config(folder / "config.yaml", **GOLDEN_VARIANTS["softmax_heads2"])
    host.run(prompt, executor=executor)
    assert_patched_like(host, files, golden, "softmax_heads2")

    (folder / "config.yaml").unlink()
    host.run(prompt, executor=executor)
    assert_patched_like(host, files, golden, "released_like")


@pytest.fixture
def extra_lorweb_folder(tmp_path):
    """A second lorweb folder, as extra_model_paths.yaml adds one; removed again afterwards."""
    import folder_paths

    folder_paths.add_model_folder_path("lorweb", str(tmp_path))
    yield tmp_path
    folder_paths.folder_names_and_paths["lorweb"][0].remove(str(tmp_path))


def test_files_of_a_folder_added_later_are_listed_and_found(host, extra_lorweb_folder):
    shutil.copy(GOLDEN_CKPT, extra_lorweb_folder / "extra_basis.safetensors")
    (extra_lorweb_folder / "sub").mkdir()
    write_ai_toolkit_config(extra_lorweb_folder / "sub" / "extra_settings.yml")
    (extra_lorweb_folder / "notes.txt").write_text("not a model")

    load = host.nodes.NODE_CLASS_MAPPINGS["LoRWeB_LoadBasis"]
    required = load.GET_NODE_INFO_V1()["input"]["required"]  # what /object_info serves
    basis_options, config_options = json.dumps(required["basis_name"]), json.dumps(required["config"])
    assert "extra_basis.safetensors" in basis_options and "notes.txt" not in basis_options
    assert "sub/extra_settings.yml" in config_options and "extra_basis" not in config_options
    assert "notes.txt" not in config_options

    prompt = {
        "basis": {
            "class_type": "LoRWeB_LoadBasis",
            "inputs": {"basis_name": "extra_basis.safetensors", "config": "sub/extra_settings.yml"},
        },
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["basis", 0]}},
    }
    _, outputs = host.run(prompt)
    summary = json.dumps(outputs["basis"])
    assert "extra_basis.safetensors" in summary and "extra_settings.yml" in summary
