"""The pack in a running ComfyUI server (``main.py --cpu`` on loopback): /object_info, model lists, queue errors."""

from __future__ import annotations

import json
import shutil

import pytest
from comfy_server import get_json, make_base, post_json, running_server
from lorweb_testing import GOLDEN_CKPT, write_ai_toolkit_config

NODE_IDS = {
    "LoRWeB_LoadBasis": ("Load LoRA Basis", ["LORWEB_BASIS"]),
    "LoRWeB_EncodeAnalogy": ("Encode Analogy Pair", ["LORWEB_ANALOGY"]),
    "LoRWeB_ApplyBasis": ("Apply Weighted LoRA Basis", ["MODEL", "LORWEB_WEIGHTS", "IMAGE"]),
    "LoRWeB_AnalogyGrid": ("Analogy Grid", ["IMAGE"]),
    "LoRWeB_CropResult": ("Crop Analogy Result", ["IMAGE"]),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("server_base"))
    shutil.copy(GOLDEN_CKPT, base / "models" / "lorweb" / "golden.safetensors")
    write_ai_toolkit_config(base / "models" / "lorweb" / "heads2.yaml", lora_heads=2)
    with running_server(base) as url:
        yield url, base


def test_nodes_appear_in_object_info_with_tooltips(server):
    url, _ = server
    info = get_json(url + "/object_info")
    for node_id, (display_name, outputs) in NODE_IDS.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["display_name"] == display_name
        assert node["category"] == "LoRWeB"
        assert node["output"] == outputs
        assert node["description"]
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert inputs
        for name, spec in inputs.items():
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(node.get("output_tooltips", [])) and len(node.get("output_tooltips", [])) == len(outputs)


def test_model_folder_lists_and_licence_note(server):
    url, _ = server
    load = get_json(url + "/object_info/LoRWeB_LoadBasis")["LoRWeB_LoadBasis"]
    basis_spec, config_spec = load["input"]["required"]["basis_name"], load["input"]["required"]["config"]
    assert "golden.safetensors" in json.dumps(basis_spec[0]) + json.dumps(basis_spec[1])
    assert "heads2.yaml" in json.dumps(config_spec) and "auto" in json.dumps(config_spec)
    assert "non-commercial" in basis_spec[1]["tooltip"]
    assert "golden.safetensors" in get_json(url + "/models/lorweb")


def test_queue_rejects_a_missing_basis_with_a_clear_message(server):
    url, _ = server
    load = {"basis_name": "missing.safetensors", "config": "auto"}
    prompt = {
        "1": {"class_type": "LoRWeB_LoadBasis", "inputs": load},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    status, body = post_json(url + "/prompt", {"prompt": prompt, "client_id": "lorweb-tests"})
    assert status == 400
    details = json.dumps(body)
    assert "missing.safetensors" in details and "was not found in the lorweb model folder" in details
