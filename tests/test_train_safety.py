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
from safetensors.torch import load_file, save_file
from train_testing import environment_with_paths, png_header_only, training_config, write_quadruplets

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


# ------------------------------------------------------------------------------------------------ never a broken basis
def no_broken_files(folder: Path) -> list[Path]:
    """Every basis / checkpoint tensor file under ``folder``; each must load and hold only finite values."""
    files = sorted(folder.rglob("*.safetensors"))
    for file in files:
        for name, tensor in load_file(str(file)).items():
            assert bool(torch.isfinite(tensor.float()).all()), f"{file}: {name} holds NaN/Inf"
    assert not list(folder.rglob("*.tmp")), "a half-written file was left behind"
    return files


def test_nan_text_encodings_stop_at_the_cache_naming_the_encoder_and_file(tmp_path):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    config = training_config(tmp_path, tmp_path / "data", model={"backend_options": {"seed": 0, "nan_text": True}})
    result = run_cli(tmp_path, config)
    assert_refused(result, "the text encoder (model.t5xxl, model.clip_l)")
    assert "returned NaN or Inf for example" in result.stderr and "000_a.png" in result.stderr
    assert not list((tmp_path / "out").glob("*.safetensors"))
    no_broken_files(tmp_path / "out")


def test_a_diverging_run_stops_with_a_message_and_writes_no_nan_file(tmp_path):
    """lr 1e30: the first update is finite in float32 but overflows float16 (the save dtype), later ones NaN."""
    write_quadruplets(tmp_path / "data", 2, seed=1)
    config = training_config(tmp_path, tmp_path / "data", train={"steps": 6, "lr": 1e30, "save_every": 1})
    result = run_cli(tmp_path, config)
    assert_refused(result, "NaN or Inf")
    assert "diverged" in result.stderr and "lower train.lr" in result.stderr
    no_broken_files(tmp_path / "out")


def test_a_diverging_run_keeps_the_last_good_checkpoint(tmp_path):
    """Good steps first (checkpointed), then the loss goes NaN: the run stops, the good checkpoint stays newest."""
    write_quadruplets(tmp_path / "data", 2, seed=1)
    config = config_from_mapping(training_config(tmp_path, tmp_path / "data", train={"steps": 6, "save_every": 2}),
                                 "yaml")  # fmt: skip
    trainer = Trainer(config)

    def poison(trainer: Trainer) -> None:
        if trainer.step == 3:  # as a bad batch would: the next loss is NaN
            with torch.no_grad():
                next(iter(trainer.basis.parameters())).fill_(float("nan"))

    with pytest.raises(LoRWeBError, match="diverged"):
        trainer.train(on_step_end=poison)
    assert trainer.latest_checkpoint().name == "step_00000002"
    files = no_broken_files(tmp_path / "out")
    assert any(f.name == "tiny_basis.safetensors" for f in files)


def test_the_loader_says_whether_a_nan_basis_was_trained_here_or_downloaded(tmp_path):
    import lorweb_ops
    from lorweb_ops.basis_format import TRAINER_SOFTWARE

    module = "transformer.transformer_blocks.0.attn.to_q"
    tensors = {
        f"{module}.lora_A": torch.full((2, 4, 1), float("nan")),
        f"{module}.lora_B": torch.zeros(2, 1, 4),
        f"{module}.lora_keys": torch.zeros(2, 3),
        f"{module}.att_lora_to_q.weight": torch.zeros(3, 6),
    }
    trained, downloaded = tmp_path / "trained.safetensors", tmp_path / "downloaded.safetensors"
    save_file(tensors, str(trained), metadata={"software": TRAINER_SOFTWARE, "training_info": '{"step": 40}'})
    save_file(tensors, str(downloaded), metadata={"training_info": '{"step": 40}'})
    with pytest.raises(LoRWeBError, match=r"written by this pack's trainer .*step.*40.*diverged.*lower train.lr"):
        lorweb_ops.load_basis(trained, use_cache=False)
    with pytest.raises(LoRWeBError, match="corrupted. Download it again"):
        lorweb_ops.load_basis(downloaded, use_cache=False)


