"""What a new user meets first, checked without ComfyUI: the templates' model downloads, the pack's own example
images, one repository address, and the registry's rules for pyproject.toml.

The Missing Models dialog itself is checked in a real front end in tests/host/test_first_hour_in_browser.py;
``comfy node validate`` (comfy-cli) in tests/host/test_registry_validate.py.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import tomllib
from PIL import Image
from workflow_testing import INPUT_IMAGES, MODEL_FILES, ROOT, WORKFLOWS, all_nodes, load_example

sys.path.insert(0, str(ROOT / "scripts"))
import example_inputs  # noqa: E402

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
#: what ComfyUI's front ends (1.27 with ComfyUI 0.3.64, 1.35 with 0.8.0) accept for a download in that dialog
ALLOWED_SOURCES = ("https://civitai.com/", "https://huggingface.co/")
ALLOWED_SUFFIXES = (".safetensors", ".sft")


def _model_entries(workflow: dict) -> dict[str, dict]:
    """file name -> the ``properties.models`` entry of the node whose widget selects it (inside subgraphs too)."""
    entries = {}
    for node in all_nodes(workflow):
        values = {value for value in node.get("widgets_values") or [] if isinstance(value, str)}
        for entry in node.get("properties", {}).get("models", []):
            assert entry["name"] in values, f"{node['type']}: {entry['name']} is not the selected file"
            entries[entry["name"]] = entry
    return entries


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_model_file_has_a_download_the_front_end_accepts(name):
    entries = _model_entries(load_example(name))
    assert set(entries) == set(MODEL_FILES), "every model file of the template, and only those"
    assert len(MODEL_FILES) == 6
    for file_name, entry in entries.items():
        assert entry["directory"] == MODEL_FILES[file_name]
        assert entry["url"].startswith(ALLOWED_SOURCES) and "/resolve/main/" in entry["url"], entry["url"]
        assert entry["name"].endswith(ALLOWED_SUFFIXES)
    urls = [entry["url"] for entry in entries.values()]
    assert len(set(urls)) == len(urls), "the front end shows one row per distinct URL"


def test_every_template_uses_the_same_sources():
    first, *others = (_model_entries(load_example(name)) for name in WORKFLOWS)
    assert len(others) == len(WORKFLOWS) - 1 == 4 and all(entries == first for entries in others)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_load_image_nodes_name_the_packs_example_images(name):
    images = [node["widgets_values"][0] for node in load_example(name)["nodes"] if node["type"] == "LoadImage"]
    assert len(images) == (5 if "two_analogies" in name else 3) and set(images) <= set(INPUT_IMAGES)
    for image in images:
        assert (example_inputs.EXAMPLES_DIR / image).is_file(), image


def test_the_example_images_are_what_the_generator_draws():
    """The committed PNGs come from scripts/example_inputs.py (own code, no third-party pictures)."""
    assert set(example_inputs.EXAMPLES) == set(INPUT_IMAGES)
    for file_name, draw in example_inputs.EXAMPLES.items():
        committed = np.asarray(Image.open(example_inputs.EXAMPLES_DIR / file_name).convert("RGB"), dtype=np.int16)
        drawn = np.asarray(example_inputs.to_image(draw()), dtype=np.int16)
        assert committed.shape == (example_inputs.SIZE, example_inputs.SIZE, 3)
        assert np.abs(committed - drawn).max() <= 1, file_name


def test_the_example_edit_is_visible():
    """a' is a grey sketch of a (not a copy), and b is another scene."""
    a = example_inputs.sailboat_scene()
    a_prime = example_inputs.pencil_sketch(a)
    b = example_inputs.house_scene()
    assert np.abs(a_prime[..., 0] - a_prime[..., 2]).max() == 0  # grey
    assert np.abs(a - a_prime).mean() > 0.2 and np.abs(a - b).mean() > 0.1


def test_install_copies_without_replacing_a_users_file(tmp_path):
    own = tmp_path / "lorweb_b.png"
    Image.new("RGB", (4, 4), "red").save(own)
    before = own.read_bytes()
    report = example_inputs.install(tmp_path)
    assert own.read_bytes() == before and any("kept your own" in line for line in report)
    for name in set(INPUT_IMAGES) - {"lorweb_b.png"}:
        assert (tmp_path / name).read_bytes() == (example_inputs.EXAMPLES_DIR / name).read_bytes()
    assert all("already there" in line or "kept" in line for line in example_inputs.install(tmp_path))


def test_one_repository_address_everywhere():
    urls = PYPROJECT["project"]["urls"]
    repository = urls["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository)
    assert urls["Documentation"].startswith(repository) and urls["Issues"] == repository + "/issues"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"git clone {repository} custom_nodes/comfyui-lorweb" in readme
    addresses = set(re.findall(r"https://github\.com/[\w.-]+/comfyui-lorweb\b", readme))
    assert addresses <= {repository}, addresses
    assert "<this repository>" not in readme


# The Comfy Registry's rules for pyproject.toml (docs.comfy.org, "Registry / pyproject.toml specifications").
REGISTRY_NAME = re.compile(r"[a-z][a-z0-9_.-]*")
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")


def test_pyproject_follows_the_registry_rules():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    name = project["name"]
    assert REGISTRY_NAME.fullmatch(name) and len(name) < 100 and "comfyui" not in name.lower()
    assert SEMVER.fullmatch(project["version"])
    assert project["description"] and project["license"] == {"file": "LICENSE"} and (ROOT / "LICENSE").is_file()
    assert "Repository" in project["urls"]
    assert REGISTRY_NAME.fullmatch(comfy["PublisherId"].lower()) and comfy["DisplayName"]
    assert comfy["requires-comfyui"] == ">=0.3.64"
    assert all(not re.search(r"torch", dependency) for dependency in project.get("dependencies", []))
    for model in comfy.get("Models", []):
        assert model["location"].startswith("/models/") and model["model_url"].startswith("https://huggingface.co/")
