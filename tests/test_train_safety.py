"""The trainer against what users get wrong: where it writes, what it refuses, and that it never writes a broken basis.

Cases that a user meets at the command line run the CLI (``python -m lorweb_train``) in its own process with a
timeout, and check the exit code, the pack's message on stderr and that no traceback is shown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_testing import environment_with_paths, training_config, write_quadruplets

from lorweb_ops.errors import LoRWeBError
from lorweb_train import config as config_module
from lorweb_train.config import config_from_mapping
from lorweb_train.trainer import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only fight over the 2 CI cores
    yield
    torch.set_num_threads(threads)


def run_cli(tmp: Path, config: dict, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m lorweb_train --config <tmp>/train.yaml ARGS`` as a user runs it (CPU, one thread)."""
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "lorweb_train", "--config", str(path), *args]
    env = environment_with_paths() | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "LoRWeB training:" in result.stderr and message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ output_dir
@pytest.mark.parametrize(
    "name",
    ["../x", "/tmp/absolute", "", "a/b", "a\\b", "..", "x..y", "with space", "caf\u00e9", "-dash", "a" * 101, "a\nb"],
)
def test_a_name_that_could_leave_output_dir_is_refused_at_load(tmp_path, name):
    with pytest.raises(LoRWeBError, match="cannot be a file name in output_dir"):
        config_from_mapping(training_config(tmp_path, tmp_path, name=name), "yaml")


def test_plain_names_are_accepted(tmp_path):
    for name in ("my_basis", "v1.2-final", "A" * 100):
        assert config_from_mapping(training_config(tmp_path, tmp_path, name=name), "yaml").name == name


def test_an_output_dir_that_is_a_file_or_under_one_is_refused_at_load(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for output_dir in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(LoRWeBError, match=r"is a file\. Choose another output_dir"):
            config_from_mapping(training_config(tmp_path, tmp_path, output_dir=str(output_dir)), "yaml")


def test_an_unwritable_output_dir_is_a_message_before_the_model_is_loaded(tmp_path, monkeypatch):
    """Root ignores permissions, so the probe's failure is injected (as a read-only or full disk would raise it)."""
    write_quadruplets(tmp_path / "data", 1, seed=1)
    config = config_from_mapping(training_config(tmp_path, tmp_path / "data"), "yaml")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def no_backend(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(config_module.tempfile, "NamedTemporaryFile", refuse)
    monkeypatch.setattr("lorweb_train.trainer.make_backend", no_backend)
    with pytest.raises(LoRWeBError, match=r"output_dir .* is not writable \(Permission denied\)"):
        Trainer(config)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_a_message(tmp_path):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    config = training_config(tmp_path, tmp_path / "data", output_dir=str(locked / "out"))
    assert_refused(run_cli(tmp_path, config), "is not writable")


def test_the_cli_refuses_a_name_outside_output_dir_and_writes_nothing_there(tmp_path):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    config = training_config(tmp_path, tmp_path / "data", name="../escaped")
    assert_refused(run_cli(tmp_path, config), "cannot be a file name in output_dir")
    assert not list(tmp_path.rglob("escaped*")) and not (tmp_path / "out").exists()