# ------------------------------------------------------------------------------------------------ hostile values
HUGE = 10**6


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": {"lr": float("inf")}}, "train.lr must be a positive finite number"),
        ({"train": {"lr": float("nan")}}, "train.lr must be a positive finite number"),
        ({"train": {"lr": 0}}, "train.lr must be a positive finite number"),
        ({"train": {"betas": [float("nan"), 0.99]}}, "train.betas must be two numbers within 0..1"),
        ({"train": {"betas": [0.9, 1.0]}}, "train.betas must be two numbers within 0..1"),
        ({"train": {"weight_decay": -0.1}}, "train.weight_decay must be >= 0"),
        ({"network": {"rank": HUGE}}, "rank <= 256"),
        ({"network": {"num_loras": HUGE}}, "num_loras must be <= 1024"),
        ({"network": {"keys_dim": HUGE}}, "keys_dim must be <= 8192"),
        ({"data": {"resolution": HUGE}}, "data.resolution must be at most 4096"),
        ({"train": {"batch_size": HUGE}}, "train.batch_size must be at most 1024"),
        ({"model": {"backend": "train_testing:failing_backend"}}, "failed while loading the model: RuntimeError"),
    ],
)
def test_hostile_values_get_a_message_from_the_cli(tmp_path, sections, message):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    assert_refused(run_cli(tmp_path, training_config(tmp_path, tmp_path / "data", **sections), timeout=120), message)


def test_a_bad_set_value_gets_a_message(tmp_path):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    result = run_cli(tmp_path, training_config(tmp_path, tmp_path / "data"), "--set", "train.lr=[1,")
    assert_refused(result, "the value is not readable YAML")


@pytest.mark.parametrize("side", [30000, 12000])  # PIL's bomb error (> 179 MP), and the pack's 64 MP bound
def test_a_huge_image_is_named_before_it_is_decoded(tmp_path, side):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    png_header_only(tmp_path / "data" / "000_b.png", side, side)
    result = run_cli(tmp_path, training_config(tmp_path, tmp_path / "data"), timeout=120)
    assert_refused(result, "000_b.png is ")
    assert "megapixels a training image may have" in result.stderr


def test_a_basis_too_large_for_the_machine_is_refused_before_it_is_allocated(tmp_path, monkeypatch):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    config = config_from_mapping(training_config(tmp_path, tmp_path / "data"), "yaml")
    monkeypatch.setattr("lorweb_train.trainer._memory_bytes", lambda device: 2**16)  # a 64 KiB machine

    def no_allocation(*args, **kwargs):
        raise AssertionError("the basis was allocated before its size was checked")

    monkeypatch.setattr("lorweb_train.trainer.TrainableBasis", no_allocation)
    with pytest.raises(LoRWeBError, match=r"needs about .* GiB .* Lower network.num_loras"):
        Trainer(config)


# ------------------------------------------------------------------------------------------------ device
def test_device_cpu_trains_and_auto_says_it_uses_the_cpu(tmp_path):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    config = training_config(tmp_path, tmp_path / "data", train={"steps": 1, "batch_size": 2})
    result = run_cli(tmp_path, config, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no CUDA GPU found" not in result.stdout and (tmp_path / "out" / "tiny_basis.safetensors").is_file()
    result = run_cli(tmp_path / "out", config | {"output_dir": str(tmp_path / "auto")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no CUDA GPU found, training on the CPU" in result.stdout


@pytest.mark.parametrize(
    "device, message",
    [("cuda", "torch sees no CUDA GPU"), ("cuda:1", "torch sees no CUDA GPU"), ("tpu", "is not one of")],
)
def test_an_unavailable_or_unknown_device_gets_a_message(tmp_path, device, message):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    assert_refused(run_cli(tmp_path, training_config(tmp_path, tmp_path / "data"), "--device", device), message)


# ------------------------------------------------------------------------------------------------ another run
def test_a_new_run_in_another_runs_folder_and_a_misfit_resume_get_messages(tmp_path):
    write_quadruplets(tmp_path / "data", 1, seed=1)
    config = training_config(tmp_path, tmp_path / "data", train={"steps": 1, "batch_size": 2})
    assert run_cli(tmp_path, config).returncode == 0
    assert_refused(run_cli(tmp_path, config), "already holds another run's checkpoints")
    bigger = training_config(tmp_path, tmp_path / "data", network={"num_loras": 6}, train={"steps": 2})
    assert_refused(run_cli(tmp_path, bigger, "--resume"), "was trained with another network")
