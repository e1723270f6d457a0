"""Training data layouts, grids and the config: what is read, and the message for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from train_testing import training_config, write_pairs, write_quadruplets

from lorweb_ops.errors import LoRWeBError
from lorweb_train.config import TrainingConfig, config_from_mapping, load_config
from lorweb_train.data import load_images, quadrant_size, read_dataset, training_grids


def colour(rgb, size=(20, 20)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def test_reference_layout_cuts_the_control_strip(tmp_path):
    (tmp_path / "control").mkdir()
    (tmp_path / "target").mkdir()
    strip = Image.new("RGB", (60, 20))
    for part, rgb in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
        strip.paste(colour(rgb), (20 * part, 0))
    strip.save(tmp_path / "control" / "x1.png")
    colour((9, 9, 9)).save(tmp_path / "target" / "x1.png")
    (tmp_path / "target" / "x1.txt").write_text("make it dark\n")
    (example,) = read_dataset(tmp_path)
    assert example.instruction == "make it dark" and not example.pair_only
    images = load_images(example)
    assert [images[r].getpixel((5, 5)) for r in ("a", "a_prime", "b", "b_prime")] == [
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9),
    ]  # fmt: skip


def test_quadruplets_from_metadata_and_from_folders(tmp_path):
    kinds = write_quadruplets(tmp_path / "jsonl", 2, seed=0)
    examples = read_dataset(tmp_path / "jsonl")
    assert len(examples) == 4 and kinds == ["invert", "flip"] * 2 and examples[0].instruction == "edit"
    root = tmp_path / "folders"
    for role, rgb in (("a", (1, 1, 1)), ("a_prime", (2, 2, 2)), ("b", (3, 3, 3)), ("b_prime", (4, 4, 4))):
        (root / role).mkdir(parents=True)
        colour(rgb).save(root / role / "s.png")
    (root / "instructions").mkdir()
    (root / "instructions" / "s.txt").write_text("brighten")
    (example,) = read_dataset(root)
    assert example.instruction == "brighten" and load_images(example)["b_prime"].getpixel((0, 0)) == (4, 4, 4)


def test_pairs_become_self_analogies(tmp_path):
    write_pairs(tmp_path, 3, seed=0)
    examples = read_dataset(tmp_path)
    assert len(examples) == 3 and all(e.pair_only for e in examples)
    images = load_images(examples[0])
    assert images["b"].tobytes() == images["a"].tobytes() and images["b_prime"].tobytes() == images["a_prime"].tobytes()


def test_grids_hold_the_quadrants_where_kontext_expects_them():
    images = {role: colour((10 * (i + 1), 0, 0)) for i, role in enumerate(("a", "a_prime", "b", "b_prime"))}
    grids = training_grids(images, resolution=32)
    assert grids["target_0"].size == (32, 32)

    def quadrants(grid):
        return [grid.getpixel(p)[0] for p in ((4, 4), (20, 4), (4, 20), (20, 20))]

    assert quadrants(grids["target_0"]) == [10, 20, 30, 40]
    assert quadrants(grids["control_0"]) == [10, 20, 30, 30]  # b' replaced by b
    assert quadrants(grids["target_1"]) == [20, 10, 40, 30]  # a<->a', b<->b' (also LoRA Reverse's grid)
    assert quadrants(grids["control_1"]) == [20, 10, 40, 40]


def test_quadrant_size_follows_the_resolution_bucket():
    assert quadrant_size(1024, 1024, 512) == (256, 256)
    width, height = quadrant_size(600, 400, 512)
    assert width % 16 == 0 and height % 16 == 0 and abs(4 * width * height / 512**2 - 1) < 0.1


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "does not exist"),
        ("unreadable", "cannot read image"),
        ("sizes", "different sizes"),
        ("bad_json", "not valid JSON"),
        ("missing_key", "missing b_prime"),
    ],
)
def test_bad_data_is_named_with_the_fix(tmp_path, breakage, message):
    write_quadruplets(tmp_path, 2, seed=0)
    metadata = tmp_path / "metadata.jsonl"
    lines = metadata.read_text().splitlines()
    record = json.loads(lines[1])
    if breakage == "missing":
        (tmp_path / record["b"]).unlink()
    elif breakage == "unreadable":
        (tmp_path / record["b"]).write_bytes(b"not a png")
    elif breakage == "sizes":
        colour((0, 0, 0), (40, 32)).save(tmp_path / record["b"])
    elif breakage == "bad_json":
        lines[1] = lines[1][:-3]
    elif breakage == "missing_key":
        del record["b_prime"]
        lines[1] = json.dumps(record)
    metadata.write_text("\n".join(lines) + "\n")
    with pytest.raises(LoRWeBError, match=message) as error:
        read_dataset(tmp_path)
    if breakage in ("missing", "unreadable"):
        assert record["b"] in str(error.value)
    if breakage in ("bad_json", "missing_key"):
        assert "line 2" in str(error.value)


def test_empty_or_unknown_data_folder(tmp_path):
    (tmp_path / "control").mkdir()
    (tmp_path / "target").mkdir()
    with pytest.raises(LoRWeBError, match="no training examples"):
        read_dataset(tmp_path)
    with pytest.raises(LoRWeBError, match="cannot tell the data layout"):
        read_dataset(tmp_path / "control")
    with pytest.raises(LoRWeBError, match="data folder not found"):
        read_dataset(tmp_path / "nowhere")


def test_config_defaults_are_the_reference_recipe(tmp_path):
    config = config_from_mapping({"data": {"path": "x"}}, "yaml")
    net, train = config.network, config.train
    assert (net.num_loras, net.rank, net.keys_dim, net.lora_heads, net.lora_softmax) == (32, 4, 128, 1, True)
    assert (net.query_mode, net.mixing_coeffs_type, net.query_projection_type) == ("cat-aa'b", "mean", "linear")
    assert (train.lr, train.betas, train.weight_decay, train.optimizer) == (1e-3, [0.9, 0.99], 0.05, "adamw8bit")
    assert (train.mixed_precision, train.gradient_checkpointing, train.batch_size, train.steps) == (
        "bf16",
        True,
        6,
        10000,
    )
    assert (config.data.caption_dropout, config.data.resolution, train.save_every) == (0.05, 512, 250)
    assert config.data.swap_probability == 0.5 and train.timestep_weighting == "weighted"


def test_config_refuses_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(LoRWeBError, match=r"unknown config key 'train.learning_rate'.*Known keys"):
        config_from_mapping({"data": {"path": "x"}, "train": {"learning_rate": 1}}, "yaml")
    with pytest.raises(LoRWeBError, match="Did you mean 'network.num_loras'"):
        config_from_mapping({"data": {"path": "x"}, "network": {"num_lora": 4}}, "yaml")
    with pytest.raises(LoRWeBError, match="train.steps must be a int"):
        config_from_mapping({"data": {"path": "x"}, "train": {"steps": "many"}}, "yaml")
    with pytest.raises(LoRWeBError, match="query_mode"):
        config_from_mapping({"data": {"path": "x"}, "network": {"query_mode": "caa'b"}}, "yaml")
    with pytest.raises(LoRWeBError, match="data.path is empty"):
        config_from_mapping({}, "yaml")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(training_config(tmp_path, tmp_path) | {"epochs": 3}))
    with pytest.raises(LoRWeBError, match=f"{path}: unknown config key 'epochs'"):
        load_config(path)
    path.write_text(yaml.safe_dump(training_config(tmp_path, tmp_path)))
    config = load_config(path, {"train.lr": "5e-4"})
    assert isinstance(config, TrainingConfig) and config.train.lr == 5e-4 and config.network.num_loras == 4


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys):
    from lorweb_train.__main__ import main

    path = Path(tmp_path) / "train.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": str(tmp_path)}, "trian": {}}))
    assert main(["--config", str(path)]) == 2
    assert "unknown config key 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: &x [1, 2]\nb: *x\n", "uses YAML aliases"),
        ("train: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper than 32 levels"),
        ("# pad\n" * 60_000, "is larger than 256 kB"),
        ("train: {lr: 1e-3\n", "is not readable YAML"),
    ],
)
def test_a_hostile_training_config_gets_a_bounded_message(tmp_path, text, message):
    from lorweb_train.config import load_config

    path = tmp_path / "train.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LoRWeBError, match=message) as error:
        load_config(path)
    assert len(str(error.value)) < 600 and "run again" in str(error.value)
