"""The pack in a running ComfyUI server (``main.py --cpu`` on loopback): /object_info, model lists, queue errors."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from comfy_host import COMFYUI_ROOT, PACK_LINK_NAME, REPO_ROOT
from lorweb_testing import GOLDEN_CKPT, write_ai_toolkit_config

NODE_IDS = {
    "LoRWeB_LoadBasis": ("Load LoRA Basis", ["LORWEB_BASIS"]),
    "LoRWeB_EncodeAnalogy": ("Encode Analogy Pair", ["LORWEB_ANALOGY"]),
    "LoRWeB_ApplyBasis": ("Apply Weighted LoRA Basis", ["MODEL", "LORWEB_WEIGHTS", "IMAGE"]),
    "LoRWeB_AnalogyGrid": ("Analogy Grid", ["IMAGE"]),
    "LoRWeB_CropResult": ("Crop Analogy Result", ["IMAGE"]),
}
STARTUP_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    lorweb = base / "models" / "lorweb"
    lorweb.mkdir(parents=True)
    shutil.copy(GOLDEN_CKPT, lorweb / "golden.safetensors")
    write_ai_toolkit_config(lorweb / "heads2.yaml", lora_heads=2)
    port = _free_port()
    log = open(base / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--disable-auto-launch"], cwd=COMFYUI_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while True:
            try:
                _get(url + "/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("ComfyUI did not start:\n" + Path(base / "server.log").read_text()[-5000:])
                time.sleep(0.5)
        yield url, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_nodes_appear_in_object_info_with_tooltips(server):
    url, _ = server
    info = _get(url + "/object_info")
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
    load = _get(url + "/object_info/LoRWeB_LoadBasis")["LoRWeB_LoadBasis"]
    basis_spec, config_spec = load["input"]["required"]["basis_name"], load["input"]["required"]["config"]
    assert "golden.safetensors" in json.dumps(basis_spec[0]) + json.dumps(basis_spec[1])
    assert "heads2.yaml" in json.dumps(config_spec) and "auto" in json.dumps(config_spec)
    assert "non-commercial" in basis_spec[1]["tooltip"]
    assert "golden.safetensors" in _get(url + "/models/lorweb")


def test_queue_rejects_a_missing_basis_with_a_clear_message(server):
    url, _ = server
    load = {"basis_name": "missing.safetensors", "config": "auto"}
    prompt = {"1": {"class_type": "LoRWeB_LoadBasis", "inputs": load},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    status, body = _post(url + "/prompt", {"prompt": prompt, "client_id": "lorweb-tests"})
    assert status == 400
    details = json.dumps(body)
    assert "missing.safetensors" in details and "was not found in the lorweb model folder" in details
