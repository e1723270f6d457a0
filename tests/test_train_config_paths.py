"""Where the trainer's config is read from and what it names: relative paths from the config file's folder, the
command from any folder (``scripts/train_basis.py``), and one set of model file names in the example config, the
README's download table and the demo's files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from train_testing import ROOT, environment_with_paths, training_config, write_pairs

from lorweb_ops.errors import LoRWeBError
from lorweb_train.config import load_config

EXAMPLE = ROOT / "training" / "train_example.yaml"
sys.path.insert(0, str(ROOT / "scripts"))
from lorweb_demo import FILES  # noqa: E402  (importing it imports no ComfyUI)


def _write(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_relative_paths_are_read_from_the_config_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "kontext.safetensors").write_bytes(b"")
    document = {
        "output_dir": "runs/first",
        "data": {"path": "edits", "cache_dir": "../cache"},
        "model": {"diffusion_model": "weights/kontext.safetensors", "vae": "ae.safetensors", "init": "b.safetensors"},
    }
    config_path = _write(folder / "train.yaml", document)
    monkeypatch.chdir(tmp_path)  # started elsewhere, as from the ComfyUI folder
    config = load_config(config_path)
    assert config.output_dir == str(folder / "runs" / "first")
    assert config.data.path == str(folder / "edits")
    assert config.data.cache_dir == str(tmp_path / "cache")
    assert config.model.init == str(folder / "b.safetensors")
    assert config.model.diffusion_model == str(folder / "weights" / "kontext.safetensors")
    assert config.model.vae == "ae.safetensors"  # not beside the config: a name for ComfyUI's models/vae


def test_command_line_values_stay_relative_to_the_current_folder(tmp_path):
    config_path = _write(tmp_path / "cfg" / "train.yaml", {"data": {"path": "/data/edits"}})
    config = load_config(config_path, {"model.init": "models/lorweb/basis.safetensors", "output_dir": "out"})
    assert config.model.init == "models/lorweb/basis.safetensors"
    assert config.output_dir == "out"


def test_a_backend_options_value_that_is_not_a_mapping_is_refused(tmp_path):
    config_path = _write(tmp_path / "train.yaml", {"data": {"path": "d"}, "model": {"backend_options": [1, 2]}})
    with pytest.raises(LoRWeBError, match="backend_options must be a mapping"):
        load_config(config_path)


def _readme_model_files() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Model files", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| [^|]+ \| `([^`]+\.safetensors)`", table, flags=re.MULTILINE))


def test_the_example_config_loads_and_names_the_readmes_files_as_the_demo_writes_them(tmp_path):
    config = load_config(EXAMPLE)
    model = config.model
    named = {
        "unet": model.diffusion_model,
        "clip_l": model.clip_l,
        "t5": model.t5xxl,
        "vae": model.vae,
        "clip_vision": model.clip_vision,
    }
    assert named == {key: FILES[key][1] for key in named}  # the demo's files carry these names
    assert set(named.values()) <= _readme_model_files()  # the files the README tells users to download
    assert "fp8" in model.diffusion_model and "fp8" in model.t5xxl
    assert config.output_dir == str(EXAMPLE.parent / "output" / "my_basis")  # beside the config, not the cwd


def test_the_script_trains_from_another_folder_with_the_configs_relative_paths(tmp_path):
    project = tmp_path / "project"
    write_pairs(project / "edits", 2, seed=4)
    document = training_config(project, Path("edits"), train={"steps": 1, "batch_size": 2})
    document["output_dir"] = "out"
    config_path = _write(project / "train.yaml", document)
    elsewhere = tmp_path / "comfyui"
    elsewhere.mkdir()
    command = [sys.executable, str(ROOT / "scripts" / "train_basis.py"), "--config", str(config_path)]
    env = environment_with_paths() | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_file(str(project / "out" / "tiny_basis.safetensors"))
    assert not any(elsewhere.iterdir())  # nothing written where it was started
